"""A user's embedder that hangs (or is merely slow) in a background job holds up no other
user's memories on the folder, and loses none of its own (see writer.py, late_embeddings.py)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager

import pytest
from _reliability_support import wait_for

from headroom_memory_integrations import OpenAIEmbedder, jobs
from headroom_memory_integrations.openai import with_fast_memory
from headroom_memory_integrations.testing import (
    MemoryFollowingModel,
    Reply,
    ScriptedOpenAIServer,
    hash_embedding,
)
from headroom_memory_integrations.writer import queue_path_for

pytestmark = pytest.mark.openai_client

HANG = 300.0  # seconds an endpoint holds a request it is told to hold (let go of at the end)


class HeldEndpoint:
    """An embedding endpoint (a real HTTP server) that holds each request whose text contains
    one of ``held`` words until ``release`` is set, at most ``hold`` seconds, recording the
    texts it was asked for and those it answered, in order."""

    def __init__(self, *held: str, hold: float = HANG) -> None:
        self.held, self.hold = held, hold
        self.release = threading.Event()
        self.asked: list[str] = []
        self.answered: list[str] = []

    def __call__(self, text: str, dimensions: int) -> list[float]:
        self.asked.append(text)
        if any(word in text for word in self.held):
            self.release.wait(self.hold)
        self.answered.append(text)
        return hash_embedding(text, dimensions)


@contextmanager
def serving(endpoint: HeldEndpoint) -> Iterator[ScriptedOpenAIServer]:
    """A server whose embeddings ``endpoint`` makes; its held requests end as it closes."""
    with ScriptedOpenAIServer(embedder=endpoint) as server:
        try:
            yield server
        finally:
            endpoint.release.set()


def embedder_on(server: ScriptedOpenAIServer) -> OpenAIEmbedder:
    """A new ``OpenAIEmbedder`` on ``server`` whose requests may take longer than the hang (an
    endpoint of one's own with no short timeout, or a slow one)."""
    return OpenAIEmbedder(server.client(max_retries=0), dimensions=64, timeout=HANG + 100)


def texts(memory) -> list[str]:
    return [m.text for m in memory.get_all()]


def tell(client, text: str) -> None:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])


@pytest.fixture
def patience(monkeypatch) -> float:
    """A job's embedding call is waited for 2 s here (30 s by default), so that the test does
    not spend half a minute on it; a stalled machine only makes more calls late, whose answers
    are used all the same."""
    from headroom_memory_integrations import late_embeddings

    monkeypatch.setattr(late_embeddings, "EMBEDDING_WAIT_SECONDS", 2.0)
    return 2.0


def test_one_users_hung_embedder_holds_up_no_other_users_memories(
    openai_server, db_path, model, patience
) -> None:
    """Alice's embedding endpoint accepts her memory's request and does not answer (300 s);
    bob, on the same folder with an embedder of his own, tells the model where he lives: his
    memory is stored while hers hangs, and hers is stored once her endpoint answers, nothing
    lost. Before, the folder's one store thread waited in alice's call: bob's memory waited
    behind it for as long as it hung."""
    openai_server.responder = MemoryFollowingModel()
    endpoint = HeldEndpoint("cats")
    with serving(endpoint) as server:
        alice = with_fast_memory(
            openai_server.client(), user_id="alice", db_path=db_path, embedder=embedder_on(server)
        )
        bob = with_fast_memory(
            openai_server.client(), user_id="bob", db_path=db_path, embedder=model
        )
        try:
            tell(alice, "I have 2 cats")  # answered (her recall is bounded); her memory queued
            wait_for(lambda: "Has 2 cats" in endpoint.asked, timeout=60)  # her job is in it
            tell(bob, "I live in Lyon")
            wait_for(lambda: "Lives in Lyon" in texts(bob.memory), timeout=120)
            assert texts(alice.memory) == []  # still hanging: nothing of hers yet
            assert "Has 2 cats" not in endpoint.answered
            endpoint.release.set()
            wait_for(lambda: alice.memory.flush(0.1), timeout=120)
            assert texts(alice.memory) == ["Has 2 cats"]
            assert bob.memory.flush(60) and texts(bob.memory) == ["Lives in Lyon"]
        finally:
            endpoint.release.set()
            alice.memory.close(timeout=0)
            bob.memory.close(timeout=0)


