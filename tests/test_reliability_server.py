"""A sick Chroma server never holds a chat call beyond a bound (issue 11, item 2): a real
`chroma run`, frozen with SIGSTOP and thawed with SIGCONT, under the real openai client."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import ChromaServer, RememberingModel

from headroom_memory_integrations import ChromaStorage, StorageError
from headroom_memory_integrations.openai import with_fast_memory
from headroom_memory_integrations.prompts import CONTEXT_OPEN
from headroom_memory_integrations.writer import READ_YOUR_WRITES_SECONDS

pytestmark = pytest.mark.server

TIMEOUT = 2.0  # seconds per storage request in these tests (the default is 5)
BOUND = 60.0  # a call "kept to its bound" (a few seconds) against a server that never answers
CELLO = {"text": "Plays the cello in an orchestra", "category": "fact"}


@pytest.fixture
def own_server(tmp_path) -> Iterator[ChromaServer]:
    """A server of this test's own, since it gets frozen."""
    server = ChromaServer(tmp_path / "chroma")
    yield server
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def ask(client, text: str) -> tuple[str, float]:
    started = time.monotonic()
    response = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}]
    )
    return response.choices[0].message.content, time.monotonic() - started


def injected(openai_server) -> bool:
    """Whether the last chat request carried the memory about the cello."""
    return any(
        CONTEXT_OPEN in str(m.get("content")) and CELLO["text"] in str(m.get("content"))
        for m in openai_server.requests[-1].body["messages"]
        if m["role"] == "system"
    )


