"""Another process holding the job queue file's write lock (as a process frozen in the middle
of a transaction would) costs a chat call at most the documented bound, never blocks another
user's call, and loses no memory: work that cannot be queued in time is held and queued once
the file can be written. A lock on Chroma's own database costs a chat call its bound too, and
``add`` a clear error after a bounded wait."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _reliability_support import wait_for
from conftest import HashEmbedder, RememberingModel

from headroom_memory_integrations import writer
from headroom_memory_integrations.jobs import JobQueue
from headroom_memory_integrations.openai import with_fast_memory

QUEUE_WAIT = 0.25  # the documented wait for the queue file (writer.QUEUE_WAIT_SECONDS)
BUSY_SECONDS = 300.0  # the queue's wait for another process's lock in these tests (else 10 s)
BOUND = 60.0  # "did not wait for the lock": far from what waiting for it costs (300 s)


@pytest.fixture(autouse=True)
def patient_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory writers' job queues wait up to BUSY_SECONDS for another process's lock (10 s
    otherwise): a call that waited for the locked file would take that long, far from BOUND,
    where 10 s against a second or two failed on a stalled machine."""

    class PatientQueue(JobQueue):
        def __init__(self, path: Any, **options: Any) -> None:
            super().__init__(path, busy_timeout=BUSY_SECONDS, **options)

    monkeypatch.setattr(writer, "JobQueue", PatientQueue)