def test_an_embedder_slower_than_the_wait_still_stores_each_memory_with_one_call(
    openai_server, db_path, patience
) -> None:
    """Alice's endpoint answers her memory's request after 6 s, three times the wait: her
    job's try gives up waiting, the call goes on, and its answer, kept, is what the job's
    next try stores. One request for the memory's text, however many tries: a late call is
    never made again beside itself (a bound alone would have tried again and again, each
    try as late as the first, and stored nothing)."""
    openai_server.responder = MemoryFollowingModel()
    endpoint = HeldEndpoint("cats", hold=3 * patience)
    with serving(endpoint) as server:
        alice = with_fast_memory(
            openai_server.client(), user_id="alice", db_path=db_path, embedder=embedder_on(server)
        )
        try:
            tell(alice, "I have 2 cats")
            wait_for(lambda: alice.memory.flush(0.1), timeout=120)
            assert texts(alice.memory) == ["Has 2 cats"]
            assert endpoint.asked.count("Has 2 cats") == 1
            assert alice.memory.stats()["background"]["retried"] >= 1  # given up, then reused
        finally:
            alice.memory.close(timeout=0)


def queue_rows(client) -> list[tuple[int, str, int, str | None]]:
    """The client's queue file's jobs: (id, status, attempts, last error)."""
    with closing(sqlite3.connect(queue_path_for(client.memory))) as conn:
        return conn.execute(
            "SELECT id, status, attempts, last_error FROM jobs ORDER BY id"
        ).fetchall()


def test_a_users_jobs_wait_behind_their_late_call_whatever_embedder_object_they_have(
    openai_server, db_path, patience, monkeypatch
) -> None:
    """Alice's memories come through two wrappers, each with an embedder object of its own on
    the same endpoint (embedders made per request), which holds her first memory's request.
    Her second job, let out of line at once here (it would be after 10 failed tries of the
    first), makes no call of its own while the first hangs: no second request, no second
    thread stuck. Once the endpoint answers, both are stored."""
    monkeypatch.setattr(jobs, "HOLDS_THE_LINE_TRIES", 1)
    openai_server.responder = MemoryFollowingModel()
    endpoint = HeldEndpoint("cats", "Paris")
    with serving(endpoint) as server:
        one, other = (
            with_fast_memory(
                openai_server.client(),
                user_id="alice",
                db_path=db_path,
                embedder=embedder_on(server),
            )
            for _ in range(2)
        )
        try:
            tell(one, "I have 2 cats")
            wait_for(lambda: "Has 2 cats" in endpoint.asked, timeout=60)
            tell(other, "I live in Paris")

            def both_tried() -> bool:
                rows = queue_rows(one)
                return len(rows) == 2 and all(row[3] and "EmbeddingLate" in row[3] for row in rows)

            wait_for(both_tried, timeout=120)
            assert "Lives in Paris" not in endpoint.asked  # held back: no call of its own
            endpoint.release.set()
            wait_for(lambda: one.memory.flush(0.1), timeout=120)
            assert sorted(texts(one.memory)) == ["Has 2 cats", "Lives in Paris"]
            assert endpoint.asked.count("Has 2 cats") == 1
        finally:
            endpoint.release.set()
            one.memory.close(timeout=0)
            other.memory.close(timeout=0)


@contextmanager
def late_call(late, job_id: int, user_id: str, embedder, text: str) -> Iterator[threading.Event]:
    """A job of ``user_id`` whose call to ``embedder`` embeds ``text`` and hangs until the
    event yielded is set (at most ``HANG`` s): its try is given up; the call's thread has
    ended when the block exits."""
    from headroom_memory_integrations.late_embeddings import EmbeddingLate, embed_texts
    from headroom_memory_integrations.writer import embedder_identity

    release = threading.Event()

    def hung(texts: list[str]) -> list[list[float]]:
        release.wait(HANG)
        return [hash_embedding(text, 8) for text in texts]

    before = set(threading.enumerate())
    with late.running(job_id, user_id, embedder_identity), pytest.raises(EmbeddingLate):
        embed_texts(embedder, hung, [text], False)
    (thread,) = [
        t for t in set(threading.enumerate()) - before if t.name == "headroom-memory-embed"
    ]
    try:
        yield release
    finally:
        release.set()
        thread.join(60)
        assert not thread.is_alive()


