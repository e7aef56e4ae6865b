"""Reliability and privacy (issue 11): one search index per user and process whoever writes,
batches over Chroma's maximum, writes that fail leave nothing behind, deleted text erased from
every file, one writing process per embedded folder, and the smaller failures of item 7.
Real embedded Chroma in temp folders; docs/reliability.md maps each guarantee to its test."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _reliability_support import (
    RandomEmbedder,
    files_containing,
    files_holding_vector,
    freed_text_handed_back,
    is_root,
    make_writable,
    read_ahead,
    read_only_view,
    run_python,
    wait_for,
    wrapped_for,
)
from conftest import HashEmbedder, RememberingModel

from headroom_memory_integrations import (
    InvalidInputError,
    MemoryStore,
    StorageError,
)
from headroom_memory_integrations.jobs import Backoff
from headroom_memory_integrations.openai import with_fast_memory, with_memory
from headroom_memory_integrations.storage import chroma
from headroom_memory_integrations.storage.folder import ERASE_FILE, scrub_freed_memory
from headroom_memory_integrations.testing import Reply

FAST = Backoff(initial=0.01, factor=2.0, maximum=0.05, jitter=0.0)


def texts_found(store: MemoryStore, query: str, top_k: int = 5) -> list[str]:
    return [r.memory.text for r in store.search(query, top_k=top_k, min_score=-1)]


def wait_for_index(store: MemoryStore, monkeypatch, seconds: float = 30.0) -> None:
    """Search until the background read-ahead has built the in-memory index."""
    monkeypatch.setattr(chroma, "_WARM_RETRY_SECONDS", 0.0)
    collection = store._open()
    deadline = time.monotonic() + seconds
    while collection._index is None:
        assert time.monotonic() < deadline, "the read-ahead never finished"
        store.search("anything", min_score=-1)
        time.sleep(0.02)


# -- 1: one index per user and process ---------------------------------------------------------


def test_two_stores_of_one_user_stay_in_step_through_clear(db_path, monkeypatch) -> None:
    """The issue's reproduction: a write through one store reaches the other's searches even
    after the other cleared the user and built its in-memory index."""
    embedder = HashEmbedder()
    a = MemoryStore("alice", db_path=db_path, embedder=embedder)
    b = MemoryStore("alice", db_path=db_path, embedder=embedder)
    a.add("Plays the cello")
    b.get_all()
    a.clear()
    a.add("Lives in Lisbon")
    wait_for_index(a, monkeypatch)
    b.add("Is a vegetarian")
    fresh = MemoryStore("alice", db_path=db_path, embedder=embedder)
    for store in (a, b, fresh):
        assert "Is a vegetarian" in texts_found(store, "Is a vegetarian")
    assert a._open() is b._open() is fresh._open()  # one handle, one index


def test_writers_racing_clear_leave_every_listed_memory_searchable(db_path, monkeypatch) -> None:
    """Three threads write and search through their own stores while a fourth clears the user
    every 0.3 s: no error reaches them, and afterwards every memory that get_all() lists is
    found by a search for its own text; so are writes the racing stores make once the index
    is built."""
    monkeypatch.setattr(chroma, "_WARM_RETRY_SECONDS", 0.1)  # read ahead often, to race writes
    embedder = RandomEmbedder()
    stores = [MemoryStore("alice", db_path=db_path, embedder=embedder) for _ in range(4)]
    stop, stop_clearing = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    written = [0]

    def write(number: int) -> None:
        count = 0
        while not stop.is_set():
            text = f"writer {number} fact {count}"
            try:
                stores[number].add(text)
                stores[number].search(text, min_score=-1)
                written[0] += 1
            except BaseException as exc:
                errors.append(exc)
            count += 1

    def clear() -> None:
        while not stop_clearing.wait(0.3):
            try:
                stores[3].clear()
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=clear))
    for thread in threads:
        thread.start()
    time.sleep(6)
    stop_clearing.set()  # the clears stop first, so that some writes surely outlive the last one
    threads[-1].join(60)
    after_the_last_clear = written[0] + 3
    deadline = time.monotonic() + 60
    while written[0] < after_the_last_clear and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert errors == []
    checker = MemoryStore("alice", db_path=db_path, embedder=embedder)
    listed = checker.get_all()
    assert listed and written[0] > len(listed)
    unsearchable = [m.text for m in listed if texts_found(checker, m.text, top_k=1) != [m.text]]
    assert unsearchable == []

    stores[3].clear()
    checker.add("written after the race by the checker")
    wait_for_index(checker, monkeypatch)
    for number, store in enumerate(stores):
        store.add(f"written after the race by store {number}")
    for number in range(4):
        text = f"written after the race by store {number}"
        assert texts_found(checker, text, top_k=1) == [text]


# -- 3: batches over Chroma's maximum; a failed write is undone --------------------------------


def _export_line(number: int) -> str:
    return json.dumps(
        {
            "id": f"m{number:05d}",
            "text": f"Imported fact number {number}",
            "category": "fact",
            "created_at": 1_700_000_000 + number,
        }
    )


def test_an_export_larger_than_one_chroma_batch_round_trips(db_path) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    assert store.storage._batch_size() == 5461  # Chroma 1.5's limit for one write
    lines = [_export_line(n) for n in range(5600)]
    assert store.import_(lines) == 5600
    assert store.count() == 5600
    exported = [json.loads(line) for line in str(store.export()).splitlines()]
    assert [(m["id"], m["text"]) for m in exported] == [
        (f"m{n:05d}", f"Imported fact number {n}") for n in range(5600)
    ]
    assert texts_found(store, "Imported fact number 5599", top_k=1) == ["Imported fact number 5599"]


@pytest.mark.parametrize(
    ("failure", "raised"),
    [(RuntimeError("the disk went away"), StorageError), (KeyboardInterrupt(), KeyboardInterrupt)],
    ids=["failure", "ctrl-c"],
)
def test_a_write_that_fails_halfway_is_undone(
    db_path, monkeypatch, failure: BaseException, raised: type[BaseException]
) -> None:
    """Also when the user presses Ctrl-C during it: the undo ran for StorageError alone, so an
    interrupted import kept the batches written before it."""
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    kept = store.add("Plays the cello")
    collection = store._open()
    monkeypatch.setattr(collection._storage, "_max_batch", 10)
    upsert = collection._collection.upsert
    calls: list[int] = []

    def third_batch_fails(**request):
        calls.append(len(request["ids"]))
        if len(calls) == 3:
            raise failure
        return upsert(**request)

    monkeypatch.setattr(collection._collection, "upsert", third_batch_fails)
    rewrite = json.dumps({"id": kept.id, "text": "Plays the viola", "category": "fact"})
    lines = [rewrite] + [_export_line(n) for n in range(34)]
    with pytest.raises(raised):
        store.import_(lines)
    assert calls[:3] == [10, 10, 10]  # split to the limit; the third batch failed
    assert [(m.id, m.text) for m in store.get_all()] == [(kept.id, "Plays the cello")]
    assert texts_found(store, "Imported fact number 3") == ["Plays the cello"]


def test_ctrl_c_stays_an_interrupt_when_the_undo_fails_too(db_path, monkeypatch, caplog) -> None:
    """A write cut short by Ctrl-C whose undo also failed (a server that stopped answering,
    the likeliest reason to press Ctrl-C) came out as a StorageError: an application's
    ``except StorageError`` swallowed the interrupt."""
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    store.add("Plays the cello")
    collection = store._open()
    monkeypatch.setattr(collection._storage, "_max_batch", 10)
    upsert, calls = collection._collection.upsert, []

    def interrupted_third_batch(**request: Any) -> Any:
        calls.append(len(request["ids"]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return upsert(**request)

    def undo_fails(**request: Any) -> Any:
        raise RuntimeError("the server went away")

    monkeypatch.setattr(collection._collection, "upsert", interrupted_third_batch)
    monkeypatch.setattr(collection._collection, "delete", undo_fails)
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.WARNING):
        store.import_([_export_line(n) for n in range(34)])
    assert "undoing a write cut short by KeyboardInterrupt failed" in caplog.text


@contextlib.contextmanager
def _another_thread_in_a_chroma_call(lock: Any) -> Iterator[None]:
    """While inside: another thread is inside a Chroma call of the storage whose erase lock
    is ``lock`` (it shares the lock), and leaves it on the way out."""
    inside, leave = threading.Event(), threading.Event()

    def another_threads_call() -> None:
        with lock.shared():
            inside.set()
            leave.wait(10)

    reader = threading.Thread(target=another_threads_call)
    reader.start()
    try:
        assert inside.wait(10)
        yield
    finally:
        leave.set()
        reader.join(10)


def test_ctrl_c_while_a_delete_waits_leaves_the_storage_usable(db_path, monkeypatch) -> None:
    """A delete waits for the Chroma calls of other threads before it erases the text; a
    Ctrl-C during that wait left the storage marked as erasing, and every later call of the
    process (every user's) waited forever."""
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    doomed = store.add("Keeps the spare key under the blue flowerpot")
    store.flush()
    store._open()._index_bytes()  # (its index folder looked up now, which waits too)
    lock = store.storage._erase_lock
    with _another_thread_in_a_chroma_call(lock):
        wait = lock._condition.wait

        def interrupted_wait(timeout: float | None = None) -> bool:
            if threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt
            return wait(timeout)

        monkeypatch.setattr(lock._condition, "wait", interrupted_wait)
        with pytest.raises(KeyboardInterrupt):
            store.delete(doomed.id)
        monkeypatch.undo()
    found: list[list[str]] = []
    later = threading.Thread(target=lambda: found.append([m.text for m in store.get_all()]))
    later.start()
    later.join(10)
    assert found == [[]]  # answered (the memory was deleted before the wait for the erase)
    store.add("Plays the cello")
    assert [m.text for m in store.get_all()] == ["Plays the cello"]


def test_chromas_catalog_is_read_with_python_sqlite_only_while_no_chroma_call_runs(
    db_path, monkeypatch
) -> None:
    """Python's sqlite3 is another copy of SQLite in the process, and POSIX locks are the
    process's: its reading the file (locking and unlocking it) and closing it change or drop
    the locks of a Chroma transaction under way in another thread, and another process could
    then roll Chroma's unfinished write back under it. The lookup of a user's vector index
    folder (on the first write of a collection, and on clear()) waits for the Chroma calls of other
    threads, as the erase does, and they wait for it."""
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    store.add("Keeps bees on the roof")
    store.flush()  # (the folder is looked up on the first write to a collection that exists)
    lock = store.storage._erase_lock
    looked_up: list[tuple[bool, int]] = []
    catalog = chroma.vector_segment

    def watched(*args: Any) -> Any:
        looked_up.append((lock._erasing, lock._sharers))
        return catalog(*args)

    monkeypatch.setattr(chroma, "vector_segment", watched)
    writer = threading.Thread(target=lambda: store.add("Plays the cello"))
    with _another_thread_in_a_chroma_call(lock):
        writer.start()
        writer.join(1.0)
        assert writer.is_alive() and looked_up == []  # waits for the other thread's call
    writer.join(30)
    assert not writer.is_alive() and looked_up == [(True, 0)]
    store.clear()
    assert looked_up[1:] == [(True, 0)] and store.count() == 0


# -- 6: deleted text leaves every file ---------------------------------------------------------

SECRETS = [
    "Keeps the spare key under the blue flowerpot",
    "Keeps the spare key in the garden shed",
    "Keeps the spare key with the neighbour Ingrid",
]


def test_delete_erases_every_version_of_a_memory_from_disk(db_path) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    store.add_many([f"Ordinary fact number {n}" for n in range(30)])
    secret = store.add(SECRETS[0])
    store.supersede(secret.id, SECRETS[1])
    store.update(secret.id, SECRETS[2])
    assert set(files_containing(db_path, SECRETS)) == set(SECRETS)  # kept while remembered
    store.delete(secret.id)
    for n in range(5):
        store.add(f"A later fact number {n}")
    assert files_containing(db_path, SECRETS) == {}
    assert "Ordinary fact number 7" in files_containing(db_path, ["Ordinary fact number 7"])
    assert texts_found(store, "Ordinary fact number 7", top_k=1) == ["Ordinary fact number 7"]
    store.storage.close()  # and after a clean exit
    assert files_containing(db_path, SECRETS) == {}


def test_delete_erases_the_deleted_memorys_vector_from_chromas_log(db_path) -> None:
    """Chroma's write-ahead log keeps each write's vector until it saves its index (every 100
    writes); a deleted memory's entry is blanked to zeros, and replaying the log still gives
    the stored memories."""
    embedder = RandomEmbedder(dimension=384)
    store = MemoryStore("alice", db_path=db_path, embedder=embedder)
    store.add_many([f"Ordinary fact number {n}" for n in range(30)])
    secret = store.add(SECRETS[0])
    store.flush()
    vector = embedder.embed([SECRETS[0]])[0].astype(np.float32).tobytes()
    assert vector in (db_path / "chroma.sqlite3").read_bytes()  # kept while remembered
    store.delete(secret.id)
    store.add("A later fact")
    store.storage.close()
    assert vector not in (db_path / "chroma.sqlite3").read_bytes()
    reopened = MemoryStore("alice", db_path=db_path, embedder=embedder)  # replays the log
    assert reopened.count() == 31
    assert texts_found(reopened, SECRETS[0], top_k=31).count(SECRETS[0]) == 0
    assert texts_found(reopened, "Ordinary fact number 7", top_k=1) == ["Ordinary fact number 7"]


_CHROMA_SEARCH = """
import json, sys
import chromadb
from headroom_memory_integrations.storage.base import collection_name
client = chromadb.PersistentClient(path={db!r})
collection = client.get_collection(collection_name("alice"), embedding_function=None)
count = collection.count()
found = collection.query(query_embeddings=[{vector!r}], n_results=count)["ids"][0]
records = collection.get(include=["embeddings"])
vectors = dict(zip(records["ids"], records["embeddings"]))
unfound = sorted(set(records["ids"]) - set(found))
unreachable = [
    i for i in unfound
    if i not in collection.query(query_embeddings=[vectors[i]], n_results=count)["ids"][0]
]
missed = [i for i in unfound if i not in unreachable]
print(json.dumps({{"count": count, "found": found, "missed": missed, "unreachable": unreachable}}))
"""


def _chroma_search(db_path: Path, vector: np.ndarray) -> dict[str, Any]:
    """Chroma's own search of alice's collection (its vector index loaded from the files, in a
    new process), for ``vector``, asking for as many as it counts: the count, every id found,
    and the ids of the records it did not find, in two lists. "unreachable": not found either
    when searched with their own vector, asking for all: chromadb 1.5.9 can leave a live
    record out of its graph's reach after deletes and upserts (chroma-core/chroma#7758, open;
    a CI run here once found 150 of 151, likely this, not proven), and the tests accept these
    as Chroma's. "missed": found with their own vector, so reachable, yet not among the
    results: what a deleted memory still live in the index (filtered out by Chroma, taking a
    place) would do. The tests want "missed" empty."""
    run = run_python(_CHROMA_SEARCH.format(db=str(db_path), vector=vector.tolist()))
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("written", [5, 150], ids=["index-unsaved", "index-saved-before-delete"])
def test_a_deleted_memorys_id_leaves_the_disk_and_the_index_still_replays(db_path, written) -> None:
    """A memory's id is a hash of its user's id and its wording: a short secret could be found
    again from it by trying every guess ("My bank card PIN is 0000" to "9999"). After delete()
    no file holds it: Chroma's log entries get a random id (still "added, then deleted"), and
    so does its index's id map when it was saved with the memory in it (every 100 writes: 150
    writes), whose replay of the log then still deletes it."""
    embedder = RandomEmbedder()
    store = MemoryStore("alice", db_path=db_path, embedder=embedder)
    secret = store.add("My bank card PIN is 4821")
    store.add_many([f"Ordinary fact number {n}" for n in range(written)])
    store.flush()
    assert files_containing(db_path, [secret.id])  # kept while remembered
    store.delete(secret.id)
    store.add("A later fact")
    store.storage.close()
    # (not the bare "4821": the other memories' microsecond timestamps and Chroma's random ids
    # hold any four digits now and then, found in about 1 run in 20)
    assert files_containing(db_path, [secret.id, "PIN is 4821"]) == {}
    searched = _chroma_search(db_path, embedder.embed(["My bank card PIN is 4821"])[0])
    assert searched["count"] == written + 1
    assert searched["missed"] == [], searched
    assert secret.id not in searched["found"]
    assert not any(i.startswith("erased-") for i in searched["found"])
    reopened = MemoryStore("alice", db_path=db_path, embedder=embedder)
    assert reopened.count() == written + 1
    assert texts_found(reopened, "Ordinary fact number 3", top_k=1) == ["Ordinary fact number 3"]


@pytest.mark.parametrize("saved", [True, False], ids=["index-saved-before-delete", "index-unsaved"])
def test_a_deleted_memorys_vector_leaves_the_vector_index_for_good(db_path, saved) -> None:
    """Text can be partly reconstructed from a sentence vector. Chroma keeps a deleted record's
    vector in its vector index's elements file (``data_level0.bin``, saved every 100 writes),
    and in its memory, from which it saves it again with the index's next save. The erase
    clears the saved copy and has Chroma load the index anew. Before, the vector stayed on
    disk for good: at once when the index had been saved with it, else from the next save."""
    embedder = RandomEmbedder()
    store = MemoryStore("alice", db_path=db_path, embedder=embedder)
    if not saved:  # the index is saved before the secret comes
        store.add_many([f"Earlier fact number {n}" for n in range(150)])
        store.flush()
    secret = store.add("My bank card PIN is 4821")
    store.add_many([f"Ordinary fact number {n}" for n in range(150 if saved else 5)])
    store.flush()
    vector = embedder.embed([secret.text])[0]
    in_index = [f for f in files_holding_vector(db_path, vector) if f.endswith("data_level0.bin")]
    assert bool(in_index) == saved
    store.delete(secret.id)
    assert files_holding_vector(db_path, vector) == []
    store.add_many([f"Later fact number {n}" for n in range(150)])  # Chroma saves the index
    store.flush()
    kept = 150 + 150 + (0 if saved else 5)
    assert store.count() == kept
    store.storage.close()
    assert files_holding_vector(db_path, vector) == []
    searched = _chroma_search(db_path, embedder.embed(["Later fact number 7"])[0])
    assert searched["count"] == kept and searched["missed"] == [], searched
    reopened = MemoryStore("alice", db_path=db_path, embedder=embedder)
    assert texts_found(reopened, "Ordinary fact number 3", top_k=1) == ["Ordinary fact number 3"]
    assert texts_found(reopened, "Later fact number 7", top_k=1) == ["Later fact number 7"]


@pytest.mark.parametrize("spoiled", ["version", "element size", "links"])
def test_vector_index_files_of_another_layout_are_left_as_they_are(db_path, spoiled) -> None:
    """The erase writes into Chroma's vector index files only in the layout it reads (its
    header's version, sizes that fit the file and the vectors): otherwise it would zero bytes
    that are not a vector, and break the index. It refuses, the file unchanged."""
    from headroom_memory_integrations.storage import folder

    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    secret = store.add("My bank card PIN is 4821")
    store.add_many([f"Ordinary fact number {n}" for n in range(150)])  # the index is saved
    store.storage.close()
    (segment,) = {path.parent for path in db_path.glob("*/" + folder.INDEX_ELEMENTS)}
    header = bytearray((segment / folder.INDEX_HEADER).read_bytes())
    if spoiled == "version":
        header[0:4] = (2).to_bytes(4, "little")
    elif spoiled == "element size":  # a byte larger, as if a field were added to each
        header[28:36] = (int.from_bytes(header[28:36], "little") + 4).to_bytes(8, "little")
    else:  # more links in an element than fit before its vector
        header[68:76] = (int.from_bytes(header[68:76], "little") + 1).to_bytes(8, "little")
    (segment / folder.INDEX_HEADER).write_bytes(bytes(header))
    elements = (segment / folder.INDEX_ELEMENTS).read_bytes()
    with pytest.raises(OSError):
        folder._clear_vectors(segment, [secret.id], RandomEmbedder().dimension)
    assert (segment / folder.INDEX_ELEMENTS).read_bytes() == elements


def test_the_erase_opens_chroma_again_without_an_opens_recovery(db_path, monkeypatch) -> None:
    """The erase closes Chroma (above) and opens it again at once, without what an open does
    for a dead writer's leftovers (undo a large write left half-done, replay the journal): what
    the folder holds of them is this process's own, and its journal its worker's to store."""
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    kept, gone = store.add("Plays the cello"), store.add("Lives in Lisbon")
    recovered: list[str] = []
    monkeypatch.setattr(chroma, "_roll_back_left", lambda *a: recovered.append("undo"))
    monkeypatch.setattr(chroma, "_store_journaled", lambda *a: recovered.append("journal"))
    store.delete(gone.id)
    assert store.storage._client is not None  # opened again already
    store.add_many([f"Ordinary fact number {n}" for n in range(20)])
    assert recovered == []
    assert store.count() == 21 and store.get(kept.id).text == "Plays the cello"


def test_a_delete_done_is_not_reported_failed_when_chroma_cannot_be_opened_again(
    db_path, monkeypatch, caplog
) -> None:
    """The erase closes Chroma and opens it again (above). If Chroma cannot be opened then (no
    file descriptors left, say), the delete is done all the same: delete() returns, with a
    warning, and the next call opens Chroma."""
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    store.add("Plays the cello")
    gone = store.add("Lives in Lisbon")
    storage = store.storage
    opening = storage._connect

    def cannot_open(**_: Any) -> Any:
        raise OSError("too many open files")

    erase = chroma.ChromaStorage._erase

    def erase_then_fail_to_open(self: chroma.ChromaStorage) -> None:
        monkeypatch.setattr(self, "_open_folder", cannot_open)
        monkeypatch.setattr(self, "_connect", cannot_open)
        erase(self)

    monkeypatch.setattr(chroma.ChromaStorage, "_erase", erase_then_fail_to_open)
    with caplog.at_level(logging.WARNING):
        store.delete(gone.id)
    assert "could not open" in caplog.text and "again after an erase" in caplog.text
    assert storage._client is None
    monkeypatch.setattr(storage, "_open_folder", opening)
    monkeypatch.setattr(storage, "_connect", opening)

    def read() -> list[str] | None:
        try:
            return [m.text for m in store.get_all()]
        except StorageError:  # held to be down for a moment after the failed open
            return None

    wait_for(lambda: read() is not None, timeout=30)
    assert read() == ["Plays the cello"]
    assert store.add("Lives in Porto").text == "Lives in Porto"
    assert sorted(m.text for m in store.get_all()) == ["Lives in Porto", "Plays the cello"]
    assert not files_containing(db_path, ["Lives in Lisbon"])


_DELETE_AND_DIE = """
import os, sys
from _reliability_support import RandomEmbedder
from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.storage import chroma
store = MemoryStore("alice", db_path={db!r}, embedder=RandomEmbedder())
secret = store.add({secret!r})
store.add_many([f"Ordinary fact number {{n}}" for n in range(150)])  # the index saved with it
store.flush()
print(secret.id, flush=True)
if {when!r} == "after the delete":
    chroma.erase_noted = lambda *a, **k: os._exit(9)  # killed before the erase
else:
    noted = chroma.note_erase
    def note_and_die(*args, **kwargs):
        noted(*args, **kwargs)
        os._exit(9)  # killed after the erase is noted, before Chroma's delete
    chroma.note_erase = note_and_die
store.delete(secret.id)
"""


@pytest.mark.parametrize("when", ["after the delete", "before the delete"])
def test_a_process_killed_during_delete_leaves_the_erase_to_the_next_one(db_path, when):
    """delete() notes the erase on disk (no text) before Chroma's delete, and the process that
    next opens the folder does it: a process killed after Chroma's delete leaves no deleted
    text behind it for good. One killed before Chroma's delete leaves the memory stored (the
    delete never happened), and the erase leaves it as it is."""
    run = run_python(_DELETE_AND_DIE.format(db=str(db_path), secret=SECRETS[0], when=when))
    assert run.returncode == 9, run.stderr[-2000:]
    secret_id = run.stdout.split()[0]
    assert (db_path / ERASE_FILE).exists()
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    listed = [m.id for m in store.get_all()]  # (opens the folder)
    assert not (db_path / ERASE_FILE).exists()
    if when == "after the delete":
        assert len(listed) == 150 and secret_id not in listed
        assert files_containing(db_path, [SECRETS[0], secret_id]) == {}
        store.add_many([f"Later fact number {n}" for n in range(150)])  # Chroma saves the index
        store.flush()
        assert files_holding_vector(db_path, RandomEmbedder().embed([SECRETS[0]])[0]) == []
    else:
        assert store.count() == 151 and store.get(secret_id).text == SECRETS[0]
        assert texts_found(store, SECRETS[0], top_k=1) == [SECRETS[0]]
    store.storage.close()
    searched = _chroma_search(db_path, RandomEmbedder().embed([SECRETS[0]])[0])
    assert (secret_id in searched["found"]) == (when == "before the delete")
    assert searched["missed"] == [], searched


@contextlib.contextmanager
def _chroma_cannot_apply_the_delete_of(db_path: Path, memory_id: str) -> Iterator[None]:
    """While inside: Chroma's second step of deleting ``memory_id`` (applying the delete it
    has logged to its records) fails, as if the process were killed between the two steps
    (chromadb raises "Failed to apply logs to the metadata segment"). An SQLite trigger in
    Chroma's database, removed on leaving."""
    with closing(sqlite3.connect(db_path / "chroma.sqlite3")) as db, db:
        db.execute(
            "CREATE TRIGGER test_hold_delete BEFORE DELETE ON embeddings "
            f"WHEN OLD.embedding_id = '{memory_id}' BEGIN SELECT RAISE(ABORT, 'held'); END"
        )
    try:
        yield
    finally:
        with closing(sqlite3.connect(db_path / "chroma.sqlite3")) as db, db:
            db.execute("DROP TRIGGER test_hold_delete")


def _delete_logged_not_applied(db_path: Path, memory_id: str) -> tuple[int, int]:
    """Where Chroma's log has the delete of ``memory_id`` and its records do not yet: the
    newest log entry's operation (3: delete) and how many records hold it."""
    with closing(sqlite3.connect(db_path / "chroma.sqlite3")) as db:
        newest = db.execute(
            "SELECT operation FROM embeddings_queue WHERE id = ? ORDER BY seq_id DESC LIMIT 1",
            (memory_id,),
        ).fetchone()
        stored = db.execute(
            "SELECT COUNT(*) FROM embeddings WHERE embedding_id = ?", (memory_id,)
        ).fetchone()
    return newest[0], stored[0]


_DELETE_LOGGED_AND_DIE = """
import os, sys
from _reliability_support import RandomEmbedder
from headroom_memory_integrations import MemoryStore
store = MemoryStore("alice", db_path={db!r}, embedder=RandomEmbedder())
try:
    store.delete({secret_id!r})  # Chroma logs it, then cannot apply it
except Exception as exc:
    print(type(exc).__name__, exc, flush=True)
sys.stdin.readline()  # (holds the folder until killed)
os._exit(9)
"""


@pytest.mark.parametrize("by", ["the next open", "a reader taking over"])
def test_a_delete_chroma_logged_and_did_not_apply_is_erased_by_the_next_writer(db_path, by) -> None:
    """Chroma deletes in two steps: it logs the delete, then applies it to its records. A
    process killed in between (here the second step fails, then the process dies) leaves the
    erase noted and the id still stored. Before, the next writer erased first, found the id
    stored, took the delete for one that never happened and let the erase go; Chroma then
    applied the logged delete, and the text stayed in freed pages of chroma.sqlite3 and the
    id in its log and the index's id map, for good. Now Chroma applies the delete first, and
    the erase follows. The next writer is another user's store: nothing reads alice's
    collection (which has Chroma apply its log) before the erase."""
    import subprocess
    import sys

    from _reliability_support import ROOT

    embedder = RandomEmbedder()
    store = MemoryStore("alice", db_path=db_path, embedder=embedder)
    secret = store.add("My bank card PIN is 4821")
    store.add_many([f"Ordinary fact number {n}" for n in range(150)])  # the id map is saved
    store.storage.close()
    with _chroma_cannot_apply_the_delete_of(db_path, secret.id):
        killed = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _DELETE_LOGGED_AND_DIE.format(db=str(db_path), secret_id=secret.id),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])},
        )
        assert killed.stdout is not None and killed.stdin is not None
        assert "Failed to apply logs" in killed.stdout.readline()
    try:
        assert _delete_logged_not_applied(db_path, secret.id) == (3, 1)
        assert (db_path / ERASE_FILE).exists()
        bob = MemoryStore("bob", db_path=db_path, embedder=embedder)
        if by == "a reader taking over":
            assert bob.storage.users() == ["alice"]  # opened while the other process writes
    finally:
        killed.kill()
        killed.wait()
    bob.add("Bob likes tea")  # (opens the folder, or takes it over, as its writer)
    assert not (db_path / ERASE_FILE).exists()
    alice = MemoryStore("alice", db_path=db_path, embedder=embedder)
    assert alice.count() == 150 and alice.get_many([secret.id]) == []
    assert texts_found(alice, "Ordinary fact number 7", top_k=1) == ["Ordinary fact number 7"]
    alice.add_many([f"Later fact number {n}" for n in range(150)])  # Chroma saves the index
    alice.storage.close()
    assert files_containing(db_path, [secret.id, "PIN is 4821"]) == {}
    assert files_holding_vector(db_path, embedder.embed([secret.text])[0]) == []
    searched = _chroma_search(db_path, embedder.embed(["My bank card PIN is 4821"])[0])
    assert searched["count"] == 300 and searched["missed"] == [], searched
    assert secret.id not in searched["found"]
    assert not any(i.startswith("erased-") for i in searched["found"])
    assert files_containing(db_path, [secret.id, "PIN is 4821"]) == {}


