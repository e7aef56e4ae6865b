"""Embedders turn texts into unit vectors. Any object with ``name``, ``dimension`` and
``embed(texts)`` is an :class:`Embedder`; the package ships three.

- :class:`LocalEmbedder`: all-MiniLM-L6-v2 (384 dimensions) on the CPU, the default.
- :class:`OpenAIEmbedder`: ``text-embedding-3-small`` (1536) through an OpenAI client.
- Your own: implement the protocol and pass ``embedder=`` to :class:`MemoryStore`.
"""

from .base import Embedder, normalize_rows
from .local import DEFAULT_LOCAL_MODEL, LocalEmbedder
from .openai import OpenAIEmbedder

__all__ = ["DEFAULT_LOCAL_MODEL", "Embedder", "LocalEmbedder", "OpenAIEmbedder", "normalize_rows"]
