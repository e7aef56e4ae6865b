"""with_memory: responses untouched, each turn extracted once by a separate call, durably."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from typing import Any

import pytest
from _reliability_support import embeds_now, wait_for, wrapped_for

from headroom_memory_integrations import StorageError
from headroom_memory_integrations.jobs import Backoff
from headroom_memory_integrations.openai import with_memory
from headroom_memory_integrations.testing import Reply

pytestmark = pytest.mark.openai_client

FAST = Backoff(initial=0.01, factor=2.0, maximum=0.05, jitter=0.0)
EXTRACTED = json.dumps(
    {"memories": [{"text": "Prefers Python for backend work", "category": "preference"}]}
)


def is_extraction(body: dict) -> bool:
    return "You maintain long-term memory" in body["messages"][0]["content"]


class Model:
    """Answers chat turns with a fixed text and extraction calls from a script (then EXTRACTED)."""

    def __init__(
        self, answer: str = "Python is a good fit.", extractions: list | None = None
    ) -> None:
        self.answer = answer
        self.extractions = list(extractions or [])
        self.extraction_calls = 0
        self.chat_bodies: list[dict] = []

    def __call__(self, body: dict):
        if is_extraction(body):
            self.extraction_calls += 1
            return self.extractions.pop(0) if self.extractions else Reply.text(EXTRACTED)
        self.chat_bodies.append(body)
        return Reply.text(self.answer, chunk_size=3)


@pytest.fixture
def fake_model(openai_server) -> Model:
    model = Model()
    openai_server.responder = model
    return model


@pytest.fixture
def client(openai_server, db_path, model):
    client = with_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model, retry_backoff=FAST
    )
    yield client
    client.memory.close(timeout=0)  # a job left failing is not retried every 0.05 s for good


@pytest.fixture
def async_client(openai_server, db_path, model):
    client = with_memory(
        openai_server.async_client(),
        user_id="alice",
        db_path=db_path,
        embedder=model,
        retry_backoff=FAST,
    )
    yield client
    client.memory.close(timeout=0)


def ask(client, text: str, **options):
    return client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}], **options
    )


def test_response_untouched_and_memories_extracted_in_the_background(client, fake_model) -> None:
    response = ask(client, "I prefer Python for backend work")
    assert response.choices[0].message.content == "Python is a good fit."
    assert fake_model.chat_bodies[0]["messages"] == [
        {"role": "user", "content": "I prefer Python for backend work"}
    ]  # no instruction, nothing injected (no memories yet)
    assert client.memory.flush(30)
    assert fake_model.extraction_calls == 1
    [memory] = client.memory.get_all()
    assert (memory.text, memory.source.value, memory.user_id) == (
        "Prefers Python for backend work",
        "background",
        "alice",
    )
    ask(client, "Which language should I use?")
    injected = fake_model.chat_bodies[-1]["messages"][0]
    assert injected["role"] == "system" and "Prefers Python" in injected["content"]
    assert "<memory-" not in injected["content"]  # context only, never an instruction


def test_leaving_a_with_block_stores_the_turn_then_closes_the_client(client, fake_model) -> None:
    """``with with_memory(OpenAI()) as client``: the block's turns are extracted and stored
    before the client closes (the extraction answers 0.3 s late, after the block)."""
    fake_model.extractions = [Reply.text(EXTRACTED).delayed(0.3)]
    with client as entered:
        assert entered is client
        ask(client, "I prefer Python for backend work")
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    assert client._wrapped.is_closed()


def test_leaving_an_async_with_block_also_closes_the_background_twin(
    async_client, fake_model
) -> None:
    fake_model.extractions = [Reply.text(EXTRACTED).delayed(0.3)]

    async def chat():
        async with async_client as client:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "I prefer Python"}]
            )
        return client

    client = asyncio.run(chat())
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    (twin,) = client._owned  # the synchronous client extraction ran on
    assert client._wrapped.is_closed() and twin.is_closed()


def test_a_key_rotation_reaches_the_background_twin_and_strands_no_turn(
    async_client, openai_server, fake_model
) -> None:
    """An async client's extraction runs on a synchronous twin made when it was wrapped: a key
    assigned on the memory client goes to the twin too. The turn queued before the rotation
    is extracted (with the new key: the old one may be revoked); the extractor's destination
    fingerprint follows the twin, so turns queued after it carry the new one."""
    from headroom_memory_integrations.openai import client_destination
    from headroom_memory_integrations.writer import queue_path_for, writer_for

    (twin,) = async_client._owned
    writer = writer_for(queue_path_for(async_client.memory))
    extractor = writer._extractors[async_client.memory][-1]
    old = extractor.destination
    assert old == client_destination(twin, None)

    def revoked_old_key(body: dict) -> Reply:
        [sent] = [r for r in openai_server.requests if r.body is body]
        if sent.headers["authorization"] != "Bearer sk-rotated" and is_extraction(body):
            return Reply.error(503, "the old key is being retired")  # retried, not failed
        return fake_model(body)

    openai_server.responder = revoked_old_key

    async def chat(text: str) -> None:
        await async_client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": text}]
        )

    async def rotating() -> None:  # one loop: its pooled connection is not used in another
        await chat("I prefer Python for backend work")
        async_client.api_key = "sk-rotated"  # while the turn is queued
        assert twin.api_key == "sk-rotated" and async_client._wrapped.api_key == "sk-rotated"
        assert extractor.destination == client_destination(twin, None) != old
        await chat("I live in Lisbon")

    asyncio.run(rotating())
    assert async_client.memory.flush(30)
    requests = openai_server.requests
    chats = [r.headers["authorization"] for r in requests if not is_extraction(r.body)]
    assert chats == ["Bearer sk-scripted", "Bearer sk-rotated"]
    assert fake_model.extraction_calls == 2  # the turn queued before the rotation too
    assert len(async_client.memory.get_all()) == 1  # the same memory, extracted twice

    copy = async_client.with_options(timeout=5)
    copy.api_key = "sk-copy"  # a copy's assignment is its own: the twin stays the client's
    assert twin.api_key == "sk-rotated" and async_client.api_key == "sk-rotated"


def test_a_client_is_entered_the_way_it_is_used(openai_server, db_path, model) -> None:
    sync = with_memory(openai_server.client(), user_id="a", db_path=db_path, embedder=model)
    asynchronous = with_memory(
        openai_server.async_client(), user_id="a", db_path=db_path, embedder=model
    )
    with pytest.raises(TypeError, match="async with"), asynchronous:
        pass

    async def enter_sync():
        async with sync:
            pass

    with pytest.raises(TypeError, match="'with'"):
        asyncio.run(enter_sync())


def test_the_extraction_sees_the_turn_as_quoted_data(client, fake_model, openai_server) -> None:
    ask(client, "I prefer Python for backend work")
    assert client.memory.flush(30)
    extraction = next(r.body for r in openai_server.requests if is_extraction(r.body))
    data = extraction["messages"][1]["content"]
    assert '"I prefer Python for backend work"' in data and '"Python is a good fit."' in data
    assert extraction["model"] == "gpt-4o"


def test_a_turn_with_a_pasted_file_is_extracted_from_its_start_and_end(
    client, fake_model, openai_server
) -> None:
    """A message over a megabyte (a pasted file) would not fit a queued job, nor the extraction
    model's context: its start and end are extracted, with a note of what was left out."""
    pasted = "I prefer Python for backend work. Here is my log:\n" + "GET /health 200\n" * 70_000
    ask(client, pasted + "Why is it slow?")
    assert client.memory.flush(30)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    [extraction] = [r.body for r in openai_server.requests if is_extraction(r.body)]
    sent = extraction["messages"][1]["content"]
    assert "I prefer Python for backend work" in sent and "Why is it slow?" in sent
    assert "characters left out" in sent and len(sent) < 70_000
    assert client.memory.stats()["events"].get("store_failures", 0) == 0


def test_transient_errors_and_malformed_answers_are_retried(client, fake_model) -> None:
    fake_model.extractions = [
        Reply.error(429, "slow down"),
        Reply.error(503, "overloaded"),
        Reply.text("Sure! Here are the memories: none"),  # malformed
        Reply.text(
            '{"memories": [{"text": "Prefers Python for backend work", "category": "preference"}]}'
        ),
    ]
    ask(client, "I prefer Python for backend work")
    assert client.memory.flush(30)
    assert fake_model.extraction_calls == 4
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    stats = client.memory.stats()
    assert stats["background"]["retried"] >= 3 and stats["events"]["malformed_extractions"] == 1


MALFORMED = Reply.text("Sure! Here are the memories: none")


def test_transient_errors_do_not_use_up_a_malformed_answers_tries(client, fake_model) -> None:
    """Four 429s, then a malformed answer: the malformed answer is the first of its 5 tries."""
    fake_model.extractions = [Reply.error(429, "slow down")] * 4 + [MALFORMED]
    ask(client, "I prefer Python for backend work")
    assert client.memory.flush(30)
    assert fake_model.extraction_calls == 6
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    assert client.memory.stats()["background"]["failed"] == 0