def test_a_delete_chroma_failed_to_apply_stays_noted_until_the_next_open_erases_it(
    db_path,
) -> None:
    """In a process that goes on: Chroma logged a delete of alice's and failed to apply it
    (delete() raised; this process's chromadb does not try again). The next erase (after a
    delete of bob's) keeps alice's noted, and the next open of the folder has Chroma apply
    it, then erases it. Before, that erase let alice's go, and her text stayed once Chroma
    applied the delete."""
    embedder = RandomEmbedder()
    alice = MemoryStore("alice", db_path=db_path, embedder=embedder)
    secret = alice.add("My bank card PIN is 4821")
    alice.add_many([f"Ordinary fact number {n}" for n in range(30)])
    tea = MemoryStore("bob", db_path=db_path, embedder=embedder).add("Bob likes green tea")
    alice.storage.close()
    alice = MemoryStore("alice", db_path=db_path, embedder=embedder)
    bob = MemoryStore("bob", db_path=db_path, embedder=embedder)
    with _chroma_cannot_apply_the_delete_of(db_path, secret.id), pytest.raises(StorageError):
        alice.delete(secret.id)
    assert _delete_logged_not_applied(db_path, secret.id) == (3, 1)
    bob.delete(tea.id)
    assert files_containing(db_path, [tea.id, "Bob likes green tea"]) == {}
    noted = [json.loads(line) for line in (db_path / ERASE_FILE).read_text().splitlines()]
    assert [list(entry["ids"]) for entry in noted] == [[secret.id]]
    alice.storage.close()
    alice = MemoryStore("alice", db_path=db_path, embedder=embedder)
    assert alice.count() == 30 and alice.get_many([secret.id]) == []
    assert not (db_path / ERASE_FILE).exists()
    assert files_containing(db_path, [secret.id, "PIN is 4821"]) == {}
    alice.storage.close()
    assert files_containing(db_path, [secret.id, "PIN is 4821"]) == {}


