"""Memories outlive the process that wrote them, and a store keeps its embedder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from headroom_memory_integrations import EmbeddingMismatchError, MemoryStore


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_memories_persist_across_processes(db_path) -> None:
    _run(
        f"""
        from headroom_memory_integrations import MemoryStore
        store = MemoryStore("alice", db_path={str(db_path)!r})
        store.add("Prefers Python for backend work", category="preference")
        store.add("Is allergic to peanuts", category="fact")
        """
    )
    out = _run(
        f"""
        import json
        from headroom_memory_integrations import MemoryStore
        store = MemoryStore("alice", db_path={str(db_path)!r})
        hits = store.search("What language should I use for my API?")
        print(json.dumps([m.text for m, _ in hits]))
        print(json.dumps(store.stats()["by_category"]))
        """
    )
    hits, categories = (json.loads(line) for line in out.splitlines())
    assert hits[0] == "Prefers Python for backend work"
    assert categories == {"preference": 1, "fact": 1, "context": 0}


def test_changing_the_embedder_is_a_clear_error(db_path, model) -> None:
    from conftest import HashEmbedder

    MemoryStore("alice", db_path=db_path, embedder=model).add("Knows French")
    other = MemoryStore("alice", db_path=db_path, embedder=HashEmbedder(dimension=64))
    with pytest.raises(EmbeddingMismatchError, match=r"all-MiniLM-L6-v2.*384.*test-hash.*64"):
        other.search("French")
    with pytest.raises(EmbeddingMismatchError):
        other.add("Knows German")
    # a new user in the same folder may use another embedder
    MemoryStore("bob", db_path=db_path, embedder=HashEmbedder()).add("Knows German")
    # and clearing releases the user's old binding
    assert other.clear() == 1
    other.add("Knows German")
    assert other.count() == 1


def test_closing_an_embedded_storage_lets_the_folder_be_opened_afresh(db_path, model) -> None:
    from headroom_memory_integrations import ChromaStorage

    storage = ChromaStorage.at(db_path)
    MemoryStore("alice", storage=storage, embedder=model).add("Plays the cello")
    storage.close()
    reopened = ChromaStorage.at(db_path)
    assert reopened is not storage
    store = MemoryStore("alice", storage=reopened, embedder=model)
    assert [m.text for m in store.get_all()] == ["Plays the cello"]


def test_a_store_of_a_closed_storage_says_it_is_closed(db_path, model) -> None:
    """A store still held after its storage was closed raises that the storage is closed, for
    reads and writes alike (before: chromadb's "'RustBindingsAPI' object has no attribute
    'bindings'", from the collection the store had kept), and a new store opens it afresh."""
    from headroom_memory_integrations import ChromaStorage, StorageError

    store = MemoryStore("alice", db_path=db_path, embedder=model)
    store.add("Plays the cello")
    store.flush(10)
    ChromaStorage.at(db_path).close()
    for name, use in (
        ("search", lambda: store.search("cello", min_score=-1)),
        ("add", lambda: store.add("Has a dog named Rex")),
        ("get_all", store.get_all),
    ):
        with pytest.raises(StorageError, match=r"storage at .* is closed") as raised:
            use()
        assert "bindings" not in str(raised.value), name
    again = MemoryStore("alice", db_path=db_path, embedder=model)
    assert [m.text for m in again.get_all()] == ["Plays the cello"]


def test_the_vector_index_is_saved_every_100_writes_in_new_and_older_collections(
    db_path,
) -> None:
    """Chroma keeps writes in its log until it saves the vector index, and each write costs
    more the longer that log is: collections are made with a save every 100 writes (Chroma's
    default is 1,000), and those of older versions are set to it when a process opens them."""
    threshold = f"""
        import chromadb
        from chromadb.config import Settings
        client = chromadb.PersistentClient({str(db_path)!r}, Settings(anonymized_telemetry=False))
        [chroma] = client.list_collections()
        print(chroma.configuration_json["hnsw"]["sync_threshold"])
        """
    out = _run(
        f"""
        from headroom_memory_integrations import MemoryStore
        store = MemoryStore("alice", db_path={str(db_path)!r})
        store.add("Likes green tea")
        """
        + threshold
        + """
        chroma.modify(configuration={"hnsw": {"sync_threshold": 1000}})  # as older versions
        """
        + threshold
    )
    assert out.split() == ["100", "1000"]
    out = _run(
        f"""
        import json
        from headroom_memory_integrations import MemoryStore
        store = MemoryStore("alice", db_path={str(db_path)!r})
        print(json.dumps([m.text for m, _ in store.search("green tea", min_score=-1)]))
        store.add("Walks to work")
        print(store.count())
        """
        + threshold
    )
    assert out.splitlines() == ['["Likes green tea"]', "2", "100"]


def test_where_memories_are_kept_when_db_path_is_empty(tmp_path, monkeypatch) -> None:
    """An empty ``$HEADROOM_MEMORY_DB`` is an unset one (the default folder), not the current
    folder; an empty ``db_path`` is an error; credentials in a server URL, which are never
    sent, are refused rather than dropped."""
    from headroom_memory_integrations import InvalidInputError
    from headroom_memory_integrations.engine import resolve_storage
    from headroom_memory_integrations.storage import ChromaStorage

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HEADROOM_MEMORY_DB", " ")
    storage = resolve_storage(None)
    try:
        assert storage.location == str(tmp_path / "home" / ".headroom-memory")
    finally:
        storage.close()
    for empty in ("", " "):
        with pytest.raises(InvalidInputError, match="db_path"):
            MemoryStore("alice", db_path=empty)
    with pytest.raises(InvalidInputError, match="credentials"):
        ChromaStorage.from_url("http://admin:secret@127.0.0.1:8000")
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == []  # nothing made here


def test_a_folder_the_library_creates_is_its_owners_alone(tmp_path, monkeypatch) -> None:
    """Memories and queued turns are personal: the folders made for them (the memories', and
    the home folder's for a server's job queue) are 0700; a folder that exists keeps its mode."""
    import stat

    from conftest import HashEmbedder

    from headroom_memory_integrations.storage import ChromaStorage
    from headroom_memory_integrations.writer import queue_path_for, writer_for

    def mode(path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    made = tmp_path / "new" / "memories"
    store = MemoryStore("alice", db_path=made, embedder=HashEmbedder())
    store.add("Takes medication for migraines")
    assert mode(made) == 0o700 and (made / "chroma.sqlite3").exists()
    store.close()

    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    store = MemoryStore("alice", db_path=existing, embedder=HashEmbedder())
    store.add("Takes medication for migraines")
    assert mode(existing) == 0o755
    store.close()

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    server = MemoryStore(
        "bob", storage=ChromaStorage.connect("127.0.0.1", 9), embedder=HashEmbedder()
    )
    queue = queue_path_for(server)
    writer_for(queue).worker.close(0)
    assert queue.parent == tmp_path / "home" / ".headroom-memory" and mode(queue.parent) == 0o700


def test_a_folder_removed_and_used_again_in_the_process_starts_afresh(
    openai_server, db_path, model
) -> None:
    """A notebook's "start afresh" cell (remove the folder, wrap the client again): the
    process kept the removed folder's open files, so the removed memories were still recalled,
    new ones were written only to the removed files (lost at exit), and flush() never ended."""
    from conftest import RememberingModel

    from headroom_memory_integrations.openai import with_fast_memory

    def chat(said: str, memories: list[dict]) -> Any:
        openai_server.responder = RememberingModel("ok", memories)
        client = with_fast_memory(
            openai_server.client(), user_id="alice", db_path=db_path, embedder=model
        )
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": said}])
        assert client.memory.flush(30)
        return client

    chat("I have a cat named Miso", [{"text": "Has a cat named Miso", "category": "fact"}])
    shutil.rmtree(db_path)
    client = chat("I drive a red Volvo", [{"text": "Drives a red Volvo", "category": "fact"}])
    assert [m.text for m in client.memory.get_all()] == ["Drives a red Volvo"]
    assert (db_path / "chroma.sqlite3").is_file() and (db_path / "jobs.sqlite3").is_file()
    seen = subprocess.run(
        [sys.executable, "-c", _READ_ALICE, str(db_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert seen.stdout.strip() == "['Drives a red Volvo']"


_READ_ALICE = (
    "import sys\n"
    "from headroom_memory_integrations import MemoryStore\n"
    "print([m.text for m in MemoryStore('alice', db_path=sys.argv[1]).get_all()])\n"
)


@pytest.mark.parametrize("name", ["mem#1", "100% mine?", "caf\u00e9 folder"])
def test_a_folder_named_with_uri_characters_has_its_index_cleared(tmp_path, name) -> None:
    """The index folder of a collection is found in Chroma's catalog through an SQLite URI,
    which was written unquoted: in a folder named with "#" or "?", SQLite read another path
    (and made an empty file there), so clear() left the index folder, with stray bytes of the
    deleted texts, on disk, and the disk check counted it as nothing."""
    from conftest import HashEmbedder

    from headroom_memory_integrations.storage.folder import vector_segment

    folder = tmp_path / name
    store = MemoryStore("alice", db_path=folder, embedder=HashEmbedder())
    for number in range(5):
        store.add(f"Likes fruit number {number} very much")
    segment = vector_segment(folder, str(store._open()._collection.id))
    assert segment is not None and segment.is_dir()
    store.clear()
    store.storage.close()
    assert not segment.exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # nothing made beside it