def hold_queue_lock(path: Path, begin: str = "BEGIN IMMEDIATE") -> subprocess.Popen[str]:
    """A real second process that takes the file's write lock (``begin``: ``BEGIN IMMEDIATE``
    or ``BEGIN EXCLUSIVE``) and keeps it until :func:`let_go` (BUSY_SECONDS at most). Returns
    once it holds it."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import select, sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute(sys.argv[3]); print('locked', flush=True)\n"
            "select.select([sys.stdin], [], [], float(sys.argv[2])); c.execute('COMMIT')\n",
            str(path),
            str(BUSY_SECONDS),
            begin,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def let_go(holder: subprocess.Popen[str]) -> None:
    """The holder commits and ends (its standard input closed). Again: nothing."""
    assert holder.stdin is not None
    if not holder.stdin.closed:
        holder.stdin.close()
    holder.wait(60)
    assert holder.stdout is not None
    holder.stdout.close()


def say(client, text: str) -> float:
    started = time.monotonic()
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])
    return time.monotonic() - started


def users_who_said(openai_server, tmp_path: Path, text: str, *names: str) -> list:
    """A wrapped client for each of ``names`` on one folder, each having said ``text`` (its
    memories stored)."""
    embedder = HashEmbedder()
    clients = [
        with_fast_memory(openai_server.client(), user_id=name, db_path=tmp_path, embedder=embedder)
        for name in names
    ]
    for client in clients:
        say(client, text)
        assert client.memory.flush(60)
    return clients


def test_a_locked_queue_file_holds_no_call_and_loses_no_memory(openai_server, tmp_path) -> None:
    model = RememberingModel("Noted.", [{"text": "Plays the cello", "category": "fact"}])
    openai_server.responder = model
    alice, bob = users_who_said(openai_server, tmp_path, "I play the cello", "alice", "bob")
    lyon = RememberingModel("Noted.", [{"text": "Lives in Lyon", "category": "fact"}])
    openai_server.responder = lambda body: (
        lyon if "I live in Lyon" in str(body["messages"][-1]["content"]) else RememberingModel()
    )(body)

    holder = hold_queue_lock(tmp_path / "jobs.sqlite3")
    try:
        took: dict[str, float] = {}
        asked = len(openai_server.requests)
        call = threading.Thread(target=lambda: took.update(alice=say(alice, "I live in Lyon")))
        call.start()
        wait_for(lambda: len(openai_server.requests) > asked)  # she has her answer, or soon
        took["bob"] = say(bob, "What's the weather like?")  # another user, meanwhile
        call.join(BOUND)
        assert not call.is_alive(), "alice's call waited for the locked file"
        # alice's memory could not be queued: her call waited at most QUEUE_WAIT_SECONDS for
        # the file, not the busy timeout (before: 10 s, and her memory was lost; here 300 s);
        # bob's call did not wait for hers (before: 14.6 s; here over 300 s)
        assert took["alice"] < BOUND and took["bob"] < BOUND, took
        # her next call waits for her held memory at most READ_YOUR_WRITES_SECONDS, not until
        # it is stored (the lock is held until let go)
        assert say(alice, "Anything new?") < BOUND
        assert holder.poll() is None  # all that while, the file was locked
        assert alice.memory.counters["queue_delays"] == 1
        assert writer.QUEUE_WAIT_SECONDS == QUEUE_WAIT
    finally:
        let_go(holder)
    # once the file can be written again, the held memory is queued and stored: nothing lost
    assert alice.memory.flush(60)
    assert sorted(m.text for m in alice.memory.get_all()) == ["Lives in Lyon", "Plays the cello"]
    assert alice.memory.counters["store_failures"] == 0
    assert [m.text for m in bob.memory.get_all()] == ["Plays the cello"]


def test_work_held_for_a_locked_file_is_all_queued_and_forget_user_drops_it(
    openai_server, tmp_path
) -> None:
    model = RememberingModel("Noted.", [])
    openai_server.responder = model
    alice, carol = users_who_said(openai_server, tmp_path, "Hello", "alice", "carol")

    holder = hold_queue_lock(tmp_path / "jobs.sqlite3")
    try:
        model.memories = [{"text": "Lives in Boston", "category": "fact"}]
        say(alice, "I live in Boston")
        model.memories = [{"text": "Sings in a choir", "category": "fact"}]
        say(alice, "I sing in a choir")  # held behind the first
        model.memories = [{"text": "Keeps bees", "category": "fact"}]
        say(carol, "I keep bees")
        assert holder.poll() is None  # all that while, the file was locked
        # her held work goes with her; deleting her queued jobs waits for the file, let go
        # once she has begun
        threading.Timer(1.0, let_go, (holder,)).start()
        carol.memory.forget_user()
    finally:
        let_go(holder)
    assert alice.memory.flush(60) and carol.memory.flush(60)
    texts = sorted(m.text for m in alice.memory.get_all())
    assert texts == ["Lives in Boston", "Sings in a choir"], texts
    assert carol.memory.get_all() == []
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal"):
        if (tmp_path / name).exists():
            assert b"Keeps bees" not in (tmp_path / name).read_bytes()


def test_each_piece_of_work_held_for_a_locked_file_is_counted_and_logged_once(
    openai_server, tmp_path, caplog, monkeypatch
) -> None:
    """Work held behind other held work waits in memory for the locked file as much as the
    first piece: each piece is counted in ``queue_delays``, once. Before, only the first piece
    was: another user's memory held behind it (or a later one of the same user) showed
    nothing, though a process killed meanwhile would lose it. The first is logged, then at
    most one line per ``SURVIVED_LOG_SECONDS``, which says how many were held since: one line
    a piece (a chat call's) flooded the log while a backup tool held the file."""
    model = RememberingModel("Noted.", [])
    openai_server.responder = model
    alice, bob = users_who_said(openai_server, tmp_path, "Hello", "alice", "bob")

    def held_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "kept in memory" in r.getMessage()]

    holder = hold_queue_lock(tmp_path / "jobs.sqlite3")
    try:
        with caplog.at_level(logging.WARNING, logger="headroom_memory_integrations.writer"):
            for client, said, memory in (
                (alice, "I live in Lyon", "Lives in Lyon"),
                (bob, "I live in Paris", "Lives in Paris"),  # held behind alice's
                (alice, "I sing in a choir", "Sings in a choir"),  # behind both
            ):
                model.memories = [{"text": memory, "category": "fact"}]
                say(client, said)
            assert alice.memory.counters["queue_delays"] == 2
            assert bob.memory.counters["queue_delays"] == 1
            assert len(held_lines()) == 1, held_lines()  # one line for the three pieces
            monkeypatch.setattr(writer, "SURVIVED_LOG_SECONDS", 0.0)  # the minute is over
            model.memories = [{"text": "Keeps bees", "category": "fact"}]
            say(bob, "I keep bees")
            assert holder.poll() is None  # all that while, the file was locked
        let_go(holder)
        assert alice.memory.flush(60) and bob.memory.flush(60)
    finally:
        let_go(holder)
    lines = held_lines()
    assert len(lines) == 2 and "2 more pieces held" in lines[1], lines
    assert (alice.memory.counters["queue_delays"], bob.memory.counters["queue_delays"]) == (2, 2)
    texts = sorted(m.text for m in alice.memory.get_all())
    assert texts == ["Lives in Lyon", "Sings in a choir"], texts
    assert sorted(m.text for m in bob.memory.get_all()) == ["Keeps bees", "Lives in Paris"]


# -- a store closed while one of its calls waits for the model -------------------------------------