def test_the_fifth_malformed_answer_fails_the_job_whatever_errors_came_between(
    client, fake_model
) -> None:
    """Transient errors between malformed answers neither count nor restart the count; after
    ``retry_failed()`` the job has 5 malformed answers again."""
    fake_model.extractions = [
        MALFORMED,
        Reply.error(503, "overloaded"),
        MALFORMED,
        Reply.error(429, "slow down"),
        MALFORMED,
        Reply.error(503, "overloaded"),
        Reply.error(503, "overloaded"),
        MALFORMED,
        MALFORMED,  # the fifth: dead-lettered
        MALFORMED,  # after retry_failed(): the first of 5 again
    ]
    ask(client, "I prefer Python for backend work")
    assert client.memory.flush(30)
    assert fake_model.extraction_calls == 9 and client.memory.get_all() == []
    stats = client.memory.stats()
    assert stats["background"]["failed"] == 1 and stats["events"]["malformed_extractions"] == 5
    assert client.memory.retry_failed() == 1
    assert client.memory.flush(30)
    assert fake_model.extraction_calls == 11
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]


def test_an_answer_cut_at_the_output_limit_is_dead_lettered_at_once(
    client, fake_model, caplog
) -> None:
    """An extraction answer cut at ``finish_reason="length"`` is not asked again 5 times (the
    call sets no limit to raise, so each answer is cut the same way), and nothing of it is
    stored (its cut list could lack a ``replaces``): the job is dead-lettered after one call,
    logged with the user's tag and counted as failed; ``retry_failed()`` runs it again."""
    from headroom_memory_integrations.jobs import user_tag

    cut = '{"memories": [{"text": "Prefers Python for backend work", "category": "pref'
    fake_model.extractions = [Reply.text(cut, finish_reason="length")] * 5
    caplog.set_level("WARNING", logger="headroom_memory_integrations")
    ask(client, "I prefer Python for backend work")
    assert client.memory.flush(30)
    assert fake_model.extraction_calls == 1 and client.memory.get_all() == []
    stats = client.memory.stats()
    assert stats["background"]["failed"] == 1 and stats["background"]["retried"] == 0
    [warning] = [r for r in caplog.records if "ExtractionCutOff" in r.getMessage()]
    assert warning.levelname == "WARNING" and user_tag("alice") in warning.getMessage()
    assert "dead-lettered" in warning.getMessage()
    fake_model.extractions = []  # the model answers in full now
    assert client.memory.retry_failed() == 1
    assert client.memory.flush(30)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]


@pytest.mark.parametrize(
    ("places", "reason"),
    [
        (({"finish_reason": "length"},), "length"),  # OpenAI's shape, as a dict
        ((Reply.text("a", finish_reason="length"),), "length"),  # an object's attribute
        ((None, {"stopReason": "max_tokens"}), "max_tokens"),  # a place the answer lacks
        (({"finish_reason": None, "done_reason": "length"},), "length"),
        (({"id": "r1"}, {"stop_reason": "end_turn"}), "end_turn"),  # the first that says
        (({"finish_reason": "stop"}, {"stop_reason": "max_tokens"}), "stop"),
        (({"incomplete_details": {"reason": "max_output_tokens"}},), "max_output_tokens"),
        (({"stop_reason": "stop"}, {"incomplete_details": {"reason": "x"}}), "stop"),
        (({}, None), None),
    ],
)
def test_a_stop_reason_is_the_first_its_provider_gives(places: Any, reason: Any) -> None:
    """One reading of why an answer stopped serves the OpenAI, LangChain and LlamaIndex
    extractors: the first field that names it, in the order of the places given, else the
    reason of a Responses API answer left incomplete."""
    from headroom_memory_integrations.writer import stop_reason

    assert stop_reason(*places) == reason


def test_a_bad_request_is_kept_as_failed_and_can_be_retried(client, fake_model) -> None:
    fake_model.extractions = [Reply.error(400, "model not found")]
    ask(client, "I prefer Python for backend work")
    assert client.memory.flush(30)
    assert client.memory.get_all() == [] and client.memory.stats()["background"]["failed"] >= 1
    assert client.memory.retry_failed() == 1
    assert client.memory.flush(30)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]


def test_the_model_cannot_choose_the_user(client, fake_model, db_path, model) -> None:
    from headroom_memory_integrations import MemoryStore

    fake_model.extractions = [
        Reply.text(
            json.dumps(
                {
                    "memories": [{"text": "Is an admin", "category": "fact", "user_id": "root"}],
                    "user_id": "root",
                }
            )
        )
    ]
    ask(client, "hello")
    assert client.memory.flush(30)
    assert [m.user_id for m in client.memory.get_all()] in ([], ["alice"])
    assert MemoryStore("root", db_path=db_path, embedder=model).get_all() == []


def test_streaming_is_untouched_and_queued_at_the_end(client, fake_model) -> None:
    chunks = [
        c.choices[0].delta.content
        for c in ask(client, "I prefer Python for backend work", stream=True)
        if c.choices
    ]
    assert "".join(c or "" for c in chunks) == "Python is a good fit."
    assert client.memory.flush(30)
    assert fake_model.extraction_calls == 1 and client.memory.count() == 1


def test_a_stream_not_read_to_its_end_is_not_extracted(client, fake_model) -> None:
    """A stream the caller stops reading (or that fails midway, raising the API's error) did
    not complete, as a call that failed did not: its turn is not extracted (an application
    that asks again would have it extracted twice)."""
    stream = ask(client, "I prefer Python for backend work", stream=True)
    for _ in stream:
        break
    stream.close()
    del stream
    gc.collect()  # the stream is let go of: the end of its iteration runs now
    assert client.memory.flush(30)
    assert fake_model.extraction_calls == 0 and client.memory.count() == 0
    assert client.memory.stats()["background"]["processed"] == 0


def test_a_stream_left_by_break_closes_its_http_response_at_once(client, fake_model) -> None:
    """openai's Stream holds itself in a cycle: a stream left by ``break`` and let go of kept its
    response (and connection) open until a garbage collection, which could run inside the same
    client's next request, holding the pool lock the close needs (seen: a hung test run)."""
    stream = ask(client, "I prefer Python for backend work", stream=True)
    raw = stream._wrapped
    gc.disable()  # no collection in between: only the wrapper can have closed it
    try:
        for _ in stream:
            break
        assert not raw.response.is_closed
        del stream, _
        assert raw.response.is_closed
    finally:
        gc.enable()
    assert ask(client, "And a second question?").choices[0].message.content


def test_an_async_stream_left_by_break_closes_its_http_response(async_client, fake_model) -> None:
    """The async twin: an async stream left by ``break`` and let go of is closed by the loop's
    finalizer of async generators (no garbage collection needed), its response with it."""

    async def chat() -> None:
        stream = await async_client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "I prefer Python for backend work"}],
            stream=True,
        )
        raw = stream._wrapped
        async for _ in stream:
            break
        assert not raw.response.is_closed
        del stream, _
        deadline = time.monotonic() + 60  # the loop runs the finalizer's aclose() as a task
        while not raw.response.is_closed:
            assert time.monotonic() < deadline, "the abandoned stream's response was not closed"
            await asyncio.sleep(0.01)
        await async_client.close()

    gc.disable()  # no collection in between: only the wrapper can have closed it
    try:
        asyncio.run(chat())
    finally:
        gc.enable()
    assert async_client.memory.stats()["background"]["processed"] == 0


def test_a_slow_extraction_holds_up_no_other_users_memories(openai_server, db_path, model):
    """Extractions (model calls) run beside the storing of inline memories, not before it:
    while bob's extraction is held, alice's memory from with_fast_memory is stored at once and
    used by her next call, and her flush and close do not wait for bob."""
    from headroom_memory_integrations.openai import with_fast_memory
    from headroom_memory_integrations.testing import MemoryFollowingModel

    follow = MemoryFollowingModel()
    bobs_extraction, release = threading.Event(), threading.Event()

    def respond(body: dict):
        if is_extraction(body) and "jazz" in json.dumps(body):
            bobs_extraction.set()
            release.wait(120)  # held until alice is done (a time bound would be a race)
        return follow(body)

    openai_server.responder = respond
    bob = with_memory(openai_server.client(), user_id="bob", db_path=db_path, embedder=model)
    alice = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model
    )
    try:
        ask(bob, "I like jazz")
        assert bobs_extraction.wait(60)
        ask(alice, "I have 2 cats")
        answer = ask(alice, "How many cats do I have?").choices[0].message.content
        assert answer == "From what I remember: Has 2 cats."
        assert alice.memory.flush(60)
        alice.close()
        assert bob.memory.stats()["background"]["running"] == 1  # still held
    finally:
        release.set()
    assert bob.memory.flush(30) and "Likes jazz" in [m.text for m in bob.memory.get_all()]
    bob.close()


