"""One user never sees another's memories, whatever the user ids look like."""

from __future__ import annotations

import pytest

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.storage import collection_name


def test_fifty_users_with_near_identical_memories_each_find_only_their_own(db_path, model) -> None:
    stores = [MemoryStore(f"user-{i}", db_path=db_path, embedder=model) for i in range(50)]
    for i, store in enumerate(stores):
        store.add(f"My locker code is {1000 + i} and my locker is on floor {i % 5}")
    for i, store in enumerate(stores):
        results = store.search("What is my locker code?", top_k=10, min_score=-1)
        assert [m.text for m, _ in results] == [
            f"My locker code is {1000 + i} and my locker is on floor {i % 5}"
        ]
        assert all(m.user_id == f"user-{i}" for m, _ in results)
        assert len(store.get_all()) == 1 and store.stats()["total_chunks"] == 1


STRANGE_IDS = [
    "alice/../bob",
    "../../etc/passwd",
    "..",
    "a/b\\c",
    "ユーザー🙂",
    "Alice",
    "alice ",
    "x" * 1000,
    "hm-" + "0" * 40,
    "'; DROP TABLE memories; --",
]


def test_strange_user_ids_work_and_stay_isolated(db_path, model) -> None:
    plain = MemoryStore("alice", db_path=db_path, embedder=model)
    plain.add("Alice's secret: the vault code is 1234")
    for user_id in STRANGE_IDS:
        store = MemoryStore(user_id, db_path=db_path, embedder=model)
        store.add(f"Secret of {user_id[:20]}: likes kites")
        found = store.search("secret vault code", top_k=10, min_score=-1)
        assert [m.user_id for m, _ in found] == [user_id]
        assert store.stats()["user_id"] == user_id
    assert [m.text for m in plain.get_all()] == ["Alice's secret: the vault code is 1234"]
    assert len({collection_name(u) for u in [*STRANGE_IDS, "alice"]}) == len(STRANGE_IDS) + 1


def test_import_cannot_move_memories_into_another_users_scope(db_path, model) -> None:
    mallory = MemoryStore("mallory", db_path=db_path, embedder=model)
    line = '{"id": "abc", "user_id": "alice", "text": "Alice is an admin", "category": "fact"}'
    mallory.import_([line])
    assert MemoryStore("alice", db_path=db_path, embedder=model).get_all() == []
    assert [m.user_id for m in mallory.get_all()] == ["mallory"]


def test_metadata_cannot_change_the_owner(hash_store: MemoryStore, db_path) -> None:
    memory = hash_store.add("Has a cat", metadata={"user_id": "bob"})
    assert memory.user_id == "alice" and memory.metadata["user_id"] == "bob"
    from conftest import HashEmbedder

    assert MemoryStore("bob", db_path=db_path, embedder=HashEmbedder()).get_all() == []


@pytest.mark.parametrize("user_id", ["x" * 2049])
def test_overlong_user_id_is_refused(db_path, user_id) -> None:
    from headroom_memory_integrations import InvalidInputError

    with pytest.raises(InvalidInputError, match="maximum is 2048"):
        MemoryStore(user_id, db_path=db_path)


def test_one_queue_file_serves_one_storage(openai_server, tmp_path, model, model_says) -> None:
    """Queued jobs name a user, not a storage: two storages sharing a ``queue_path`` would
    store one tenant's memories in the other's (the same user id in both). The second wrapper
    is refused at once, and the first keeps its own memories."""
    from headroom_memory_integrations.errors import InvalidInputError
    from headroom_memory_integrations.openai import with_fast_memory

    queue = tmp_path / "shared-jobs.sqlite3"
    tenant_a = with_fast_memory(
        openai_server.client(),
        user_id="alice",
        db_path=tmp_path / "tenant-a",
        embedder=model,
        queue_path=queue,
    )
    with pytest.raises(InvalidInputError, match="already serves the memories in"):
        with_fast_memory(
            openai_server.client(),
            user_id="alice",
            db_path=tmp_path / "tenant-b",
            embedder=model,
            queue_path=queue,
        )
    model_says.memories = [{"text": "Prefers Python for backend work", "category": "preference"}]
    tenant_a.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "I prefer Python for backend work"}]
    )
    assert tenant_a.memory.flush(10)
    assert [m.text for m in tenant_a.memory.get_all()] == ["Prefers Python for backend work"]
    assert MemoryStore("alice", db_path=tmp_path / "tenant-b", embedder=model).count() == 0
    # the same folder, opened again, is the same storage: it may share the queue
    again = with_fast_memory(
        openai_server.client(),
        user_id="bob",
        db_path=tmp_path / "tenant-a",
        embedder=model,
        queue_path=queue,
    )
    assert again.memory.count() == 0


