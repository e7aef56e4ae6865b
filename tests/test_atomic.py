"""Consolidation is atomic for every writer of a user: stores in threads, processes on a
server, and imports (issue 11, item 5; docs/reliability.md section 5)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from _atomic_support import DISTINCT, REWORDED, processes_adding

from headroom_memory_integrations import ChromaStorage, MemoryStore, Outcome
from headroom_memory_integrations.cli import main


def _in_threads(*jobs: Callable[[], Any]) -> list[Any]:
    """Run ``jobs`` at once (released together), re-raising the first error."""
    start = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            start.wait()
            results[index] = jobs[index]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


def _adding(store: MemoryStore, texts: Sequence[str]) -> Callable[[], list[Outcome]]:
    return lambda: [store.remember(text).outcome for text in texts]


# -- one process, several store objects --------------------------------------------------------


def test_two_stores_adding_the_same_texts_at_once_store_each_once(db_path, model) -> None:
    first = MemoryStore("alice", db_path=db_path, embedder=model)
    second = MemoryStore("alice", db_path=db_path, embedder=model)
    texts = DISTINCT[:40]
    outcomes = _in_threads(_adding(first, texts), _adding(second, texts))
    assert sorted(m.text for m in first.get_all()) == sorted(texts)  # before: 77 memories
    for pair in zip(*outcomes):  # each text was stored once, and found by the other
        assert sorted(pair) == [Outcome.DUPLICATE, Outcome.STORED]


def test_rewordings_from_two_stores_at_once_are_consolidated(db_path, model) -> None:
    first = MemoryStore("alice", db_path=db_path, embedder=model)
    second = MemoryStore("alice", db_path=db_path, embedder=model)
    originals, rewordings = zip(*REWORDED)
    _in_threads(_adding(first, originals), _adding(second, rewordings))
    kept = [m.text for m in first.get_all()]
    assert len(kept) == len(REWORDED)
    assert all((a in kept) != (b in kept) for a, b in REWORDED)  # one of each pair


def test_stores_on_separate_clients_of_one_server_share_the_lock(server_storages, model) -> None:
    """Two storage objects for one server URL in a process (``db_path=url`` twice) are
    two clients with their own caches; they still take the same user's lock."""
    first = MemoryStore("atomic-lock", storage=server_storages(), embedder=model)
    second = MemoryStore("atomic-lock", storage=server_storages(), embedder=model)
    assert first.storage is not second.storage
    assert first._write_lock is second._write_lock
    originals, rewordings = zip(*REWORDED)
    _in_threads(_adding(first, originals), _adding(second, rewordings))
    assert len(first.get_all()) == len(REWORDED)


# -- processes on a Chroma server --------------------------------------------------------------


@pytest.mark.server
def test_four_processes_adding_the_same_texts_store_each_once(chroma_server, model) -> None:
    results = processes_adding(chroma_server.url, "atomic-procs", [DISTINCT] * 4)
    assert all(isinstance(outcomes, list) for outcomes in results), results
    kept = [m.text for m in MemoryStore("atomic-procs", db_path=chroma_server.url).get_all()]
    assert sorted(kept) == sorted(DISTINCT)  # before: 295 memories
    assert all(len(outcomes) == len(DISTINCT) for outcomes in results)


def _client(chroma_server, name: str) -> ChromaStorage:
    """A storage that acts as another process: its own client, cache and lock."""
    import chromadb

    client = chromadb.HttpClient(host="127.0.0.1", port=chroma_server.port)
    return ChromaStorage(client, location=f"{chroma_server.url} as {name}")


@pytest.mark.server
def test_a_rewording_written_meanwhile_by_another_process_is_reconciled(
    chroma_server, model, monkeypatch
) -> None:
    """``first`` decides its memory is new; before it writes, another process stores a
    rewording. After writing, ``first`` sees it and yields to it: one memory is left."""
    first = MemoryStore("atomic-meanwhile", storage=_client(chroma_server, "p1"), embedder=model)
    other = MemoryStore("atomic-meanwhile", storage=_client(chroma_server, "p2"), embedder=model)
    decide = first._consolidate

    def decide_then_race(*args: Any, **kwargs: Any) -> Any:
        decisions = decide(*args, **kwargs)
        other.add("Deploys with Kubernetes and Docker")
        return decisions

    monkeypatch.setattr(first, "_consolidate", decide_then_race)
    done = first.remember("Deploys with Docker and Kubernetes")
    assert done.outcome is Outcome.DUPLICATE  # before: stored beside it
    assert done.memory.text == "Deploys with Kubernetes and Docker"
    assert [m.text for m in other.get_all()] == ["Deploys with Kubernetes and Docker"]


