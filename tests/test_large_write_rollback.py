"""A write larger than one Chroma batch is undone whole even when its process is killed between
two batches (docs/reliability.md, section 3): real processes on real embedded folders, killed
with SIGKILL right after Chroma committed the first batch (5,461 records) of a 6,000-memory
import or ``add_many``; and the undo record, which can hold memories' text, leaves the folder
once its write is over."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _reliability_support import ROOT, RandomEmbedder, files_containing

from headroom_memory_integrations import MemoryStore, StorageError
from headroom_memory_integrations.storage import chroma
from headroom_memory_integrations.storage.rollback import ROLLBACK_FILE

LARGE = 6000  # more than Chroma 1.5 takes in one write (5,461): two batches

# The process that is killed: it stores "Plays the cello", then makes a large write whose
# first line (import) rewrites it. Chroma's upsert is wrapped to say when a large batch is
# committed (and what the rewritten memory holds in Chroma then), then wait to be killed; it
# changes nothing of what is written.
_WRITER = """
import json, sys, time
import chromadb
from _reliability_support import RandomEmbedder
from headroom_memory_integrations import MemoryStore

upsert = chromadb.api.models.Collection.Collection.upsert
store = MemoryStore("alice", db_path={db!r}, embedder=RandomEmbedder(), duplicate_threshold=None)
kept = store.add("Plays the cello")


def upsert_then_wait(self, *args, **kwargs):
    done = upsert(self, *args, **kwargs)
    if len(kwargs["ids"]) > 1000:
        record = json.loads(self.get(ids=[kept.id])["metadatas"][0]["record"])
        print("committed", len(kwargs["ids"]), kept.id, json.dumps(record["text"]), flush=True)
        time.sleep(600)
    return done


chromadb.api.models.Collection.Collection.upsert = upsert_then_wait
if {how!r} == "import":
    rewrite = json.dumps({{"id": kept.id, "text": "Plays the viola", "category": "fact"}})
    store.import_([rewrite] + [_line(n) for n in range({large} - 1)], consolidate=False)
else:
    store.add_many([f"Added fact number {{n}}" for n in range({large})])
print("written", flush=True)
"""
_LINE = """
def _line(n):
    return json.dumps({"id": f"m{n:05d}", "text": f"Imported fact number {n}", "category": "fact"})