EXTRACTED = '{"memories": [{"text": "Has a dog named Rex", "category": "fact"}]}'


class HeldModel:
    """Answers "Noted." with the block of "Has a dog named Rex" (inline), or that memory as an
    extraction answer; the first chat answer waits until ``release`` is set."""

    def __init__(self) -> None:
        self.asked, self.release = threading.Event(), threading.Event()
        self.inline = RememberingModel(
            "Noted.", [{"text": "Has a dog named Rex", "category": "fact"}]
        )

    def __call__(self, body: dict):
        if "You maintain long-term memory" in str(body["messages"][0].get("content")):
            return EXTRACTED
        self.asked.set()
        assert self.release.wait(60)
        return self.inline(body)


def call_while_closing(client, model: HeldModel, between=lambda: None) -> threading.Thread:
    """Start a call, close the client's store while the model has not answered yet (as an
    application shutting it down from another thread), run ``between``, let the model
    answer; returns the call's thread, joined."""
    answered: list[str] = []
    call = threading.Thread(
        target=lambda: answered.append(
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "I have a dog named Rex."}]
            )
            .choices[0]
            .message.content
        )
    )
    call.start()
    assert model.asked.wait(60)
    assert client.memory.close(60)  # the last store on the file: its workers and queue close
    between()
    model.release.set()
    call.join(60)
    assert answered and "Rex" not in answered[0] and "memory" not in answered[0]
    return call


def queued_jobs(path: Path, deadline: float = 60.0) -> list[tuple[str, str]]:
    """The jobs in the queue file, once there are some (or after ``deadline`` seconds)."""
    import sqlite3

    ends = time.monotonic() + deadline
    while True:
        with sqlite3.connect(path) as connection:
            jobs = connection.execute("SELECT kind, payload FROM jobs").fetchall()
        if jobs or time.monotonic() > ends:
            return jobs
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["fast", "background"])
def test_a_call_under_way_when_its_store_is_closed_leaves_its_memory_queued(
    openai_server, tmp_path, mode
) -> None:
    """close() stops serving the store's work, "what is left stays queued": that includes the
    work of a call still waiting for its answer (before: "job queue ... is closed", counted as
    a store failure, and the memory lost)."""
    from headroom_memory_integrations.openai import with_memory

    model = HeldModel()
    openai_server.responder = model
    wrap = with_fast_memory if mode == "fast" else with_memory
    embedder = HashEmbedder()
    client = wrap(openai_server.client(), user_id="alice", db_path=tmp_path, embedder=embedder)
    client.memory.add("Plays the cello")
    call_while_closing(client, model)
    assert client.memory.counters["store_failures"] == 0
    jobs = queued_jobs(tmp_path / "jobs.sqlite3")
    assert [kind for kind, _ in jobs] == ["store" if mode == "fast" else "extract"], jobs
    assert "Rex" in jobs[0][1]
    # a later wrapper (here, or the next process) runs it
    later = wrap(openai_server.client(), user_id="alice", db_path=tmp_path, embedder=embedder)
    assert later.memory.flush(60)
    texts = sorted(m.text for m in later.memory.get_all())
    assert texts == ["Has a dog named Rex", "Plays the cello"], texts
    later.close()


def test_a_call_under_way_when_its_store_is_closed_goes_to_the_wrapper_made_since(
    openai_server, tmp_path
) -> None:
    """A wrapper made for the same folder after the close serves the late work at once: its
    user's next call through it finds the memory (read-your-writes)."""
    model = HeldModel()
    openai_server.responder = model
    embedder = HashEmbedder()
    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=tmp_path, embedder=embedder
    )
    made: list = []

    def make_another():
        made.append(
            with_fast_memory(
                openai_server.client(), user_id="alice", db_path=tmp_path, embedder=embedder
            )
        )

    call_while_closing(client, model, between=make_another)
    later = made[0]
    assert later.memory.flush(60)
    assert [m.text for m in later.memory.get_all()] == ["Has a dog named Rex"]
    assert client.memory.counters["store_failures"] == 0
    later.close()


# -- async calls never write the queue file on the event loop's thread -----------------------------


class PutThreads:
    """Records the thread of every ``JobQueue.put`` (the write to the queue file)."""

    def __init__(self, monkeypatch) -> None:
        self.threads: list[int] = []
        original = JobQueue.put

        def put(queue, *args, **kwargs):
            self.threads.append(threading.get_ident())
            return original(queue, *args, **kwargs)

        monkeypatch.setattr(JobQueue, "put", put)