@pytest.mark.server
def test_two_processes_that_both_wrote_a_rewording_keep_exactly_one(
    chroma_server, model, monkeypatch
) -> None:
    """Both decide before either writes, both write, then both check: exactly one of the two
    memories yields to the other (never both), whatever the order of the checks."""
    stores = [
        MemoryStore("atomic-both", storage=_client(chroma_server, f"p{n}"), embedder=model)
        for n in (1, 2)
    ]
    decided, written = threading.Barrier(2), threading.Barrier(2)
    for store in stores:
        decide, check = store._consolidate, store._reconcile

        def decide_together(*args: Any, _decide=decide, **kwargs: Any) -> Any:
            decisions = _decide(*args, **kwargs)
            decided.wait(30)
            return decisions

        def check_together(*args: Any, _check=check, **kwargs: Any) -> Any:
            written.wait(30)
            return _check(*args, **kwargs)

        monkeypatch.setattr(store, "_consolidate", decide_together)
        monkeypatch.setattr(store, "_reconcile", check_together)
    pair = REWORDED[10]
    results = _in_threads(*(lambda s=s, t=t: s.remember(t) for s, t in zip(stores, pair)))
    kept = stores[0].get_all()
    assert len(kept) == 1 and kept[0].text in pair  # before: both kept
    assert sorted(r.outcome for r in results) == [Outcome.DUPLICATE, Outcome.STORED]
    assert {r.memory.id for r in results} == {kept[0].id}


@pytest.mark.server
def test_a_duplicate_whose_original_vanished_is_still_reconciled(
    chroma_server, model, monkeypatch
) -> None:
    """``first`` finds its text stored twice (worded two ways) and decides it is a duplicate;
    before it writes, another process deletes the copy it matched, so ``first`` stores it.
    The other wording, seen when deciding but never judged, is then settled too."""
    first = MemoryStore("atomic-vanished", storage=_client(chroma_server, "p1"), embedder=model)
    other = MemoryStore("atomic-vanished", storage=_client(chroma_server, "p2"), embedder=model)
    original, rewording = REWORDED[16]
    matched = other.add(original)
    other.put("reworded", rewording)  # put does not consolidate: both wordings are stored
    decide = first._consolidate

    def decide_then_delete(*args: Any, **kwargs: Any) -> Any:
        decisions = decide(*args, **kwargs)
        other.delete(matched.id)
        return decisions

    monkeypatch.setattr(first, "_consolidate", decide_then_delete)
    first.remember(original)
    kept = [m.text for m in other.get_all()]
    assert len(kept) == 1 and kept[0] in (original, rewording)  # before the fix: both


@pytest.mark.server
def test_an_update_overwritten_by_another_process_is_kept_in_history(
    chroma_server, model, monkeypatch
) -> None:
    """Two processes supersede one memory at once: both read it, ``first`` writes, then
    ``other`` overwrites it. ``first`` sees that its text is gone and adds it to the history."""
    first = MemoryStore("atomic-updates", storage=_client(chroma_server, "p1"), embedder=model)
    other = MemoryStore("atomic-updates", storage=_client(chroma_server, "p2"), embedder=model)
    daughter = first.add("User's daughter is 7 years old")
    other_read, first_wrote, other_wrote = threading.Event(), threading.Event(), threading.Event()
    decided = threading.Barrier(2)
    turns = ((first, other_read, first_wrote), (other, first_wrote, other_wrote))
    for store, before, after in turns:  # other reads, first writes, then other writes
        collection, decide = store._open(), store._consolidate

        def decide_together(*args: Any, _decide=decide, **kwargs: Any) -> Any:
            decisions = _decide(*args, **kwargs)
            decided.wait(30)
            return decisions

        def write_in_turn(
            *args: Any, _write=collection.rewrite, _before=before, _after=after, **kwargs: Any
        ):
            _before.wait(30)
            done = _write(*args, **kwargs)
            _after.set()
            return done

        monkeypatch.setattr(store, "_consolidate", decide_together)
        monkeypatch.setattr(collection, "rewrite", write_in_turn)
    read = other._open().get
    monkeypatch.setattr(other._open(), "get", lambda *a: (read(*a), other_read.set())[0])
    check = first._reconcile
    monkeypatch.setattr(
        first, "_reconcile", lambda *a, **k: (other_wrote.wait(30), check(*a, **k))[1]
    )
    results = _in_threads(
        lambda: first.remember("User's daughter is 8 years old"),
        lambda: other.remember("User's daughter is 9 years old"),
    )
    assert [r.outcome for r in results] == [Outcome.SUPERSEDED, Outcome.SUPERSEDED]
    now = other.get(daughter.id)
    assert now.text == "User's daughter is 9 years old"  # the last write holds
    assert [r.text for r in now.history] == [  # before: the 8 was lost
        "User's daughter is 7 years old",
        "User's daughter is 8 years old",
    ]
    assert len(other.get_all()) == 1


