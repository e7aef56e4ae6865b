"""headroom-memory-integrations: persistent, per-user long-term memory for LLM applications.

Quick start (embedded Chroma and a local model; no API key, no network)::

    from headroom_memory_integrations import MemoryStore

    memory = MemoryStore("alice", db_path="./memories")
    memory.add("Prefers Python for backend work", category="preference")
    for found, score in memory.search("Which language should I use?"):
        print(f"{score:.2f} {found.text}")

Scores are similarities: higher is more relevant. Importing this package is cheap: the
model and Chroma load on first use, and ``with_fast_memory``, ``with_memory`` (which import
``openai``) and ``RollingWindowTransform`` load when first named.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .embeddings import Embedder, LocalEmbedder, OpenAIEmbedder
from .engine import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_MIN_SCORE,
    MAX_TEXT_CHARS,
    MemoryStore,
    NewMemory,
)
from .errors import (
    EmbeddingError,
    EmbeddingMismatchError,
    HeadroomMemoryError,
    InvalidCategoryError,
    InvalidInputError,
    MemoryNotFoundError,
    MissingDependencyError,
    StorageError,
)
from .storage import ChromaStorage
from .types import Category, Memory, Revision, SearchResult, Source
from .write_path import Outcome, Remembered

if TYPE_CHECKING:
    from .openai import with_fast_memory, with_memory
    from .transforms import RollingWindowTransform

__version__ = "0.1.0"

_LAZY = {
    "with_fast_memory": ".openai",
    "with_memory": ".openai",
    "RollingWindowTransform": ".transforms",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_MIN_SCORE",
    "MAX_TEXT_CHARS",
    "Category",
    "ChromaStorage",
    "Embedder",
    "EmbeddingError",
    "EmbeddingMismatchError",
    "HeadroomMemoryError",
    "InvalidCategoryError",
    "InvalidInputError",
    "LocalEmbedder",
    "Memory",
    "MemoryNotFoundError",
    "MemoryStore",
    "MissingDependencyError",
    "NewMemory",
    "OpenAIEmbedder",
    "Outcome",
    "Remembered",
    "Revision",
    "RollingWindowTransform",
    "SearchResult",
    "Source",
    "StorageError",
    "__version__",
    "with_fast_memory",
    "with_memory",
]