def test_a_stalled_extraction_call_is_given_up_and_retried(
    openai_server, db_path, model, monkeypatch
):
    """Each try of the extraction call is bounded (EXTRACTION_TIMEOUT, here 1 s, against the
    client's 10-minute default): a model that stalls is given up on, counted as a retry, and
    the next try stores the memory."""
    import headroom_memory_integrations.openai as wrappers
    from headroom_memory_integrations.testing import MemoryFollowingModel

    monkeypatch.setattr(wrappers, "EXTRACTION_TIMEOUT", 1.0)
    follow = MemoryFollowingModel()
    tries = []

    def respond(body: dict):
        if is_extraction(body):
            tries.append(time.monotonic())
            if len(tries) > 1:
                return follow(body)
            # the first try has its 1 s deadline: the next one, meant to succeed, is given
            # 120 s (a shared machine may stall it past 1 s)
            monkeypatch.setattr(wrappers, "EXTRACTION_TIMEOUT", 120.0)
            return follow(body).delayed(300.0)
        return follow(body)

    openai_server.responder = respond
    client = openai_server.client(max_retries=0)
    bob = with_memory(client, user_id="bob", db_path=db_path, embedder=model, retry_backoff=FAST)
    ask(bob, "I like jazz")
    assert bob.memory.flush(120)
    assert [m.text for m in bob.memory.get_all()] == ["Likes jazz"]
    assert len(tries) == 2 and tries[1] - tries[0] < 60  # not the stalled answer's 300 s
    assert bob.memory.stats()["background"]["retried"] == 1
    bob.close()


def prompt_text(body: dict) -> str:
    return "\n".join(str(m.get("content")) for m in body["messages"])


def extraction_threads(queue) -> int:
    """The live extraction threads of the job queue file ``queue``."""
    name = f"headroom-memory extract {queue.name}"
    return sum(t.name == name and t.is_alive() for t in threading.enumerate())


def test_extractions_of_different_users_run_side_by_side_and_each_users_in_order(
    openai_server, db_path, model, tmp_path
) -> None:
    """While alice's extraction waits for the model, bob's runs too, on a second thread that
    starts then (not for alice's next turn: it is extracted only once her first is done, as a
    correction must not be stored before the fact it corrects) and leaves once idle."""
    from headroom_memory_integrations.testing import MemoryFollowingModel

    follow = MemoryFollowingModel()
    started: list[str] = []
    release = {"jazz": threading.Event(), "tea": threading.Event(), "blues": threading.Event()}

    def respond(body: dict):
        if not is_extraction(body):
            return follow(body)
        turns = {"jazz": "I like jazz", "tea": "I like tea", "blues": "I now like blues more"}
        said = next(word for word, turn in turns.items() if f'user: "{turn}"' in prompt_text(body))
        started.append(said)
        assert release[said].wait(30)
        return follow(body)

    openai_server.responder = respond
    queue = tmp_path / f"jobs-{tmp_path.name}.sqlite3"
    alice, bob = wrapped_for(
        with_memory,
        openai_server,
        ("alice", "bob"),
        db_path=db_path,
        embedder=model,
        queue_path=queue,
    )

    def wait_for_started(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(started) < count:
            assert time.monotonic() < deadline, started
            time.sleep(0.01)

    ask(alice, "I like jazz")
    wait_for_started(1)
    ask(alice, "I now like blues more")
    time.sleep(0.3)
    assert started == ["jazz"] and extraction_threads(queue) == 1  # no thread for her second
    ask(bob, "I like tea")
    wait_for_started(2)
    time.sleep(0.3)
    assert started == ["jazz", "tea"]  # bob's beside alice's; alice's second waits
    assert extraction_threads(queue) == 2
    release["tea"].set()
    release["jazz"].set()
    wait_for_started(3)
    assert started == ["jazz", "tea", "blues"]
    release["blues"].set()
    assert alice.memory.flush(60) and bob.memory.flush(60)
    assert [m.text for m in bob.memory.get_all()] == ["Likes tea"]
    deadline = time.monotonic() + 60
    while extraction_threads(queue) > 1:  # the second leaves within seconds of idling
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert alice.memory.close(60) and bob.memory.close(60)  # the last one stops the threads
    assert extraction_threads(queue) == 0
    alice.close()
    bob.close()


def test_a_writer_that_never_extracts_starts_no_extraction_thread(
    openai_server, db_path, model, tmp_path
) -> None:
    """Wrappers that store inline memories (no extractor) have the storing thread only."""
    from headroom_memory_integrations.openai import with_fast_memory
    from headroom_memory_integrations.testing import MemoryFollowingModel

    openai_server.responder = MemoryFollowingModel()
    queue = tmp_path / f"jobs-{tmp_path.name}.sqlite3"
    clients = wrapped_for(
        with_fast_memory,
        openai_server,
        ("alice", "bob"),
        db_path=db_path,
        embedder=model,
        queue_path=queue,
    )
    for client in clients:
        ask(client, "I have 2 cats")
    assert all(client.memory.flush(10) for client in clients)
    assert [m.text for m in clients[1].memory.get_all()] == ["Has 2 cats"]
    store = f"headroom-memory store {queue.name}"
    assert sum(t.name == store for t in threading.enumerate()) == 1
    assert extraction_threads(queue) == 0
    for client in clients:
        client.close()


def test_closing_one_of_two_wrappers_of_a_store_leaves_the_other_extracting(
    openai_server, db_path, model
) -> None:
    """A sync and an async client over one store (the guide's pattern): leaving the async
    one's ``async with`` closes the client it extracts with; the sync one, still open, goes
    on extracting its turns with its own."""
    from headroom_memory_integrations.testing import MemoryFollowingModel

    openai_server.responder = MemoryFollowingModel()
    client = with_memory(openai_server.client(), user_id="alice", db_path=db_path, embedder=model)

    async def use_async_once() -> None:
        async with with_memory(openai_server.async_client(), memory=client.memory) as aclient:
            await aclient.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "I play the violin"}]
            )

    asyncio.run(use_async_once())
    ask(client, "I am allergic to peanuts")
    assert client.memory.flush(10)
    assert sorted(m.text for m in client.memory.get_all()) == [
        "Is allergic to peanuts",
        "Plays the violin",
    ]
    client.close()


def test_a_turn_left_queued_by_a_closed_client_is_extracted_by_a_new_one(
    openai_server, db_path, model
) -> None:
    """An extraction still failing when its client is closed is not retried for ever with
    the closed client: the user's next wrapper extracts it."""
    from headroom_memory_integrations.testing import MemoryFollowingModel

    follow, down = MemoryFollowingModel(), threading.Event()
    down.set()
    openai_server.responder = lambda body: (
        Reply.error(503) if down.is_set() and is_extraction(body) else follow(body)
    )
    first = with_memory(
        openai_server.client(),
        user_id="carol",
        db_path=db_path,
        embedder=model,
        retry_backoff=FAST,
    )
    ask(first, "I am allergic to shellfish")
    first.close()  # its turn is still queued: the model was down
    down.clear()
    second = with_memory(
        openai_server.client(),
        user_id="carol",
        db_path=db_path,
        embedder=model,
        retry_backoff=FAST,
    )
    assert second.memory.flush(10)
    assert [m.text for m in second.memory.get_all()] == ["Is allergic to shellfish"]
    second.close()


def test_async_client(async_client, fake_model) -> None:
    client = async_client

    async def scenario():
        answer = await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "I prefer Python for backend work"}],
        )
        return answer.choices[0].message.content

    assert asyncio.run(scenario()) == "Python is a good fit."
    assert client.memory.flush(30) and client.memory.count() == 1


def test_each_turn_is_extracted_once(client, fake_model) -> None:
    for i in range(5):
        ask(client, f"Fact number {i}: I collect stamps from country {i}")
    assert client.memory.flush(60)
    assert fake_model.extraction_calls == 5


def test_a_tool_loop_extracts_its_user_message_once(client, fake_model) -> None:
    """Every step of a tool loop ends with the same user message: each queued an extraction of
    it, one extraction call per step for the same memories. The first step queues it; a new
    user message after the loop is extracted, and so is the first one said again."""
    asked = {"role": "user", "content": "I prefer Python for backend work. Weather in Porto?"}
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    step = {"role": "assistant", "content": None, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}
    for messages in ([asked], [asked, step, result], [asked, step, result, step, result]):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert client.memory.flush(30)
    assert fake_model.extraction_calls == 1
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    ask(client, "And in Lisbon?")
    assert client.memory.flush(30) and fake_model.extraction_calls == 2
    client.chat.completions.create(model="gpt-4o", messages=[asked, step, result])
    assert client.memory.flush(30) and fake_model.extraction_calls == 3


