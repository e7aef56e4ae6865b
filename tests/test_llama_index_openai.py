"""LlamaIndex's OpenAILike over real HTTP (ScriptedOpenAIServer): memory through its own
clients (openai_llm_with_memory), and every adapter with a real OpenAI-compatible LLM.

llama-index's OpenAI LLM packages pin openai<3: these tests run in the openai 2.x venv."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from _llama_index_support import (
    AGENTS,
    CASES,
    ENGINES,
    FACT,
    PLANTED,
    POISON,
    QUESTION,
    RECALLED,
    Brain,
    DocumentFollowingBrain,
    PoisonedRetriever,
    ReActBrain,
    ScriptedLLM,
    ask,
    flush,
    in_new_process,
    leave_stream_early_every_way,
    lookup_tool,
    scripted_openai_like,
)

from headroom_memory_integrations.errors import InvalidInputError
from headroom_memory_integrations.llama_index import (
    HeadroomChatMemoryBuffer,
    HeadroomMemoryBlock,
    MemoryLLM,
    llm_memory,
    openai_llm_with_memory,
)
from headroom_memory_integrations.openai import MemoryClient, with_fast_memory
from headroom_memory_integrations.testing import Reply

pytestmark = pytest.mark.openai2  # llama-index-llms-openai-like: only in the openai 2.x venv


@pytest.fixture
def brain(openai_server) -> Brain:
    brain = Brain()
    openai_server.responder = brain.responder
    return brain


@pytest.fixture
def http_clients():
    """Makes the sync and async httpx clients of an LLM (closed after the test)."""
    import httpx

    opened: list = []

    def make() -> dict:
        plain_http = {  # the server is http://127.0.0.1: no certificates to load (~0.3 s each)
            "http_client": httpx.Client(verify=False),
            "async_http_client": httpx.AsyncClient(verify=False),
        }
        opened.append(plain_http)
        return plain_http

    yield make
    for clients in opened:
        clients["http_client"].close()
        with contextlib.suppress(RuntimeError):  # its connections' event loop may be gone
            asyncio.run(clients["async_http_client"].aclose())


@pytest.fixture
def plain_llm(openai_server, brain, http_clients):
    def build(**options):
        options = {"is_function_calling_model": True, **options}
        return scripted_openai_like(openai_server.base_url, **http_clients(), **options)

    return build


@pytest.fixture
def memory_llm(plain_llm, db_path, model):
    def build(user: str = "alice", **options):
        return openai_llm_with_memory(
            plain_llm(**options), user_id=user, db_path=db_path, embedder=model
        )

    return build


def assert_no_block(text: str) -> None:
    assert "<memory-" not in text and "</memory" not in text and "category" not in text


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_recalls_through_the_llms_own_memory_clients(kind, mode, memory_llm, brain) -> None:
    first = memory_llm()
    told = ask(kind, first, None, FACT, mode)
    assert told.text.strip() == "Noted."
    assert_no_block(told.all_text())
    flush(llm_memory(first))
    assert [m.text for m in llm_memory(first).get_all()] == [FACT]

    second = memory_llm()
    seen = ask(kind, second, None, QUESTION, mode)
    assert f"{RECALLED} {FACT}" in seen.text
    assert_no_block(seen.all_text())
    assert "<user-memories>" not in "\n".join(str(m.content) for m in seen.history)
    assert "<memory-" in str(brain.requests[-1])  # the instruction went over HTTP


@pytest.fixture
def responses_llm(openai_server, brain, http_clients, db_path, model):
    """LlamaIndex's OpenAIResponses (it calls ``responses.create``) with memory."""
    from llama_index.llms.openai import OpenAIResponses

    def build(user: str = "alice"):
        llm = OpenAIResponses(
            **http_clients(),
            model="gpt-4o-mini",
            api_base=openai_server.base_url,
            api_key="test-key",
            context_window=16000,
        )
        return openai_llm_with_memory(llm, user_id=user, db_path=db_path, embedder=model)

    return build


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_open_ai_responses_recalls_through_its_own_memory_clients(
    kind, mode, responses_llm, openai_server
) -> None:
    first = responses_llm()
    told = ask(kind, first, None, FACT, mode)
    assert told.text.strip() == "Noted."
    assert_no_block(told.all_text())
    flush(llm_memory(first))
    assert [m.text for m in llm_memory(first).get_all()] == [FACT]

    seen = ask(kind, responses_llm(), None, QUESTION, mode)
    assert f"{RECALLED} {FACT}" in seen.text
    assert_no_block(seen.all_text())
    assert openai_server.requests[-1].path == "/v1/responses"