def test_a_forgotten_users_late_answer_is_not_kept(patience) -> None:
    """Alice is forgotten while her job's embedding call hangs: when it answers, neither her
    text nor its vector is kept for the deleted job (deleted means gone), and nothing of hers
    holds her next jobs back. Before, the answer was kept (until 1,000 later jobs' answers)."""
    from headroom_memory_integrations.late_embeddings import LateEmbeddings

    late = LateEmbeddings()
    with late_call(late, 1, "alice", object(), "Alice's secret"):
        late.forget("alice")
    assert late._kept == {} and late._late == {}


def test_one_hung_embedder_object_several_users_share_gets_one_thread(patience) -> None:
    """Twenty users' jobs share one embedder object, whose first call hangs: the others
    make no call into it (no thread each stuck in the same object, no wait of the store
    thread each) until it has answered; a user with another object goes on."""
    from headroom_memory_integrations.late_embeddings import (
        EmbeddingLate,
        LateEmbeddings,
        embed_texts,
    )
    from headroom_memory_integrations.writer import embedder_identity

    late, shared, calls = LateEmbeddings(), object(), []

    def call(texts: list[str]) -> list[list[float]]:
        calls.append(texts)
        return [hash_embedding(text, 8) for text in texts]

    def job(job_id: int, user_id: str, embedder) -> object:
        with late.running(job_id, user_id, embedder_identity):
            return embed_texts(embedder, call, [f"{user_id}'s memory"], False)

    with late_call(late, 1, "user0", shared, "user0's memory"):
        for n in range(1, 20):
            with pytest.raises(EmbeddingLate):
                job(1 + n, f"user{n}", shared)
        assert calls == []
        assert job(100, "bob", object()) and calls == [["bob's memory"]]
    assert job(2, "user1", shared) and calls[-1] == ["user1's memory"]


def test_a_late_calls_job_goes_before_the_users_other_jobs_once_it_has_answered(
    openai_server, db_path, patience, monkeypatch
) -> None:
    """Alice's memory "Lives in Paris" (the endpoint failing it) waits out a retry when her
    memory "Has 2 cats" goes late (the endpoint holds it). Once the late call has answered,
    both jobs are due at once and the Paris one, queued first, is claimed first; it waits:
    the job whose late answer is kept is stored before it (the user's other jobs wait for
    that job's next try). Without that hold, the Paris memory was embedded and stored first,
    while the cats job's answer waited. (The Paris job is let out of line after one try here:
    it would be after 10.)"""
    monkeypatch.setattr(jobs, "HOLDS_THE_LINE_TRIES", 1)
    openai_server.responder = MemoryFollowingModel()
    failing = threading.Event()
    failing.set()
    stored_when_paris_was_embedded: list[list[str]] = []
    held = HeldEndpoint("Has 2 cats")  # (not the user's question, "I have 2 cats")

    def endpoint(text: str, dimensions: int) -> list[float] | Reply:
        if text == "Lives in Paris":
            if failing.is_set():
                return Reply.error(503)  # (no Retry-After: the endpoint is not held to be down)
            stored_when_paris_was_embedded.append(texts(alice.memory))
        return held(text, dimensions)

    with ScriptedOpenAIServer(embedder=endpoint) as server:
        alice = with_fast_memory(
            openai_server.client(), user_id="alice", db_path=db_path, embedder=embedder_on(server)
        )
        try:
            tell(alice, "I live in Paris")
            wait_for(lambda: any(row[3] for row in queue_rows(alice)), timeout=60)  # failed
            tell(alice, "I have 2 cats")
            wait_for(
                lambda: any(row[3] and "gave no answer" in row[3] for row in queue_rows(alice)),
                timeout=120,
            )  # the cats job's call is late (and still held)
            failing.clear()
            held.release.set()
            wait_for(lambda: alice.memory.flush(0.1), timeout=120)
            assert sorted(texts(alice.memory)) == ["Has 2 cats", "Lives in Paris"]
            assert stored_when_paris_was_embedded == [["Has 2 cats"]]
            assert held.asked.count("Has 2 cats") == 1  # its late answer was used
        finally:
            held.release.set()
            alice.memory.close(timeout=0)