def test_a_tool_loop_step_extracts_the_message_its_first_step_could_not_queue(
    client, fake_model, monkeypatch
) -> None:
    """The first step's turn refused by the queue (counted in store_failures): the later step
    queues the message, rather than take it for queued."""
    from headroom_memory_integrations.jobs import JobQueue

    encode, refused = JobQueue.encode, []

    def refuse_the_first_extraction(kind, user_id, payload):
        if kind == "extract" and not refused:
            refused.append(kind)
            raise ValueError("refused")
        return encode(kind, user_id, payload)

    monkeypatch.setattr(JobQueue, "encode", staticmethod(refuse_the_first_extraction))
    asked = {"role": "user", "content": "I prefer Python for backend work. Weather in Porto?"}
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    step = {"role": "assistant", "content": None, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}
    for messages in ([asked], [asked, step, result]):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert client.memory.flush(30)
    assert refused and client.memory.stats()["events"]["store_failures"] == 1
    assert fake_model.extraction_calls == 1
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]


def test_half_an_emoji_in_the_answer_does_not_lose_the_turn(client, fake_model) -> None:
    """A lone surrogate (half an emoji, as some servers send) made the queue refuse the turn:
    nothing extracted, the user's words lost with it."""
    fake_model.answer = "Python fits \ud83d"
    assert (
        ask(client, "I prefer Python for backend work")
        .choices[0]
        .message.content.endswith("\ud83d")
    )
    assert client.memory.flush(30)
    assert client.memory.stats()["events"].get("store_failures", 0) == 0
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]


def test_a_killed_worker_resumes_and_loses_nothing(openai_server, db_path, model, tmp_path) -> None:
    """A process queues turns whose extraction hangs, is killed with SIGKILL, and the next
    process extracts and stores every one of them."""
    hung = tmp_path / "hung"

    def respond(body):
        if is_extraction(body) and not hung.exists():
            return Reply.text(EXTRACTED).delayed(60)  # the first process's extraction hangs
        return Reply.text(EXTRACTED if is_extraction(body) else "ok")

    openai_server.responder = respond
    code = f"""
        from headroom_memory_integrations.openai import with_memory
        from openai import OpenAI
        raw = OpenAI(base_url={openai_server.base_url!r}, api_key="x", max_retries=0)
        client = with_memory(raw, user_id="alice", db_path={str(db_path)!r})
        for text in ["I prefer Python for backend work", "I live in Lisbon", "I am a vegetarian"]:
            turn = [{{"role": "user", "content": text}}]
            client.chat.completions.create(model="gpt-4o", messages=turn)
        print("queued", flush=True)
        import time; time.sleep(120)
        """
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "queued"
        deadline = time.monotonic() + 30
        while not any(is_extraction(r.body) for r in openai_server.requests):
            assert time.monotonic() < deadline, "the worker never started an extraction"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
    hung.touch()

    client = with_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model, retry_backoff=FAST
    )
    assert client.memory.flush(60)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    extraction_payloads = [
        r.body["messages"][1]["content"] for r in openai_server.requests if is_extraction(r.body)
    ]
    for text in ["I prefer Python for backend work", "I live in Lisbon", "I am a vegetarian"]:
        assert any(text in p for p in extraction_payloads)  # every turn was extracted
    assert client.memory.stats()["background"]["pending"] == 0


def test_close_drains_and_stops(client, fake_model) -> None:
    ask(client, "I prefer Python for backend work")
    assert client.memory.close(30)
    assert client.memory.count() == 1 and fake_model.extraction_calls == 1
    assert client.memory.close() is True  # idempotent
    assert client.memory.search("Which language should I use for the backend?")  # still works