def test_memory_llm_over_open_ai_responses_streams_no_block_in_raw(
    openai_server, brain, http_clients, db_path, model
) -> None:
    """The Responses API's last stream events (text.done, content_part.done, output_item.done,
    completed) carry the whole answer: ``MemoryLLM`` kept them in each chunk's ``raw``, block
    included, where apps read the response id and usage (and agents pass it on)."""
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.llms.openai import OpenAIResponses

    plain = OpenAIResponses(
        **http_clients(),
        model="gpt-4o-mini",
        api_base=openai_server.base_url,
        api_key="test-key",
        context_window=16000,
    )
    llm = MemoryLLM(llm=plain, user_id="alice", db_path=db_path, embedder=model)
    said = [ChatMessage(role="user", content=FACT)]

    async def astream() -> list:
        return [chunk async for chunk in await llm.astream_chat(said)]

    for chunks in (list(llm.stream_chat(said)), asyncio.run(astream())):
        assert chunks[-1].message.content.strip()  # "Noted.", then what it recalls
        assert any(chunk.raw is not None for chunk in chunks[-3:])  # the final events are kept
        for chunk in chunks:
            assert "<memory-" not in repr(chunk.raw) + (chunk.delta or "")
    flush(llm.memory)
    assert [m.text for m in llm.memory.get_all()] == [FACT]


def test_one_store_for_the_sync_and_async_clients(memory_llm) -> None:
    llm = memory_llm()
    assert isinstance(llm._client, MemoryClient) and isinstance(llm._aclient, MemoryClient)
    assert llm._client.memory is llm._aclient.memory is llm_memory(llm)
    assert "test-key" not in repr(llm._client) + repr(llm._aclient)


def test_reuse_client_false_is_switched_with_a_warning(memory_llm, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="headroom_memory_integrations"):
        llm = memory_llm(reuse_client=False)
    assert "reuse_client=False" in caplog.text and "bypass" in caplog.text
    assert llm.reuse_client is True
    assert llm._get_client() is llm._client  # every call goes through the memory client
    ask("simple", llm, None, FACT, "astream")
    flush(llm_memory(llm))
    assert [m.text for m in llm_memory(llm).get_all()] == [FACT]


def test_an_llm_built_on_wrapped_clients_is_checked_and_kept(
    openai_server, plain_llm, db_path, model
) -> None:
    sync = with_fast_memory(openai_server.client(), "alice", db_path, embedder=model)
    llm = plain_llm(openai_client=sync, reuse_client=False)
    assert openai_llm_with_memory(llm) is llm
    assert llm._client is sync and llm._aclient.memory is sync.memory  # async added, one store
    asyncio.run(llm.achat([_user(FACT)]))
    flush(sync.memory)
    assert [m.text for m in sync.memory.get_all()] == [FACT]

    other = with_fast_memory(openai_server.async_client(), "alice", db_path, embedder=model)
    with pytest.raises(InvalidInputError, match="different stores"):
        openai_llm_with_memory(plain_llm(openai_client=sync, async_openai_client=other))
    with pytest.raises(InvalidInputError, match="no store options"):
        openai_llm_with_memory(plain_llm(openai_client=sync), user_id="alice")


def test_other_llms_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="wrap any other LLM in MemoryLLM"):
        openai_llm_with_memory(ScriptedLLM())


def _user(text: str):
    from llama_index.core.base.llms.types import ChatMessage

    return ChatMessage(role="user", content=text)


# -- the other adapters with a real OpenAI-compatible LLM over HTTP ---------------------------


