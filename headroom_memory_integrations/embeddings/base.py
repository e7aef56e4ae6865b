"""The embedder protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors.

    Attributes:
        name: Identifies the model; stored with each user's collection so that a store
            built with one model is never silently queried with another.
        dimension: Length of every vector.

    An embedder may also have an ``embed_queries(texts)`` method, used for search queries
    instead of ``embed`` (the same vectors but for texts longer than its model reads:
    :class:`~.local.LocalEmbedder` reads a long query's end, where its question usually is,
    and a memory's start). The name is the package's own: an ``embed_query`` (LangChain's
    takes one text) is not used.

    An embedder that calls a backend which can be down may also have a ``location``: the name
    its :class:`~headroom_memory_integrations.storage.guard.Availability` announces when the
    backend answers again (:class:`~.openai.OpenAIEmbedder`'s), so that the job queues of its
    stores retry their waiting work at once.
    """

    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Return one L2-normalised float32 row per text, shape ``(len(texts), dimension)``."""
        ...


def normalize_rows(vectors: npt.ArrayLike) -> Vectors:
    """Scale each row to unit length (rows of zeros stay zero)."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)
