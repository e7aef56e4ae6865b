"""headroom-memory-integrations: persistent, per-user long-term memory for LLM applications.

Quick start (embedded Chroma and a local model; no API key, no network)::

    from headroom_memory_integrations import MemoryStore

    memory = MemoryStore("alice", db_path="./memories")
    memory.add("Prefers Python for backend work", category="preference")
    for found, score in memory.search("Which language should I use?"):
        print(f"{score:.2f} {found.text}")

Scores are similarities: higher is more relevant. Importing this package is cheap: the
model and Chroma load on first use.
"""

from __future__ import annotations

from .embeddings import Embedder, LocalEmbedder, OpenAIEmbedder
from .engine import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_MIN_SCORE,
    MAX_TEXT_CHARS,
    MemoryStore,
    NewMemory,
    Outcome,
    Remembered,
)
from .errors import (
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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_MIN_SCORE",
    "MAX_TEXT_CHARS",
    "Category",
    "ChromaStorage",
    "Embedder",
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
    "SearchResult",
    "Source",
    "StorageError",
    "__version__",
]
