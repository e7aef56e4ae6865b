"""A sole writer (embedded storage) reads a user's memories ahead and searches them in memory:
the in-memory index must answer exactly like Chroma and follow every write."""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref

import numpy as np
import pytest
from _reliability_support import read_ahead

from headroom_memory_integrations import MemoryStore, StorageError
from headroom_memory_integrations.storage import chroma
from headroom_memory_integrations.storage.vectors import VectorIndex


def _unit_rows(count: int, dimension: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_vector_index_ranks_exactly_and_follows_puts_and_removes() -> None:
    index = VectorIndex(8)
    vectors = _unit_rows(200, 8, seed=1)  # grows past its first 64 rows
    ids = [f"m{i}" for i in range(200)]
    index.put(ids, vectors)
    index.put(["m5"], vectors[7:8])  # a rewrite replaces, never duplicates
    index.remove(["m0", "m100", "m199", "unknown"])
    expected = {i: v for i, v in zip(ids, vectors)} | {"m5": vectors[7]}
    for gone in ("m0", "m100", "m199"):
        del expected[gone]
    assert len(index) == len(expected) == 197

    query = _unit_rows(1, 8, seed=2)[0]
    truth = sorted(((i, float(v @ query)) for i, v in expected.items()), key=lambda p: -p[1])
    found = index.nearest(query, 10)
    assert [i for i, _ in found] == [i for i, _ in truth[:10]]
    np.testing.assert_allclose([s for _, s in found], [s for _, s in truth[:10]], atol=1e-6)
    assert len(index.nearest(query, 1000)) == 197
    assert VectorIndex(8).nearest(query, 5) == []

    for rows in (2, 40):  # row by row, and one matrix product for a batch
        queries = _unit_rows(rows, 8, seed=3)
        batch = index.nearest_many(queries, 7)
        assert len(batch) == rows
        for row, found in zip(queries, batch):
            truth = {i: float(v @ row) for i, v in expected.items()}  # m5 and m7 tie
            best = sorted(truth.values(), reverse=True)[:7]
            np.testing.assert_allclose([s for _, s in found], best, atol=1e-5)
            np.testing.assert_allclose([truth[i] for i, _ in found], best, atol=1e-5)


def _wait_for_index(store: MemoryStore, monkeypatch, seconds: float = 20.0) -> VectorIndex:
    """Search until the background read-ahead has built the index. A read-ahead that a write
    overlapped is tried again by a later search; here without the usual pause."""
    monkeypatch.setattr(chroma, "_WARM_RETRY_SECONDS", 0.0)
    collection = store._open()
    deadline = time.monotonic() + seconds
    while collection._index is None:
        assert time.monotonic() < deadline, "the read-ahead never finished"
        store.search("anything", min_score=-1)
        time.sleep(0.01)
    return collection._index


def test_searches_move_to_memory_and_answer_as_chroma_did(store: MemoryStore, monkeypatch) -> None:
    texts = [
        "Plays the cello in a community orchestra",
        "Is allergic to peanuts",
        "Works as a nurse in Leeds",
        "Prefers tea over coffee",
        "Has a dog called Biscuit",
    ]
    store.add_many(texts)
    questions = ["Which instrument do I play?", "What is my job?", "Do I have pets?"]
    by_chroma = [store.search(q, min_score=-1) for q in questions]  # starts the read-ahead
    index = _wait_for_index(store, monkeypatch)
    assert len(index) == 5
    by_memory = [store.search(q, min_score=-1) for q in questions]
    for chroma_results, memory_results in zip(by_chroma, by_memory):
        assert [r.memory.id for r in memory_results] == [r.memory.id for r in chroma_results]
        np.testing.assert_allclose(
            [r.score for r in memory_results], [r.score for r in chroma_results], atol=1e-4
        )

    new = store.add("Speaks fluent Portuguese")
    assert store.search("Which languages do I speak?")[0].memory.id == new.id
    store.update(new.id, "Speaks fluent Japanese")
    found = store.search("Do I speak Japanese?")[0]
    assert found.memory.text == "Speaks fluent Japanese" and found.score > 0.6
    store.delete(new.id)
    assert all(r.memory.id != new.id for r in store.search("Which languages do I speak?"))
    assert len(index) == 5 == store.count()


def _writing_during_first_page(collection, write) -> None:
    """Make the read-ahead's first page run ``write()`` before it reads."""
    chroma_get = collection._collection.get

    def get_and_write(*args, **kwargs):
        if kwargs.get("offset") == 0:  # the read-ahead's first page
            collection._collection.get = chroma_get
            write()
            # (a delete's erase opens Chroma anew: its collection is another object now)
            return collection._chroma(create=False).get(*args, **kwargs)
        return chroma_get(*args, **kwargs)

    collection._collection.get = get_and_write


def test_writes_during_the_read_ahead_are_replayed_on_it(hash_store: MemoryStore) -> None:
    """A user who keeps writing still gets the in-memory index: what was written, rewritten or
    deleted while the read-ahead read its pages is in it, exactly as in Chroma."""
    collection = hash_store._open()
    collection._warm_after = None  # no background read-ahead: this test runs it by hand
    stored = hash_store.add_many([f"fact number {i}" for i in range(30)])
    gone, rewritten = stored[3].id, stored[4].id
    added: list[str] = []

    def write() -> None:
        added.append(hash_store.add("a fact written meanwhile").id)
        hash_store.delete(gone)
        hash_store.update(rewritten, "a fact rewritten meanwhile")

    _writing_during_first_page(collection, write)
    collection._warm()  # what the background thread runs
    index = collection._index
    assert index is not None and collection._warm_log is None
    assert len(index) == hash_store.count() == 30
    assert added[0] in index and gone not in index and rewritten in index
    assert collection._cache[rewritten].entry.text == "a fact rewritten meanwhile"
    assert gone not in collection._cache
    stored = collection._collection.get(include=["embeddings"])  # what Chroma holds
    assert sorted(stored["ids"]) == sorted(index._ids)
    for memory_id, vector in zip(stored["ids"], stored["embeddings"]):
        np.testing.assert_allclose(index._matrix[index._rows[memory_id]], vector, atol=1e-6)
    assert hash_store.search("a fact written meanwhile")[0].memory.id == added[0]
    assert hash_store.search("a fact rewritten meanwhile")[0].memory.id == rewritten


def test_a_failed_write_during_the_read_ahead_spoils_it(hash_store: MemoryStore) -> None:
    from headroom_memory_integrations import StorageError

    collection = hash_store._open()
    collection._warm_after = None
    hash_store.add_many([f"fact number {i}" for i in range(30)])
    chroma_upsert = collection._collection.upsert

    def failing_write() -> None:
        def broken_upsert(*args, **kwargs):
            raise RuntimeError("disk full")

        collection._collection.upsert = broken_upsert
        with pytest.raises(StorageError, match="disk full"):
            hash_store.add("a fact that may be half written")
        collection._collection.upsert = chroma_upsert

    _writing_during_first_page(collection, failing_write)
    collection._warm()
    assert collection._index is None and collection._warm_after is not None
    collection._warm_after = 0.0
    collection._warm()  # a later attempt, with no write in the way
    assert collection._index is not None and len(collection._index) == hash_store.count() == 30


@pytest.mark.parametrize("handle", ["retired", "not retired yet"])
def test_closing_the_storage_under_a_read_ahead_warns_of_nothing(
    hash_store: MemoryStore, caplog: pytest.LogCaptureFixture, monkeypatch, handle
) -> None:
    """close() tears the client down under a read-ahead in flight (its next page fails): the
    read stops quietly, keeps nothing, and is not tried again. Also when the read fails in the
    moment after close() marked the storage closed and before it retired the user's handle
    (a warning on a plain close, seen in a script that closed right after its writes)."""
    collection = hash_store._open()
    collection._warm_after = None
    if handle == "not retired yet":
        monkeypatch.setattr(collection, "retire", lambda: None)
    hash_store.add_many([f"fact number {i}" for i in range(30)])
    _writing_during_first_page(collection, hash_store.storage.close)
    with caplog.at_level("WARNING"):
        collection._warm()
    assert collection._index is None and collection._warm_after is None
    assert not [r for r in caplog.records if "ahead" in r.getMessage()]


def test_large_collections_stay_on_chroma(hash_store: MemoryStore, monkeypatch) -> None:
    monkeypatch.setattr(chroma, "WARM_LIMIT", 10)
    collection = hash_store._open()
    collection._warm_after = None
    hash_store.add_many([f"note {chr(97 + i) * 3} {i * 7919}" for i in range(11)])
    collection._warm()
    assert collection._index is None
    assert hash_store.count() == 11
    assert len(hash_store.search("note ddd", min_score=-1)) == 5


@pytest.mark.server
def test_a_server_collection_reads_texts_ahead_but_searches_with_chroma(
    server_storage, model
) -> None:
    """Other clients write to a server: its texts may rank candidates, nothing more."""
    store = MemoryStore("srv-dave", storage=server_storage, embedder=model)
    collection = store._open()
    collection._warm_after = None  # no background read-ahead: this test runs it by hand
    memory = store.add("Plays the cello")
    assert memory.id not in collection._cache  # a server handle keeps nothing it writes
    collection._warm()
    assert collection._cache[memory.id].entry.text == "Plays the cello"
    assert collection._index is None and collection._warm_after is None  # done, no retry
    assert store.search("Which instrument do I play?")[0].memory.id == memory.id


def test_a_failed_write_sends_searches_back_to_chroma(hash_store: MemoryStore, monkeypatch) -> None:
    from headroom_memory_integrations import StorageError

    hash_store.add("Plays the cello")
    hash_store.search("cello")
    _wait_for_index(hash_store, monkeypatch)
    collection = hash_store._open()

    def broken_upsert(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(collection._collection, "upsert", broken_upsert)
    with pytest.raises(StorageError, match="disk full"):  # a write made at once (an import)
        hash_store.import_([json.dumps({"id": "f" * 32, "text": "Plays the violin"})])
    assert collection._index is None  # it may not match Chroma any more
    assert collection._warm_after is not None  # and will be read again
    assert [r.memory.text for r in hash_store.search("cello")] == ["Plays the cello"]


def test_clear_stops_a_read_ahead_and_does_not_revive_the_collection(db_path) -> None:
    from conftest import HashEmbedder

    from headroom_memory_integrations import ChromaStorage
    from headroom_memory_integrations.storage.base import collection_name

    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    collection = store._open()
    collection._warm_after = None  # no background read-ahead: this test runs it by hand
    store.add_many([f"note {chr(97 + i) * 3} {i * 7919}" for i in range(20)])
    chroma_get = collection._collection.get
    pages = []

    def get_then_clear(*args, **kwargs):
        page = chroma_get(*args, **kwargs)
        pages.append(len(page["ids"]))
        store.clear()  # another thread clears the user while the read-ahead runs
        return page

    collection._collection.get = get_then_clear
    collection._warm()
    assert pages == [20] and collection._index is None  # the overlapped read kept nothing
    assert collection._warm_after is not None  # the handle stays in use: read ahead again later
    names = [c.name for c in ChromaStorage.at(db_path)._client.list_collections()]
    assert collection_name("alice") not in names
    assert store.count() == 0


def test_the_least_recently_searched_users_are_let_go_past_the_budget(db_path, monkeypatch) -> None:
    from conftest import HashEmbedder

    monkeypatch.setattr(chroma, "READ_AHEAD_BUDGET", 25)
    stores = [MemoryStore(user, db_path=db_path, embedder=HashEmbedder()) for user in "abc"]
    collections = []
    for number, store in enumerate(stores):
        collection = store._open()
        collection._warm_after = None  # no background read-ahead: this test runs it by hand
        store.add_many([f"note {chr(97 + i) * 3} {number} {i * 7919}" for i in range(10)])
        collections.append(collection)
    collections[0]._warm()
    collections[1]._warm()
    stores[0].search("note aaa")  # user a is now searched more recently than user b
    collections[2]._warm()  # 30 memories held: the least recently searched (b) is let go
    assert collections[1]._index is None and collections[1]._cache == {}
    assert collections[1]._warm_after is not None  # read again on a later search
    assert collections[0]._index is not None and collections[2]._index is not None
    assert len(stores[1].search("note bbb 1", min_score=-1)) == 5  # now served by Chroma


def test_records_read_on_demand_are_held_up_to_a_limit(
    hash_store: MemoryStore, monkeypatch
) -> None:
    """A user too large to read ahead has each search's candidates read and kept: past
    CACHE_LIMIT records the oldest half is let go, and they are read again when needed."""
    monkeypatch.setattr(chroma, "WARM_LIMIT", 10)  # too many to read ahead: searched by Chroma
    monkeypatch.setattr(chroma, "CACHE_LIMIT", 40)
    collection = hash_store._open()
    collection._warm_after = None
    stored = hash_store.add_many([f"note {i} about topic {i % 9} and word{i}" for i in range(120)])
    collection._cache.clear()  # as in a new process
    for i in range(0, 120, 7):
        hash_store.search(f"word{i} topic {i % 9}", min_score=-1)
        assert len(collection._cache) <= 40
    assert collection._index is None
    oldest = stored[0].id
    assert hash_store.get(oldest).text == "note 0 about topic 0 and word0"  # read again
    assert [r.memory.id for r in hash_store.search("note 0 about topic 0 and word0")][:1] == [
        oldest
    ]
    hash_store.add_many([f"later note {i} on subject {i}" for i in range(60)])  # writes too
    assert len(collection._cache) <= 40 and hash_store.count() == 180


def test_a_new_memory_id_is_read_once_above_the_read_ahead_limit(
    hash_store: MemoryStore, monkeypatch
) -> None:
    """Without a complete index, a new memory's id is read to see whether it is taken; the
    write then needs to know what it replaces, which that read already said (nothing): Chroma
    is asked once, not twice. A failed write still leaves nothing behind."""
    monkeypatch.setattr(chroma, "WARM_LIMIT", 10)
    collection = hash_store._open()
    collection._warm_after = None  # no read-ahead
    hash_store.add_many([f"note {i} about topic {i}" for i in range(30)])
    reads: list[list[str]] = []
    real_get = collection._collection.get

    def counting_get(*args, **kwargs):
        reads.append(list(kwargs.get("ids") or []))
        return real_get(*args, **kwargs)

    monkeypatch.setattr(collection._collection, "get", counting_get)
    memory = hash_store.add("Keeps bees in the back garden")
    assert sum(memory.id in ids for ids in reads) == 1
    assert hash_store.get(memory.id).text == "Keeps bees in the back garden"

    def broken_upsert(**kwargs):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(collection._collection, "upsert", broken_upsert)
    with pytest.raises(StorageError):
        hash_store.add("Owns a red canoe")
    monkeypatch.undo()
    assert hash_store.count() == 31
    assert [m.text for m in hash_store.get_all() if "canoe" in m.text] == []
    assert hash_store.add("Owns a red canoe").text == "Owns a red canoe"  # its id is free


def test_the_read_ahead_waits_before_reading_and_stops_if_the_process_is_stopping(
    hash_store: MemoryStore, monkeypatch
) -> None:
    """The first search's call goes first: the read waits READ_AHEAD_DELAY, and gives up
    when the process stops meanwhile (nothing read, nothing kept)."""
    waited: list[float] = []
    reads: list[str] = []

    class Stopping:
        def __init__(self, stop: bool) -> None:
            self.stop = stop

        def wait(self, timeout: float) -> bool:
            waited.append(timeout)
            return self.stop

        def is_set(self) -> bool:
            return False

    hash_store.add_many([f"note {i}" for i in range(5)])
    collection = hash_store._open()
    pages = collection._pages
    monkeypatch.setattr(collection, "_pages", lambda *a: reads.append("page") or pages(*a))
    monkeypatch.setattr(chroma, "_stopping", Stopping(stop=True))
    collection._warm()
    assert waited == [chroma.READ_AHEAD_DELAY] and reads == [] and collection._index is None

    monkeypatch.setattr(chroma, "_stopping", Stopping(stop=False))
    collection._warm()
    assert waited[-1] == chroma.READ_AHEAD_DELAY > 0 and reads
    assert collection._index is not None and len(collection._index) == 5


# -- the handles a storage keeps (OPEN_COLLECTIONS) ---------------------------------------------


def test_the_handles_of_users_let_go_are_bounded_and_come_back_right(db_path, monkeypatch) -> None:
    """A server opening many users keeps the most recently opened handles, not one per user
    ever opened (each with its cache and read-ahead); a user let go of reads back right."""
    from conftest import HashEmbedder

    monkeypatch.setattr(chroma, "OPEN_COLLECTIONS", 3)
    storage = chroma.ChromaStorage.at(db_path)
    first = weakref.ref(MemoryStore("user-0", storage=storage, embedder=HashEmbedder())._open())
    for n in range(8):
        MemoryStore(f"user-{n}", storage=storage, embedder=HashEmbedder()).add(
            f"Plays instrument number {n} in a band"
        )
    storage.settle()
    for thread in list(chroma._warmers):  # a read-ahead holds its handle while it runs
        thread.join(10)
    gc.collect()
    assert len(storage._recent) == 3 and len(storage._collections) == 3
    assert first() is None  # collected, with what it held
    again = MemoryStore("user-0", storage=storage, embedder=HashEmbedder())
    assert [m.text for m in again.get_all()] == ["Plays instrument number 0 in a band"]
    assert [r.memory.text for r in again.search("instrument number 0 band")] == [
        "Plays instrument number 0 in a band"
    ]


def test_a_handle_still_held_stays_the_only_one_of_its_user(db_path) -> None:
    """Past the bound, a handle a store (or a thread) still holds is the one every caller
    gets: two would each keep a cache, an index and a user lock of their own."""
    from conftest import HashEmbedder

    storage = chroma.ChromaStorage.at(db_path)
    alice = MemoryStore("alice", storage=storage, embedder=HashEmbedder())
    alice.add("Keeps bees on the roof")
    held = read_ahead(alice)
    for n in range(chroma.OPEN_COLLECTIONS + 5):
        storage.open(f"user-{n}", "test-hash", 64)  # opened, not read: creates nothing
    gc.collect()
    assert "alice" not in {key[0] for key in storage._recent}  # let go of by the storage ...
    assert storage.open("alice", "test-hash", 64) is held  # ... but not doubled
    other = MemoryStore("alice", storage=storage, embedder=HashEmbedder())
    other.add("Grows tomatoes on the balcony")
    assert {r.memory.text for r in alice.search("tomatoes balcony bees roof", min_score=-1)} == {
        "Keeps bees on the roof",
        "Grows tomatoes on the balcony",
    }
    assert other.clear() == 2
    assert alice.get_all() == [] and held._index is None  # told of the clear


def test_a_handle_let_go_with_deferred_writes_loses_and_reorders_nothing(
    db_path, model, monkeypatch
) -> None:
    """A handle collected while its writes wait in the journal: they are the storage's, not
    the handle's; the user's next handle reads them, in order, once they are in Chroma."""
    from headroom_memory_integrations.storage import deferred

    monkeypatch.setattr(deferred, "GROUP_SECONDS", 60.0)  # the worker waits unless asked
    monkeypatch.setattr(chroma, "_WARM_RETRY_SECONDS", 0.0)
    monkeypatch.setattr(chroma, "OPEN_COLLECTIONS", 1)
    storage = chroma.ChromaStorage.at(db_path)
    alice = MemoryStore("alice", storage=storage, embedder=model)
    alice.add("Plays the cello in an orchestra")
    handle = weakref.ref(read_ahead(alice))
    dentist = alice.add("Dentist appointment on Tuesday")
    assert alice.remember("Dentist appointment on Thursday").outcome.value == "superseded"
    assert storage._deferred.pending == 2  # both writes wait, in memory and the journal
    del alice
    storage.open("bob", model.name, model.dimension)  # alice's handle is let go of
    for thread in list(chroma._warmers):
        thread.join(10)
    gc.collect()
    assert handle() is None and storage._deferred.pending == 2
    again = MemoryStore("alice", storage=storage, embedder=model)
    assert sorted(m.text for m in again.get_all()) == [
        "Dentist appointment on Thursday",  # the later write won
        "Plays the cello in an orchestra",
    ]
    assert [r.text for r in again.get(dentist.id).history] == ["Dentist appointment on Tuesday"]
    assert storage._deferred.pending == 0
    found = again.search("When is the dentist appointment?")
    assert [r.memory.text for r in found][:1] == ["Dentist appointment on Thursday"]


def test_a_handle_opened_while_its_user_is_cleared_is_told_of_the_clear(
    db_path, monkeypatch
) -> None:
    """A user whose handle was let go of is cleared while another thread opens them again: the
    new handle (not there when the clear began) must not keep serving what was cleared."""
    from conftest import HashEmbedder

    monkeypatch.setattr(chroma, "OPEN_COLLECTIONS", 1)
    storage = chroma.ChromaStorage.at(db_path)
    bees = MemoryStore("alice", storage=storage, embedder=HashEmbedder()).add("Keeps bees")
    storage.open("bob", "test-hash", 64)  # alice's handle is let go of
    for thread in list(chroma._warmers):
        thread.join(10)
    gc.collect()
    assert "alice" not in {key[0] for key in storage._collections}

    clearing, go = threading.Event(), threading.Event()
    settle = storage._settle

    def held_in_clear() -> None:  # the clear, between listing the handles and deleting
        if threading.current_thread().name == "clear":
            clearing.set()
            go.wait(30)
        settle()

    monkeypatch.setattr(storage, "_settle", held_in_clear)
    counted: list[int] = []
    clear = threading.Thread(target=lambda: counted.append(storage.drop("alice")), name="clear")
    clear.start()
    assert clearing.wait(30)
    handle = storage.open("alice", "test-hash", 64)  # opened meanwhile, and read
    assert [m.text for m in handle.get([bees.id])] == ["Keeps bees"]
    go.set()
    clear.join(30)
    assert counted == [1]
    assert handle.get([bees.id]) == []  # not served from what it read before the clear
    assert MemoryStore("alice", storage=storage, embedder=HashEmbedder()).get_all() == []


_OVERLAPPING_BLAS_LIMITS = """
import threading

import numpy
from threadpoolctl import threadpool_info

from headroom_memory_integrations.storage.vectors import one_blas_thread


def blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


before = blas_threads()
first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
meanwhile = []


def first():
    with one_blas_thread():
        first_in.set()
        second_in.wait()
    first_out.set()


def second():
    first_in.wait()
    with one_blas_thread():
        second_in.set()
        first_out.wait()
        meanwhile.extend(blas_threads())


threads = [threading.Thread(target=first), threading.Thread(target=second)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(before, meanwhile, blas_threads())
"""


def test_overlapping_blas_limits_leave_the_process_as_it_was() -> None:
    """Threads limiting BLAS at once (a batch search, a duplicate check, the numpy model): the
    process's setting is restored when the last of them leaves, whatever the order, and the
    limit holds until then. In a process of its own whose BLAS starts with 2 threads (under
    the suite's OMP_NUM_THREADS=1 it starts with one: a limit to one would change nothing)."""
    said = _with_two_blas_threads(_OVERLAPPING_BLAS_LIMITS)
    assert said.split("\n")[0] == "[2] [1] [2]", said


def _with_two_blas_threads(script: str) -> str:
    """What ``script`` prints (and writes to stderr), run by Python in a process of its own
    whose BLAS starts with 2 threads."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["OPENBLAS_NUM_THREADS"] = "2"
    done = subprocess.run(  # the scripts wait for each step: a hang ends here
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


_BLAS_LIMITS_ROUNDS = """
import threading

import numpy
from threadpoolctl import threadpool_limits, threadpool_info

from headroom_memory_integrations.storage.vectors import few_blas_threads, one_blas_thread


def blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"][0]


changed = 0
for _ in range(30):  # A enters, B enters, A leaves (its thread ends), B leaves
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with one_blas_thread():
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with one_blas_thread():
            b_in.set()
            a_out.wait()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    changed += blas_threads() != 2
threadpool_limits(1, user_api="blas")  # as a restore that did not take effect would leave it
with few_blas_threads(1):
    pass
print(changed, blas_threads())
"""


def test_blas_limits_restore_the_setting_the_process_started_with() -> None:
    """The setting is saved once, when BLAS is first limited: a later first entry finding one
    thread (left by a restore that did not take effect) does not take it as the setting to
    restore, and every round of overlapping limits is restored."""
    said = _with_two_blas_threads(_BLAS_LIMITS_ROUNDS)
    assert said.split("\n")[0] == "0 2", said


_LIMITS_WHILE_A_LIMITING_THREAD_LIVES = """
import threading

import numpy
from threadpoolctl import threadpool_info

from headroom_memory_integrations.storage.vectors import one_blas_thread


def blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"][0]


with one_blas_thread():  # the main thread limits BLAS first (a batch search), and lives on
    pass
limited = []


def limit():
    with one_blas_thread():
        limited.append(blas_threads())


worker = threading.Thread(target=limit)
worker.start()
worker.join()
main_in, worker_in, main_out = threading.Event(), threading.Event(), threading.Event()


def leave_last():
    main_in.wait()
    with one_blas_thread():
        worker_in.set()
        main_out.wait()


worker = threading.Thread(target=leave_last)
worker.start()
with one_blas_thread():
    main_in.set()
    worker_in.wait()
main_out.set()
worker.join()
print(limited, blas_threads())
"""


def test_a_thread_that_limited_blas_and_lives_on_leaves_the_setting_to_the_others() -> None:
    """threadpoolctl (3.8) lets only the first thread that set OpenBLAS's count set it, for
    as long as that thread lives: after the main thread had limited BLAS once, a worker's
    limit did nothing (BLAS ran on every core in it), and a worker that left last restored
    nothing: the process stayed at one BLAS thread for as long as the main thread lived."""
    said = _with_two_blas_threads(_LIMITS_WHILE_A_LIMITING_THREAD_LIVES)
    assert said.split("\n")[0] == "[1] 2", said