@pytest.mark.server
def test_a_memory_rewritten_meanwhile_is_never_overwritten(chroma_server, model) -> None:
    """A text's first writer stores it under an id derived from its wording, so that
    processes adding it at once write one record. If that record was superseded since (it
    holds another text now), adding the text again stores it beside, under a fresh id."""
    first = MemoryStore("atomic-rewritten", storage=_client(chroma_server, "p1"), embedder=model)
    other = MemoryStore("atomic-rewritten", storage=_client(chroma_server, "p2"), embedder=model)
    original = first.add("Prefers aisle seats")
    other.update(original.id, "Speaks fluent Dutch")  # unrelated: not compared when adding
    again = first.remember("Prefers aisle seats")
    assert again.outcome is Outcome.STORED and again.memory.id != original.id
    texts = {m.id: m.text for m in first.get_all()}
    assert texts == {original.id: "Speaks fluent Dutch", again.memory.id: "Prefers aisle seats"}


# -- imports ------------------------------------------------------------------------------------


def _export_line(memory_id: str, text: str, when: int, **more: Any) -> str:
    return json.dumps(
        {"id": memory_id, "text": text, "created_at": when, "updated_at": when, **more}
    )


def test_an_import_is_consolidated_with_the_stored_memories(db_path, model, tmp_path) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=model)
    cello = store.add("Plays the cello")
    daughter = store.add("User's daughter is 7 years old")
    dentist = store.add("Dentist appointment on Thursday at 3pm")
    now = int(time.time())
    lines = [
        _export_line("e1", "plays the cello.", now - 100),  # same wording: a duplicate
        _export_line("e2", "User's daughter is seven years old", now - 100),  # a rewording
        _export_line("e3", "User's daughter is 9 years old", now + 100),  # newer: supersedes
        _export_line("e4", "Dentist appointment on Tuesday at 3pm", now - 10_000),  # outdated
        _export_line("e5", "Is learning Portuguese", now - 100, category="context"),  # new
        _export_line("e6", "Is learning Portuguese!", now - 50),  # a duplicate within the file
    ]
    path = tmp_path / "import.jsonl"
    path.write_text("\n".join(lines) + "\n")

    outcomes = store.import_with_outcomes(path)
    assert [o.outcome for o in outcomes] == [
        Outcome.DUPLICATE,
        Outcome.DUPLICATE,
        Outcome.SUPERSEDED,
        Outcome.DUPLICATE,
        Outcome.STORED,
        Outcome.DUPLICATE,
    ]
    memories = {m.id: m for m in store.get_all()}
    assert set(memories) == {cello.id, daughter.id, dentist.id, "e5"}  # before: 9 memories
    assert memories[daughter.id].text == "User's daughter is 9 years old"
    assert memories[daughter.id].history[-1].text == "User's daughter is 7 years old"
    assert memories[dentist.id].text == "Dentist appointment on Thursday at 3pm"  # kept newer
    assert memories["e5"].category.value == "context"  # stored as exported: id, category

    assert store.import_(path) == 6  # every memory of the file is taken in, again
    assert len(store.get_all()) == 4  # and nothing changes


