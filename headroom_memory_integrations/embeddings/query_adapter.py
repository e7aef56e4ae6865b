"""A learned linear map applied to a question's vector before it is searched.

A memory states a fact ("Is allergic to shellfish"); the question that needs it is worded
otherwise, often with no word in common ("Any seafood dishes I should avoid?"), and
all-MiniLM-L6-v2 places it little nearer to that memory than to others. It also places small
talk and general questions ("Tell me a joke.", "How do I undo the last git commit?") about as
near to a user's memories as real needs, so a floor that keeps those out keeps out many right
memories too.

The adapter moves a query's vector to ``q + q D`` (then unit length), with ``D`` a square
matrix learned from (question, memory) pairs and questions that need no memory, written for
this and kept apart from every benchmark question (``scripts/train_query_adapter.py``;
``benchmarks/adapter_train/``). Memories' vectors are not changed, so stores written before
keep working; only the model the adapter was learned for (:data:`ADAPTERS`) is adapted, and
the relevance floor (``engine.FLOOR_RISE``) is measured with it. On the paraphrase benchmark
at 10k memories with keys, it finds the right memory in the top 5 for 0.82 of a set of
questions nobody here had seen instead of 0.72, and returns nothing for 3% of them instead of
10% (docs/benchmarks.md, "A query adapter"). It costs one 384 x 384 matrix-vector product per
query (~0.05 ms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Vectors, normalize_rows
from .shipped import PerModel

ADAPTERS = {
    "all-MiniLM-L6-v2": Path(__file__).resolve().parent
    / "models"
    / "all-MiniLM-L6-v2"
    / "query_adapter.npy",
}
"""The model name -> the file of its adapter's ``D`` (float16, ``dimension x dimension``)."""


class QueryAdapter:
    """``q -> unit(q + q D)`` for query vectors of one model."""

    def __init__(self, delta: np.ndarray) -> None:
        if delta.ndim != 2 or delta.shape[0] != delta.shape[1]:
            raise ValueError(f"a query adapter is a square matrix, not {delta.shape}")
        self.delta = np.ascontiguousarray(delta, dtype=np.float32)

    @property
    def dimension(self) -> int:
        return int(self.delta.shape[0])

    def __call__(self, vectors: Vectors) -> Vectors:
        """The adapted unit vectors of query ``vectors`` (one row, or a matrix of rows)."""
        rows = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dimension)
        # einsum's own loop, not BLAS, as in storage/vectors.py: no BLAS threads on the search
        moved = rows + np.einsum("ij,jk->ik", rows, self.delta)
        return normalize_rows(moved).reshape(np.shape(vectors))


_adapters = PerModel(ADAPTERS, QueryAdapter)


def query_adapter(model: str) -> QueryAdapter | None:
    """The adapter for query vectors of ``model`` (an embedder's ``name``), or None where none
    was learned for it. Loaded once."""
    return _adapters(model)


def adapt_queries(model: str, vectors: Vectors) -> Vectors:
    """Query ``vectors`` of ``model`` (rows) as a search compares them with memories: adapted
    where an adapter applies (:func:`query_adapter`), else as they are."""
    adapter = query_adapter(model)
    if adapter is None or np.shape(vectors)[-1] != adapter.dimension:
        return vectors
    return adapter(vectors)