def test_close_waits_for_this_processs_jobs_not_another_processs(
    openai_server, db_path, model, tmp_path
) -> None:
    """``memory.close()`` waits for the turns this process queued (alice's, answered 0.3 s
    late), not for another process's in the same queue file (bob's turn, for an extraction
    model this process has no client of: retried here for ever). Before, close() waited its
    whole timeout for bob's turn and returned False."""
    openai_server.responder = Model(extractions=[Reply.text(EXTRACTED).delayed(0.3)])
    queue_path = tmp_path / "shared-jobs.sqlite3"
    client = with_memory(
        openai_server.client(),
        user_id="alice",
        db_path=db_path,
        embedder=model,
        queue_path=queue_path,
        retry_backoff=FAST,
    )
    code = f"""
from headroom_memory_integrations.jobs import JobQueue
queue = JobQueue({str(queue_path)!r})
exchange = [{{"role": "user", "content": "I drink tea"}}]
queue.put("extract", "bob", {{"exchange": exchange, "injected": {{}}, "model": "gpt-4o",
                              "untrusted": False, "destination": "another tenant's model"}})
queue.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    ask(client, "I prefer Python for backend work")
    started = time.monotonic()
    assert client.memory.close(timeout=300)
    assert time.monotonic() - started < 60  # before: the whole 300 s, and False
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    with closing(sqlite3.connect(queue_path)) as conn:  # bob's turn is left for its process
        assert conn.execute("SELECT user_id, status FROM jobs").fetchall() == [("bob", "pending")]


def test_pending_work_is_drained_at_exit(openai_server, db_path, model) -> None:
    """A script that never calls flush() or close(): its queued turn is extracted before the
    interpreter exits."""
    openai_server.responder = lambda body: (
        Reply.text(EXTRACTED).delayed(0.5) if is_extraction(body) else Reply.text("ok")
    )
    code = f"""
        from headroom_memory_integrations.openai import with_memory
        from openai import OpenAI
        raw = OpenAI(base_url={openai_server.base_url!r}, api_key="x", max_retries=0)
        client = with_memory(raw, user_id="alice", db_path={str(db_path)!r})
        turn = [{{"role": "user", "content": "I prefer Python for backend work"}}]
        client.chat.completions.create(model="gpt-4o", messages=turn)
        """
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr
    from headroom_memory_integrations import MemoryStore

    stored = MemoryStore("alice", db_path=db_path, embedder=model).get_all()
    assert [m.text for m in stored] == ["Prefers Python for backend work"]


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (AttributeError("'str' object has no attribute 'chat'"), False),  # llm="gpt-4o-mini"
        (TypeError("chat() missing 1 required positional argument"), False),
        (ImportError("No module named 'llama_index.llms.openai'"), False),
        (ConnectionError("connection refused"), True),
        (TimeoutError("timed out"), True),
    ],
)
def test_a_programming_error_fails_the_job_instead_of_retrying_for_ever(error, retried) -> None:
    from headroom_memory_integrations.writer import retryable

    assert retryable(error) is retried


HIKER = [
    "Enjoys hiking on weekends",
    "Prefers trails with mountain views",
    "Owns trail running shoes",
    "Hikes with a dog named Juno",
    "Likes long hikes in autumn",
    "Uses AllTrails to find hikes",
    "Lives in Boston",
    "Favorite ice cream is pistachio",
]


def test_the_extraction_may_replace_a_near_memory_the_request_did_not_need(
    client, fake_model, openai_server
) -> None:
    """The extraction call is shown, as known, the memories nearest to what the user said
    besides those injected (here: past the request's top 5), and supersedes one with
    "replaces"."""
    client.memory.add_many(HIKER)
    fake_model.extractions = [
        Reply.text(
            json.dumps(
                {"memories": [{"text": "Lives in Denver", "category": "fact", "replaces": "m7"}]}
            )
        )
    ]
    ask(client, "Just moved to Denver. Any good hiking trails nearby?")
    assert client.memory.flush(30)
    injected = fake_model.chat_bodies[-1]["messages"][0]["content"]
    extraction = next(r.body for r in openai_server.requests if is_extraction(r.body))
    known = extraction["messages"][1]["content"]
    assert "Lives in Boston" not in injected and injected.count("- m") == 5
    assert "- m7 (fact, noted " in known and '"Lives in Boston"' in known.split("- m7")[1]
    assert "pistachio" not in known  # under the floor even for the extraction
    texts = {m.text: m for m in client.memory.get_all()}
    assert "Lives in Boston" not in texts and "Lives in Denver" in texts
    assert [r.text for r in texts["Lives in Denver"].history] == ["Lives in Boston"]


def test_two_entries_replacing_one_memory_keep_both_facts(client, fake_model, openai_server):
    """Two entries of one answer name the same memory in "replaces": the first replaces it,
    the second is stored beside it (not superseding the first entry's new text)."""
    client.memory.add("Subscribes to Netflix", category="fact")
    fake_model.extractions = [
        Reply.text(
            json.dumps(
                {
                    "memories": [
                        {
                            "text": "Cancelled the Netflix subscription",
                            "category": "fact",
                            "replaces": "m1",
                        },
                        {"text": "Subscribes to Disney Plus", "category": "fact", "replaces": "m1"},
                    ]
                }
            )
        )
    ]
    ask(client, "I cancelled my Netflix subscription and signed up for Disney Plus.")
    assert client.memory.flush(30)
    extraction = next(r.body for r in openai_server.requests if is_extraction(r.body))
    assert "- m1 (fact, noted " in extraction["messages"][1]["content"]
    texts = {m.text: m for m in client.memory.get_all()}
    assert set(texts) == {"Cancelled the Netflix subscription", "Subscribes to Disney Plus"}
    assert [r.text for r in texts["Cancelled the Netflix subscription"].history] == [
        "Subscribes to Netflix"
    ]


def test_the_extraction_goes_on_when_the_search_for_near_memories_fails(
    client, fake_model, monkeypatch
) -> None:
    from headroom_memory_integrations import StorageError

    def down(*args, **kwargs):
        raise StorageError("the store is down")

    monkeypatch.setattr(client.memory, "search", down)
    ask(client, "I prefer Python for backend work")
    assert client.memory.flush(30)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    assert client.memory.stats()["events"]["nearby_search_failures"] == 1


def test_a_message_of_only_invisible_characters_is_not_searched_with(client, fake_model) -> None:
    """A lone zero-width space or byte order mark (a client's "empty" message) is skipped as
    a blank message is: the search would refuse it, and it was counted as a failure."""
    client.memory.add("Prefers Python for backend work")
    for message in ("   ", "\u200b", "\ufeff"):
        response = ask(client, message)
        assert response.choices[0].message.content == "Python is a good fit."
    assert client.memory.flush(30)
    assert [body["messages"][0]["role"] for body in fake_model.chat_bodies] == ["user"] * 3
    events = client.memory.stats()["events"]
    assert not [name for name in events if "fail" in name], events


def acme_then_freelance(down: threading.Event | None = None, fail_first: bool = False):
    """A model extracting "I work at Acme" and then "I quit Acme, I freelance now", saying
    what a real one says when shown the other fact as known: that it ``replaces`` it. It
    answers 503 while ``down`` is set, and 500 to the first extraction if ``fail_first``.
    Returns the responder and the turns it extracted, in order."""
    extracted: list[str] = []
    failed: list[str] = []

    def respond(body: dict):
        if not is_extraction(body):
            return Reply.text("Noted.")
        said = prompt_text(body)
        turn = "quit" if "I quit Acme" in said else "acme"
        if (down is not None and down.is_set()) or (fail_first and not failed):
            failed.append(turn)
            return Reply.error(503, "overloaded")
        extracted.append(turn)
        if turn == "quit":
            item = {"text": "Works as a freelancer", "category": "fact"}
            shown = "Works at Acme" in said
        else:
            item = {"text": "Works at Acme", "category": "fact"}
            shown = "Works as a freelancer" in said
        if shown:  # the other fact is memory m1
            item["replaces"] = "m1"
        return Reply.text(json.dumps({"memories": [item]}))

    return respond, extracted, failed


def test_a_turn_retried_after_a_later_one_does_not_bring_back_what_it_corrected(
    openai_server, db_path, model
) -> None:
    """The first turn's extraction fails once and waits a second for its retry while the
    user's next turn, which corrects it, is queued. A user's turns are extracted in order: the
    second waits for the first (before: it ran first, then the retried first turn, shown "Works
    as a freelancer", said "Works at Acme" replaces it; outdated, it was judged by similarity
    alone and stored beside it, current again)."""
    respond, extracted, failed = acme_then_freelance(fail_first=True)
    openai_server.responder = respond
    slow_retry = Backoff(initial=1.0, factor=2.0, maximum=1.0, jitter=0.0)
    client = with_memory(
        openai_server.client(),
        user_id="alice",
        db_path=db_path,
        embedder=model,
        retry_backoff=slow_retry,
    )
    ask(client, "I work at Acme as a data engineer.")
    wait_for(lambda: failed == ["acme"])  # its retry waits a second
    ask(client, "Update: I quit Acme, I freelance now.")
    assert client.memory.flush(30)
    assert extracted == ["acme", "quit"]
    [current] = client.memory.get_all()
    assert current.text == "Works as a freelancer"
    assert [r.text for r in current.history] == ["Works at Acme"]
    client.close()


def test_turns_queued_while_the_model_is_down_are_extracted_in_order(
    openai_server, db_path, model
) -> None:
    """While the model is down, the first turn has failed twice (its next try 1.2 s off) when
    the second is queued: the second's first retry would come sooner (0.3 s). It waits for
    the first: once the model is back, the turns are extracted in the order they were said
    (before: the second first, and the first, the fact it corrected, stored after it)."""
    down = threading.Event()
    down.set()
    respond, extracted, failed = acme_then_freelance(down=down)
    openai_server.responder = respond
    backoff = Backoff(initial=0.3, factor=4.0, maximum=10.0, jitter=0.0)
    client = with_memory(
        openai_server.client(max_retries=0),
        user_id="alice",
        db_path=db_path,
        embedder=model,
        retry_backoff=backoff,
    )
    ask(client, "I work at Acme as a data engineer.")
    wait_for(lambda: failed == ["acme", "acme"])  # next try in 1.2 s
    ask(client, "Update: I quit Acme, I freelance now.")
    time.sleep(0.15)  # (before: the second turn failed once meanwhile, its next try in 0.3 s)
    down.clear()
    assert client.memory.flush(30)
    assert extracted == ["acme", "quit"]
    assert [m.text for m in client.memory.get_all()] == ["Works as a freelancer"]
    client.close()


def test_an_async_clients_twin_for_extraction_keeps_its_query_and_headers(openai_server) -> None:
    """The synchronous client made for an async client's background extraction sends what the
    async one sends: a gateway's query parameter (an api-version) and headers too."""
    import openai

    from headroom_memory_integrations.openai import sync_twin

    client = openai.AsyncOpenAI(
        base_url=openai_server.base_url,
        api_key="sk-twin",
        default_query={"api-version": "2024-10-21"},
        default_headers={"x-gateway": "team-a"},
    )
    twin = sync_twin(client, "extraction_client=")
    assert twin.default_query["api-version"] == "2024-10-21"
    assert twin.default_headers["x-gateway"] == "team-a"
    assert (twin.api_key, str(twin.base_url)) == ("sk-twin", str(client.base_url))
    twin.close()


def test_an_async_client_with_no_twin_says_what_to_pass(openai_server, db_path) -> None:
    """An async client a synchronous twin cannot be made from (Azure's, another SDK's) is
    refused with what to pass for the work the twin would do: the extraction client for
    ``with_memory``, an embedder for OpenAI embeddings."""
    import openai

    from headroom_memory_integrations import with_fast_memory

    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=openai_server.azure_endpoint, api_key="sk-azure", api_version="2024-10-21"
    )
    with pytest.raises(TypeError, match=r"AsyncAzureOpenAI .*pass extraction_client="):
        with_memory(azure, user_id="alice", db_path=db_path)
    with pytest.raises(TypeError, match=r"pass embedder=OpenAIEmbedder\(<a synchronous client>\)"):
        with_fast_memory(azure, user_id="alice", db_path=db_path, use_local_embeddings=False)
    assert not db_path.exists()


@pytest.mark.parametrize("auth", ["key function", "workload identity", "provider"])
def test_an_async_client_not_signed_in_by_a_key_has_no_twin(
    openai_server, db_path, monkeypatch, auth
) -> None:
    """A twin copies the async client's ``api_key``. One given an async function as its key
    (a vault, a rotation) has ``api_key`` "", one signed in by ``workload_identity`` has a
    placeholder, one built with ``provider=`` has "": a twin would send no key, another key from the
    environment, or the placeholder (a 401 on every extraction call, nothing ever learnt).
    Such a client is refused with what to pass, as Azure's is."""
    import openai

    from headroom_memory_integrations import with_fast_memory

    monkeypatch.setenv("OPENAI_API_KEY", "sk-another-project")  # what a twin would have sent

    async def key() -> str:
        return "sk-from-vault"

    if auth == "key function":
        client = openai.AsyncOpenAI(base_url=openai_server.base_url, api_key=key)
    elif auth == "workload identity":
        provider = {"token_type": "jwt", "get_token": lambda: "jwt"}
        identity = {"identity_provider_id": "idp", "service_account_id": "sa", "provider": provider}
        client = openai.AsyncOpenAI(base_url=openai_server.base_url, workload_identity=identity)
    else:
        from openai.providers import bedrock

        signed_in = bedrock(region="us-east-1", base_url=openai_server.base_url, api_key="k")
        client = openai.AsyncOpenAI(provider=signed_in)
    with pytest.raises(
        TypeError, match=r"AsyncOpenAI that authenticates with .*extraction_client="
    ):
        with_memory(client, user_id="alice", db_path=db_path, extraction_model="gpt-4o-mini")
    with pytest.raises(TypeError, match=r"pass embedder=OpenAIEmbedder\(<a synchronous client>\)"):
        with_fast_memory(client, user_id="alice", db_path=db_path, use_local_embeddings=False)
    assert not db_path.exists()
    assert not openai_server.requests  # no extraction call went out as someone else


def test_two_users_stay_isolated(client, fake_model, openai_server, db_path, model) -> None:
    """Two users' wrappers on one folder share its job queue and worker: each turn is
    extracted and stored under its own user, and one user's memories never reach the other's
    prompt."""
    bob = with_memory(
        openai_server.client(), user_id="bob", db_path=db_path, embedder=model, retry_backoff=FAST
    )
    ask(client, "I prefer Python for backend work")
    assert client.memory.flush(30)
    fake_model.extractions = [Reply.text(json.dumps({"memories": []}))]
    ask(bob, "Which language should I use for backend work?")
    assert bob.memory.flush(30)
    assert len(fake_model.chat_bodies[-1]["messages"]) == 1  # nothing of alice's injected
    assert bob.memory.get_all() == []
    ask(client, "Which language should I use for backend work?")
    assert "Prefers Python for backend work" in fake_model.chat_bodies[-1]["messages"][0]["content"]
    assert [m.user_id for m in client.memory.get_all()] == ["alice"]
    bob.close()


def test_a_model_that_takes_no_temperature_still_extracts(openai_server, db_path, model) -> None:
    """Extraction asked for temperature=0, which OpenAI's reasoning models (gpt-5, o1, o3,
    o4-mini) refuse with a 400: every turn of a user chatting with one was dead-lettered."""
    refused: list[str] = []

    def reasoning_model(body: dict) -> Any:
        if "temperature" in body and body["temperature"] != 1:
            refused.append(body["messages"][0]["content"][:30])
            return Reply.error(
                400,
                "Unsupported value: 'temperature' does not support 0 with this model. Only "
                "the default (1) value is supported.",
                code="unsupported_value",
                param="temperature",
            )
        if "long-term memory" in body["messages"][0]["content"]:
            memories = [{"text": "Prefers Python for backend work", "category": "preference"}]
            return Reply.text(json.dumps({"memories": memories}))
        return Reply.text("Python is a good fit.")

    openai_server.responder = reasoning_model
    client = with_memory(openai_server.client(), user_id="alice", db_path=db_path, embedder=model)
    for said in ("I prefer Python for backend work", "I also like short answers"):
        client.chat.completions.create(
            model="o4-mini", messages=[{"role": "user", "content": said}]
        )
        assert client.memory.flush(30)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    assert client.memory.stats()["background"]["failed"] == 0
    assert len(refused) == 1  # asked without a temperature from then on
    client.close()


# -- a Chroma server that goes down, then comes back ----------------------------------------


@pytest.fixture
def outage(tmp_path):
    """A `chroma run` of the test's own: ``kill()`` it, ``restart()`` it on the same port."""
    import conftest

    servers = [conftest.ChromaServer(tmp_path / "chroma")]
    first = servers[0]

    class Outage:
        url = first.url

        @staticmethod
        def kill() -> None:
            servers[-1].process.kill()
            servers[-1].process.wait()

        @staticmethod
        def restart() -> None:
            servers.append(conftest.ChromaServer(first.path, port=first.port))

    yield Outage
    for server in servers:
        server.stop()


def extracting(answers: dict[str, str], calls: list[str]):
    """A responder: chat turns get "Noted.", extraction calls the memory of the first key of
    ``answers`` their turn contains (each call's key noted in ``calls``)."""

    def respond(body: dict):
        if not is_extraction(body):
            return Reply.text("Noted.")
        said = body["messages"][1]["content"]
        key = next(k for k in answers if k in said)
        calls.append(key)
        memories = [{"text": answers[key], "category": "fact"}]
        return Reply.text(json.dumps({"memories": memories}))

    return respond


def down_while_answering(outage, respond):
    """``respond``, the storage killed as the model gets its first extraction call: the job's
    search for known memories worked, its write of the answer fails."""
    killed: list[bool] = []

    def answer(body: dict):
        if is_extraction(body) and not killed:
            killed.append(True)
            outage.kill()
        return respond(body)

    return answer


def on_server(openai_server, url: str, user_id: str, queue_path, backoff: Backoff = FAST):
    from conftest import HashEmbedder

    from headroom_memory_integrations import ChromaStorage

    storage = ChromaStorage.from_url(url, timeout=2)
    return with_memory(
        openai_server.client(),
        user_id=user_id,
        storage=storage,
        embedder=HashEmbedder(),
        queue_path=queue_path,
        retry_backoff=backoff,
    )


def queued_jobs(queue_path) -> list[tuple[str, str, str]]:
    import sqlite3

    with sqlite3.connect(queue_path) as conn:
        return conn.execute("SELECT kind, status, user_id FROM jobs ORDER BY id").fetchall()


def tries_by_user(queue_path) -> dict[str, int]:
    """How many times each user's job in the queue was tried (claimed) so far."""
    with closing(sqlite3.connect(queue_path)) as conn:
        return dict(conn.execute("SELECT user_id, attempts FROM jobs").fetchall())


@pytest.mark.server
def test_a_turn_extracted_while_the_storage_is_down_calls_the_model_once(
    outage, openai_server, tmp_path
) -> None:
    """Each retry of the extraction called the model again (a paid call) and threw its
    answer away when the write failed: once answered, the job only stores the answer; a turn
    queued while the storage is down waits for it before the model is called. A user
    forgotten while their turn waits gets nothing stored."""
    calls: list[str] = []
    answers = {"Lyon": "Lives in Lyon", "Oslo": "Lives in Oslo"}
    openai_server.responder = down_while_answering(outage, extracting(answers, calls))
    queue_path = tmp_path / "jobs.sqlite3"
    alice = on_server(openai_server, outage.url, "alice", queue_path)
    bob = on_server(openai_server, outage.url, "bob", queue_path)
    try:
        ask(alice, "I live in Lyon")  # the storage goes down while the model answers
        wait_for(lambda: queued_jobs(queue_path) == [("store", "pending", "alice")])
        ask(bob, "I live in Oslo")
        wait_for(lambda: [kind for kind, _, _ in queued_jobs(queue_path)] == ["store", "extract"])
        # 20 tries of each job (FAST's backoff), each a model call before: counted, not
        # timed (a loaded machine tries less often)
        wait_for(lambda: min(tries_by_user(queue_path).values()) >= 20)
        assert calls == ["Lyon"]  # and none for bob's turn: it waits for the storage
        assert not alice.memory.flush(0.1)  # still waiting for the storage
        with pytest.raises(StorageError):  # the memories cannot be erased yet; the jobs are
            bob.memory.forget_user()
        # alice's is kept, waiting for the storage (pending, or 'running' while its next
        # try, every 50 ms, fails: the status read here falls in one or the other)
        [(kind, status, user)] = queued_jobs(queue_path)
        assert (kind, user) == ("store", "alice") and status in ("pending", "running")
        outage.restart()
        assert alice.memory.flush(60)
        assert [(m.text, m.source.value) for m in alice.memory.get_all()] == [
            ("Lives in Lyon", "background")
        ]
        # forgotten, not brought back (bob's storage may still hold calls back a moment)
        wait_for(lambda: answers_again(bob.memory))
        assert bob.memory.get_all() == []
        assert calls == ["Lyon"]
    finally:
        alice.memory.close(timeout=0)
        bob.memory.close(timeout=0)


@pytest.mark.server
def test_a_turn_left_to_store_when_its_process_is_killed_is_stored_by_the_next(
    outage, openai_server, tmp_path
) -> None:
    """The process is killed (SIGKILL) after the model answered and the write failed: the
    queue file holds the answer to store, which the next process stores, calling no model."""
    calls: list[str] = []
    openai_server.responder = down_while_answering(
        outage, extracting({"Lyon": "Lives in Lyon"}, calls)
    )
    queue_path = tmp_path / "jobs.sqlite3"
    code = f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        from _reliability_support import RandomEmbedder
        from openai import OpenAI
        from headroom_memory_integrations import ChromaStorage
        from headroom_memory_integrations.openai import with_memory
        raw = OpenAI(base_url={openai_server.base_url!r}, api_key="x", max_retries=0)
        client = with_memory(raw, user_id="alice", embedder=RandomEmbedder(),
                             storage=ChromaStorage.from_url({outage.url!r}, timeout=2),
                             queue_path={str(queue_path)!r})
        client.chat.completions.create(
            model="gpt-4o", messages=[{{"role": "user", "content": "I live in Lyon"}}])
        print("queued", flush=True)
        import time; time.sleep(120)
        """
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "queued"
        wait_for(lambda: queued_jobs(queue_path) == [("store", "pending", "alice")], 30)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
    assert calls == ["Lyon"]
    outage.restart()
    from _reliability_support import RandomEmbedder

    from headroom_memory_integrations import ChromaStorage

    client = with_memory(
        openai_server.client(),
        user_id="alice",
        storage=ChromaStorage.from_url(outage.url, timeout=2),
        embedder=RandomEmbedder(),
        queue_path=queue_path,
        retry_backoff=FAST,
    )
    try:
        assert client.memory.flush(60)
        assert [m.text for m in client.memory.get_all()] == ["Lives in Lyon"]
        assert calls == ["Lyon"] and queued_jobs(queue_path) == []
    finally:
        client.memory.close(timeout=0)


@pytest.mark.server
def test_a_memory_told_while_the_storage_was_down_is_stored_as_soon_as_it_is_back(
    outage, openai_server, tmp_path, monkeypatch
) -> None:
    """The job's retries during the outage grew its backoff: it was stored up to a minute
    after the server was back, while the user's calls already got their older memories. A
    call that finds the storage back makes the waiting jobs due at once."""
    calls: list[str] = []
    openai_server.responder = extracting(
        {"Python": "Prefers Python for backend work", "Lyon": "Lives in Lyon"}, calls
    )
    minutes = Backoff(initial=600.0, factor=2.0, maximum=600.0, jitter=0.0)
    # a job failed on the storage waits at most the storage's longest hold-back (16 s) whatever
    # its backoff: made ten minutes too, so only the call that finds the storage back (hurry)
    # can make the job due within the minute waited below
    from headroom_memory_integrations import writer

    monkeypatch.setattr(writer, "MAX_RETRY_SECONDS", 600.0)
    client = on_server(openai_server, outage.url, "alice", tmp_path / "jobs.sqlite3", minutes)
    try:
        ask(client, "I prefer Python for backend work")
        assert client.memory.flush(60)
        outage.kill()
        ask(client, "I live in Lyon")
        wait_for(lambda: tried(tmp_path / "jobs.sqlite3"))  # and its backoff set to 10 minutes
        assert calls == ["Python"]  # the turn waits for the storage before the model is called
        outage.restart()
        # calls are held back a while after each failure (up to 16 s; a shared machine may stall)
        deadline = time.monotonic() + 120
        while True:
            before = len(openai_server.requests)
            ask(client, "which python for backend work")
            if "Prefers Python" in prompt_text(openai_server.requests[before].body):
                break  # the storage answers this user's calls again
            assert time.monotonic() < deadline, "the storage never came back"
            time.sleep(0.2)
        # within a minute (a shared machine may stall): not the backoff's ten minutes
        wait_for(lambda: client.memory.flush(0.1), timeout=60)
        assert {m.text for m in client.memory.get_all()} == {
            "Prefers Python for backend work",
            "Lives in Lyon",
        }
        assert calls.count("Lyon") == 1  # (the checks above are turns of their own)
    finally:
        client.memory.close(timeout=0)


def bag_of_words_endpoint(hung: threading.Event):
    """An embedding endpoint's vectors (``ScriptedOpenAIServer.embedder``): the test
    ``HashEmbedder``'s, after 3 s while ``hung`` is set (past the embedder's timeout)."""
    from conftest import HashEmbedder

    def embed(text: str, dimensions: int) -> list[float]:
        if hung.is_set():
            time.sleep(3.0)
        return HashEmbedder(dimensions).embed([text])[0].tolist()

    return embed


def alice_on_an_embedding_endpoint(openai_server, db_path, hung: threading.Event):
    """Alice's with_memory wrapper embedding through the scripted server's endpoint (which
    hangs once ``hung`` is set) with a 0.5 s timeout, her jobs retried after a minute."""
    from headroom_memory_integrations import OpenAIEmbedder

    openai_server.embedder = bag_of_words_endpoint(hung)
    embedder = OpenAIEmbedder(openai_server.client(max_retries=0), dimensions=64, timeout=0.5)
    return alice_retried_after_a_minute(openai_server, db_path, embedder)


def alice_retried_after_a_minute(openai_server, db_path, embedder):
    """Alice's with_memory wrapper with ``embedder``, her failed jobs retried after a minute."""
    minute = Backoff(initial=60.0, factor=2.0, maximum=60.0, jitter=0.0)
    return with_memory(
        openai_server.client(),
        user_id="alice",
        db_path=db_path,
        embedder=embedder,
        retry_backoff=minute,
    )


