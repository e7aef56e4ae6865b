"""Small writes to an embedded folder reach Chroma just after the caller returns: journaled
first, searchable in the process at once, stored by a worker thread, never lost (see
``storage/deferred.py``)."""

from __future__ import annotations

import json
import os
import selectors
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from _reliability_support import ROOT, files_containing, read_ahead, run_python
from conftest import HashEmbedder

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.storage import chroma, deferred
from headroom_memory_integrations.storage.deferred import JOURNAL_FILE, PendingWrite, merged


def _read_ahead(store: MemoryStore, monkeypatch) -> chroma.ChromaCollection:
    """The store once its user is read ahead (the state in which writes are deferred)."""
    monkeypatch.setattr(chroma, "_WARM_RETRY_SECONDS", 0.0)
    collection: chroma.ChromaCollection = read_ahead(store)
    return collection


def _in_chroma(collection: chroma.ChromaCollection, memory_id: str) -> bool:
    """Whether Chroma itself holds the record (asked directly, without waiting for anything)."""
    return bool(collection._collection.get(ids=[memory_id])["ids"])


def _journal(store: MemoryStore) -> bytes:
    return (store.storage.folder / JOURNAL_FILE).read_bytes()


@pytest.fixture
def held(monkeypatch) -> None:
    """The worker gathers writes for a minute unless somebody waits for them."""
    monkeypatch.setattr(deferred, "GROUP_SECONDS", 60.0)


def test_a_single_add_is_journaled_searchable_at_once_and_in_chroma_after_flush(
    hash_store: MemoryStore, monkeypatch, held
) -> None:
    hash_store.add("Plays the cello")  # the first write makes the collection, at once
    collection = _read_ahead(hash_store, monkeypatch)
    memory = hash_store.add("Keeps bees on the roof")
    assert hash_store.storage._deferred.pending == 1
    assert not _in_chroma(collection, memory.id)  # not yet: the worker is gathering
    assert b"Keeps bees on the roof" in _journal(hash_store)
    assert hash_store.get(memory.id).text == "Keeps bees on the roof"
    found = hash_store.search("Keeps bees on the roof", min_score=-1)
    assert found[0].memory.id == memory.id  # this process sees it at once
    assert hash_store.flush(10)
    assert _in_chroma(collection, memory.id) and _journal(hash_store) == b""
    assert hash_store.storage._deferred.pending == 0


def test_whatever_reads_chroma_waits_for_the_pending_writes(
    hash_store: MemoryStore, monkeypatch, held
) -> None:
    hash_store.add("Plays the cello")
    _read_ahead(hash_store, monkeypatch)
    for n in range(3):
        hash_store.add(f"Visited country number {n} last year")
    assert hash_store.storage._deferred.pending == 3
    assert hash_store.count() == 4  # Chroma answers, with every earlier write in it
    assert hash_store.storage._deferred.pending == 0