def _adapter(path: str, llm, user: str, db_path, model):
    """(the engine's LLM, the engine's memory, the user's store) for one adapter."""
    store = {"user_id": user, "db_path": db_path, "embedder": model}
    if path == "buffer":
        memory = HeadroomChatMemoryBuffer.from_defaults(llm=llm, **store)
        return llm, memory, memory.memory
    if path == "block":
        from llama_index.core.memory import Memory

        block = HeadroomMemoryBlock(llm=llm, **store)
        memory = Memory.from_defaults(session_id=str(uuid.uuid4()), memory_blocks=[block])
        return llm, memory, block.memory
    wrapped = MemoryLLM(llm=llm, **store)
    return wrapped, None, wrapped.memory


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("path", ["buffer", "block", "memory_llm"])
def test_every_adapter_over_http(path, kind, plain_llm, db_path, model) -> None:
    mode = "stream" if kind in AGENTS else "astream"
    llm, memory, store = _adapter(path, plain_llm(), "alice", db_path, model)
    assert ask(kind, llm, memory, FACT, mode).text.strip() == "Noted."
    flush(store)
    assert [m.text for m in store.get_all()] == [FACT]

    llm, memory, store = _adapter(path, plain_llm(), "alice", db_path, model)
    seen = ask(kind, llm, memory, QUESTION, mode)
    assert f"{RECALLED} {FACT}" in seen.text
    assert_no_block(seen.all_text())
    flush(store)  # before the server goes away

    llm, memory, store = _adapter(path, plain_llm(), "bob", db_path, model)
    assert RECALLED not in ask(kind, llm, memory, QUESTION, mode).text  # two users, isolated
    flush(store)


@pytest.mark.parametrize("kind", AGENTS)
@pytest.mark.parametrize("path", ["buffer", "block", "memory_llm", "openai_clients"])
def test_a_memory_outage_is_counted_once_per_agent_turn(
    path, kind, plain_llm, brain, model, caplog
) -> None:
    """With the Chroma server down, an agent's turn answers without memories and counts one
    ``inject_failures``, however often the agent asks for memories in it (after its tool call,
    and once more after it has put its answer), logged in one WARNING line without a
    traceback. Before: two or three a turn through the chat memory buffer and the memory
    block, two through MemoryLLM (each later call of the turn recalled anew, failed again and
    was counted again), each with the storage error's traceback at WARNING. (The user's
    message could need a memory: one the gate holds back, such as "What is the weather in
    Oslo?", needs none and counts no outage.)"""
    import logging

    from conftest import closed_server_url

    down = closed_server_url()
    if path == "openai_clients":
        settings = {"user_id": "alice", "db_path": down, "embedder": model}
        llm, memory = openai_llm_with_memory(plain_llm(), **settings), None
        store = llm_memory(llm)
    else:
        llm, memory, store = _adapter(path, plain_llm(), "alice", down, model)
    try:
        with caplog.at_level(logging.WARNING, logger="headroom_memory_integrations"):
            for turn, city in enumerate(["Oslo", "Lyon"], start=1):
                brain.tool_calls.append(("weather", {"city": city}))
                asked = f"Should I pack an umbrella for my trip to {city}?"
                seen = ask(kind, llm, memory, asked, "stream")
                assert seen.text.startswith(f"The tool says sunny in {city}.")  # answered
                assert store.counters["inject_failures"] == turn
        assert any("could not search memories" in r.getMessage() for r in caplog.records)
        assert not [r for r in caplog.records if r.exc_info]  # no traceback at WARNING
    finally:
        store.close(timeout=0)  # its extraction jobs wait for a storage that never comes