def test_a_frozen_server_costs_a_chat_call_at_most_the_bound(
    own_server, openai_server, model, monkeypatch
) -> None:
    """A frozen server never answers: each call goes on without memories, the first after its
    request's timeout, the next ones at once, sending the server nothing (counted by a proxy
    in front of it), while the storage is held to be down; memories come back once it
    answers again."""
    from _reliability_support import SlowProxy

    from headroom_memory_integrations import flow
    from headroom_memory_integrations.storage import guard

    # held down 10 s after a failure (not 1 s), so that a stalled machine does not end the
    # hold-back before the next call
    monkeypatch.setattr(guard, "FIRST_RETRY_SECONDS", 10.0)
    proxy = SlowProxy(own_server.port, 0.0)
    model_says = RememberingModel("Noted.", [CELLO])
    openai_server.responder = model_says
    storage = ChromaStorage.from_url(proxy.url, timeout=TIMEOUT)
    client = with_fast_memory(
        openai_server.client(), user_id="alice", storage=storage, embedder=model
    )
    ask(client, "I play the cello in an orchestra")
    assert client.memory.flush(60)
    model_says.memories = []  # from now on the model writes no memories (nothing to store)
    ask(client, "Which instrument do I play?")
    assert injected(openai_server)

    os.kill(own_server.process.pid, signal.SIGSTOP)
    with monkeypatch.context() as patch:
        # the call's time for memory made long: its request (TIMEOUT) ends it, never the
        # chat call's deadline, which a stalled machine could reach first (not counted as the
        # server's failure, so the next call would try the server again)
        patch.setattr(flow, "READ_YOUR_WRITES_SECONDS", 30.0)
        answer, frozen = ask(client, "Which instrument do I play?")
    assert answer == "Noted." and not injected(openai_server)  # answered, without memories
    assert frozen < BOUND  # the request's timeout ended it: the server never answers
    assert storage.down  # held to be down
    sent = proxy.requests
    answer, again = ask(client, "Which instrument do I play?")
    assert answer == "Noted." and again < BOUND
    assert proxy.requests == sent  # storage calls now fail at once, without a request
    assert client.memory.counters["inject_failures"] >= 2  # counted (stats() needs storage)

    later = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=proxy.url, embedder=model
    )  # built while the server is frozen: nothing is contacted yet
    assert proxy.requests == sent
    bob = with_fast_memory(
        openai_server.client(),
        user_id="bob",
        storage=ChromaStorage.from_url(proxy.url, timeout=TIMEOUT),
        embedder=model,
    )
    answer, first_contact = ask(bob, "Hello")  # its client cannot be made: answers all the same
    assert answer == "Noted." and first_contact < BOUND
    with pytest.raises(StorageError):
        client.memory.get_all()

    os.kill(own_server.process.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60  # calls are held back a while after each failure
    while True:
        ask(client, "Which instrument do I play?")
        if injected(openai_server):
            break
        assert time.monotonic() < deadline, "memories never came back after the server did"
        time.sleep(0.2)
    for recovered in (later, bob):
        while True:
            ask(recovered, "Which instrument do I play?")
            if recovered is bob or injected(openai_server):
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert [m.text for m in later.memory.get_all()] == [CELLO["text"]]
    while True:  # bob's last call may have timed out on the just-resumed server: held back
        try:
            assert bob.memory.get_all() == []
            break
        except StorageError:
            assert time.monotonic() < deadline, "bob's storage never came back"
            time.sleep(0.2)
    proxy.close()


def test_a_killed_server_fails_fast_and_a_restarted_one_is_used_again(
    tmp_path, openai_server, model
) -> None:
    openai_server.responder = RememberingModel("Noted.", [CELLO])
    server = ChromaServer(tmp_path / "chroma")
    storage = ChromaStorage.from_url(server.url, timeout=TIMEOUT)
    client = with_fast_memory(
        openai_server.client(), user_id="alice", storage=storage, embedder=model
    )
    ask(client, "I play the cello in an orchestra")
    assert client.memory.flush(60)
    server.process.kill()
    server.process.wait()
    answer, elapsed = ask(client, "Which instrument do I play?")
    assert answer == "Noted." and not injected(openai_server)
    assert elapsed < BOUND  # refused at once; at most the recall's bound (3 s) in any case

    restarted = ChromaServer(server.path, port=server.port)  # the same port again
    try:
        deadline = time.monotonic() + 60  # calls are held back a while after each failure
        while True:
            ask(client, "Which instrument do I play?")
            if injected(openai_server):
                break
            assert time.monotonic() < deadline, "memories never came back after the restart"
            time.sleep(0.2)
    finally:
        restarted.stop()


OUTAGE_FACTS = [
    "Has a dog named Rex",
    "Lives in Lisbon",
    "Drinks green tea every morning",
    "Runs marathons on weekends",
    "Works as a night nurse",
    "Is learning Japanese",
]


def says(openai_server, text: str) -> bool:
    """Whether the last chat request carried ``text`` in its memory context."""
    return any(
        CONTEXT_OPEN in str(m.get("content")) and text in str(m.get("content"))
        for m in openai_server.requests[-1].body["messages"]
        if m["role"] == "system"
    )


def test_calls_during_an_outage_do_not_wait_for_writes_held_behind_a_failing_one(
    tmp_path, openai_server, model, monkeypatch
) -> None:
    """With the server killed, each turn's write waits (in order) behind the user's first
    one, which failed and waits out its backoff: every call from the third on waited the
    whole read-your-writes second for writes that could not be tried yet (measured: 0.004,
    0.003, then 1.007 s a call for as long as the outage lasted). Now the writer knows, from
    the failure its worker saw, that they cannot run before the wait ends, and the call goes
    on at once; once the server is back, the writes are stored and read."""
    from headroom_memory_integrations.jobs import Backoff
    from headroom_memory_integrations.writer import writer_for

    model_says = RememberingModel("Noted.", [CELLO])
    openai_server.responder = model_says
    server = ChromaServer(tmp_path / "chroma")
    queue_path = tmp_path / "jobs.sqlite3"
    # a first retry later than any call's wait (the default's 0.5 s may fall within one):
    # then no write behind the failing one can be stored while a call waits
    writer = writer_for(queue_path, backoff=Backoff(initial=5.0, jitter=0.0))
    storage = ChromaStorage.from_url(server.url, timeout=TIMEOUT)
    client = with_fast_memory(
        openai_server.client(),
        user_id="carol",
        storage=storage,
        embedder=model,
        queue_path=queue_path,
    )
    restarted: ChromaServer | None = None
    try:
        ask(client, "I play the cello in an orchestra")
        model_says.memories = []
        ask(client, "Which instrument do I play?")
        assert injected(openai_server)  # healthy: the next call read the write (settle)
        assert writer.settle_timeouts == 0

        server.process.kill()
        server.process.wait()
        settled: list[bool] = []
        settle = writer.settle

        def recording(memory, *args, **kwargs) -> bool:
            settled.append(settle(memory, *args, **kwargs))
            return settled[-1]

        monkeypatch.setattr(writer, "settle", recording)
        for fact in OUTAGE_FACTS:
            model_says.memories = [{"text": fact, "category": "fact"}]
            ask(client, f"Note this: {fact.lower()}")
        # the first outage call had nothing to wait for, the second waited for the first
        # write's try (it failed); each later one found its writes held behind that write,
        # which is not tried again within the wait: not settled, and not waited for
        assert len(settled) == len(OUTAGE_FACTS)
        assert settled[:2] == [True, True]
        assert settled[2:] == [False] * (len(OUTAGE_FACTS) - 2)
        assert writer.settle_timeouts == 0, "a call waited its whole second in vain"
        assert writer.stats()["retried"] >= 1

        restarted = ChromaServer(server.path, port=server.port)  # the same port
        model_says.memories = []
        deadline = time.monotonic() + 60  # calls are held back a while after each failure
        while True:  # the held writes are stored, and a next call reads them
            ask(client, "Which language am I learning?")
            if says(openai_server, OUTAGE_FACTS[-1]):
                break
            assert time.monotonic() < deadline, "the writes held in the outage were not read"
            time.sleep(0.2)
        assert client.memory.flush(30)
        stored = {m.text for m in client.memory.get_all()}
        assert stored == {CELLO["text"], *OUTAGE_FACTS}
    finally:
        client.memory.close(5)
        storage.close()
        for running in (restarted, server):
            if running is not None and running.process.poll() is None:
                running.stop()


SLOW = 0.8  # seconds the slow server takes for every request, within its timeout
SLOW_TIMEOUT = 1.5  # seconds per request: every one of them answers in time


def remember_cello(openai_server, chroma_server, model, user_id: str) -> None:
    """``user_id`` tells the server's memories "I play the cello"; the model then learns nothing
    more."""
    openai_server.responder = RememberingModel("Noted.", [CELLO])
    seed = with_fast_memory(
        openai_server.client(), user_id=user_id, db_path=chroma_server.url, embedder=model
    )
    ask(seed, "I play the cello in an orchestra")
    assert seed.memory.flush(60)
    openai_server.responder = RememberingModel("Noted.", [])


def test_a_slow_server_costs_a_chat_call_one_deadline_not_a_timeout_per_request(
    chroma_server, openai_server, model
) -> None:
    from _reliability_support import SlowProxy

    remember_cello(openai_server, chroma_server, model, "slow-alice")

    proxy = SlowProxy(chroma_server.port, SLOW)
    storage = ChromaStorage.from_url(proxy.url, timeout=SLOW_TIMEOUT)
    try:
        client = with_fast_memory(
            openai_server.client(), user_id="slow-alice", storage=storage, embedder=model
        )
        bound = READ_YOUR_WRITES_SECONDS + SLOW_TIMEOUT  # flow.recall_seconds, documented
        # the first call needs a dozen requests (connecting, opening, searching, reading),
        # each answered in SLOW s: before, it waited for all of them (~12 s) and answered with
        # the memory; now it goes on without memories once its one deadline has passed
        answer, first = ask(client, "Which instrument do I play?")
        assert answer == "Noted." and first < BOUND, first
        assert not injected(openai_server)  # cut short: not all its requests were answered
        # later calls keep to the bound, and memories come back once what was cut short (the
        # client, made on its own thread) is done: nothing was left half-done to block them
        deadline = time.monotonic() + 60
        while True:
            answer, took = ask(client, "Which instrument do I play?")
            assert answer == "Noted." and took < BOUND, took
            if injected(openai_server):
                break
            assert time.monotonic() < deadline, "memories never came back from the slow server"
            time.sleep(0.3)
        assert client.memory.counters["inject_failures"] >= 1  # the cut call was counted
        from headroom_memory_integrations.flow import recall_seconds

        assert recall_seconds(client.memory) == bound
    finally:
        storage.close()
        proxy.close()


def test_a_request_the_deadline_cut_short_says_nothing_of_the_server() -> None:
    """A request whose own timeout was cut to the chat call's time left, and failed, may have
    met a slow server, not a dead one: it is told apart (the storage then raises
    DeadlineExceeded and does not hold the server back), whatever requests came before it in
    the same guarded step. One given its whole timeout is not."""
    import httpx

    from headroom_memory_integrations.storage.guard import (
        _charge_deadline,
        memory_deadline,
        request_starts,
        request_was_cut,
    )

    def request() -> httpx.Request:
        timeouts = {"connect": 1.5, "read": 1.5, "write": 1.5, "pool": 1.5}
        return httpx.Request("GET", "http://127.0.0.1:9/", extensions={"timeout": timeouts})

    with memory_deadline(0.5):
        request_starts()
        first = request()
        _charge_deadline(first)
        assert request_was_cut() and first.extensions["timeout"]["read"] <= 0.5
    with memory_deadline(30):
        request_starts()
        _charge_deadline(request())
        assert not request_was_cut()  # its whole own timeout: a failure is the server's
    assert not request_was_cut()  # no deadline, nothing cut


def test_a_connection_lost_while_the_client_is_built_keeps_memory_away_only_a_while(
    chroma_server, openai_server, model, monkeypatch
) -> None:
    """The server's connection is lost without a reset right after the heartbeat, while
    chromadb's client is built: the build's requests time out as every other does, so once
    the server answers again memories come back (before, the build waited forever and every
    later call failed with "has not answered yet")."""
    from _reliability_support import BlackHoleProxy

    from headroom_memory_integrations.storage import chroma

    # a build still running is given up on only after 300 s: memories come back within the
    # 60 s below only if the lost build ended on its own timeout (TIMEOUT)
    monkeypatch.setattr(chroma, "_CLIENT_SETUP_SECONDS", 300.0)
    remember_cello(openai_server, chroma_server, model, "lost-alice")

    proxy = BlackHoleProxy(chroma_server.port)
    storage = ChromaStorage.from_url(proxy.url, timeout=TIMEOUT)
    try:
        client = with_fast_memory(
            openai_server.client(), user_id="lost-alice", storage=storage, embedder=model
        )
        answer, took = ask(client, "Which instrument do I play?")
        assert answer == "Noted." and not injected(openai_server)
        assert took < BOUND  # the lost request is never answered
        assert proxy.held >= 1  # the build's first request after the heartbeat was lost

        proxy.hole = False  # the server answers again (what was lost stays lost)
        deadline = time.monotonic() + 60  # calls are held back a while after each failure
        while True:
            ask(client, "Which instrument do I play?")
            if injected(openai_server):
                break
            assert time.monotonic() < deadline, "memories never came back after the server did"
            time.sleep(0.2)
        assert [m.text for m in client.memory.get_all()] == [CELLO["text"]]
    finally:
        storage.close()
        proxy.close()


def test_a_build_still_running_past_its_time_is_left_to_end_and_another_started(
    chroma_server, model, monkeypatch
) -> None:
    """A build of the client that no timeout reaches (one stuck where chromadb gives none) is
    given up once it has run its timeout plus the setup allowance: the next call after the
    hold-back starts another, and at most _ABANDONED_BUILDS are left running. A build given
    up on that ends later hands over its client, or closes it if another was kept."""
    import chromadb

    from headroom_memory_integrations import MemoryStore
    from headroom_memory_integrations.storage import chroma

    monkeypatch.setattr(chroma, "_CLIENT_SETUP_SECONDS", 0.5)
    monkeypatch.setattr(chroma, "_ABANDONED_BUILDS", 1, raising=False)
    stuck = threading.Event()
    builds: list[object] = []

    def hanging_build(hang: int):
        def build():
            builds.append(None)
            if len(builds) <= hang:
                stuck.wait(300)
            return chromadb.HttpClient(host="127.0.0.1", port=chroma_server.port)

        return build

    def call_until_answered(store: MemoryStore, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                store.get_all()
                return True
            except StorageError:
                time.sleep(0.1)
        return False

    # the first build hangs; the one started beside it once it is given up on answers
    storage = ChromaStorage(connect=hanging_build(1), location="a stuck build", timeout=0.5)
    try:
        store = MemoryStore("stuck-alice", storage=storage, embedder=model)
        assert call_until_answered(store, 60), "no build was started beside the stuck one"
        assert len(builds) == 2
        stuck.set()  # the given-up build ends: its client is closed, the kept one stays
        ends = time.monotonic() + 60
        while any(t.name == "headroom-memory-connect" for t in threading.enumerate()):
            assert time.monotonic() < ends, "the given-up build never ended"
            time.sleep(0.05)
        assert store.get_all() == []
    finally:
        storage.close()

    # every build hangs: one is left running, one more started, then no more
    stuck.clear()
    builds.clear()
    storage = ChromaStorage(connect=hanging_build(100), location="a stuck build", timeout=0.5)
    try:
        store = MemoryStore("stuck-alice", storage=storage, embedder=model)
        assert not call_until_answered(store, 12)
        assert len(builds) == 2
        stuck.set()  # both end late: the first to end is kept
        assert call_until_answered(store, 60)
    finally:
        storage.close()