_DROP_AND_DIE = """
import os
from _reliability_support import RandomEmbedder
from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.storage import chroma
store = MemoryStore("alice", db_path={db!r}, embedder=RandomEmbedder())
store.add_many([f"Ordinary fact number {{n}}" for n in range(150)])
store.flush()
noted = chroma.note_erase
def note_and_die(*args, **kwargs):
    noted(*args, **kwargs)
    os._exit(9)  # killed after the erase is noted, before Chroma drops the collection
chroma.note_erase = note_and_die
store.{how}()
"""


@pytest.mark.parametrize("how", ["clear", "forget_user"])
def test_a_process_killed_before_its_drop_leaves_the_users_index_in_use(db_path, how) -> None:
    """clear()/forget_user() note the erase (with the collection's index folder) before Chroma
    drops the collection. A process killed in between dropped nothing: the next one to open
    the folder lets that entry go, and keeps the index folder (it removed it: every search of
    the user then failed with Chroma's "Error finding id")."""
    run = run_python(_DROP_AND_DIE.format(db=str(db_path), how=how))
    assert run.returncode == 9, run.stderr[-2000:]
    assert (db_path / ERASE_FILE).exists()
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    assert store.count() == 150  # (opens the folder, as its writer)
    assert not (db_path / ERASE_FILE).exists()
    assert texts_found(store, "Ordinary fact number 7", top_k=1) == ["Ordinary fact number 7"]
    store.storage.close()
    searched = _chroma_search(db_path, RandomEmbedder().embed(["Ordinary fact number 7"])[0])
    assert searched["count"] == 150 and searched["missed"] == [], searched