def test_a_new_process_recalls_through_the_openai_llm(memory_llm, openai_server, db_path) -> None:
    first = memory_llm()
    ask("simple", first, None, FACT, "sync")
    flush(llm_memory(first))
    out = in_new_process(
        f"""
        from _llama_index_support import QUESTION, ask
        from llama_index.llms.openai_like import OpenAILike
        from headroom_memory_integrations.llama_index import llm_memory, openai_llm_with_memory

        llm = openai_llm_with_memory(
            OpenAILike(model="gpt-4o-mini", api_base={openai_server.base_url!r}, api_key="k",
                       is_chat_model=True, is_function_calling_model=True),
            user_id="alice",
            db_path={str(db_path)!r},
        )
        print(ask("function_agent", llm, None, QUESTION, "stream").text)
        llm_memory(llm).flush(30)
        """
    )
    assert out.splitlines()[-1] == f"{RECALLED} {FACT}"


@pytest.mark.parametrize("method", ["stream_chat", "astream_chat"])
@pytest.mark.parametrize("path", ["openai_clients", "memory_llm"])
def test_a_stream_left_early_over_http_stores_nothing_and_counts_no_fault(
    path, method, memory_llm, plain_llm, db_path, model
) -> None:
    """A stream the caller leaves before its end (``break``, ``close()`` / ``aclose()``, an
    error in its loop) stores nothing and counts no model fault, whether the memory is in the
    LLM's own clients or in MemoryLLM around it; read to its end, the same answer stores."""
    if path == "openai_clients":
        llm = memory_llm()
        memory = llm_memory(llm)
    else:
        llm = MemoryLLM(llm=plain_llm(), user_id="alice", db_path=db_path, embedder=model)
        memory = llm.memory
    leave_stream_early_every_way(llm, method, FACT, ("Not", "Noted."))  # block after "Noted."
    flush(memory)
    assert memory.get_all() == []
    events = memory.stats()["events"]
    assert events.get("missing_blocks", 0) == 0 and events.get("malformed_blocks", 0) == 0

    ask("simple", llm, None, FACT, "stream" if method == "stream_chat" else "astream")
    flush(memory)
    assert [m.text for m in memory.get_all()] == [FACT]


@pytest.mark.parametrize("mode", ["async", "stream"])
@pytest.mark.parametrize("path", ["openai_clients", "memory_llm"])
def test_tool_calls_pass_through_over_http(
    path, mode, memory_llm, plain_llm, brain, db_path, model
) -> None:
    def build():
        if path == "openai_clients":
            return memory_llm()
        return MemoryLLM(llm=plain_llm(), user_id="alice", db_path=db_path, embedder=model)

    llm = build()
    ask("function_agent", llm, None, FACT, mode)
    flush(llm_memory(llm) if path == "openai_clients" else llm.memory)
    brain.tool_calls.append(("weather", {"city": "Oslo"}))
    llm = build()
    seen = ask("function_agent", llm, None, QUESTION, mode)
    assert seen.text == f"The tool says sunny in Oslo. {RECALLED} {FACT}"
    assert_no_block(seen.all_text())
    tool_turn = next(r for r in brain.requests if r[-1]["role"] == "tool")
    assert "<memory-" in str(tool_turn)  # the answer after the tool result had memory too


# -- text the user did not write, over HTTP ----------------------------------------------------


@pytest.mark.parametrize("untrusted", [False, True])
def test_untrusted_context_reaches_the_memory_clients(
    untrusted, openai_server, plain_llm, db_path, model
) -> None:
    from llama_index.core.chat_engine import ContextChatEngine

    openai_server.responder = DocumentFollowingBrain().responder
    llm = openai_llm_with_memory(
        plain_llm(), user_id="alice", db_path=db_path, embedder=model, untrusted_context=untrusted
    )
    ContextChatEngine.from_defaults(retriever=PoisonedRetriever(), llm=llm).chat("Shipping?")
    flush(llm_memory(llm))
    assert [m.text for m in llm_memory(llm).get_all()] == ([] if untrusted else [PLANTED])


def test_untrusted_context_of_the_memory_clients_is_true_or_false(plain_llm, db_path, model):
    with pytest.raises(InvalidInputError, match="True or False, got 'false'"):
        openai_llm_with_memory(
            plain_llm(), user_id="alice", db_path=db_path, embedder=model, untrusted_context="false"
        )


