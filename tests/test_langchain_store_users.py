"""HeadroomStore with many users: a search of one namespace does not list every user of the
storage (listing costs ~0.4 ms per user), descendants written elsewhere are still found, and a
user forgotten elsewhere is never brought back. Real embedded Chroma; a tiny deterministic
embedder (nothing here depends on meaning)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import HashEmbedder

from headroom_memory_integrations import ChromaStorage, InvalidInputError, MemoryStore
from headroom_memory_integrations.langchain import HeadroomStore, namespace_user


class CountedStorage:
    """The real embedded Chroma storage, counting how often every user is listed."""

    def __init__(self, inner: ChromaStorage) -> None:
        self.inner = inner
        self.listings = 0

    def users(self) -> list[str]:
        self.listings += 1
        return self.inner.users()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def embedder() -> HashEmbedder:
    return HashEmbedder()


@pytest.fixture
def storage(db_path: Path) -> CountedStorage:
    return CountedStorage(ChromaStorage.at(str(db_path)))


def test_searching_one_namespace_does_not_list_every_user(
    storage: CountedStorage, embedder: HashEmbedder
) -> None:
    store = HeadroomStore(storage=storage, embedder=embedder)  # type: ignore[arg-type]
    for n in range(30):
        store.put((f"user-{n}",), "drink", {"text": f"User {n} drinks green tea"})
    store.put(("user-3", "work"), "desk", {"text": "Sits on floor 3"})
    storage.listings = 0

    for _ in range(10):
        found = store.search(("user-3",), query="green tea", limit=5)
        assert [(i.namespace, i.key) for i in found] == [(("user-3",), "drink")]
        listed = store.search(("user-3",), limit=5)
        assert {(i.namespace, i.key) for i in listed} == {
            (("user-3",), "drink"),
            (("user-3", "work"), "desk"),  # a descendant, as LangGraph's prefix search has it
        }
    assert storage.listings <= 1  # (the first search's), not one per search

    assert len(store.list_namespaces(limit=100)) == 31  # listing every user: always afresh
    assert storage.listings == 2


def test_a_namespace_written_elsewhere_is_found(
    db_path: Path, storage: CountedStorage, embedder: HashEmbedder
) -> None:
    store = HeadroomStore(storage=storage, embedder=embedder, descendants_max_age=0.2)  # type: ignore[arg-type]
    store.put(("acme",), "k", {"text": "Acme ships on Mondays"})
    assert [i.key for i in store.search(("acme",))] == ["k"]

    # the prefix's own user, written by a wrapper's store: read directly, found at once
    MemoryStore("carol", storage=storage.inner, embedder=embedder).add("Carol likes jazz")
    assert [i.value["text"] for i in store.search(("carol",))] == ["Carol likes jazz"]

    # a descendant written elsewhere: not listed yet; the first search that starts more than
    # descendants_max_age after the last listing finds it (a search never uses an older list)
    bob = MemoryStore(namespace_user(("acme", "bob")), storage=storage.inner, embedder=embedder)
    bob.add("Bob works nights")
    time.sleep(0.3)
    found = {(i.namespace, i.value["text"]) for i in store.search(("acme",))}
    assert found == {(("acme",), "Acme ships on Mondays"), (("acme", "bob"), "Bob works nights")}

    exact = HeadroomStore(storage=storage, embedder=embedder, descendants_max_age=0)  # type: ignore[arg-type]
    assert len(exact.search(("acme",))) == 2
    MemoryStore(namespace_user(("acme", "eve")), storage=storage.inner, embedder=embedder).add(
        "Eve works days"
    )
    assert len(exact.search(("acme",))) == 3  # 0: every search lists

    for wrong in (-1, "5", True, float("nan")):
        with pytest.raises(InvalidInputError, match="descendants_max_age"):
            HeadroomStore(db_path=db_path, embedder=embedder, descendants_max_age=wrong)  # type: ignore[arg-type]


def test_a_user_forgotten_elsewhere_is_never_brought_back(
    db_path: Path, embedder: HashEmbedder
) -> None:
    """Another HeadroomStore (or the CLI, or ``forget_user``) deletes a user this store has
    seen: its reads, deletes and searches find nothing and create no collection again."""
    mine = HeadroomStore(db_path=db_path, embedder=embedder)
    other = HeadroomStore(db_path=db_path, embedder=embedder)
    for namespace in [("acme",), ("acme", "bob")]:
        other.put(namespace, "k", {"text": "Works nights"})
    assert len(mine.search(("acme",))) == 2  # seen (and its users listed)
    assert mine.get(("acme", "bob"), "k") is not None

    MemoryStore(namespace_user(("acme", "bob")), db_path=db_path, embedder=embedder).forget_user()
    other.delete(("acme",), "k")
    other.memory(("acme",)).forget_user()

    assert mine.get(("acme", "bob"), "k") is None
    assert mine.search(("acme",)) == [] and mine.search(("acme",), query="nights") == []
    mine.delete(("acme", "bob"), "k")
    mine.put(("acme", "bob"), "other", None)  # a put of None deletes
    assert mine.list_namespaces() == [] and other.list_namespaces() == []
    assert mine.stores.users() == []