def test_a_failed_drop_leaves_the_users_index_to_later_erases(db_path, monkeypatch) -> None:
    """forget_user() whose drop Chroma refuses raises, and the user's memories stay; the next
    delete in the folder (another user's) erases what it deleted and leaves the user's vector
    index folder alone (it removed it: the user's searches failed from then on)."""
    import chromadb.api.client

    embedder = RandomEmbedder()
    alice = MemoryStore("alice", db_path=db_path, embedder=embedder)
    alice.add_many([f"Ordinary fact number {n}" for n in range(150)])
    bob = MemoryStore("bob", db_path=db_path, embedder=embedder)
    tea = bob.add("Bob likes tea")
    alice.flush()

    def refused(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk I/O error")

    monkeypatch.setattr(chromadb.api.client.Client, "delete_collection", refused)
    with pytest.raises(StorageError):
        alice.forget_user()
    monkeypatch.undo()
    assert not (db_path / ERASE_FILE).exists()  # the drop's entry is let go of
    bob.delete(tea.id)
    assert files_containing(db_path, ["Bob likes tea"]) == {}
    alice.storage.close()
    reopened = MemoryStore("alice", db_path=db_path, embedder=embedder)  # loads the index
    assert reopened.count() == 150
    assert texts_found(reopened, "Ordinary fact number 7", top_k=1) == ["Ordinary fact number 7"]


def test_an_erase_noted_after_a_torn_line_is_still_done(db_path) -> None:
    """A process killed while it noted an erase leaves a torn last line (no newline): the
    next erase is noted on a line of its own, and done."""
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    store.add_many([f"Ordinary fact number {n}" for n in range(5)])
    secret = store.add(SECRETS[0])
    store.flush()
    (db_path / ERASE_FILE).write_bytes(b'{"collection":"torn","ids":{"a')
    store.delete(secret.id)
    assert files_containing(db_path, [SECRETS[0], secret.id]) == {}
    assert not (db_path / ERASE_FILE).exists()


def _legacy_id_map(path: Path, monkeypatch) -> None:
    """Rewrite the id map at ``path`` as chromadb < 1.0 pickled it (an instance of its
    ``PersistentData`` class with the same fields), which chromadb 1.5 still reads."""
    import pickle
    import sys
    import types

    fields = pickle.loads(path.read_bytes())
    module = types.ModuleType("chromadb.segment.impl.vector.local_persistent_hnsw")
    persistent_data = type("PersistentData", (), {"__module__": module.__name__})
    module.PersistentData = persistent_data  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    legacy = persistent_data()
    legacy.__dict__.update(fields)
    path.write_bytes(pickle.dumps(legacy, protocol=3))


def test_an_id_map_the_erase_cannot_read_still_lets_the_text_be_erased(
    db_path, monkeypatch, caplog
) -> None:
    """The erase reads the index's id map with an unpickler that refuses classes; one in
    another layout (chromadb < 1.0's) made the whole erase fail, and the deleted text stayed.
    Now the text and vector are erased, the log entries keep the id (its delete must still
    find it in the index), and the id alone stays noted for a later try."""
    embedder = RandomEmbedder()
    store = MemoryStore("alice", db_path=db_path, embedder=embedder)
    secret = store.add("My PIN is 4821")
    store.add_many([f"Ordinary fact number {n}" for n in range(150)])  # the id map is saved
    store.flush()
    store.storage.close()
    _legacy_id_map(next(db_path.glob("*/index_metadata.pickle")), monkeypatch)
    store = MemoryStore("alice", db_path=db_path, embedder=embedder)
    with caplog.at_level(logging.WARNING):
        store.delete(secret.id)
    assert files_containing(db_path, ["My PIN is 4821"]) == {}
    assert "ids of deleted memories stay" in caplog.text
    noted = [json.loads(line) for line in (db_path / ERASE_FILE).read_text().splitlines()]
    assert [list(entry["ids"]) for entry in noted] == [[secret.id]]
    store.storage.close()
    reopened = MemoryStore("alice", db_path=db_path, embedder=embedder)
    assert reopened.count() == 150 and reopened.get_many([secret.id]) == []
    assert texts_found(reopened, "Ordinary fact number 7", top_k=1) == ["Ordinary fact number 7"]
    reopened.storage.close()
    searched = _chroma_search(db_path, embedder.embed(["My PIN is 4821"])[0])
    assert searched["count"] == 150 and searched["missed"] == [], searched
    assert secret.id not in searched["found"]


_READER = """
import sys
from _reliability_support import RandomEmbedder
from headroom_memory_integrations import MemoryStore
store = MemoryStore("alice", db_path={db!r}, embedder=RandomEmbedder())
print(store.search("My PIN is 4821", top_k=1, min_score=-1)[0].memory.text, flush=True)
sys.stdin.readline()  # the writer deleted the memory and closed: this process takes over
store.add_many([f"Written after the takeover {{n}}" for n in range(150)])
store.flush()
store.storage.close()
print("done", flush=True)
"""


def test_a_reader_that_takes_over_does_not_bring_a_deleted_id_back(db_path) -> None:
    """A reading process loaded the user's index (Chroma keeps it in memory); the writer then
    deleted a memory (its log entries renamed to a placeholder) and closed. The reader takes
    the folder over: its Chroma loads the index from disk again. Before, Chroma replayed the
    log from where its index in memory stood, deleted the placeholder, kept the real id, and
    saved it in the index's id map (and its own search returned it)."""
    import subprocess
    import sys

    from _reliability_support import ROOT

    embedder = RandomEmbedder()
    store = MemoryStore("alice", db_path=db_path, embedder=embedder)
    store.add_many([f"Ordinary fact number {n}" for n in range(150)])
    secret = store.add("My PIN is 4821")
    store.flush()
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER.format(db=str(db_path))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])},
    )
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "My PIN is 4821"  # its index is loaded
        store.delete(secret.id)
        store.storage.close()
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "done", reader.stderr.read()[-2000:]
    finally:
        reader.kill()
        reader.wait()
    assert files_containing(db_path, [secret.id, "My PIN is 4821"]) == {}
    searched = _chroma_search(db_path, embedder.embed(["My PIN is 4821"])[0])
    assert searched["count"] == 300 and searched["missed"] == [], searched
    assert secret.id not in searched["found"]