def test_an_async_call_under_a_locked_queue_file_does_not_freeze_the_event_loop(
    openai_server, tmp_path, monkeypatch
) -> None:
    """The queue file locked by another process: an async call's memory work waits for it
    (QUEUE_WAIT_SECONDS, then held) in a thread, never on the event loop's thread, which
    every other task of the application shares (before: the whole loop stood still 0.25 s
    per call), and the memory is stored once the lock goes."""
    model = RememberingModel("Noted.", [])
    openai_server.responder = model
    embedder = HashEmbedder()
    client = with_fast_memory(
        openai_server.async_client(), user_id="alice", db_path=tmp_path, embedder=embedder
    )
    puts = PutThreads(monkeypatch)

    async def main():
        messages = [{"role": "user", "content": "Hello"}]
        await client.chat.completions.create(model="gpt-4o", messages=messages)
        await asyncio.to_thread(client.memory.flush, 60)
        holder = hold_queue_lock(tmp_path / "jobs.sqlite3")
        try:
            model.memories = [{"text": "Lives in Lyon", "category": "fact"}]
            messages = [{"role": "user", "content": "I live in Lyon"}]
            await client.chat.completions.create(model="gpt-4o", messages=messages)
            assert holder.poll() is None  # the call was made while the file was locked
        finally:
            await asyncio.to_thread(let_go, holder)
        assert await asyncio.to_thread(client.memory.flush, 60)
        await client.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(puts.threads) >= 2  # the try that found the file locked, the held work's
    assert loop_thread not in puts.threads
    assert client.memory.counters["queue_delays"] == 1
    assert sorted(m.text for m in client.memory.get_all()) == ["Lives in Lyon"]


def test_no_async_path_writes_the_queue_file_on_the_event_loop(
    openai_server, tmp_path, monkeypatch
) -> None:
    """Every async way of calling the model (create, a stream, with_raw_response plain and
    streamed, with_streaming_response, the Responses API) queues its memory work off the event
    loop's thread; a whole answer's, or a finished stream's, before the call (the stream)
    returns: a crash right after it loses nothing."""
    model = RememberingModel("Noted.", [{"text": "Likes tea", "category": "fact"}])
    model.chunk_size = 4
    openai_server.responder = model
    client = with_fast_memory(
        openai_server.async_client(), user_id="alice", db_path=tmp_path, embedder=HashEmbedder()
    )
    puts = PutThreads(monkeypatch)
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "I like tea"}]}
    completions = client.chat.completions

    async def main():
        async def create():
            await completions.create(**request)

        async def stream():
            async for _ in await completions.create(**request, stream=True):
                pass

        async def raw():
            raw = await completions.with_raw_response.create(**request)
            raw.parse()  # openai's parse() is synchronous: the work was done before it

        async def raw_stream():
            raw = await completions.with_raw_response.create(**request, stream=True)
            async for _ in raw.parse():
                pass

        async def streaming_response():
            async with completions.with_streaming_response.create(**request) as response:
                await response.parse()

        async def responses():
            await client.responses.create(model="gpt-4o", input="I like tea")

        for way in (create, stream, raw, raw_stream, streaming_response, responses):
            before = len(puts.threads)
            await way()
            assert len(puts.threads) == before + 1, way.__name__  # in the file already
        assert await asyncio.to_thread(client.memory.flush, 60)
        await client.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert loop_thread not in puts.threads


def test_memory_work_queued_on_an_event_loops_thread_is_handed_to_a_thread(
    openai_server, tmp_path, monkeypatch
) -> None:
    """Work queued on the event loop's thread anyway (a Responses API stream finishes its
    answer at its final event; a synchronous client called in a coroutine) is handed to the
    queue's hand-over thread at once, never written there, and is stored all the same."""
    model = RememberingModel("Noted.", [{"text": "Likes tea", "category": "fact"}])
    model.chunk_size = 4
    openai_server.responder = model
    embedder = HashEmbedder()
    aclient = with_fast_memory(
        openai_server.async_client(), user_id="alice", db_path=tmp_path, embedder=embedder
    )
    client = with_fast_memory(openai_server.client(), memory=aclient.memory)
    puts = PutThreads(monkeypatch)

    async def main():
        async for _ in await aclient.responses.create(
            model="gpt-4o", input="I like tea", stream=True
        ):
            pass
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "I like tea"}]
        )
        assert await asyncio.to_thread(aclient.memory.flush, 60)
        await aclient.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(puts.threads) == 2
    assert loop_thread not in puts.threads
    assert [m.text for m in aclient.memory.get_all()] == ["Likes tea"]
    assert aclient.memory.counters["store_failures"] == 0