def test_the_cli_reports_what_an_import_did(db_path, model, tmp_path, capsys) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=model)
    store.add("Plays the cello")
    path = tmp_path / "import.jsonl"
    lines = [_export_line("e1", "Plays the cello", 1), _export_line("e2", "Speaks Dutch", 2)]
    path.write_text("\n".join(lines) + "\n")
    assert main(["import", str(path), "--user", "alice", "--db", str(db_path)]) == 0
    assert capsys.readouterr().out.strip() == ("imported 2 memories: 1 stored, 1 already known")
    assert main(["import", str(path), "--user", "alice", "--db", str(db_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "imported": 2,
        "stored": 0,
        "superseded": 0,
        "duplicate": 2,
    }


def test_an_imported_id_that_a_memory_holds_is_another_version_of_it(db_path, model) -> None:
    """An id this library makes is that of the user and the text a memory was first stored
    with: a line with the id of a stored memory and that first text in its history, worded
    otherwise now, is that memory updated elsewhere (or before). It was stored beside it under
    a fresh id, so a superseded text became current again."""
    store = MemoryStore("alice", db_path=db_path, embedder=model)
    kept = store.add("Plays the cello")
    now = int(time.time())

    def line(when: int) -> str:
        first = {"text": "Plays the cello", "category": "fact", "replaced_at": when}
        return _export_line(kept.id, "Speaks fluent Dutch", when, history=[first])

    [done] = store.import_with_outcomes([line(now - 100)])  # outdated: the store knows better
    assert done.outcome is Outcome.DUPLICATE and done.memory == kept
    [done] = store.import_with_outcomes([line(now + 100)])  # now, then: newer
    assert done.outcome is Outcome.SUPERSEDED and done.memory.id == kept.id
    assert [(m.text, [r.text for r in m.history]) for m in store.get_all()] == [
        ("Speaks fluent Dutch", ["Plays the cello"])
    ]


def test_an_imported_id_that_names_no_memory_here_stores_the_line_beside(db_path, model) -> None:
    """Ids this library did not make (a hand-written file's "m1", another system's) name no
    memory: two files that both number their lines from m1 hold unrelated facts under the
    same ids. Each was taken as another version of the memory holding its id: one fact was
    dropped as outdated, another overwrote an unrelated memory. So is a line whose id is a
    stored memory's wording id but not that of its own first text."""
    store = MemoryStore("alice", db_path=db_path, embedder=model)
    first = [
        {"id": "m1", "text": "Likes green tea", "updated_at": "2026-03-01T00:00:00Z"},
        {"id": "m2", "text": "Has a dog named Rex", "updated_at": "2026-01-01T00:00:00Z"},
    ]
    second = [
        {"id": "m1", "text": "Works at Acme as a nurse", "updated_at": "2026-02-01T00:00:00Z"},
        {"id": "m2", "text": "Was born in Lisbon", "updated_at": "2026-02-01T00:00:00Z"},
    ]
    store.import_([json.dumps(line) for line in first])
    done = store.import_with_outcomes([json.dumps(line) for line in second])
    assert [d.outcome for d in done] == [Outcome.STORED, Outcome.STORED]
    assert {d.memory.id for d in done}.isdisjoint({"m1", "m2"})
    kept = store.add("Plays the cello")
    [done] = store.import_with_outcomes([_export_line(kept.id, "Speaks fluent Dutch", 1)])
    assert done.outcome is Outcome.STORED and done.memory.id != kept.id
    assert sorted(m.text for m in store.get_all()) == [
        "Has a dog named Rex",
        "Likes green tea",
        "Plays the cello",
        "Speaks fluent Dutch",
        "Was born in Lisbon",
        "Works at Acme as a nurse",
    ]
    # a line that shares a text with the memory holding its id is another version of it
    store.update("m1", "Likes black tea")
    [done] = store.import_with_outcomes([json.dumps(first[0])])  # an old backup: outdated
    assert (done.outcome, done.memory.text) == (Outcome.DUPLICATE, "Likes black tea")


def test_imports_from_two_stores_at_once_store_each_memory_once(db_path, model) -> None:
    first = MemoryStore("alice", db_path=db_path, embedder=model)
    second = MemoryStore("alice", db_path=db_path, embedder=model)
    texts = DISTINCT[:30]
    file_one = [_export_line(f"a{n}", text, n) for n, text in enumerate(texts)]
    file_two = [_export_line(f"b{n}", text, n) for n, text in enumerate(texts)]
    _in_threads(lambda: first.import_(file_one), lambda: second.import_(file_two))
    assert sorted(m.text for m in first.get_all()) == sorted(texts)


def test_the_lock_is_one_per_user_and_location(tmp_path: Path, model) -> None:
    a1 = MemoryStore("alice", db_path=tmp_path / "m", embedder=model)
    a2 = MemoryStore("alice", db_path=tmp_path / "m", embedder=model)
    bob = MemoryStore("bob", db_path=tmp_path / "m", embedder=model)
    elsewhere = MemoryStore("alice", db_path=tmp_path / "other", embedder=model)
    assert a1._write_lock is a2._write_lock
    assert a1._write_lock is not bob._write_lock
    assert a1._write_lock is not elsewhere._write_lock