def failed_try(queue) -> tuple[float, str] | None:
    """When the job that failed in the queue file ``queue`` is tried again, and why it failed."""
    with closing(sqlite3.connect(queue)) as conn:
        query = "SELECT not_before, last_error FROM jobs WHERE last_error IS NOT NULL"
        return conn.execute(query).fetchone()


def setting(event: threading.Event, answer):
    """A responder giving ``answer``'s replies that sets ``event`` at the first chat call that
    is not an extraction (the model's: the chat call's recall has embedded the question)."""

    def respond(body: dict):
        if not is_extraction(body):
            event.set()
        return answer(body)

    return respond


def lyon_failed_once(client) -> tuple[float, str]:
    """Alice tells her city through ``client``; once the job of her turn has failed a try:
    when it is due again, and its error."""
    from headroom_memory_integrations.writer import queue_path_for

    client.memory.count()  # the store's folder and its queue file are made
    queue = queue_path_for(client.memory)
    ask(client, "I live in Lyon")
    wait_for(lambda: failed_try(queue) is not None)
    return failed_try(queue)


def test_a_memory_told_while_the_embedding_api_was_down_is_stored_as_soon_as_it_is_back(
    openai_server, db_path, monkeypatch
) -> None:
    """As for a storage that was down: the embedder's endpoint announces that it answers
    again, and a call that finds it back makes the jobs waiting out a backoff due at once.
    Before, only the storage's coming back did: the job waited out its backoff (a minute
    here; up to the default's 60 s after an outage) while the user's calls had memories.
    The longest wait of a failed job is put past the backoff's minute here, so that what is
    measured is the hurry, not that cap (16 s), with room for a stalled machine."""
    from headroom_memory_integrations import writer
    from headroom_memory_integrations.writer import queue_path_for

    monkeypatch.setattr(writer, "MAX_RETRY_SECONDS", 120.0)

    calls: list[str] = []
    openai_server.responder = extracting(
        {"Python": "Prefers Python for backend work", "Lyon": "Lives in Lyon"}, calls
    )
    hung = threading.Event()
    client = alice_on_an_embedding_endpoint(openai_server, db_path, hung)
    try:
        ask(client, "I prefer Python for backend work")
        assert client.memory.flush(30)
        hung.set()
        ask(client, "I live in Lyon")  # answered without memories; its turn is queued
        wait_for(lambda: tried(queue_path_for(client.memory)))  # its backoff set to a minute
        hung.clear()
        deadline = time.monotonic() + 30  # calls are held back a while after each failure
        while True:
            before = len(openai_server.requests)
            ask(client, "which python for backend work")
            chat = [r for r in openai_server.requests[before:] if r.path == "/v1/chat/completions"]
            if "Prefers Python" in prompt_text(chat[0].body):
                break  # the endpoint answers this user's calls again
            assert time.monotonic() < deadline, "the embedding endpoint never came back"
            time.sleep(0.2)
        back = time.monotonic()
        wait_for(lambda: client.memory.flush(0.1), timeout=30)
        assert time.monotonic() - back < 30  # not the backoff's minute
        assert {m.text for m in client.memory.get_all()} == {
            "Prefers Python for backend work",
            "Lives in Lyon",
        }
        assert calls.count("Lyon") == 1
    finally:
        client.memory.close(timeout=0)