def test_untrusted_context_must_match_clients_given(openai_server, plain_llm, db_path, model):
    sync = with_fast_memory(
        openai_server.client(), "alice", db_path, embedder=model, untrusted_context=True
    )
    llm = openai_llm_with_memory(plain_llm(openai_client=sync), untrusted_context=True)
    assert llm._aclient.memory is sync.memory
    assert llm._aclient._flow.flow.untrusted_context is True  # the added client follows
    plain = with_fast_memory(openai_server.client(), "alice", db_path, embedder=model)
    with pytest.raises(InvalidInputError, match="untrusted_context=True"):
        openai_llm_with_memory(plain_llm(openai_client=plain), untrusted_context=True)


@pytest.mark.parametrize("wrapper", ["MemoryLLM", "openai_llm_with_memory"])
def test_memory_over_http_in_a_react_workflow(wrapper, openai_server, plain_llm, db_path, model):
    from llama_index.core.agent.workflow import AgentWorkflow, ReActAgent

    brain = ReActBrain()
    openai_server.responder = brain.responder
    plain = plain_llm(is_function_calling_model=False)  # AgentWorkflow gives it a ReActAgent
    settings = {"user_id": "alice", "db_path": db_path, "embedder": model}
    if wrapper == "MemoryLLM":
        llm = MemoryLLM(llm=plain, **settings)
        memory = llm.memory
    else:  # the OpenAI memory clients recognise ReAct's observations too
        llm = openai_llm_with_memory(plain, **settings)
        memory = llm_memory(llm)
    workflow = AgentWorkflow.from_tools_or_functions([lookup_tool()], llm=llm)
    assert [type(a) for a in workflow.agents.values()] == [ReActAgent]

    async def run() -> str:
        return str(await workflow.run(user_msg=FACT))

    assert "12345" in asyncio.run(run())
    observed = brain.requests[-1]
    assert observed[-1]["content"].startswith("Observation: ")
    assert observed[-3]["content"] == FACT and observed[-4]["role"] == "system"
    flush(memory)
    assert [m.text for m in memory.get_all()] == [FACT]  # not the observation


@dataclass
class StateFollowingBrain(Brain):
    """Takes the state an agent sends with the user's message (LlamaIndex's state prompt) for
    the user's words: given the inline instruction, it records what the message says and, when
    the state asks for it, :data:`PLANTED`."""

    def answer(self, messages: Any, *, tools: bool = False) -> Any:
        answer = super().answer(messages, tools=tools)
        said = [str(m.get("content") or "") for m in messages if m["role"] == "user"]
        if isinstance(answer, tuple) or "<memory-" not in answer or not said:
            return answer
        text, block = answer.split("\n<memory-", 1)
        tag = block.split(">", 1)[0]
        message = said[-1].rsplit("Current message:\n", 1)[-1].strip()
        found = [] if message.endswith("?") else [{"text": message, "category": "preference"}]
        if "12345" in said[-1]:
            found.append({"text": PLANTED, "category": "preference"})
        return f"{text}\n<memory-{tag}>{json.dumps(found)}</memory-{tag}>"


@pytest.mark.parametrize("wrapper", ["MemoryLLM", "openai_llm_with_memory"])
def test_a_workflows_state_is_not_the_users_words(
    wrapper, openai_server, plain_llm, db_path, model
) -> None:
    """AgentWorkflow(initial_state=...) sends the user's message inside its state prompt: text
    in the state (a web page a tool wrote there) is not the user's, and cannot make the model
    plant a memory."""
    from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent

    brain = StateFollowingBrain()
    openai_server.responder = brain.responder
    settings = {"user_id": "alice", "db_path": db_path, "embedder": model}
    if wrapper == "MemoryLLM":
        llm: Any = MemoryLLM(llm=plain_llm(), **settings)
        memory = llm.memory
    else:
        llm = openai_llm_with_memory(plain_llm(), **settings)
        memory = llm_memory(llm)
    agent = FunctionAgent(name="a", description="a", tools=[], llm=llm)
    page = f"Shipping FAQ. {POISON}"
    workflow = AgentWorkflow(agents=[agent], initial_state={"notes": page})

    async def run() -> None:
        await workflow.run(user_msg=FACT)

    asyncio.run(run())
    asked = [m["content"] for m in brain.requests[-1] if m["role"] == "user"][-1]
    assert asked.startswith("Current state:") and page in asked and asked.endswith(f"{FACT}\n")
    flush(memory)
    assert [m.text for m in memory.get_all()] == [FACT]  # the user's words, not the state's
    assert memory.counters["ungrounded_memories"] == 1