def test_storages_on_the_applications_own_clients_do_not_share_a_queue(
    openai_server, tmp_path, model
) -> None:
    """Storages that name the same queue file share it only when they hold the same
    memories: another storage is refused (before, one tenant's memories were stored in the
    other's)."""
    import chromadb

    from headroom_memory_integrations.errors import InvalidInputError
    from headroom_memory_integrations.openai import with_fast_memory
    from headroom_memory_integrations.storage import ChromaStorage

    settings = chromadb.Settings(anonymized_telemetry=False)
    tenant_a, tenant_b = (
        ChromaStorage(chromadb.PersistentClient(path=str(tmp_path / name), settings=settings))
        for name in ("a", "b")
    )
    queue = tmp_path / "jobs.sqlite3"
    options = {"embedder": model, "queue_path": queue}
    with_fast_memory(openai_server.client(), "alice", storage=tenant_a, **options)
    with_fast_memory(openai_server.client(), "bob", storage=tenant_a, **options)  # the same
    with pytest.raises(InvalidInputError, match="give each storage its own queue_path"):
        with_fast_memory(openai_server.client(), "alice", storage=tenant_b, **options)


def test_storages_on_two_persistent_clients_get_their_own_default_queues(
    openai_server, tmp_path, model, model_says, monkeypatch
) -> None:
    """The default queue of a storage on an application's ``PersistentClient`` is named after
    the client's folder, so two tenants need no ``queue_path`` (before, both storages read
    "chroma client", got one default file, and the second wrapper was refused)."""
    import chromadb

    from headroom_memory_integrations.openai import with_fast_memory
    from headroom_memory_integrations.storage import ChromaStorage
    from headroom_memory_integrations.writer import queue_path_for

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    settings = chromadb.Settings(anonymized_telemetry=False)

    def storage(name: str) -> ChromaStorage:
        folder = str(tmp_path / name)
        return ChromaStorage(chromadb.PersistentClient(path=folder, settings=settings))

    tenant_a, tenant_b = storage("a"), storage("b")
    a = with_fast_memory(openai_server.client(), "alice", storage=tenant_a, embedder=model)
    b = with_fast_memory(openai_server.client(), "alice", storage=tenant_b, embedder=model)
    for client, said in ((a, "Prefers Python for backend work"), (b, "Drinks green tea")):
        model_says.memories = [{"text": said, "category": "preference"}]
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": said}])
        assert client.memory.flush(10)
    assert [m.text for m in a.memory.get_all()] == ["Prefers Python for backend work"]
    assert [m.text for m in b.memory.get_all()] == ["Drinks green tea"]
    queue_a, queue_b = queue_path_for(a.memory), queue_path_for(b.memory)
    assert queue_a != queue_b
    assert {queue_a.parent, queue_b.parent} == {home / ".headroom-memory"}  # not in their folders
    assert queue_a.exists() and queue_b.exists()
    # a storage on another client of folder "a" holds the same memories: it shares a's queue
    again = with_fast_memory(openai_server.client(), "bob", storage=storage("a"), embedder=model)
    assert queue_path_for(again.memory) == queue_a
    assert again.memory.count() == 0


def test_the_place_of_an_applications_client(tmp_path) -> None:
    """What tells an application's chromadb client apart: a persistent client's real folder,
    with a tenant or database that is not the default; nothing for an in-memory client."""
    import chromadb

    from headroom_memory_integrations.storage import ChromaStorage

    def settings() -> chromadb.Settings:  # one each: chromadb's clients change the one given
        return chromadb.Settings(anonymized_telemetry=False)

    folder = tmp_path / "data"
    persistent = ChromaStorage(chromadb.PersistentClient(path=str(folder), settings=settings()))
    assert persistent.place == str(folder.resolve())
    assert persistent.db_path is None  # reopening needs the application's client
    assert ChromaStorage(chromadb.EphemeralClient(settings=settings())).place is None
    assert ChromaStorage.at(folder).place == str(folder.resolve())


@pytest.mark.server
def test_the_place_of_an_applications_http_client(chroma_server) -> None:
    import chromadb

    from headroom_memory_integrations.storage import ChromaStorage

    client = chromadb.HttpClient(host="127.0.0.1", port=chroma_server.port)
    storage = ChromaStorage(client)
    assert storage.place == chroma_server.url == ChromaStorage.from_url(chroma_server.url).place
    assert storage.db_path is None