@pytest.mark.parametrize("how", ["clear", "forget_user"])
def test_clear_and_forget_user_erase_the_users_text_and_keep_others(db_path, how) -> None:
    embedder = RandomEmbedder()
    alice = MemoryStore("alice", db_path=db_path, embedder=embedder)
    bob = MemoryStore("bob", db_path=db_path, embedder=embedder)
    bob.add("Bob collects stamps")
    alice.add_many(SECRETS)
    assert getattr(alice, how)() == 3
    assert files_containing(db_path, SECRETS) == {}
    assert "alice" not in alice.storage.users()
    assert alice.get_all() == [] and alice.search(SECRETS[0], min_score=-1) == []
    assert texts_found(bob, "Bob collects stamps") == ["Bob collects stamps"]
    alice.add("Starts afresh")  # the cleared user can write again
    assert [m.text for m in alice.get_all()] == ["Starts afresh"]


@pytest.mark.parametrize("how", ["clear", "forget_user"])
def test_a_cleared_users_vector_index_files_are_removed(db_path, how) -> None:
    """Chroma leaves a deleted collection's index folder behind; its files may hold stray
    bytes of the deleted texts, so dropping a user removes it."""
    alice = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    alice.add_many(SECRETS)
    index_folders = {p for p in db_path.iterdir() if p.is_dir()}
    assert index_folders  # the collection's vector index
    getattr(alice, how)()
    assert not index_folders & {p for p in db_path.iterdir() if p.is_dir()}


def test_a_kept_users_index_files_hold_none_of_the_text_the_process_freed(tmp_path) -> None:
    """Chroma writes its index's unused room to disk uncleared. Before the allocator was made
    to clear freed memory, a kept user's ``data_level0.bin`` held text freed moments before
    (here: the forgotten user's) in about one round in five."""
    for round_ in range(40):
        folder = tmp_path / f"round{round_}"
        alice = MemoryStore("alice", db_path=folder, embedder=RandomEmbedder())
        bob = MemoryStore("bob", db_path=folder, embedder=RandomEmbedder())
        bob.add("Bob collects stamps")
        alice.add_many(SECRETS)
        alice.forget_user()
        assert files_containing(folder, SECRETS) == {}, f"round {round_}"
        bob.storage.close()  # its freed memory is what the next round's indexes are given


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's allocator")
def test_memory_freed_in_the_process_is_cleared_before_it_is_handed_out_again() -> None:
    assert scrub_freed_memory()  # as opening an embedded folder does
    assert freed_text_handed_back() == 0