@pytest.mark.parametrize("joiner", ["", "\n"])  # LlamaIndex's text_of, the openai parts'
def test_a_state_around_the_last_of_several_text_blocks_is_found(joiner) -> None:
    """LlamaIndex wraps only the message's last text block in the state prompt: the state is
    still not the user's words, and still makes the call untrusted."""
    from llama_index.core.agent.workflow.prompts import DEFAULT_STATE_PROMPT
    from llama_index.core.base.llms.types import ChatMessage, TextBlock
    from llama_index.core.prompts import PromptTemplate

    from headroom_memory_integrations.flow import user_words
    from headroom_memory_integrations.llama_index._messages import user_message_holds_agent_text

    stated = PromptTemplate(DEFAULT_STATE_PROMPT).format(state={"notes": POISON}, msg=FACT)
    blocks = [TextBlock(text="Hello there,"), TextBlock(text=stated)]
    assert user_words(joiner.join(block.text for block in blocks)) == f"Hello there,{joiner}{FACT}"
    assert user_message_holds_agent_text([ChatMessage(role="user", blocks=blocks)])


@pytest.mark.parametrize("sloppy", ["", "Thought: Python?"])
@pytest.mark.parametrize("wrapper", ["MemoryLLM", "openai_llm_with_memory"])
def test_reacts_retry_prompts_over_http_are_not_the_users_words(
    wrapper, sloppy, openai_server, plain_llm, db_path, model
) -> None:
    from llama_index.core.agent.workflow import ReActAgent
    from test_llama_index_tool_results import OLDER, RetriedReActBrain

    brain = RetriedReActBrain(sloppy=sloppy)
    openai_server.responder = brain.responder
    plain = plain_llm(is_function_calling_model=False)
    settings = {"user_id": "alice", "db_path": db_path, "embedder": model}
    if wrapper == "MemoryLLM":
        llm = MemoryLLM(llm=plain, **settings)
        memory = llm.memory
    else:
        llm = openai_llm_with_memory(plain, **settings)
        memory = llm_memory(llm)
    memory.add(OLDER, category="fact")

    async def run() -> str:
        return str(await ReActAgent(tools=[lookup_tool()], llm=llm).run(user_msg=FACT))

    assert "Python it is." in asyncio.run(run())
    retried = brain.requests[-1]
    assert retried[-1]["content"].startswith(("FAILURE:", "Error while parsing"))
    flush(memory)
    assert sorted(m.text for m in memory.get_all()) == sorted([FACT, OLDER])  # not the retry
    assert retried[-3]["content"] == FACT and OLDER in retried[-4]["content"]  # memory before it
    if wrapper == "MemoryLLM":  # a later call of the turn, learnt from in its first call
        assert "<memory-" not in json.dumps(retried)


