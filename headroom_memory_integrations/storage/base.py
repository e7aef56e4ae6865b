"""The storage protocol: one collection of memories per user."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from ..embeddings.base import Vectors
from ..types import Category, Memory


def collection_name(user_id: str) -> str:
    """A storage-safe name derived from ``user_id`` (any string: slashes, ``..``, unicode).

    The raw ``user_id`` is kept in the collection's metadata and checked on every open,
    so even a hash collision could not mix two users.
    """
    return "hm-" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:40]


class UserCollection(Protocol):
    """One user's memories with their vectors. Scores are similarities: higher is closer."""

    def upsert(self, memories: Sequence[Memory], vectors: Vectors) -> None: ...

    def get(self, ids: Sequence[str] | None = None) -> list[Memory]:
        """The memories with these ids (missing ones are skipped), or all when ``ids`` is None.
        Current: read from storage, or from a cache when this handle is the collection's only
        writer."""
        ...

    def nearest(self, vectors: Vectors, limit: int) -> list[list[tuple[str, float]]]:
        """For each row of ``vectors``, the ids of the ``limit`` nearest memories with their
        cosine similarity, most similar first."""
        ...

    def catalog(self, ids: Sequence[str]) -> dict[str, tuple[str, Category]]:
        """Text and category by id (ids that do not exist are left out). May be served from a
        cache that this handle's own writes keep current; use :meth:`get` for fresh records."""
        ...

    def delete(self, ids: Sequence[str]) -> None: ...

    def count(self) -> int: ...


class Storage(Protocol):
    """Opens users' collections.

    Attributes:
        location: Where the data is, for humans (a folder, or a server's URL).
    """

    location: str

    def open(self, user_id: str, embedder: str, dimension: int) -> UserCollection:
        """The user's collection, created if missing.

        Raises:
            EmbeddingMismatchError: it was built with another embedder or dimension.
        """
        ...

    def users(self) -> list[str]:
        """The ids of every user with a collection here, sorted."""
        ...

    def drop(self, user_id: str) -> int:
        """Delete the user's collection; return how many memories it held."""
        ...