_FREED_TEXT_CHECK = """
from headroom_memory_integrations import MemoryStore
from _reliability_support import RandomEmbedder, freed_text_handed_back
MemoryStore("alice", db_path=FOLDER, embedder=RandomEmbedder()).add("Opens the folder")
print(freed_text_handed_back())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's allocator")
def test_opening_a_folder_clears_freed_memory_unless_turned_off(tmp_path) -> None:
    """By default, opening an embedded folder has glibc clear freed memory; with
    HEADROOM_MEMORY_CLEAR_FREED=0 the allocator is left as it is (freed text comes back)."""
    on = run_python(f"FOLDER = {str(tmp_path / 'on')!r}" + _FREED_TEXT_CHECK)
    off = run_python(
        f"FOLDER = {str(tmp_path / 'off')!r}" + _FREED_TEXT_CHECK,
        env={"HEADROOM_MEMORY_CLEAR_FREED": "0"},
    )
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert int(on.stdout.strip().splitlines()[-1]) == 0
    assert int(off.stdout.strip().splitlines()[-1]) > 0


def test_the_job_queue_keeps_no_turn_text_after_its_job_ends(openai_server, db_path, model):
    openai_server.responder = lambda body: Reply.text(
        json.dumps({"memories": [{"text": "Prefers Python for backend work", "category": "fact"}]})
        if "You maintain long-term memory" in body["messages"][0]["content"]
        else "Noted."
    )
    client = with_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model, retry_backoff=FAST
    )
    turn = "I prefer Python for backend work; my locker code is ZEBRA-4417"
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": turn}])
    assert client.memory.flush(30)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    deadline = time.monotonic() + 10
    while files_containing(db_path, ["ZEBRA-4417"]):
        assert time.monotonic() < deadline, files_containing(db_path, ["ZEBRA-4417"])
        time.sleep(0.1)


def test_forget_user_removes_queued_turns_too(openai_server, db_path, model) -> None:
    """Turns whose extraction keeps failing wait in the queue; forget_user deletes them (and
    their text) along with the memories."""
    openai_server.responder = lambda body: (
        Reply.error(503)
        if "You maintain long-term memory" in body["messages"][0]["content"]
        else Reply.text("Noted.")
    )
    client = with_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model, retry_backoff=FAST
    )
    client.memory.add("Plays the cello")
    turn = "Remember that my locker code is ZEBRA-9031"
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": turn}])

    def extractions() -> int:
        return sum("ZEBRA-9031" in json.dumps(r.body) for r in openai_server.requests) - 1

    deadline = time.monotonic() + 30
    while extractions() < 2:  # the turn's extraction failed and is being retried
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.memory.forget_user() == 1
    background = client.memory.stats()["background"]
    assert (background["pending"], background["running"]) == (0, 0)
    assert client.memory.get_all() == []
    tried = extractions()
    time.sleep(0.3)
    assert extractions() == tried  # nothing is retried any more
    deadline = time.monotonic() + 10
    while files_containing(db_path, ["ZEBRA-9031", "Plays the cello"]):
        assert time.monotonic() < deadline, files_containing(db_path, ["ZEBRA-9031"])
        time.sleep(0.1)


def test_forget_user_erases_queued_text_once_another_reader_lets_go(
    openai_server, db_path, model
) -> None:
    """Another connection (a reader in another process) holds the queue's WAL while
    forget_user runs: the worker erases the deleted turn's text as soon as the reader is gone,
    without needing a job of its own to finish."""
    import sqlite3

    openai_server.responder = lambda body: (
        Reply.error(400, "bad request")  # the extraction fails for good: dead-lettered
        if "You maintain long-term memory" in body["messages"][0]["content"]
        else Reply.text("Noted.")
    )
    client = with_memory(openai_server.client(), user_id="alice", db_path=db_path, embedder=model)
    turn = "Remember that my locker code is ZEBRA-5820"
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": turn}])
    client.memory.flush(30)
    queue = db_path / "jobs.sqlite3"
    wait_for(lambda: Path(f"{queue}-wal").stat().st_size == 0, timeout=10)  # text in the file
    assert files_containing(db_path, ["ZEBRA-5820"])  # the dead-lettered turn
    reader = sqlite3.connect(queue)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchone()  # a read snapshot, held
        client.memory.forget_user()
    finally:
        reader.close()
    deadline = time.monotonic() + 10
    while files_containing(db_path, ["ZEBRA-5820"]):
        assert time.monotonic() < deadline, files_containing(db_path, ["ZEBRA-5820"])
        time.sleep(0.1)
    client.close()


_QUEUE_AND_DIE = """
import os, signal
from headroom_memory_integrations.jobs import Backoff
from headroom_memory_integrations.openai import with_memory
from headroom_memory_integrations.testing import Reply, ScriptedOpenAIServer

def answer(body):
    extraction = "You maintain long-term memory" in body["messages"][0]["content"]
    return Reply.error(503) if extraction else Reply.text("Noted.")

with ScriptedOpenAIServer(responder=answer) as server:
    client = with_memory(
        server.client(), user_id="alice", db_path={db!r},
        retry_backoff=Backoff(initial=60.0, maximum=60.0, jitter=0.0),
    )
    turn = "I live in Zanzibarville; my locker code is ZEBRA-7712"
    client.chat.completions.create(model="gpt-4o", messages=[{{"role": "user", "content": turn}}])
    background = client.memory.stats()["background"]
    print(background["pending"] + background["running"], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the turn stays queued in the folder
"""


def test_a_plain_store_forgets_the_turns_a_wrapper_left_queued(openai_server, db_path, model):
    """A wrapper's process dies with a turn queued; a plain MemoryStore (a deletion script,
    no wrapper) forgets the user: the queued turn goes too, so no later wrapper stores it."""
    run = run_python(_QUEUE_AND_DIE.format(db=str(db_path)))
    assert run.stdout.strip() == "1", run.stderr[-2000:]
    assert files_containing(db_path, ["ZEBRA-7712"])  # queued durably

    assert MemoryStore("alice", db_path=db_path, embedder=model).forget_user() == 0
    assert not files_containing(db_path, ["ZEBRA-7712", "Zanzibarville"])

    openai_server.responder = lambda body: Reply.text(
        json.dumps({"memories": [{"text": "Lives in Zanzibarville", "category": "fact"}]})
        if "You maintain long-term memory" in body["messages"][0]["content"]
        else "Noted."
    )
    client = with_memory(openai_server.client(), user_id="alice", db_path=db_path, embedder=model)
    client.memory.add("Plays the cello")
    assert client.memory.flush(30)
    assert [m.text for m in client.memory.get_all()] == ["Plays the cello"]
    assert not any("Zanzibarville" in json.dumps(r.body) for r in openai_server.requests)
    client.close()


def test_the_clis_clear_forgets_the_turns_a_wrapper_left_queued(db_path, capsys) -> None:
    """``headroom-memory clear``, an operator's way to forget a user, removes the user's
    queued turns too (their messages, in the folder's job queue), as ``forget_user`` does."""
    from headroom_memory_integrations.cli import main

    run = run_python(_QUEUE_AND_DIE.format(db=str(db_path)))
    assert run.stdout.strip() == "1", run.stderr[-2000:]
    assert files_containing(db_path, ["ZEBRA-7712"])  # queued durably

    assert main(["clear", "--user", "alice", "--db", str(db_path), "--yes"]) == 0
    assert "cleared 0 memories of user 'alice'" in capsys.readouterr().out
    assert not files_containing(db_path, ["ZEBRA-7712", "Zanzibarville"])


def test_forget_user_while_the_users_extraction_runs(openai_server, db_path, model) -> None:
    """The running job stores its memories under the user's write lock: forget_user waits for
    it without holding that lock, then forgets what it stored too (it used to wait for the
    job while holding the lock, and failed after its timeout)."""
    extracting = threading.Event()

    def responder(body: dict) -> Reply:
        if "You maintain long-term memory" in body["messages"][0]["content"]:
            extracting.set()
            time.sleep(0.5)
            return Reply.text(
                json.dumps({"memories": [{"text": "Prefers Python", "category": "fact"}]})
            )
        return Reply.text("Noted.")

    openai_server.responder = responder
    client = with_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model, retry_backoff=FAST
    )
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "I prefer Python"}]
    )
    assert extracting.wait(10)
    client.memory.forget_user(timeout=20)  # raised StorageError after 20 s
    assert client.memory.flush(10)
    assert client.memory.get_all() == []


class _ForgetSignals(logging.Handler):
    """Sets events as forget_user goes: its first pass over the queue is done (``forgot``);
    its second pass found a job that started between the two and goes round again
    (``retried``, which also ``moved``); it returned (``moved``, set by the test)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.forgot, self.retried, self.moved = (threading.Event() for _ in range(3))

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "jobs of user" in message and "deleted" in message:
            self.forgot.set()
        if "started while forgetting them" in message:
            self.retried.set()
            self.moved.set()


def test_forget_user_forgets_a_job_that_starts_between_its_two_passes(
    openai_server, db_path, model, caplog, monkeypatch
) -> None:
    """forget_user deletes the user's queued jobs (waiting for a running one), then takes the
    user's write lock and looks again. A job claimed in between is running then: forget_user
    lets go of the lock, waits for it, and forgets what it stored. Without the second look,
    the job stored its memory after the user was forgotten.

    The order is forced: the worker is held in Bob's extraction while the first pass runs (one
    extraction thread, so that Alice's job waits behind Bob's); the test holds Alice's write
    lock until Alice's new job runs (its extraction held too)."""
    from headroom_memory_integrations import writer
    from headroom_memory_integrations.concurrency import user_write_lock

    monkeypatch.setattr(writer, "EXTRACTION_THREADS", 1)

    released = {"alice": threading.Event(), "bob": threading.Event()}
    extracting = {"alice": threading.Event(), "bob": threading.Event()}
    said = {"alice": "I prefer Python for backend work", "bob": "I drink green tea daily"}
    stored = {"alice": "Prefers Python for backend work", "bob": "Drinks green tea daily"}

    def responder(body: dict) -> Reply:
        if "You maintain long-term memory" not in body["messages"][0]["content"]:
            return Reply.text("Noted.")
        user = "alice" if said["alice"] in json.dumps(body) else "bob"
        extracting[user].set()
        assert released[user].wait(30)
        memories = [{"text": stored[user], "category": "preference"}]
        return Reply.text(json.dumps({"memories": memories}))

    openai_server.responder = responder
    alice, bob = wrapped_for(
        with_memory,
        openai_server,
        ("alice", "bob"),
        db_path=db_path,
        embedder=model,
        retry_backoff=FAST,
    )

    def chat(client) -> None:
        user = client.memory.user_id
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": said[user]}]
        )

    signals = _ForgetSignals()
    caplog.set_level(logging.DEBUG, logger="headroom_memory_integrations")
    logging.getLogger("headroom_memory_integrations").addHandler(signals)
    forgotten: list[int] = []

    def forget() -> None:
        try:
            forgotten.append(alice.memory.forget_user(timeout=30))
        finally:
            signals.moved.set()

    forgetting = threading.Thread(target=forget)
    try:
        chat(bob)
        assert extracting["bob"].wait(30)  # the worker is busy with Bob's job
        chat(alice)  # queued behind it: the first pass deletes it
        with user_write_lock(alice.memory.storage.location, "alice"):
            forgetting.start()
            assert signals.forgot.wait(30)  # the first pass is done; the second waits for us
            chat(alice)  # queued after the first pass...
            released["bob"].set()
            assert extracting["alice"].wait(30)  # ...and running before the second
        assert signals.moved.wait(30)  # the second pass ran (and went round again, or returned)
        released["alice"].set()
        forgetting.join(30)
        assert not forgetting.is_alive()
    finally:
        for event in released.values():
            event.set()
        logging.getLogger("headroom_memory_integrations").removeHandler(signals)
    assert alice.memory.flush(10) and bob.memory.flush(10)
    assert alice.memory.get_all() == []  # the job's memory did not outlive forget_user
    assert forgotten == [1]  # it was stored first, then forgotten
    assert signals.retried.is_set()
    assert [m.text for m in bob.memory.get_all()] == [stored["bob"]]
    extractions = [
        r
        for r in openai_server.requests
        if "You maintain long-term memory" in json.dumps(r.body)
        and said["alice"] in json.dumps(r.body)
    ]
    assert len(extractions) == 1  # Alice's first job was deleted by the first pass, never run


