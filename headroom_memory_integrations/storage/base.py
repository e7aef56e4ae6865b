"""The storage protocol: one collection of memories per user."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from typing import NamedTuple, Protocol

from ..embeddings.base import Vectors
from ..redaction import without_credentials as without_credentials  # (imported from here too)
from ..types import Category, Memory


class Catalogued(NamedTuple):
    """What a search and the consolidation read of a memory: its text, category and keys."""

    text: str
    category: Category
    keys: tuple[str, ...] = ()


def collection_name(user_id: str) -> str:
    """A storage-safe name derived from ``user_id`` (any string: slashes, ``..``, unicode).

    The raw ``user_id`` is kept in the collection's metadata and checked on every open,
    so even a hash collision could not mix two users.
    """
    return "hm-" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:40]


class UserCollection(Protocol):
    """One user's memories with their vectors. Scores are similarities: higher is closer.

    A storage gives every caller in a process the same object for a user, so what it holds in
    memory (a cache, a search index) follows every write made in the process."""

    def upsert(self, memories: Sequence[Memory], vectors: Vectors, *, behind: bool = False) -> None:
        """Store new memories or new versions of existing ones (a memory not stored is
        created). A write that raises stored nothing (what it had written is undone first).

        Args:
            behind: The write may reach storage just after this returns, once it is durable
                and every later read of the process sees it (embedded storage, see
                :mod:`.deferred`); a failure to store it then is retried, not raised.
        """
        ...

    def rewrite(
        self,
        memories: Sequence[Memory],
        vectors: Vectors,
        *,
        rewrites: Collection[str],
        behind: bool = False,
    ) -> set[str]:
        """Store memories as :meth:`upsert` does, in one write, of which ``rewrites`` name
        those that are new versions of memories the caller read stored: they are never
        created. One that another process deleted meanwhile stays deleted (its new version is
        not stored); the others are stored.

        Returns:
            The ids of ``rewrites`` that were gone (deleted), whose new versions were not
            stored.
        """
        ...

    def get(self, ids: Sequence[str] | None = None) -> list[Memory]:
        """The memories with these ids (missing ones are skipped), or all when ``ids`` is None.
        Current: read from storage, or from a cache when this handle is the collection's only
        writer."""
        ...

    def nearest(self, vectors: Vectors, limit: int) -> list[list[tuple[str, float]]]:
        """For each row of ``vectors``, the ids of the ``limit`` nearest memories with their
        cosine similarity, most similar first."""
        ...

    def centroid(self) -> tuple[Vectors, int] | None:
        """The mean of the stored vectors (or of a sample of them) and how many memories it
        stands for; None when there are none. Searches are centred on it (see
        :data:`~headroom_memory_integrations.engine.QUERY_CENTERING`)."""
        ...

    def catalog(self, ids: Sequence[str]) -> dict[str, Catalogued]:
        """Text, category and keys by id (ids that do not exist are left out). May be served from a
        cache that this handle's own writes keep current; use :meth:`get` for fresh records."""
        ...

    def delete(self, ids: Sequence[str], *, erase: bool = True) -> None:
        """Delete these memories (unknown ids are ignored); with ``erase``, their text is
        also removed from the storage's files where it can be (an embedded folder)."""
        ...

    def count(self) -> int: ...

    def exclusive(self) -> AbstractContextManager[None]:
        """This user's write lock, to read, decide and write with no other write of the user
        from this process in between (consolidation). See
        :meth:`.chroma.ChromaCollection.exclusive` for what it covers across processes."""
        ...


class Storage(Protocol):
    """Opens users' collections.

    Attributes:
        location: Where the data is, for humans (a folder, or a server's URL).
    """

    location: str

    def open(self, user_id: str, embedder: str, dimension: int) -> UserCollection:
        """The user's collection (created by its first write). The same object for every
        caller of this storage in the process.

        Its methods raise :class:`EmbeddingMismatchError` if it was built with another
        embedder or dimension.
        """
        ...

    def users(self) -> list[str]:
        """The ids of every user with a collection here, sorted."""
        ...

    def drop(self, user_id: str, *, erase: bool = True) -> int:
        """Delete the user's collection; return how many memories it held. With ``erase``,
        their text is also removed from the storage's files where it can be."""
        ...

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until writes the storage stores behind its callers are stored (True at once
        for a storage that stores each write before it returns). False if ``timeout`` seconds
        passed first or the writes keep failing."""
        ...
