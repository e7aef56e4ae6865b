"""How memories are kept in Chroma (format 2): one JSON metadata value per memory and no Chroma
document, so that Chroma's full-text index stays empty; records of format 1 (the text as the
document, each field its own metadata value) are still read, and rewritten in format 2."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from _reliability_support import files_containing
from conftest import HashEmbedder

from headroom_memory_integrations import MemoryStore, StorageError


def _raw(store: MemoryStore, ids: list[str]) -> dict[str, tuple[str | None, dict]]:
    """What Chroma holds for ``ids``: (document, metadata)."""
    assert store.flush()  # writes stored behind the caller are in Chroma
    page = store._open()._collection.get(ids=ids, include=["documents", "metadatas"])
    return {
        i: (document, dict(meta))
        for i, document, meta in zip(page["ids"], page["documents"], page["metadatas"])
    }


def _add_format_1(store: MemoryStore, memory_id: str, text: str, **fields) -> dict:
    """Write a record the way versions before format 2 did, straight into Chroma."""
    meta = {
        "category": fields.get("category", "fact"),
        "source": "manual",
        "created_at": 1_700_000_000.5,
        "updated_at": 1_700_000_100.25,
        "metadata": json.dumps(fields.get("metadata", {})),
        "history": json.dumps(fields.get("history", [])),
    }
    if "keys" in fields:
        meta["keys"] = json.dumps(fields["keys"])
    vector = store.embedder.embed([text])[0]
    store._open()._collection.add(
        ids=[memory_id], embeddings=[vector], documents=[text], metadatas=[meta]
    )
    return meta


def _fulltext_rows(db_path: Path) -> int:
    with sqlite3.connect(db_path / "chroma.sqlite3") as db:
        return int(
            db.execute("SELECT count(*) FROM embedding_fulltext_search_content").fetchone()[0]
        )


def test_a_memory_is_one_json_value_and_chroma_indexes_no_text(db_path) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    memory = store.add(
        "Is allergic to sesame",
        category="fact",
        metadata={"source_app": "chat"},
        keys=["health, allergy"],
    )
    updated = store.update(memory.id, "Is allergic to sesame and peanuts", keys=["health, allergy"])
    [(document, meta)] = _raw(store, [memory.id]).values()
    assert document is None and set(meta) == {"record"}
    fields = json.loads(meta["record"])
    assert fields["text"] == "Is allergic to sesame and peanuts"
    assert fields["metadata"] == {"source_app": "chat"} and fields["keys"] == ["health, allergy"]
    assert [r["text"] for r in fields["history"]] == ["Is allergic to sesame"]
    assert _fulltext_rows(db_path) == 0  # Chroma's trigram index of documents: nothing in it
    reopened = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    again = reopened.get(memory.id)
    assert again == updated
    assert [m.text for m, _ in reopened.search("sesame and peanuts", min_score=-1)] == [again.text]


def test_records_of_format_1_are_read_and_rewritten_in_format_2(db_path) -> None:
    writer = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    writer.add("Lives in Lisbon")  # creates the collection
    history = [{"text": "Plays the piano", "category": "fact", "replaced_at": 1_699_000_000.0}]
    _add_format_1(
        writer,
        "a" * 32,
        "Plays the cello",
        category="preference",
        metadata={"origin": "import"},
        keys=["music, instrument"],
        history=history,
    )
    writer.storage.close()

    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    old = store.get("a" * 32)
    assert (old.text, old.category.value, dict(old.metadata), old.keys) == (
        "Plays the cello",
        "preference",
        {"origin": "import"},
        ("music, instrument",),
    )
    assert old.created_at.timestamp() == 1_700_000_000.5
    assert [r.text for r in old.history] == ["Plays the piano"]
    assert "Plays the cello" in [m.text for m, _ in store.search("Plays the cello", min_score=-1)]

    store.update(old.id, "Plays the viola", keys=["music, instrument"])
    [(document, meta)] = _raw(store, [old.id]).values()
    assert document == "" and set(meta) == {"record"}  # no field of format 1 is left behind
    new = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder()).get(old.id)
    assert new.text == "Plays the viola" and new.keys == ("music, instrument",)
    assert [r.text for r in new.history] == ["Plays the piano", "Plays the cello"]


def test_an_undone_rewrite_of_a_format_1_record_restores_it_as_it_was(db_path, monkeypatch) -> None:
    writer = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    writer.add("Has two cats")
    kept = "c" * 32
    meta = _add_format_1(writer, kept, "Lives in Lisbon")
    before = _raw(writer, [kept])
    writer.storage.close()
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    assert store.count() == 2
    collection = store._open()
    monkeypatch.setattr(collection._storage, "_max_batch", 1)
    upsert = collection._collection.upsert
    calls: list[list[str]] = []

    def second_batch_fails(**request):
        calls.append(request["ids"])
        if len(calls) == 2:
            raise RuntimeError("the disk went away")
        return upsert(**request)

    monkeypatch.setattr(collection._collection, "upsert", second_batch_fails)
    lines = [
        json.dumps({"id": kept, "text": "Lives in Porto", "category": "fact"}),  # an update
        json.dumps({"id": "d" * 32, "text": "Speaks Finnish", "category": "fact"}),
    ]
    with pytest.raises(StorageError, match="the disk went away"):
        store.import_(lines)
    assert calls[0] == [kept] and len(calls) >= 2  # rewritten in format 2, then undone
    assert _raw(store, [kept]) == before and before[kept] == ("Lives in Lisbon", meta)
    fresh = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    assert sorted(m.text for m in fresh.get_all()) == ["Has two cats", "Lives in Lisbon"]


def test_deleting_a_format_1_record_erases_its_text_from_every_file(db_path) -> None:
    """Its text was Chroma's document, so Chroma's full-text index held its trigrams too."""
    secret = "Keeps the spare key under the red flowerpot"
    writer = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    writer.add_many([f"Ordinary fact number {n}" for n in range(20)])
    _add_format_1(writer, "e" * 32, secret)
    writer.storage.close()
    assert _fulltext_rows(db_path) == 1
    store = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())
    assert store.get("e" * 32).text == secret
    assert files_containing(db_path, [secret])  # kept while remembered
    store.delete("e" * 32)
    assert files_containing(db_path, [secret]) == {}
    store.storage.close()
    assert files_containing(db_path, [secret]) == {}