def test_writes_pending_when_the_process_is_killed_are_stored_by_the_next(db_path) -> None:
    run = run_python(
        f"""
        import os, signal, time
        from conftest import HashEmbedder
        from headroom_memory_integrations import MemoryStore
        from headroom_memory_integrations.storage import chroma, deferred
        deferred.GROUP_SECONDS = 60.0
        chroma._WARM_RETRY_SECONDS = 0.0
        store = MemoryStore("alice", db_path={str(db_path)!r}, embedder=HashEmbedder())
        store.add("Plays the cello")
        while store._open()._index is None:
            store.search("anything", min_score=-1)
            time.sleep(0.01)
        store.add("Said just before the crash")
        assert store.storage._deferred.pending == 1
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert run.returncode == -9, run.stderr
    assert b"Said just before the crash" in (db_path / JOURNAL_FILE).read_bytes()
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    texts = sorted(m.text for m in store.get_all())
    assert texts == ["Plays the cello", "Said just before the crash"]
    assert (db_path / JOURNAL_FILE).read_bytes() == b""


def test_a_write_chroma_refuses_is_retried_and_never_fails_the_caller(
    hash_store: MemoryStore, monkeypatch, caplog
) -> None:
    hash_store.add("Plays the cello")
    collection = _read_ahead(hash_store, monkeypatch)
    monkeypatch.setattr(deferred, "_RETRY_PAUSES", (0.01,))
    upsert = collection._collection.upsert
    refusals = []

    def refuses_twice(**request):
        if len(refusals) < 2:
            refusals.append(request["ids"])
            raise RuntimeError("the disk went away")
        return upsert(**request)

    monkeypatch.setattr(collection._collection, "upsert", refuses_twice)
    memory = hash_store.add("Keeps bees on the roof")  # no error for the caller
    assert hash_store.search("Keeps bees on the roof", min_score=-1)[0].memory.id == memory.id
    assert hash_store.flush(10)
    assert len(refusals) == 2 and _in_chroma(collection, memory.id)
    assert hash_store.storage._deferred.failures == 2
    assert "stay journaled" in caplog.text and _journal(hash_store) == b""


def test_deleting_a_pending_memory_leaves_its_text_in_no_file(
    hash_store: MemoryStore, monkeypatch, held
) -> None:
    hash_store.add("Plays the cello")
    _read_ahead(hash_store, monkeypatch)
    secret = "Keeps the spare key under the red flowerpot"
    memory = hash_store.add(secret)
    assert hash_store.storage._deferred.pending == 1
    hash_store.delete(memory.id)
    assert files_containing(hash_store.storage.folder, [secret]) == {}
    assert [m.text for m in hash_store.get_all()] == ["Plays the cello"]


def test_imports_and_batches_are_written_at_once(hash_store: MemoryStore, monkeypatch, held):
    hash_store.add("Plays the cello")
    _read_ahead(hash_store, monkeypatch)
    hash_store.add_many([f"Has read book number {n} twice" for n in range(20)])  # > 16 records
    hash_store.import_([json.dumps({"id": "f" * 32, "text": "Speaks Finnish"})])
    assert hash_store.storage._deferred.pending == 0


def test_writes_gathered_together_keep_each_memorys_last_version() -> None:
    def write(user: str, records: dict[str, str]) -> PendingWrite:
        vectors = np.array([[float(v), 0.0] for v in records.values()], dtype=np.float32)
        metas = {i: {"record": v} for i, v in records.items()}
        return PendingWrite(user, "test", 2, metas, vectors)

    writes = [write("a", {"x": "1", "y": "2"}), write("b", {"z": "3"}), write("a", {"x": "4"})]
    groups = merged(writes)
    assert [(g.user_id, list(g.records)) for g in groups] == [("a", ["y", "x"]), ("b", ["z"])]
    assert groups[0].records["x"] == {"record": "4"}
    assert groups[0].vectors.tolist() == [[2.0, 0.0], [4.0, 0.0]]
    again = PendingWrite.from_line(groups[0].to_line())  # as the journal keeps it
    assert (again.user_id, again.embedder, again.dimension) == ("a", "test", 2)
    assert again.records == groups[0].records
    assert again.vectors.tolist() == groups[0].vectors.tolist()


def test_writes_pending_in_a_removed_folder_are_given_up_not_retried_forever(
    hash_store: MemoryStore, monkeypatch, held, caplog
) -> None:
    import shutil

    hash_store.add("Plays the cello")
    _read_ahead(hash_store, monkeypatch)
    hash_store.add("Keeps bees on the roof")
    queue = hash_store.storage._deferred
    assert queue.pending == 1
    shutil.rmtree(hash_store.storage.folder)  # e.g. a temporary folder cleaned up
    queue.settle(10)  # no StorageError: the worker gave the write up with the folder
    assert queue.pending == 0 and "was removed with 1 write(s) pending" in caplog.text


def test_while_chroma_refuses_writes_callers_hear_it_and_nothing_pending_is_lost(
    hash_store: MemoryStore, monkeypatch
) -> None:
    from headroom_memory_integrations import StorageError

    hash_store.add("Plays the cello")
    collection = _read_ahead(hash_store, monkeypatch)
    monkeypatch.setattr(deferred, "_RETRY_PAUSES", (0.05,))
    upsert = collection._collection.upsert
    broken = [True]

    def refuses_while_broken(**request):
        if broken[0]:
            raise RuntimeError("the disk went away")
        return upsert(**request)

    monkeypatch.setattr(collection._collection, "upsert", refuses_while_broken)
    pending = hash_store.add("Keeps bees on the roof")  # deferred: no error for the caller
    queue = hash_store.storage._deferred
    deadline = time.monotonic() + 60
    while queue.last_error is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # the wait for the pending writes is long (120 s instead of 30), so that a stalled
    # machine's "at once" is still far from it (and a caller that waits it out fails on the
    # check below, well within the suite's 600 s per test)
    monkeypatch.setattr(type(queue).settle, "__defaults__", (120.0,))
    started = time.monotonic()
    with pytest.raises(StorageError, match="the disk went away"):
        hash_store.add("Grows tomatoes on the balcony")  # made at once, and it fails
    assert time.monotonic() - started < 60  # about FAILING_SETTLE_SECONDS, not the 120 s
    broken[0] = False
    assert hash_store.flush(60)
    assert _in_chroma(collection, pending.id)
    texts = sorted(m.text for m in hash_store.get_all())
    assert texts == ["Keeps bees on the roof", "Plays the cello"]


def test_a_flush_waits_for_chromas_next_try_however_slow_once_it_accepts_writes_again(
    hash_store: MemoryStore, monkeypatch
) -> None:
    """After Chroma refused a deferred write, ``flush(10)`` waits for the worker's next try
    even when it takes longer than a refusing Chroma is waited for (1 s: a loaded machine).
    Before, the wait was cut to 1 s, and flush returned False with the write about to be
    stored."""
    hash_store.add("Plays the cello")
    collection = _read_ahead(hash_store, monkeypatch)
    monkeypatch.setattr(deferred, "_RETRY_PAUSES", (0.05,))
    upsert = collection._collection.upsert
    tries = []

    def refuses_once_then_slow(**request):
        tries.append(request["ids"])
        if len(tries) == 1:
            raise RuntimeError("the disk went away")
        time.sleep(deferred.FAILING_SETTLE_SECONDS + 0.5)  # a loaded machine's fsync
        return upsert(**request)

    monkeypatch.setattr(collection._collection, "upsert", refuses_once_then_slow)
    pending = hash_store.add("Keeps bees on the roof")
    queue = hash_store.storage._deferred
    deadline = time.monotonic() + 60
    while queue.last_error is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert hash_store.flush(60)
    assert len(tries) == 2 and _in_chroma(collection, pending.id) and queue.pending == 0


def test_the_journal_keeps_only_pending_writes_when_writes_never_pause(
    tmp_path, monkeypatch
) -> None:
    import threading

    monkeypatch.setattr(deferred, "GROUP_SECONDS", 0.0)
    monkeypatch.setattr(deferred, "COMPACT_BYTES", 1)
    calls, gates = [], [threading.Event(), threading.Event()]

    def store(write: PendingWrite) -> None:  # Chroma, slow enough for writes to pile up
        calls.append(list(write.records))
        gates[min(len(calls), 2) - 1].wait(60)

    queue = deferred.DeferredWrites(tmp_path, store)

    def write(memory_id: str) -> PendingWrite:
        meta = {"record": json.dumps({"text": f"Text of {memory_id}"})}
        return PendingWrite("u", "test", 2, {memory_id: meta}, np.ones((1, 2), np.float32))

    queue.add(write("first"))
    while not calls:
        time.sleep(0.005)
    queue.add(write("second"))
    queue.add(write("third"))
    gates[0].set()  # "first" is stored while the others wait: the journal is rewritten
    deadline = time.monotonic() + 60
    while b"Text of first" in (tmp_path / JOURNAL_FILE).read_bytes():
        assert time.monotonic() < deadline, "the journal was never compacted"
        time.sleep(0.005)
    held = (tmp_path / JOURNAL_FILE).read_bytes()
    assert b"Text of second" in held and b"Text of third" in held
    assert stat.S_IMODE((tmp_path / JOURNAL_FILE).stat().st_mode) == 0o600  # (not the umask's)
    gates[1].set()
    queue.settle(60)
    assert calls == [["first"], ["second", "third"]]
    assert (tmp_path / JOURNAL_FILE).read_bytes() == b""
    assert not (tmp_path / (JOURNAL_FILE + ".new")).exists()
    queue.stop()


@pytest.mark.parametrize("when", ["open", "forget_user"])
def test_a_compacted_journal_left_beside_the_journal_is_erased(db_path, when) -> None:
    """A process killed between writing the compacted journal and renaming it over the journal
    leaves it (``.pending.new``) with memories' text; the journal itself is whole. The next
    process to open the folder erases it, and so does forgetting a user."""
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    store.add("Plays the cello")
    left = db_path / (JOURNAL_FILE + ".new")
    line = PendingWrite(
        "alice",
        "test",
        2,
        {"m1": {"record": json.dumps({"text": "Saw the divorce lawyer"})}},
        np.ones((1, 2), np.float32),
    ).to_line()
    if when == "open":
        store.storage.close()
        left.write_bytes(line)
        store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
        assert [m.text for m in store.get_all()] == ["Plays the cello"]  # (never replayed)
    else:
        left.write_bytes(line)
        assert store.forget_user() == 1
    assert not left.exists()
    assert files_containing(db_path, ["divorce lawyer"]) == {}


_OWNER = """
import sys, time
from conftest import HashEmbedder
from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.storage import chroma, deferred
deferred.GROUP_SECONDS = 600.0  # the worker gathers until the process is killed
chroma._WARM_RETRY_SECONDS = 0.0
store = MemoryStore("alice", db_path={db!r}, embedder=HashEmbedder())
store.add("Plays the cello")
while store._open()._index is None:
    store.search("anything", min_score=-1)
    time.sleep(0.01)
pending = store.add({pending!r})
assert store.storage._deferred.pending == 1
print("ready", pending.id, flush=True)
time.sleep(600)
"""


def _reader_of_a_killed_owner(db_path, pending: str) -> tuple[MemoryStore, str]:
    """A process (this one) that opened the folder as a reader while another owned it; the
    owner added ``pending``, which is journaled, not yet in Chroma, and was then killed.
    Returns this process's store and the id of the pending memory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER.format(db=str(db_path), pending=pending)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        with selectors.DefaultSelector() as waiting:  # epoll: any descriptor number (a long
            waiting.register(owner.stdout, selectors.EVENT_READ)  # run opens over 1,024)
            ready = waiting.select(120)
        line = owner.stdout.readline().strip() if ready else ""
        if not line.startswith("ready "):
            owner.kill()
            raise AssertionError(f"the owner never got ready: {owner.communicate(timeout=30)}")
        reader = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
        assert [m.text for m in reader.get_all()] == ["Plays the cello"]  # opened: a reader
        assert not reader.storage._folder_lock.held
    finally:
        owner.kill()
        owner.wait(30)
        owner.stdout.close()
        owner.stderr.close()
    assert b"Plays" not in (db_path / JOURNAL_FILE).read_bytes()  # only the pending write
    return reader, line.split()[1]


def test_a_reader_that_becomes_the_writer_stores_the_killed_writers_journal_first(
    db_path, monkeypatch
) -> None:
    reader, _ = _reader_of_a_killed_owner(db_path, "Said just before the crash")
    assert b"Said just before the crash" in (db_path / JOURNAL_FILE).read_bytes()
    reader.add("Written by the process that took over")  # takes the lock: replays first
    collection = _read_ahead(reader, monkeypatch)
    assert collection._sole_writer
    reader.add("A second write, stored behind the caller")  # its worker empties the journal
    assert reader.flush(10)
    assert (db_path / JOURNAL_FILE).read_bytes() == b""
    expected = [
        "A second write, stored behind the caller",
        "Plays the cello",
        "Said just before the crash",  # before: gone for good, with no error anywhere
        "Written by the process that took over",
    ]
    assert sorted(m.text for m in reader.get_all()) == expected
    reader.storage.close()
    fresh = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    assert sorted(m.text for m in fresh.get_all()) == expected


def test_forget_user_by_a_reader_that_becomes_the_writer_leaves_nothing_to_replay(
    db_path,
) -> None:
    reader, _ = _reader_of_a_killed_owner(db_path, "Said just before the crash")
    assert reader.forget_user() == 2  # the journaled write is stored, then forgotten with all
    assert reader.get_all() == []
    assert (db_path / JOURNAL_FILE).read_bytes() == b""
    reader.storage.close()
    fresh = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    assert fresh.get_all() == []  # before: the forgotten memory came back from the journal
    assert files_containing(db_path, ["Said just before the crash"]) == {}


def test_a_killed_writers_journal_never_replays_an_old_version_over_a_newer_one(
    db_path,
) -> None:
    reader, pending = _reader_of_a_killed_owner(db_path, "Dentist appointment on Tuesday")
    reader.put(pending, "Dentist appointment on Thursday")  # a newer version, written at once
    assert reader.get(pending).text == "Dentist appointment on Thursday"
    reader.storage.close()
    fresh = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    # before: the journal, never replayed by the reader, put Tuesday back at this open
    assert fresh.get(pending).text == "Dentist appointment on Thursday"


def test_a_journal_the_worker_could_not_empty_is_emptied_before_a_delete(
    hash_store: MemoryStore, monkeypatch, held
) -> None:
    hash_store.add("Plays the cello")
    _read_ahead(hash_store, monkeypatch)
    monkeypatch.setattr(deferred.DeferredWrites, "_empty_journal", lambda self: None)  # failed
    secret = hash_store.add("Keeps the spare key under the red flowerpot")
    assert hash_store.flush(10)
    assert b"spare key" in _journal(hash_store)  # stored, but still journaled
    hash_store.delete(secret.id)
    assert _journal(hash_store) == b""  # before: replayed at the next open, the memory back
    hash_store.add("Keeps bees on the roof")
    assert hash_store.flush(10)
    assert hash_store.forget_user() == 2
    assert _journal(hash_store) == b""
    hash_store.storage.close()
    fresh = MemoryStore("alice", db_path=hash_store.storage.folder, embedder=HashEmbedder())
    assert fresh.get_all() == []


def test_after_one_users_delete_another_users_small_write_is_still_stored_behind_the_caller(
    hash_store: MemoryStore, monkeypatch, held
) -> None:
    """A delete closes Chroma for its erase and opens it anew (docs/reliability.md, section 6):
    every user's handle lets go of its chromadb collection, not of knowing that the collection
    exists, so another user's next small write is still journaled and left to the worker, not
    made in the caller's call (where Chroma would load that user's vector index first)."""
    bob = MemoryStore("bob", storage=hash_store.storage, embedder=hash_store.embedder)
    bob.add("Plays the oboe")
    hash_store.add("Plays the cello")
    gone = hash_store.add("Lives in Lisbon")
    _read_ahead(hash_store, monkeypatch)
    bobs = _read_ahead(bob, monkeypatch)
    hash_store.delete(gone.id)
    memory = bob.add("Keeps bees on the roof")
    assert hash_store.storage._deferred.pending == 1
    assert b"Keeps bees on the roof" in _journal(bob)
    assert bob.flush(10) and _journal(bob) == b""
    assert _in_chroma(bobs, memory.id)
    assert sorted(m.text for m in bob.get_all()) == ["Keeps bees on the roof", "Plays the oboe"]
    assert [m.text for m in hash_store.get_all()] == ["Plays the cello"]


@pytest.mark.parametrize("behind", [True, False], ids=["deferred", "written at once"])
def test_a_rewrite_of_a_memory_gone_stores_the_others_and_nothing_of_it(
    hash_store: MemoryStore, monkeypatch, held, behind
) -> None:
    """``UserCollection.rewrite``: a memory it is told is a rewrite and that is not stored as
    the write starts is neither written nor created, and its id is returned; the write's
    other memories are stored, and the handle's cache and index hold what was stored (not
    the new version of the deleted one). ``upsert`` creates what it does not find."""
    from dataclasses import replace

    kept, gone = hash_store.add("Plays the cello"), hash_store.add("Lives in Lisbon")
    collection = _read_ahead(hash_store, monkeypatch)
    hash_store.delete(gone.id)
    viola, porto = replace(kept, text="Plays the viola"), replace(gone, text="Lives in Porto")
    bees = replace(kept, id="bees", text="Keeps bees on the roof", history=())
    vectors = hash_store._vectors([viola, porto, bees])
    assert collection.rewrite(
        [viola, porto, bees], vectors, rewrites={kept.id, gone.id}, behind=behind
    ) == {gone.id}
    assert (hash_store.storage._deferred.pending > 0) == behind
    assert collection.get([gone.id]) == [] and gone.id not in collection._index
    assert {m.id: m.text for m in hash_store.get_all()} == {
        kept.id: "Plays the viola",
        "bees": "Keeps bees on the roof",
    }
    assert hash_store.flush(10)
    assert not _in_chroma(collection, gone.id) and _in_chroma(collection, "bees")
    assert collection.upsert([porto], vectors[1:2]) is None
    assert [m.text for m in collection.get([gone.id])] == ["Lives in Porto"]