# -- 7: smaller failures -----------------------------------------------------------------------


def test_a_lone_surrogate_is_invalid_input(db_path) -> None:
    with pytest.raises(InvalidInputError, match="user_id"):
        MemoryStore("bob\ud800", db_path=db_path, embedder=HashEmbedder())
    store = MemoryStore("bob", db_path=db_path, embedder=HashEmbedder())
    with pytest.raises(InvalidInputError, match="metadata"):
        store.add("Plays the cello", metadata={"note": "a\udfffb"})
    assert store.count() == 0


def test_after_a_failed_open_the_next_open_works(db_path) -> None:
    """A folder Chroma cannot open (here: a corrupt database file) fails with StorageError;
    once it is fixed, the same process opens it (chromadb's cache of the half-started system
    used to fail every later open with "'RustBindingsAPI' object has no attribute 'bindings'")."""
    db_path.mkdir(parents=True)
    (db_path / "chroma.sqlite3").write_bytes(b"not a database " * 1000)
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())  # builds fine
    with pytest.raises(StorageError, match="not a database"):
        store.add("Plays the cello")
    (db_path / "chroma.sqlite3").unlink()
    time.sleep(1.1)  # calls fail at once for 1 s after a failure
    store.add("Plays the cello")
    assert [m.text for m in store.get_all()] == ["Plays the cello"]


def test_dropped_entries_are_counted(openai_server, db_path, model) -> None:
    answer = RememberingModel(
        memories=[
            {"text": "Prefers Python for backend work", "category": "preference"},
            {"text": "", "category": "fact"},
            {"text": "Has a cat", "category": "not-a-category"},
        ]
    )
    openai_server.responder = answer
    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model
    )
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "I prefer Python"}]
    )
    assert client.memory.flush(30)
    assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]
    assert client.memory.stats()["events"]["dropped_entries"] == 2


def test_dropped_entries_of_background_extraction_are_counted(openai_server, db_path, model):
    extraction = {"memories": [{"text": "Prefers Python", "category": "preference"}, {"text": 42}]}
    openai_server.responder = lambda body: Reply.text(
        json.dumps(extraction)
        if "You maintain long-term memory" in body["messages"][0]["content"]
        else "Noted."
    )
    client = with_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model, retry_backoff=FAST
    )
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "I prefer Python"}]
    )
    assert client.memory.flush(30)
    assert client.memory.stats()["events"]["dropped_entries"] == 1


# -- 2 (embedded): built while the folder is read-only, working once it is writable ------------


@pytest.mark.skipif(not is_root(), reason="a read-only bind mount needs root")
def test_a_wrapper_built_on_a_read_only_folder_answers_and_recovers(
    openai_server, tmp_path, model
) -> None:
    source = tmp_path / "source"
    (source / "memories").mkdir(parents=True)
    model_says = RememberingModel(
        "Noted.", [{"text": "Prefers Python for backend work", "category": "preference"}]
    )
    openai_server.responder = model_says
    with read_only_view(source, tmp_path / "view") as view:
        client = with_fast_memory(
            openai_server.client(), user_id="alice", db_path=view / "memories", embedder=model
        )
        answer = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "I prefer Python"}]
        )
        assert answer.choices[0].message.content == "Noted."  # answered, without memory
        with pytest.raises(StorageError):  # the store's calls fail until the folder is back
            client.memory.get_all()
        make_writable(view)
        time.sleep(1.1)
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "I prefer Python"}]
        )
        assert client.memory.flush(30)
        assert [m.text for m in client.memory.get_all()] == ["Prefers Python for backend work"]


# -- many processes on one embedded folder -----------------------------------------------------

_CHILD = """
    import json, sys
    from conftest import HashEmbedder
    from headroom_memory_integrations import MemoryStore, StorageError
    store = MemoryStore("alice", db_path={db!r}, embedder=HashEmbedder())
    seen = [m.text for m in store.get_all()]
    try:
        store.add("Written by the second process")
        wrote = "ok"
    except StorageError as exc:
        wrote = str(exc)
    print(json.dumps({{"seen": seen, "wrote": wrote}}))
    """


def test_a_second_process_reads_the_folder_but_may_not_write(db_path) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    store.add("Written by the first process")
    run = run_python(_CHILD.format(db=str(db_path)))
    assert run.returncode == 0, run.stderr
    child = json.loads(run.stdout.splitlines()[-1])
    assert child["seen"] == ["Written by the first process"]
    assert "another process" in child["wrote"] and "chroma run" in child["wrote"]
    assert [m.text for m in store.get_all()] == ["Written by the first process"]

    store.storage.close()  # the first process lets go of the folder: the next writer may write
    run = run_python(_CHILD.format(db=str(db_path)))
    assert json.loads(run.stdout.splitlines()[-1])["wrote"] == "ok"


def test_a_killed_writer_does_not_leave_the_folder_locked(db_path) -> None:
    run = run_python(
        f"""
        import os, signal
        from conftest import HashEmbedder
        from headroom_memory_integrations import MemoryStore
        MemoryStore("alice", db_path={str(db_path)!r}, embedder=HashEmbedder()).add("Mine")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert run.returncode != 0
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    store.add("Written after the kill")
    assert sorted(m.text for m in store.get_all()) == ["Mine", "Written after the kill"]


_FORKED: dict[str, Any] = {}  # what a forked child of the test finds (set before the fork)


def _in_forked_child(_: int) -> dict[str, Any]:
    """Runs in a child forked by multiprocessing (the fork start method): the parent's store."""
    import faulthandler
    import os

    from headroom_memory_integrations import StorageError

    faulthandler.dump_traceback_later(60, exit=True)  # (before the fix: hung in chromadb)
    store = _FORKED["store"]
    outcome: dict[str, Any] = {"pid": os.getpid(), "held": store.storage._folder_lock.held}
    started = time.monotonic()
    for name, call in (
        ("add", lambda: store.add("Written by the forked child")),
        ("search", lambda: store.search("Written by the forked child", min_score=-1)),
        (
            "reopened",
            lambda: MemoryStore("bob", db_path=_FORKED["db"], embedder=HashEmbedder()).add("x"),
        ),
    ):
        try:
            call()
            outcome[name] = "ok"
        except StorageError as exc:
            outcome[name] = str(exc)
    outcome["seconds"] = time.monotonic() - started
    journal = Path(_FORKED["db"]) / ".headroom-memory.pending"
    outcome["journaled"] = journal.exists() and b"forked child" in journal.read_bytes()
    return outcome


def test_a_forked_child_refuses_its_parents_folder_clearly_and_holds_nothing_of_it(
    db_path, monkeypatch
) -> None:
    import multiprocessing

    monkeypatch.setattr(chroma, "_WARM_RETRY_SECONDS", 0.0)
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    store.add("Written by the parent")
    read_ahead(store)  # small writes are deferred from now on
    store.add("Written by the parent, stored behind it")  # (maybe still pending at the fork)
    _FORKED.update(store=store, db=str(db_path))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.map_async(_in_forked_child, [0]).get(90)[0]
        # before: the child took itself for the folder's writer, its add returned and its
        # memory sat in the journal until the parent's worker emptied it (lost, no error),
        # or its first Chroma call hung for good
        assert not child["held"]
        for name in ("add", "search", "reopened"):
            assert "forked" in child[name] and "spawn" in child[name], child
        assert child["seconds"] < 30 and not child["journaled"]
        # the parent goes on as before
        store.add("Written by the parent after the fork")
        assert store.flush(10)
        texts = sorted(m.text for m in store.get_all())
        assert texts == [
            "Written by the parent",
            "Written by the parent after the fork",
            "Written by the parent, stored behind it",
        ]
        # the child (still alive in the pool) keeps no hold on the folder's lock: once the
        # parent lets go of the folder, another process may write it
        store.storage.close()
        run = run_python(_CHILD.format(db=str(db_path)))
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout.splitlines()[-1])["wrote"] == "ok"


