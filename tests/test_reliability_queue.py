"""Another process holding the job queue file's write lock (as a process frozen in the middle
of a transaction would) costs a chat call at most the documented bound, never blocks another
user's call, and loses no memory: work that cannot be queued in time is held and queued once
the file can be written."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import HashEmbedder, RememberingModel

from headroom_memory_integrations import writer
from headroom_memory_integrations.openai import with_fast_memory
from headroom_memory_integrations.writer import READ_YOUR_WRITES_SECONDS

HOLD_SECONDS = 6.0  # how long the other process keeps the queue file locked
SLACK = 1.5  # the machine is shared and noisy: a margin, not a measurement
QUEUE_WAIT = 0.25  # the documented wait for the queue file (writer.QUEUE_WAIT_SECONDS)


def hold_queue_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """A real second process that takes the file's write lock (``BEGIN IMMEDIATE``) and keeps
    it ``seconds`` seconds. Returns once it holds it."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2])); c.execute('COMMIT')\n",
            str(path),
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def say(client, text: str) -> float:
    started = time.monotonic()
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])
    return time.monotonic() - started


def test_a_locked_queue_file_holds_no_call_and_loses_no_memory(openai_server, tmp_path) -> None:
    model = RememberingModel("Noted.", [{"text": "Plays the cello", "category": "fact"}])
    openai_server.responder = model
    embedder = HashEmbedder()
    alice = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=tmp_path, embedder=embedder
    )
    bob = with_fast_memory(
        openai_server.client(), user_id="bob", db_path=tmp_path, embedder=embedder
    )
    for client in (alice, bob):
        say(client, "I play the cello")
        assert client.memory.flush(30)
    model.memories = [{"text": "Lives in Lyon", "category": "fact"}]

    holder = hold_queue_lock(tmp_path / "jobs.sqlite3", HOLD_SECONDS)
    try:
        took: dict[str, float] = {}
        call = threading.Thread(target=lambda: took.update(alice=say(alice, "I live in Lyon")))
        call.start()
        time.sleep(0.3)
        model.memories = []
        took["bob"] = say(bob, "What's the weather like?")  # another user, meanwhile
        call.join()
        # alice's memory could not be queued: her call waited at most QUEUE_WAIT_SECONDS for
        # the file (before: the 10 s busy timeout, and her memory was lost); bob's call did not
        # wait for hers (before: 14.6 s)
        assert took["alice"] < QUEUE_WAIT + SLACK, took
        assert took["bob"] < READ_YOUR_WRITES_SECONDS + SLACK, took
        # her next call waits for her held memory at most READ_YOUR_WRITES_SECONDS
        assert say(alice, "Anything new?") < READ_YOUR_WRITES_SECONDS + SLACK
        assert holder.poll() is None, "the lock was let go too early for this test to say"
        assert alice.memory.counters["queue_delays"] == 1
        assert writer.QUEUE_WAIT_SECONDS == QUEUE_WAIT
    finally:
        holder.wait(30)
    # once the file can be written again, the held memory is queued and stored: nothing lost
    assert alice.memory.flush(30)
    assert sorted(m.text for m in alice.memory.get_all()) == ["Lives in Lyon", "Plays the cello"]
    assert alice.memory.counters["store_failures"] == 0
    assert [m.text for m in bob.memory.get_all()] == ["Plays the cello"]


def test_work_held_for_a_locked_file_is_all_queued_and_forget_user_drops_it(
    openai_server, tmp_path
) -> None:
    model = RememberingModel("Noted.", [])
    openai_server.responder = model
    embedder = HashEmbedder()
    alice = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=tmp_path, embedder=embedder
    )
    carol = with_fast_memory(
        openai_server.client(), user_id="carol", db_path=tmp_path, embedder=embedder
    )
    for client in (alice, carol):
        say(client, "Hello")
        assert client.memory.flush(30)

    holder = hold_queue_lock(tmp_path / "jobs.sqlite3", 3.0)
    try:
        model.memories = [{"text": "Lives in Boston", "category": "fact"}]
        say(alice, "I live in Boston")
        model.memories = [{"text": "Sings in a choir", "category": "fact"}]
        say(alice, "I sing in a choir")  # held behind the first
        model.memories = [{"text": "Keeps bees", "category": "fact"}]
        say(carol, "I keep bees")
        carol.memory.forget_user()  # her held work goes with her
    finally:
        holder.wait(30)
    assert alice.memory.flush(30) and carol.memory.flush(30)
    texts = sorted(m.text for m in alice.memory.get_all())
    assert texts == ["Lives in Boston", "Sings in a choir"], texts
    assert carol.memory.get_all() == []
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal"):
        if (tmp_path / name).exists():
            assert b"Keeps bees" not in (tmp_path / name).read_bytes()