@pytest.mark.parametrize("begin", ["BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"])
def test_another_process_locking_chromas_database_freezes_nothing(
    openai_server, tmp_path, begin
) -> None:
    """A second process holds a transaction on the folder's ``chroma.sqlite3`` (a backup
    tool, an ``sqlite3`` shell) for BUSY_SECONDS. chromadb's core waits for such a lock
    holding Python's interpreter lock: a chat call's search stopped every thread of the
    process for as long as the lock was held (300 s here), far past the call's bound, and
    ``add`` with it (a write waits for either lock; a read that writes nothing for the
    exclusive one). Now the chat call answers within its bound (without memories, counted,
    when Chroma is locked for it), ``add`` raises a StorageError saying the database is
    locked, and once the lock goes, memories are read and written again."""
    from headroom_memory_integrations import StorageError

    model = RememberingModel("Noted.", [{"text": "Plays the cello", "category": "fact"}])
    openai_server.responder = model
    users_who_said(openai_server, tmp_path, "I play the cello", "alice")
    model.memories = []
    # carol is new in this process and has never searched: her collection is open (her first
    # memory stored) but nothing of it is read ahead, so her call's search and her add go to
    # Chroma (a user with no collection yet may be answered without asking it)
    carol = with_fast_memory(
        openai_server.client(), user_id="carol", db_path=tmp_path, embedder=HashEmbedder()
    )
    carol.memory.add("Plays the viola")
    holder = hold_queue_lock(tmp_path / "chroma.sqlite3", begin)
    try:
        assert say(carol, "What do I play?") < BOUND
        if begin == "BEGIN EXCLUSIVE":  # (a plain read of Chroma's waits for this one alone)
            assert carol.memory.counters["inject_failures"] == 1
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"chroma\.sqlite3 locked"):
            carol.memory.add("Lives in Lyon")
        assert time.monotonic() - started < BOUND
        assert holder.poll() is None  # all that while, the file was locked
    finally:
        holder.kill()
        holder.wait(60)
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()
    carol.memory.add("Lives in Lyon")
    assert sorted(m.text for m in carol.memory.get_all()) == ["Lives in Lyon", "Plays the viola"]


def test_a_queue_file_deleted_while_in_use_keeps_the_work_queued_after_it(
    openai_server, tmp_path
) -> None:
    """``jobs.sqlite3`` (and its -wal and -shm) is deleted while a wrapper runs (the folder
    emptied by hand, a cleanup script). Before, the process went on writing its jobs into the
    deleted file: nothing was at the path any more, a process killed then lost them, and
    another process found another queue. Now the call's memory is queued in a file made at
    the path, stored, and ``forget_user()`` leaves none of the user's text in any file."""
    model = RememberingModel("Noted.", [{"text": "Plays the cello", "category": "fact"}])
    openai_server.responder = model
    [alice] = users_who_said(openai_server, tmp_path, "I play the cello", "alice")
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    model.memories = [{"text": "Lives in Lyon", "category": "fact"}]
    assert say(alice, "I live in Lyon") < BOUND
    assert (tmp_path / "jobs.sqlite3").is_file()  # the queue is at its path again
    assert alice.memory.flush(60)
    assert sorted(m.text for m in alice.memory.get_all()) == ["Lives in Lyon", "Plays the cello"]
    assert alice.memory.counters["store_failures"] == 0
    alice.memory.forget_user()
    assert alice.memory.get_all() == []
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"Lives in Lyon" not in path.read_bytes(), path


def test_a_memory_folder_removed_while_in_use_is_not_made_again_by_the_queue(
    openai_server, tmp_path
) -> None:
    """The whole folder is removed while a wrapper runs (the user wiped their memories): the
    next call answers, and its memory work, which cannot be queued, is counted as a store
    failure (and logged) rather than written into a new file or folder at that path."""
    folder = tmp_path / "memories"
    model = RememberingModel("Noted.", [{"text": "Plays the cello", "category": "fact"}])
    openai_server.responder = model
    [alice] = users_who_said(openai_server, folder, "I play the cello", "alice")
    import shutil

    for _ in range(100):  # (a read-ahead may still write in it: removed again until gone)
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            break
        time.sleep(0.1)
    model.memories = [{"text": "Lives in Lyon", "category": "fact"}]
    assert say(alice, "I live in Lyon") < BOUND
    assert alice.memory.counters["store_failures"] == 1
    assert not (folder / "jobs.sqlite3").exists()
