"""Tests for RollingWindowTransform: budget, pinning, tool-call pairing, counting, errors."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headroom_memory_integrations.errors import InvalidInputError
from headroom_memory_integrations.transforms import (
    MESSAGE_OVERHEAD,
    TOOL_CALL_OVERHEAD,
    RollingWindowTransform,
    estimate_tokens,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_OFFLINE_TIKTOKEN = bool(
    importlib.util.find_spec("tiktoken") and importlib.util.find_spec("llama_index")
)
needs_tiktoken = pytest.mark.skipif(
    not HAS_OFFLINE_TIKTOKEN, reason="needs tiktoken and llama-index-core's cached encodings"
)
Msg = dict[str, Any]
PINNED_ROLES = ("system", "developer")


def words(text: str) -> int:
    """A predictable custom counter: one token per whitespace-separated word."""
    return len(text.split())


def user(text: str) -> Msg:
    return {"role": "user", "content": text}


def assistant(text: str) -> Msg:
    return {"role": "assistant", "content": text}


def tool_group(call_ids: list[str], result: str = "ok") -> list[Msg]:
    calls = [
        {"id": cid, "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        for cid in call_ids
    ]
    results = [{"role": "tool", "tool_call_id": cid, "content": result} for cid in call_ids]
    return [{"role": "assistant", "content": None, "tool_calls": calls}, *results]


def run_python(code: str, env: dict[str, str]) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter with ``env``; it must print one JSON line."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- property-based: random conversations with tool-call groups -------------------------


@st.composite
def conversations(draw: st.DrawFn) -> list[Msg]:
    ids = iter(range(10**6))
    texts = st.text(max_size=40) | st.lists(st.sampled_from(["alpha", "beta", "42"]), max_size=30)

    def text() -> str:
        body = draw(texts)
        return f"#{next(ids)} " + (body if isinstance(body, str) else " ".join(body))

    msgs: list[Msg] = [
        {"role": draw(st.sampled_from(["system", "developer"])), "content": text()}
        for _ in range(draw(st.integers(0, 2)))
    ]
    if draw(st.booleans()):
        msgs.append(assistant(text()))  # a greeting before the first user turn
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            msgs.append(user(text()))
        else:
            parts: list[Msg] = [{"type": "text", "text": text()}]
            parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}})
            msgs.append({"role": "user", "content": parts})
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["reply", "tools", "function", "system"]))
            if kind == "reply":
                msgs.append(assistant(text()))
            elif kind == "tools":
                n_calls = draw(st.integers(1, 3))
                msgs.extend(tool_group([f"call_{next(ids)}" for _ in range(n_calls)], text()))
            elif kind == "function":
                call = {"name": "legacy", "arguments": json.dumps({"q": text()})}
                msgs.append({"role": "assistant", "content": None, "function_call": call})
                msgs.append({"role": "function", "name": "legacy", "content": text()})
            else:
                msgs.append({"role": "system", "content": text()})
    return msgs


def assert_calls_paired(result: list[Msg]) -> None:
    for i, m in enumerate(result):
        if m["role"] == "tool":
            j = i - 1
            while j >= 0 and result[j]["role"] == "tool":
                j -= 1
            assert j >= 0, "orphan tool message at the start of the window"
            call_ids = {c["id"] for c in result[j].get("tool_calls") or []}
            assert m["tool_call_id"] in call_ids, "tool message without its call"
        if m["role"] == "function":
            assert i > 0 and result[i - 1].get("function_call"), "orphan function message"
        if m.get("tool_calls"):
            answered = set()
            for follower in result[i + 1 :]:
                if follower["role"] != "tool":
                    break
                answered.add(follower["tool_call_id"])
            assert answered == {c["id"] for c in m["tool_calls"]}, "tool call without results"
        if m.get("function_call"):
            assert i + 1 < len(result) and result[i + 1]["role"] == "function"


def is_subsequence(small: list[Msg], big: list[Msg]) -> bool:
    it = iter(big)
    return all(any(s == b for b in it) for s in small)


@needs_tiktoken
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.integers(1, 400), st.booleans())
def test_random_conversations_fit_and_keep_invariants(
    msgs: list[Msg], max_tokens: int, keep_system: bool
) -> None:
    transform = RollingWindowTransform(max_tokens, keep_system=keep_system)
    snapshot = copy.deepcopy(msgs)
    result = transform.apply(msgs)

    assert msgs == snapshot  # caller's list and dicts untouched
    assert all(r is not m for r in result for m in msgs)  # new dicts
    assert is_subsequence(result, msgs)  # order preserved, nothing invented
    assert_calls_paired(result)

    n_pinned = 0
    while keep_system and n_pinned < len(msgs) and msgs[n_pinned]["role"] in PINNED_ROLES:
        n_pinned += 1
    pinned = msgs[:n_pinned]
    assert result[:n_pinned] == pinned  # leading system/developer messages kept

    last = len(msgs)  # the newest atomic unit: last message, plus the call its results answer
    while last > n_pinned and msgs[last - 1]["role"] in ("tool", "function"):
        last -= 1
    newest = msgs[max(last - 1, n_pinned) :]
    user_idx = [i for i in range(n_pinned, len(msgs)) if msgs[i]["role"] == "user"]
    latest_user = [msgs[user_idx[-1]]] if user_idx else []
    if latest_user:
        assert latest_user[0] in result  # the latest user message is always kept
    if transform.count(msgs) <= max_tokens:
        assert result == msgs
    if transform.count(result) > max_tokens:  # the one documented over-budget case
        assert result == pinned + (latest_user or newest)
        assert transform.count(pinned + (latest_user or newest)) > max_tokens
    extra = [] if not latest_user or latest_user[0] in newest else latest_user
    if newest and transform.count(pinned + extra + newest) <= max_tokens:
        assert result[-len(newest) :] == newest  # the newest turn is kept when it can be
    if result != msgs and latest_user:  # something dropped: start at a turn boundary
        assert result[n_pinned]["role"] in ("user", "system", "developer")


# --- deterministic behaviour (word counter for exact arithmetic) -------------------------


def test_keyword_usage_on_a_long_conversation() -> None:
    long = [{"role": "system", "content": "You are helpful."}]
    for i in range(300):
        long += [user(f"question {i} " * 20), assistant(f"answer {i} " * 40)]
    long.append(user("final question"))
    transform = RollingWindowTransform(max_tokens=4000)
    result = transform.apply(long)
    assert transform.count(result) <= 4000 < transform.count(long)
    assert result[0] == long[0] and result[-1] == long[-1]
    assert result[1]["role"] == "user"
    assert RollingWindowTransform(4000).apply(long) == result  # positional form too


def test_drops_oldest_turns_and_starts_at_a_user_message() -> None:
    msgs = [
        {"role": "system", "content": "s"},
        user("u1"),
        assistant("a1"),
        user("u2 " * 6),
        assistant("a2"),
        user("u3"),
        assistant("a3"),
    ]
    # costs with words(): system 5, u1/a1/a2/u3/a3 5 each, u2 10 -> 40 in all
    transform = RollingWindowTransform(20, token_counter=words)
    assert transform.count(msgs) == 40
    # 15 left after the system prompt: a2 + u3 + a3 fit, but a2 would dangle -> dropped
    assert transform.apply(msgs) == [msgs[0], msgs[5], msgs[6]]
    assert RollingWindowTransform(30, token_counter=words).apply(msgs) == [msgs[0], *msgs[3:]]


def test_tool_call_group_is_kept_or_dropped_whole() -> None:
    group = tool_group(["c1", "c2"], result="r")
    msgs = [user("q1"), *group, assistant("done"), user("q2"), assistant("fine")]
    transform = RollingWindowTransform(100, token_counter=words)
    group_cost = transform.count(group)
    assert group_cost == 3 * MESSAGE_OVERHEAD + 2 * (TOOL_CALL_OVERHEAD + 2) + 2
    tight = RollingWindowTransform(transform.count(msgs) - 1, token_counter=words)
    assert tight.apply(msgs) == msgs[5:]  # q1 gone -> group and reply dangle, window at q2
    first_turn = msgs[:5]  # q1 is the latest user message: the group must not be split
    cut = RollingWindowTransform(transform.count(first_turn) - 1, token_counter=words)
    assert cut.apply(first_turn) == [msgs[0], msgs[4]]


def test_a_custom_tool_calls_input_costs_what_function_arguments_do() -> None:
    """Chat Completions' custom tools send free-form ``input`` instead of JSON ``arguments``:
    a long input counts, so the window drops it when it does not fit."""
    text = "print(1) " * 300
    custom = {"id": "c1", "type": "custom", "custom": {"name": "run", "input": text}}
    function = {"id": "c1", "type": "function", "function": {"name": "run", "arguments": text}}
    transform = RollingWindowTransform(100, token_counter=words)
    calls = [
        {"role": "assistant", "content": None, "tool_calls": [call]} for call in (custom, function)
    ]
    assert transform.count([calls[0]]) == transform.count([calls[1]]) > 300
    msgs = [user("q1"), calls[0], {"role": "tool", "tool_call_id": "c1", "content": "1"}]
    msgs += [assistant("done"), user("q2")]
    assert transform.apply(msgs) == msgs[4:]  # the call, its result and the reply dangle


def test_latest_user_message_is_kept_even_over_budget() -> None:
    msgs = [{"role": "system", "content": "rules"}, user("old"), user("huge " * 50)]
    transform = RollingWindowTransform(10, token_counter=words)
    result = transform.apply(msgs)
    assert result == [msgs[0], msgs[2]]
    assert transform.count(result) > 10  # documented: no truncation, never empty


def test_too_big_latest_turn_keeps_its_question_and_newest_fitting_units() -> None:
    msgs = [user("q1"), assistant("a1"), user("q2"), *tool_group(["c"], "x " * 80), assistant("a")]
    result = RollingWindowTransform(15, token_counter=words).apply(msgs)
    assert result == [msgs[2], msgs[-1]]


def test_keep_system_false_and_later_system_messages_age_out() -> None:
    msgs = [{"role": "system", "content": "s"}, user("u1"), {"role": "system", "content": "m"}]
    msgs += [user("u2"), assistant("a2")]
    assert RollingWindowTransform(10, token_counter=words, keep_system=False).apply(msgs) == [
        msgs[3],
        msgs[4],
    ]
    assert RollingWindowTransform(15, token_counter=words).apply(msgs) == [msgs[0], *msgs[3:]]


def test_edge_conversations() -> None:
    transform = RollingWindowTransform(5, token_counter=words)
    assert transform.apply([]) == []
    only_system = [{"role": "system", "content": "a b c d e f"}]
    assert transform.apply(only_system) == only_system  # pinned, even over budget
    no_user = [assistant("one"), assistant("two three four five six")]
    assert transform.apply(no_user) == [no_user[1]]  # newest unit kept anyway
    assert transform.apply(tuple(no_user[:1])) == no_user[:1]


def test_content_parts_and_names_are_counted() -> None:
    transform = RollingWindowTransform(100, token_counter=words, media_tokens=7)
    parts = [
        {"type": "text", "text": "two words"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "refusal", "refusal": "no"},
    ]
    msg = {"role": "user", "name": "bob", "content": parts}
    assert transform.count([msg]) == MESSAGE_OVERHEAD + 2 + 7 + 1 + (1 + 1)


# --- token counting ----------------------------------------------------------------------


@needs_tiktoken
def test_default_counter_is_offline_tiktoken() -> None:
    transform = RollingWindowTransform(max_tokens=100)
    assert transform.counter_name in ("tiktoken:o200k_base", "tiktoken:cl100k_base")
    assert transform.counter_name in repr(transform)
    assert transform.token_counter("hello world") == 2
    assert transform.count([user("hello world")]) == MESSAGE_OVERHEAD + 2
    assert transform.count([user("a <|endoftext|> b")]) > MESSAGE_OVERHEAD  # no special error


@needs_tiktoken
def test_encoding_loads_with_network_blocked_and_restores_env(tmp_path: Path) -> None:
    out = run_python(
        """
        import json, os, sys, time
        def no_network(event, args):
            if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
                raise RuntimeError("network access attempted: " + event)
        sys.addaudithook(no_network)
        from headroom_memory_integrations.transforms import RollingWindowTransform
        start = time.perf_counter()
        t = RollingWindowTransform(max_tokens=50)
        print(json.dumps({"name": t.counter_name, "secs": time.perf_counter() - start,
                          "hello": t.token_counter("hello world"),
                          "env": os.environ.get("TIKTOKEN_CACHE_DIR")}))
        """,
        {"TIKTOKEN_CACHE_DIR": str(tmp_path), "TMPDIR": str(tmp_path)},
    )
    assert out["name"] == "tiktoken:o200k_base" and out["hello"] == 2
    assert out["secs"] < 5 and out["env"] == str(tmp_path)


def test_falls_back_to_estimate_without_tiktoken_or_cache(tmp_path: Path) -> None:
    code = """
        import json
        from headroom_memory_integrations.transforms import RollingWindowTransform
        t = RollingWindowTransform(max_tokens=50)
        print(json.dumps({"name": t.counter_name, "hello": t.token_counter("hello world")}))
        """
    shadow = tmp_path / "shadow"  # stand-ins that hide the real packages in a child process
    (shadow / "tiktoken").mkdir(parents=True)
    (shadow / "tiktoken" / "__init__.py").write_text("raise ImportError('hidden')\n")
    (shadow / "llama_index").mkdir()
    (shadow / "llama_index" / "__init__.py").write_text("")
    empty = {"TIKTOKEN_CACHE_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}
    no_tiktoken = run_python(code, {**empty, "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"})
    assert no_tiktoken == {"name": "estimate:ceil(utf8_bytes/3)", "hello": 4}
    shutil.rmtree(shadow / "tiktoken")  # real tiktoken, but no cached encoding anywhere
    no_cache = run_python(code, {**empty, "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"})
    assert no_cache == no_tiktoken


def test_import_is_light() -> None:
    out = run_python(
        """
        import json, sys
        import headroom_memory_integrations
        before = set(sys.modules)
        import headroom_memory_integrations.transforms
        new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in
                     ("tiktoken", "tiktoken_ext", "llama_index"))
        print(json.dumps({"new": new}))
        """,
        {},
    )
    assert out["new"] == []


def test_estimate_and_custom_counter() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("hello world") == 4
    assert estimate_tokens("日本") == 2  # 6 UTF-8 bytes
    transform = RollingWindowTransform(max_tokens=10, token_counter=words)
    assert transform.counter_name == "custom:words" and "custom:words" in repr(transform)
    assert transform.count([user("one two three")]) == MESSAGE_OVERHEAD + 3


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -5, 1.5, "10", True, None])
def test_bad_max_tokens(bad: Any) -> None:
    with pytest.raises(InvalidInputError, match="max_tokens"):
        RollingWindowTransform(bad)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "hello",
        {"role": "user", "content": "hi"},
        ["hi"],
        [{"content": "no role"}],
        [{"role": "", "content": "x"}],
        [{"role": 3, "content": "x"}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [7]}],
    ],
)
def test_bad_messages(bad: Any) -> None:
    transform = RollingWindowTransform(10, token_counter=words)
    with pytest.raises(ValueError):
        transform.apply(bad)
    with pytest.raises(InvalidInputError):
        transform.count(bad)


def test_bad_options() -> None:
    with pytest.raises(InvalidInputError):
        RollingWindowTransform(10, token_counter="not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        RollingWindowTransform(10, media_tokens=-1)


@pytest.mark.openai_client
def test_the_openai_sdks_message_objects_are_read_as_dicts(openai_server) -> None:
    """OpenAI's function-calling guide appends the answer's message object to the history."""
    from headroom_memory_integrations.testing import Reply

    openai_server.script(Reply.tool_call("get_weather", {"city": "Oslo"}), Reply.text("Sunny."))
    client = openai_server.client()
    messages: list[Any] = [user("Weather in Oslo?")]
    call = client.chat.completions.create(model="gpt-4o", messages=messages).choices[0].message
    messages += [call, {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny"}]
    client.chat.completions.create(model="gpt-4o", messages=messages)  # the SDK takes it too
    transform = RollingWindowTransform(4000, token_counter=words)
    kept = transform.apply(messages)
    assert kept == [messages[0], call.model_dump(exclude_none=True), messages[2]]
    assert kept[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert transform.count(messages) == transform.count(kept)
    # the call and its result are one unit: kept or dropped whole
    small = RollingWindowTransform(transform.count(messages[:1]), token_counter=words)
    assert small.apply([*messages, user("And tomorrow?")]) == [user("And tomorrow?")]
    with pytest.raises(InvalidInputError, match=r"messages\[0\] must be a dict"):
        transform.apply([object()])


def test_the_sdks_objects_inside_a_dict_are_counted_as_their_dumps() -> None:
    """The common tutorial pattern puts the SDK's tool call objects in a dict
    (``{"role": "assistant", "tool_calls": message.tool_calls}``): a call with 14,000 tokens of
    arguments counted as a few, so the window kept history far over its budget. The same for
    a ``function_call`` object and content part objects."""
    from openai.types.chat import ChatCompletionMessage, ChatCompletionMessageToolCall
    from openai.types.chat.chat_completion_message import FunctionCall

    arguments = json.dumps({"code": "print('hello world')\n" * 300})
    sdk_call = ChatCompletionMessageToolCall(
        id="c1", type="function", function={"name": "run", "arguments": arguments}
    )
    transform = RollingWindowTransform(1000, token_counter=words)
    as_objects = {"role": "assistant", "content": None, "tool_calls": [sdk_call]}
    as_dicts = {**as_objects, "tool_calls": [sdk_call.model_dump(exclude_none=True)]}
    assert transform.count([as_objects]) == transform.count([as_dicts]) > 300
    function = FunctionCall(name="run", arguments=arguments)
    legacy = {"role": "assistant", "content": None, "function_call": function}
    assert transform.count([legacy]) == transform.count(
        [{**legacy, "function_call": function.model_dump()}]
    )
    assert transform.count([legacy]) == transform.count([as_objects])
    message = ChatCompletionMessage(role="assistant", content="Done.")
    history = [
        user("Write and run a long script."),
        as_objects,
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        message,
        user("Thanks, now something else."),
    ]
    assert RollingWindowTransform(200, token_counter=words).apply(history) == [
        user("Thanks, now something else.")
    ]


def test_a_refusal_is_counted() -> None:
    """An assistant message that refused carries its text in ``refusal`` (the SDK's
    ``ChatCompletionMessage``, sent back with the history): counted as a refusal part is."""
    from openai.types.chat import ChatCompletionMessage

    text = "I can't help with that request, because it asks for something harmful. " * 20
    transform = RollingWindowTransform(1000, token_counter=words)
    as_field = ChatCompletionMessage(role="assistant", content=None, refusal=text)
    as_part = {"role": "assistant", "content": [{"type": "refusal", "refusal": text}]}
    assert (
        transform.count([as_field]) == transform.count([as_part]) == MESSAGE_OVERHEAD + words(text)
    )
    assert transform.count([{"role": "assistant", "content": "No.", "refusal": None}]) == (
        MESSAGE_OVERHEAD + 1
    )


LONG_FACT = (
    "Works as a backend engineer at a fintech startup in Berlin, where the team builds payment "
    "reconciliation services in Python with PostgreSQL and Kafka, deploys on Kubernetes and is "
    "moving from a monolith to services; prefers typed code, thorough tests, small pull "
    "requests and written design documents before any larger change, and reviews code each "
    "morning before the stand-up at ten, often with a coffee from the café near the station."
)


@needs_tiktoken
@pytest.mark.openai_client
def test_the_room_the_docs_leave_for_the_memory_prompt_is_enough(openai_server, tmp_path) -> None:
    """The window counts only the messages it is given; with_fast_memory adds its prompt after
    it. The README and the class's docstring say how much room to leave: about 450 tokens with
    top_k=5 and short memories, up to 1,000 with long ones."""
    from conftest import HashEmbedder

    from headroom_memory_integrations.openai import with_fast_memory

    transform = RollingWindowTransform(3000)
    question = [user("which backend language and database do I use at work")]
    short = [
        "Uses Python as backend language at work",
        "Uses PostgreSQL database at work",
        "Works at a fintech startup on the backend team",
        "Prefers Python for backend work",
        "Backend work at work uses Kafka queues",
    ]
    for facts, room in ((short, 500), ([f"{i}. {LONG_FACT}" for i in range(5)], 1000)):
        client = with_fast_memory(
            openai_server.client(),
            user_id="dana",
            db_path=tmp_path / str(room),
            embedder=HashEmbedder(),
            min_score=0.0,
        )
        for fact in facts:
            client.memory.add(fact, category="fact")
        client.chat.completions.create(model="gpt-4o", messages=transform.apply(question))
        sent = openai_server.requests[-1].body["messages"]
        injected = sent[0]["content"]
        assert sum(fact in injected for fact in facts) == 5  # all five, and the instruction
        assert "<memory-" in injected
        assert room // 2 < transform.count(sent) - transform.count(question) <= room
        client.close()