"""


class _Killed:
    """What the killed writer said: the first batch's size, and the rewritten memory's id
    and text in Chroma at that moment."""

    def __init__(self, line: str) -> None:
        word, size, memory_id, text = line.split(" ", 3)
        assert word == "committed", line
        self.batch, self.memory_id, self.text = int(size), memory_id, json.loads(text)


def _writer_killed_after_its_first_batch(db_path: Path, how: str, *, then: Any = None) -> _Killed:
    """Run the writer until Chroma has committed the first batch of its large write; call
    ``then()`` while it waits there (it still holds the folder); then SIGKILL it."""
    code = _LINE + _WRITER.format(db=str(db_path), how=how, large=LARGE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        "ANONYMIZED_TELEMETRY": "False",
    }
    writer = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        with selectors.DefaultSelector() as waiting:
            waiting.register(writer.stdout, selectors.EVENT_READ)
            ready = waiting.select(180)
        line = writer.stdout.readline().strip() if ready else ""
        if not line.startswith("committed "):
            writer.kill()
            raise AssertionError(f"the writer never committed a batch: {writer.communicate(30)}")
        if then is not None:
            then()
    finally:
        writer.kill()  # SIGKILL
        writer.wait(30)
        writer.stdout.close()
        writer.stderr.close()
    assert writer.returncode == -9
    return _Killed(line)


@pytest.mark.parametrize("how", ["import", "add_many"])
def test_a_large_write_killed_after_its_first_batch_is_undone_when_the_folder_opens(
    db_path, how: str
) -> None:
    killed = _writer_killed_after_its_first_batch(db_path, how)
    assert killed.batch == 5461  # Chroma committed a whole batch of the write
    if how == "import":
        assert killed.text == "Plays the viola"  # the rewrite was in it
    recorded = (db_path / ROLLBACK_FILE).exists()  # the undo the writer recorded first
    # a fresh process (this one) opens the folder: the write is undone before anything reads
    store = MemoryStore(
        "alice", db_path=db_path, embedder=RandomEmbedder(), duplicate_threshold=None
    )
    # before: 5,461 (import: 5,460 and the rewrite) of the 6,000 stored, "Plays the viola"
    assert [(m.id, m.text) for m in store.get_all()] == [(killed.memory_id, "Plays the cello")]
    assert store.count() == 1
    found = store.search("Imported fact number 3", min_score=-1)
    assert [r.memory.text for r in found] == ["Plays the cello"]
    assert recorded and not (db_path / ROLLBACK_FILE).exists()
    # and it is writable as ever: the large write made again is stored whole
    store.add_many([f"Added again, fact {n}" for n in range(LARGE)])
    assert store.count() == LARGE + 1 and not (db_path / ROLLBACK_FILE).exists()


def test_a_reader_that_takes_over_from_a_killed_writer_undoes_its_half_done_write(
    db_path,
) -> None:
    """A process that opened the folder while the writer wrote is a reader; it sees part of
    the write until it writes itself: taking the lock, it undoes the write first."""
    readers: list[MemoryStore] = []

    def open_as_reader() -> None:
        reader = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
        assert reader.count() == 5461  # the first batch (with the rewrite), as Chroma holds it
        assert not reader.storage._folder_lock.held
        readers.append(reader)

    killed = _writer_killed_after_its_first_batch(db_path, "import", then=open_as_reader)
    reader = readers[0]
    reader.add("Written by the process that took over")
    assert sorted(m.text for m in reader.get_all()) == [
        "Plays the cello",  # before: "Plays the viola", and 5,459 imported memories
        "Written by the process that took over",
    ]
    assert reader.get(killed.memory_id).text == "Plays the cello"
    assert not (db_path / ROLLBACK_FILE).exists()


_SECRET = "Keeps the spare key under the blue flowerpot"


def _import_lines(memory_id: str, text: str, first: int = 0) -> list[str]:
    """35 lines: one that rewrites ``memory_id`` to ``text``, 34 new memories."""
    rewrite = json.dumps({"id": memory_id, "text": text, "category": "fact"})
    lines = [
        json.dumps({"id": f"m{n:05d}", "text": f"Imported fact number {n}", "category": "fact"})
        for n in range(first, first + 34)
    ]
    return [rewrite, *lines]


def _small_batches(store: MemoryStore, monkeypatch) -> Any:
    """Make Chroma's largest batch 10 for ``store``'s storage; return its chromadb collection."""
    collection = store._open()
    monkeypatch.setattr(collection._storage, "_max_batch", 10)
    return collection._collection


def _record_files(db_path: Path) -> list[str]:
    return sorted(p.name for p in db_path.iterdir() if p.name.startswith(ROLLBACK_FILE))


def test_the_undo_record_holds_text_only_while_its_write_runs(db_path, monkeypatch) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    secret = store.add(_SECRET)
    chroma_collection = _small_batches(store, monkeypatch)
    upsert, seen, failing = chroma_collection.upsert, [], []

    def upsert_noting_the_record(**request: Any) -> Any:
        record = db_path / ROLLBACK_FILE
        seen.append(record.read_bytes() if record.exists() else b"")
        if len(seen) == 3 and failing:
            raise RuntimeError("the disk went away")
        return upsert(**request)

    monkeypatch.setattr(chroma_collection, "upsert", upsert_noting_the_record)
    store.import_(_import_lines(secret.id, "Keeps the spare key in the drawer"), consolidate=False)
    assert len(seen) == 4  # 35 records in batches of 10
    assert all(_SECRET.encode() in data for data in seen)  # the rewritten memory's text
    assert _record_files(db_path) == []  # removed with the text once the last batch is in
    assert store.get(secret.id).text == "Keeps the spare key in the drawer"

    seen.clear()
    failing.append(True)  # a write that fails at its third batch is undone
    with pytest.raises(StorageError):
        lines = _import_lines(secret.id, "Keeps the spare key in the car", first=100)
        store.import_(lines, consolidate=False)
    assert len(seen) == 4  # three batches (the third failed), then the undo's restore
    assert all(b"in the drawer" in data for data in seen)
    assert _record_files(db_path) == []  # removed once the write is undone
    assert store.get(secret.id).text == "Keeps the spare key in the drawer"
    assert store.count() == 35

    kept: list[Any] = []
    monkeypatch.setattr(chroma, "keep", lambda *a: kept.append(a))
    store.add_many([f"One of a few, number {n}" for n in range(10)])  # one batch: no record
    # once the read-ahead has the user, so small a write is stored in Chroma just after
    # add_many returns (storage/deferred.py): wait for it, so that its upsert is the one seen
    assert store.flush()
    assert len(seen) == 5 and seen[-1] == b""
    assert kept == [] and _record_files(db_path) == []


@pytest.mark.parametrize("then", ["write", "forget_user"])
def test_a_write_whose_undo_failed_is_undone_before_the_next_write(
    db_path, monkeypatch, then: str
) -> None:
    """The failed undo leaves the record (with the rewritten memory's old text): the next
    write undoes the write first, and forget_user leaves the text in no file."""
    store = MemoryStore("alice", db_path=db_path, embedder=RandomEmbedder())
    secret = store.add(_SECRET)
    chroma_collection = _small_batches(store, monkeypatch)
    upsert, delete, calls = chroma_collection.upsert, chroma_collection.delete, []

    def third_batch_fails(**request: Any) -> Any:
        calls.append(len(request["ids"]))
        if len(calls) == 3:
            raise RuntimeError("the disk went away")
        return upsert(**request)

    def undo_fails(**request: Any) -> Any:
        raise RuntimeError("the disk is still away")

    monkeypatch.setattr(chroma_collection, "upsert", third_batch_fails)
    monkeypatch.setattr(chroma_collection, "delete", undo_fails)
    with pytest.raises(StorageError, match="undoing the write failed too"):
        lines = _import_lines(secret.id, "Keeps the spare key in the drawer")
        store.import_(lines, consolidate=False)
    record = db_path / ROLLBACK_FILE
    left = record.read_bytes() if record.exists() else b""
    monkeypatch.setattr(chroma_collection, "upsert", upsert)
    monkeypatch.setattr(chroma_collection, "delete", delete)
    if then == "write":
        store.add("Plays the cello")
        assert sorted(m.text for m in store.get_all()) == [_SECRET, "Plays the cello"]
        assert _record_files(db_path) == []
    else:
        assert store.forget_user() == 1  # (the half-done write undone first)
        assert _record_files(db_path) == []
        assert files_containing(db_path, [_SECRET, "Keeps the spare key in the drawer"]) == {}
    assert _SECRET.encode() in left  # the record the failed undo left held the old text