def test_a_job_failed_by_the_embedder_is_retried_within_the_longest_hold_back(
    openai_server, db_path
) -> None:
    """An embedder that raises EmbeddingError (held to be down) has its jobs retried at most
    ``MAX_RETRY_SECONDS`` later, whatever the backoff has grown to, as a storage's are: the
    memory is stored soon after the API is back even when no call finds it back. Before, the
    backoff's minute applied."""
    from conftest import HashEmbedder

    from headroom_memory_integrations import EmbeddingError
    from headroom_memory_integrations.storage.guard import MAX_RETRY_SECONDS
    from headroom_memory_integrations.writer import queue_path_for

    class DownEmbedder(HashEmbedder):
        down = False

        def embed(self, texts):
            if self.down:
                raise EmbeddingError("the embedding endpoint is unavailable")
            return super().embed(texts)

    openai_server.responder = extracting({"Lyon": "Lives in Lyon"}, [])
    embedder = DownEmbedder()
    client = alice_retried_after_a_minute(openai_server, db_path, embedder)
    try:
        client.memory.count()  # the store's folder and its queue file are made
        embedder.down = True
        ask(client, "I live in Lyon")
        queue = queue_path_for(client.memory)
        wait_for(lambda: failed_try(queue) is not None)
        due, error = failed_try(queue)
        assert "EmbeddingError" in error
        assert due - time.time() <= MAX_RETRY_SECONDS + 1  # not a minute
    finally:
        client.memory.close(timeout=0)