class PanicException(BaseException):
    """What a panic in chromadb's Rust core raises (pyo3's class: not an ``Exception``)."""


PanicException.__module__ = "pyo3_runtime"


def test_a_panic_in_chromas_core_is_a_storage_failure(openai_server, db_path, monkeypatch) -> None:
    """chromadb 1.0 opening a folder that chromadb 1.5 wrote panics in its Rust core (both
    within the package's pin); the panic, a BaseException, went through every ``except
    Exception``: the store's calls, the CLI and a wrapped chat call all crashed with it."""
    import chromadb

    def panics(*args: Any, **kwargs: Any) -> Any:
        raise PanicException("range start index 10 out of range for slice of length 9")

    monkeypatch.setattr(chromadb, "PersistentClient", panics)
    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=HashEmbedder()
    )
    openai_server.script("Hello!")
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "Hello!"
    assert client.memory.counters["inject_failures"] == 1
    time.sleep(1.1)  # calls fail at once for 1 s after a failure
    with pytest.raises(StorageError, match="newer chromadb"):
        client.memory.get_all()

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(chromadb, "PersistentClient", interrupted)
    time.sleep(1.1)
    with pytest.raises(KeyboardInterrupt):  # an interrupt is never taken for a failure
        client.memory.get_all()
    monkeypatch.undo()
    time.sleep(1.1)
    client.memory.add("Plays the cello")
    assert [m.text for m in client.memory.get_all()] == ["Plays the cello"]


class PanickingEmbedder(HashEmbedder):
    """An embedder whose native code panics while ``failure`` is set (HF ``tokenizers``, under
    sentence-transformers or fastembed, raises pyo3's ``PanicException`` then), or raises
    ``failure`` itself."""

    failure: BaseException | None = None

    def embed(self, texts):
        if self.failure is not None:
            raise self.failure
        return super().embed(texts)


def test_a_panic_in_the_embedder_is_an_embedding_failure(openai_server, db_path) -> None:
    """The panic, a BaseException, went through the chat call's ``except Exception``: the
    user's call crashed with it. It is an EmbeddingError now: the call is answered without
    memories (counted), a memory it told is stored once the embedder works again, and the
    store's own calls raise the package's error with the panic as its cause."""
    from headroom_memory_integrations import EmbeddingError

    embedder = PanickingEmbedder()
    openai_server.responder = RememberingModel(
        "Noted.", [{"text": "Lives in Lyon", "category": "fact"}]
    )
    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=embedder
    )
    try:
        client.memory.add("Plays the cello")
        embedder.failure = PanicException("called `Option::unwrap()` on a `None` value")
        answer = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "I live in Lyon"}]
        )
        assert answer.choices[0].message.content.startswith("Noted.")
        assert client.memory.counters["inject_failures"] == 1
        with pytest.raises(EmbeddingError, match="native code") as raised:
            client.memory.search("cello")
        assert isinstance(raised.value.__cause__, PanicException)
        embedder.failure = KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt):  # an interrupt is never taken for a failure
            client.memory.search("Where do I live?")
        embedder.failure = None
        assert client.memory.flush(60)  # the memory block's write, retried
        assert {m.text for m in client.memory.get_all()} == {"Plays the cello", "Lives in Lyon"}
    finally:
        client.close()


def test_a_panic_that_quotes_the_users_text_is_not_logged_above_debug(
    openai_server, db_path, caplog
) -> None:
    """Rust's commonest panic, slicing a string off a character boundary, quotes the string
    ("byte index 3 is not a char boundary; ... of `<text>`"): the user's message. The
    EmbeddingError names the panic's type, not its text, and the chat call logs it at WARNING
    without its traceback; the panic (its cause) is logged at DEBUG only. Before, the panic's
    text was in the error's message and its traceback in the WARNING line (docs/security.md:
    logs above DEBUG never carry memory texts)."""
    from headroom_memory_integrations import EmbeddingError

    said = "my diagnosis is Crohn's disease, café"
    embedder = PanickingEmbedder()
    openai_server.responder = RememberingModel("Noted.", [])
    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=embedder
    )
    try:
        client.memory.add("Plays the cello")
        embedder.failure = PanicException(
            f"byte index 3 is not a char boundary; it is inside 'é' (bytes 2..4) of `{said}`"
        )
        with caplog.at_level(logging.DEBUG, logger="headroom_memory_integrations"):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": said}]
            )
            with pytest.raises(EmbeddingError, match="PanicException") as raised:
                client.memory.search(said)
        assert "Crohn" not in str(raised.value)
        assert isinstance(raised.value.__cause__, PanicException)  # the text is kept there
        assert client.memory.counters["inject_failures"] == 1
        formatter = logging.Formatter("%(message)s")
        loud = [formatter.format(r) for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("could not search memories" in line for line in loud), loud
        assert not [line for line in loud if "Crohn" in line]
        quiet = [formatter.format(r) for r in caplog.records if r.levelno < logging.WARNING]
        assert any("Crohn" in line for line in quiet)  # for whoever debugs it
    finally:
        embedder.failure = None
        client.close()


def test_ctrl_c_during_a_users_first_call_is_not_held_until_the_storage_opens(
    db_path, monkeypatch
) -> None:
    """The first call embeds while another thread opens the storage; an interrupt raised
    while embedding waited for the open (seconds, on a server that does not answer)."""
    opened_late = threading.Event()

    class InterruptedEmbedder(HashEmbedder):
        def embed(self, texts: Any) -> Any:
            raise KeyboardInterrupt

    store = MemoryStore("alice", db_path=db_path, embedder=InterruptedEmbedder())
    real_open = store._open

    def slow_open(dimension: int | None = None) -> Any:
        opened_late.wait(30)  # a storage that takes its time to open
        return real_open(dimension)

    monkeypatch.setattr(store, "_open", slow_open)
    returned = threading.Event()

    def first_call() -> None:
        try:
            store.search("Which instrument do I play?")
        except KeyboardInterrupt:
            returned.set()

    caller = threading.Thread(target=first_call)
    caller.start()
    assert returned.wait(10)  # before the storage has opened
    opened_late.set()
    caller.join(30)


_MANY_USERS = """
import json, resource, tempfile
# chromadb keeps the indexes of (soft open-file limit) / 5 collections, and lets them go well
# before that many (51 here): a user's index is let go of before it was ever saved to disk
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from conftest import HashEmbedder
from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.storage import chroma
chroma.OPEN_COLLECTIONS = 4  # as in a server of thousands: handles let go of, read afresh
folder, embedder = tempfile.mkdtemp(), HashEmbedder(8)
for user in range(60):
    store = MemoryStore(f"user-{user}", db_path=folder, embedder=embedder)
    store.add(f"My locker number is {user}")
    store.search("locker number")  # Chroma builds the index from its log: the first read
del store
failed = {}
for user in range(60):
    try:
        hits = MemoryStore(f"user-{user}", db_path=folder, embedder=embedder).search("locker")
        if [hit.memory.text for hit in hits] != [f"My locker number is {user}"]:
            failed[user] = [hit.memory.text for hit in hits]
    except Exception as exc:
        failed[user] = str(exc)
print(json.dumps(failed))
"""


def test_a_user_whose_index_chroma_let_go_of_unsaved_still_finds_their_memories() -> None:
    """chromadb 1.5 rebuilds an index from its log on a collection's first read in a process
    and on writes only: a later read of an index evicted from its cache before it was ever
    saved (fewer than HNSW_SYNC_THRESHOLD writes) failed with "Nothing found on disk" until the
    process restarted. The storage makes Chroma rebuild it and reads again."""
    run = run_python(_MANY_USERS, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {}


def test_an_index_id_map_that_is_not_plain_values_is_never_run(tmp_path: Path) -> None:
    """The erase reads Chroma's id map with an unpickler that refuses classes and functions: a
    file planted in the folder cannot run code in the process."""
    import pickle

    from headroom_memory_integrations.storage import folder as folder_module

    planted = tmp_path / "segment"
    planted.mkdir()
    ran = tmp_path / "ran"
    payload = pickle.dumps(_Planted(str(ran)), protocol=3)
    (planted / folder_module.INDEX_ID_MAP).write_bytes(payload + b"memory-id")
    with pytest.raises(OSError, match="not a vector index id map"):
        folder_module._rename_in_index(planted, {"memory-id": "erased-1"})
    assert not ran.exists()


class _Planted:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "ran"))  # type: ignore[return-value]
