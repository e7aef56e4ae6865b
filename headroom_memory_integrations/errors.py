"""Every error this package raises, drawn as one shallow tree.

::

    HeadroomMemoryError (the base: catch it to catch them all)
    ├── InvalidInputError        bad text, category, user_id, metadata, line (a ValueError)
    │   └── InvalidCategoryError     lists the valid categories
    ├── MemoryNotFoundError      no memory with that id for this user (also a KeyError)
    ├── EmbeddingMismatchError   the store was built with another embedder or dimension
    ├── StorageError             Chroma failed (server down, disk full, ...)
    └── MissingDependencyError   an optional extra is missing; gives the pip command

The base is named ``HeadroomMemoryError`` so that it never shadows Python's own ``MemoryError``.
"""

from __future__ import annotations


class HeadroomMemoryError(Exception):
    """Base class of every error raised by headroom-memory-integrations."""


class InvalidInputError(HeadroomMemoryError, ValueError):
    """The caller passed a value the memory layer cannot accept. Nothing was written."""


class InvalidCategoryError(InvalidInputError):
    """A category that is not one of the known ones."""


class MemoryNotFoundError(HeadroomMemoryError, KeyError):
    """No memory with that id exists for this user."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "memory not found"


class EmbeddingMismatchError(HeadroomMemoryError):
    """The store was built with a different embedding model or dimension."""


class StorageError(HeadroomMemoryError):
    """The storage backend failed to read or write."""


class EmbeddingError(HeadroomMemoryError):
    """The embedding backend (an API) did not answer and is held to be down for a while."""


class MissingDependencyError(HeadroomMemoryError, ImportError):
    """An optional dependency is missing; the message gives the install command."""

    @classmethod
    def for_extra(cls, module: str, extra: str) -> MissingDependencyError:
        return cls(
            f"{module} is not installed. Install the package's {extra!r} extra: in a clone of "
            f"headroom-memory-integrations, pip install '.[{extra}]'"
        )