@pytest.mark.parametrize("mode", ["sync", "async", "stream", "astream"])
def test_event_handlers_never_see_the_block_of_an_openai_llm(
    mode, plain_llm, brain, db_path, model
) -> None:
    """LlamaIndex's OpenAILike emits its own events with the answer as received: a handler on
    the root dispatcher sees them, with the memory block already cut out."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.llm import (
        LLMChatEndEvent,
        LLMChatInProgressEvent,
    )
    from test_llama_index_llm import Recorder

    recorder = Recorder()
    get_dispatcher().add_event_handler(recorder)
    try:
        llm = MemoryLLM(llm=plain_llm(), user_id="alice", db_path=db_path, embedder=model)
        seen = ask("simple", llm, None, FACT, mode)
        assert seen.text.strip() == "Noted."
        flush(llm.memory)
        assert [m.text for m in llm.memory.get_all()] == [FACT]
        assert "<memory-" in str(brain.requests[-1])  # the model was asked for a block ...
    finally:
        get_dispatcher().event_handlers.remove(recorder)
    answers = [
        e for e in recorder.events if isinstance(e, (LLMChatEndEvent, LLMChatInProgressEvent))
    ]
    assert any(isinstance(e, LLMChatEndEvent) for e in answers)
    if mode in ("stream", "astream"):
        assert any(isinstance(e, LLMChatInProgressEvent) for e in answers)
    for event in answers:  # ... and wrote one, which no handler saw
        assert_no_block(repr(event.response))
    ends = [e.response for e in answers if isinstance(e, LLMChatEndEvent)]
    assert [r.message.content for r in ends] == ["Noted."] * len(ends)


@pytest.mark.parametrize(
    "options",
    [
        {"additional_kwargs": {"response_format": {"type": "json_object"}}},  # JSON mode
        {"logprobs": True, "top_logprobs": 2},  # they would list the block's tokens, unedited
    ],
    ids=["json_mode", "logprobs"],
)
def test_memory_llm_sends_no_instruction_the_wrapped_llms_options_forbid(
    options, plain_llm, openai_server, db_path, model
) -> None:
    # set on the LLM, not in the call: MemoryLLM sees only the call's kwargs otherwise
    from llama_index.core.base.llms.types import ChatMessage

    llm = MemoryLLM(llm=plain_llm(**options), user_id="alice", db_path=db_path, embedder=model)
    llm.memory.add(FACT, category="preference")
    flush(llm.memory)
    answer = llm.chat([ChatMessage(role="user", content=QUESTION)])
    sent = openai_server.requests[-1].body
    assert {key: sent[key] for key in options.get("additional_kwargs", options)}  # sent as set
    system = "\n".join(str(m["content"]) for m in sent["messages"] if m["role"] == "system")
    assert FACT in system  # memories still injected
    assert "<memory-" not in system  # no instruction: the model writes no block
    assert answer.message.content == f"{RECALLED} {FACT}"


def test_memory_llm_follows_what_the_wrapped_llm_really_sends(
    plain_llm, openai_server, db_path, model
) -> None:
    # the OpenAI LLMs send top_logprobs only with logprobs=True, and their additional_kwargs
    # over the call's own options: the instruction follows what goes out, not the settings
    from llama_index.core.base.llms.types import ChatMessage

    told = [ChatMessage(role="user", content=FACT)]
    alone = MemoryLLM(
        llm=plain_llm(top_logprobs=3), user_id="alice", db_path=db_path, embedder=model
    )
    assert alone.chat(told).message.content == "Noted."
    sent = openai_server.requests[-1].body
    assert "logprobs" not in sent and "top_logprobs" not in sent  # none asked for
    assert any("<memory-" in str(m["content"]) for m in sent["messages"] if m["role"] == "system")
    flush(alone.memory)
    assert [m.text for m in alone.memory.get_all()] == [FACT]  # learnt inline

    json_mode = {"response_format": {"type": "json_object"}}
    bob = MemoryLLM(
        llm=plain_llm(additional_kwargs=json_mode), user_id="bob", db_path=db_path, embedder=model
    )
    bob.chat(told, response_format={"type": "text"})
    sent = openai_server.requests[-1].body
    assert sent["response_format"] == {"type": "json_object"}  # the LLM's own option won
    assert not any("<memory-" in str(m["content"]) for m in sent["messages"])


def test_extraction_through_an_llm_with_memory_goes_around_its_memory(
    memory_llm, plain_llm, brain, openai_server, db_path, model
) -> None:
    """Bob's buffer extracting with Alice's LLM (as ``llm=`` or ``Settings.llm``): the call
    must not carry Alice's memories, and what it finds is Bob's."""
    from llama_index.core.chat_engine import SimpleChatEngine

    alice_llm = memory_llm("alice")
    alice = llm_memory(alice_llm)
    alice.add("Prefers Go for backend work", category="preference")
    bob = HeadroomChatMemoryBuffer.from_defaults(
        user_id="bob", db_path=db_path, embedder=model, token_limit=3000, llm=alice_llm
    )
    SimpleChatEngine.from_defaults(llm=plain_llm(), memory=bob).chat(FACT)
    flush(bob.memory)
    flush(alice)
    extractions = [
        r.body for r in openai_server.requests if "You maintain long-term memory" in str(r.body)
    ]
    assert len(extractions) == 1 and brain.extractions == 1
    assert "Prefers Go" not in str(extractions[0])  # none of Alice's memories
    assert "<memory-" not in str(extractions[0])  # nor the inline instruction
    assert [m.text for m in bob.memory.get_all()] == [FACT]
    assert [m.text for m in alice.get_all()] == ["Prefers Go for backend work"]
    assert llm_memory(alice_llm) is alice  # the LLM itself keeps its memory


def test_extraction_does_not_continue_the_llms_stored_conversation(
    openai_server, db_path, model
) -> None:
    """An OpenAIResponses LLM that tracks its previous response: the extraction call is no
    turn of that conversation (it may be another user's), and leaves its chain as it was."""
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAIResponses

    from headroom_memory_integrations.testing import MemoryFollowingModel

    openai_server.responder = MemoryFollowingModel()
    llm = OpenAIResponses(
        model="gpt-4o-mini",
        api_base=openai_server.base_url,
        api_key="sk-x",
        track_previous_responses=True,
    )
    llm.chat([ChatMessage(role="user", content="Hello there")])
    chain = llm._previous_response_id
    assert chain
    buffer = HeadroomChatMemoryBuffer.from_defaults(
        user_id="bob", db_path=db_path, embedder=model, token_limit=3000, llm=llm
    )
    before = len(openai_server.requests)
    buffer.put(ChatMessage(role="user", content=FACT))
    buffer.put(ChatMessage(role="assistant", content="Noted."))
    flush(buffer.memory)
    extraction = [r.body for r in openai_server.requests[before:]]
    assert len(extraction) == 1
    assert extraction[0].get("previous_response_id") is None and not extraction[0].get("store")
    assert llm._previous_response_id == chain
    assert [m.text for m in buffer.memory.get_all()] == ["Prefers Python for backend work"]


@pytest.mark.parametrize("responses_api", [False, True], ids=["chat-completions", "responses"])
def test_an_extraction_answer_cut_at_the_output_limit_is_dead_lettered_at_once(
    openai_server, http_clients, db_path, model, caplog, responses_api
) -> None:
    """The extracting LLM's answer was cut off at the model's output limit (finish_reason
    "length"; the Responses API's incomplete "max_output_tokens"): one call, the job
    dead-lettered as ExtractionCutOff, nothing of the cut list stored (before: read as
    malformed and asked 5 times)."""
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAIResponses

    cut = '{"memories": [{"text": "Prefers Python for backend work", "category": "pref'
    openai_server.responder = lambda body: Reply.text(cut, finish_reason="length")
    if responses_api:
        llm = OpenAIResponses(
            model="gpt-4o-mini", api_base=openai_server.base_url, api_key="sk-x", max_retries=0
        )
    else:
        llm = scripted_openai_like(openai_server.base_url, **http_clients(), max_retries=0)
    caplog.set_level("WARNING", logger="headroom_memory_integrations")
    buffer = HeadroomChatMemoryBuffer.from_defaults(
        user_id="bob", db_path=db_path, embedder=model, token_limit=3000, llm=llm
    )
    buffer.put(ChatMessage(role="user", content=FACT))
    buffer.put(ChatMessage(role="assistant", content="Noted."))
    flush(buffer.memory)
    assert len([r for r in openai_server.requests if r.body]) == 1
    assert buffer.memory.get_all() == []
    assert buffer.memory.stats()["background"]["failed"] == 1
    [warning] = [r for r in caplog.records if "ExtractionCutOff" in r.getMessage()]
    assert "dead-lettered" in warning.getMessage()