def test_a_job_whose_own_embedding_request_times_out_is_retried_within_the_longest_hold_back(
    openai_server, db_path
) -> None:
    """The job's own request to the embedding endpoint times out (the chat call's recall was
    answered; the endpoint hangs from the model's call on): ``OpenAIEmbedder`` raises
    EmbeddingError (openai's timeout its cause), so the job is retried at most
    ``MAX_RETRY_SECONDS`` later, as one held back is. Before, openai's ``APITimeoutError``
    went through as it was, which the cap did not cover: the job waited out the backoff's
    minute, though the endpoint may have been back long before."""
    from headroom_memory_integrations.storage.guard import MAX_RETRY_SECONDS

    hung = threading.Event()  # set from the model's call on: the recall was answered
    openai_server.responder = setting(hung, extracting({"Lyon": "Lives in Lyon"}, []))
    client = alice_on_an_embedding_endpoint(openai_server, db_path, hung)
    try:
        due, error = lyon_failed_once(client)
        # its own request, not one held back ("unavailable; not trying again")
        assert "EmbeddingError" in error and "did not answer" in error, error
        assert due - time.time() <= MAX_RETRY_SECONDS + 1  # not a minute
    finally:
        hung.clear()
        client.memory.close(timeout=0)


def test_a_job_rate_limited_by_the_embedding_endpoint_is_retried_within_the_longest_hold_back(
    openai_server, db_path
) -> None:
    """The job's own request to the embedding endpoint is answered 429 with a Retry-After of an
    hour (the chat call's recall was answered): ``OpenAIEmbedder`` raises EmbeddingError
    (openai's RateLimitError its cause) and holds calls back, so the job is retried at most
    ``MAX_RETRY_SECONDS`` later, and once the endpoint answers again its memory is stored.
    Before, the RateLimitError went through as it was: the job waited the backoff's minute
    (the Retry-After, capped at the backoff's 60 s), and the endpoint's coming back hurried
    nothing, since it was never held to be down."""
    from headroom_memory_integrations import OpenAIEmbedder
    from headroom_memory_integrations.storage.guard import MAX_RETRY_SECONDS

    limited = threading.Event()
    words = bag_of_words_endpoint(threading.Event())

    def embed(text: str, dimensions: int):
        if limited.is_set():
            return Reply.error(429, "Rate limit reached", headers={"retry-after": "3600"})
        return words(text, dimensions)

    openai_server.embedder = embed
    # 429 from the model's call on: the recall was answered
    openai_server.responder = setting(limited, extracting({"Lyon": "Lives in Lyon"}, []))
    embedder = OpenAIEmbedder(openai_server.client(max_retries=0), dimensions=64, timeout=2.0)
    client = alice_retried_after_a_minute(openai_server, db_path, embedder)
    try:
        due, error = lyon_failed_once(client)
        assert "EmbeddingError" in error and "status 429" in error, error
        assert due - time.time() <= MAX_RETRY_SECONDS + 1  # not a minute, nor an hour
        limited.clear()
        embedder._availability._until = time.monotonic()  # the hold-back is over
        assert embedder.embed(["Where do I live?"]).shape == (1, 64)  # announced back
        wait_for(lambda: client.memory.flush(0.1), timeout=60)
        assert [m.text for m in client.memory.get_all()] == ["Lives in Lyon"]
    finally:
        limited.clear()
        client.memory.close(timeout=0)


def test_an_embedding_endpoint_coming_back_hurries_only_the_queues_that_embed_with_it(
    openai_server, tmp_path, monkeypatch
) -> None:
    """Two embedders of one model on two endpoints (OpenAI and a proxy, two tenants'
    ``base_url``) are two locations: the first one's coming back hurries the job of a store
    that embeds with it (alice's), and leaves the job of a store that embeds with the second,
    still down, to its backoff (bob's). Before, both were "the embedding endpoint (<model>)":
    bob's job was retried at once, against a down endpoint, a try spent towards
    ``HOLDS_THE_LINE_TRIES``."""
    from headroom_memory_integrations import OpenAIEmbedder, writer
    from headroom_memory_integrations.testing import ScriptedOpenAIServer
    from headroom_memory_integrations.writer import queue_path_for

    # the jobs failed on an embedder wait their backoff's ten minutes (not at most the longest
    # hold-back, 16 s): only a hurry makes them due while the test runs
    monkeypatch.setattr(writer, "MAX_RETRY_SECONDS", 1200.0)
    minutes = Backoff(initial=600.0, factor=2.0, maximum=600.0, jitter=0.0)
    hung_a, hung_b = threading.Event(), threading.Event()
    with ScriptedOpenAIServer() as server_b:
        openai_server.embedder = bag_of_words_endpoint(hung_a)
        openai_server.responder = extracting({"Porto": "Lives in Porto"}, [])
        server_b.embedder = bag_of_words_endpoint(hung_b)
        server_b.responder = extracting({"Lyon": "Lives in Lyon"}, [])
        embedder_a, embedder_b = (
            OpenAIEmbedder(server.client(max_retries=0), dimensions=64, timeout=0.5)
            for server in (openai_server, server_b)
        )
        assert embedder_a.location != embedder_b.location
        alice, bob = (
            with_memory(
                server.client(),
                user_id=user,
                db_path=tmp_path / user,
                embedder=embedder,
                retry_backoff=minutes,
            )
            for server, user, embedder in (
                (openai_server, "alice", embedder_a),
                (server_b, "bob", embedder_b),
            )
        )
        try:
            alice.memory.count()
            bob.memory.count()
            queue = queue_path_for(bob.memory)

            def job() -> tuple[int, float] | None:  # bob's job's tries and when it is due
                with closing(sqlite3.connect(queue)) as conn:
                    query = "SELECT attempts, not_before FROM jobs WHERE status = 'pending'"
                    return conn.execute(query).fetchone()

            hung_b.set()
            ask(bob, "I live in Lyon")  # its turn fails on endpoint B and waits its backoff
            wait_for(lambda: (j := job()) is not None and j[0] > 0 and j[1] > time.time() + 5)
            waiting = job()
            hung_a.set()  # endpoint A goes down: alice's turn fails on it, waits its backoff
            ask(alice, "I live in Porto")
            wait_for(lambda: tried(queue_path_for(alice.memory)))
            hung_a.clear()  # and comes back: announced back once its hold-back (1 s) is over
            wait_for(lambda: embeds_now(embedder_a))
            wait_for(lambda: alice.memory.flush(0.1), timeout=120)  # her job, hurried, is done
            assert job() == waiting  # bob's job still waits: endpoint B is down
        finally:
            hung_a.clear()
            hung_b.clear()
            alice.memory.close(timeout=0)
            bob.memory.close(timeout=0)


def answers_again(memory) -> bool:
    try:
        memory.count()
    except StorageError:
        return False
    return True


def tried(queue_path) -> bool:
    """Whether a job of the queue has failed at least once and waits to be tried again."""
    return tries(queue_path) > 0


def tries(queue_path) -> int:
    """The most tries a job of the queue has had (0: none tried, or none left)."""
    with closing(sqlite3.connect(queue_path)) as conn:
        return conn.execute("SELECT COALESCE(MAX(attempts), 0) FROM jobs").fetchone()[0]


@pytest.mark.server
def test_a_correction_told_while_the_storage_is_down_replaces_the_old_memory(
    outage, openai_server, tmp_path
) -> None:
    """Told while the server is down, a correction waits for it before the model is called:
    the model sees the memory it corrects and replaces it. Called at once, it saw none, and its
    answer, kept to be stored once the storage was back, left "Works at Acme" beside it."""
    shown: list[bool] = []

    def respond(body: dict):
        if not is_extraction(body):
            return Reply.text("Noted.")
        said = body["messages"][1]["content"]
        if "freelance" not in said:
            memory = {"text": "Works at Acme as a backend engineer", "category": "fact"}
            return Reply.text(json.dumps({"memories": [memory]}))
        label = re.search(r'- (m\d+) \([a-z]+, noted [^)]*\): "?Works at Acme', said)
        shown.append(label is not None)
        memory = {"text": "Is a freelance designer", "category": "fact"}
        if label:  # a model shown the old memory replaces it
            memory["replaces"] = label.group(1)
        return Reply.text(json.dumps({"memories": [memory]}))

    openai_server.responder = respond
    client = on_server(openai_server, outage.url, "alice", tmp_path / "jobs.sqlite3")
    try:
        ask(client, "I work at Acme as a backend engineer")
        assert client.memory.flush(30)
        outage.kill()
        ask(client, "I quit my job at Acme, now I freelance as a designer")
        wait_for(lambda: tries(tmp_path / "jobs.sqlite3") >= 3)  # retried with FAST's backoff
        assert shown == []  # the model is not called while the storage is down
        outage.restart()
        assert client.memory.flush(60)
        assert shown == [True]
        (current,) = client.memory.get_all()
        assert current.text == "Is a freelance designer"
        assert [r.text for r in current.history] == ["Works at Acme as a backend engineer"]
    finally:
        client.memory.close(timeout=0)
