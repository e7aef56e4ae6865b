"""Embeddings from OpenAI's embedding endpoint (or any compatible one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Vectors, normalize_rows

_KNOWN_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


DEFAULT_TIMEOUT = 10.0
"""Seconds an embedding request may take (a batch of 256 texts takes ~1-2 s)."""


def _shorter_timeout(client: Any) -> dict[str, Any]:
    """``{"timeout": DEFAULT_TIMEOUT}`` for an openai client left at openai's own default
    timeout; nothing for any other client (its own timeout stands; a client of another kind
    may not take the argument)."""
    try:
        import openai

        left_at_default = getattr(client, "timeout", None) == openai.DEFAULT_TIMEOUT
    except Exception:  # no openai, or a timeout that cannot be compared
        left_at_default = False
    return {"timeout": DEFAULT_TIMEOUT} if left_at_default else {}


class OpenAIEmbedder:
    """Embeds with ``client.embeddings.create`` (default model ``text-embedding-3-small``).

    Args:
        client: An ``openai.OpenAI`` (or compatible) client. If omitted, one is made
            from the environment (``OPENAI_API_KEY``).
        model: The embedding model.
        dimensions: Ask the API for shorter vectors (text-embedding-3 models only).
        batch_size: Texts per request.
        timeout: Seconds each request may take (the client's retries apply). By default, the
            client's own timeout, unless it is openai's default of 600 s: then
            :data:`DEFAULT_TIMEOUT`, since a search embeds its query on the chat call's path,
            which 600 s would hold up for as long.
    """

    def __init__(
        self,
        client: Any = None,
        model: str = "text-embedding-3-small",
        *,
        dimensions: int | None = None,
        batch_size: int = 256,
        timeout: float | None = None,
    ) -> None:
        if client is None:
            from openai import OpenAI

            client = OpenAI()
        self._client = client
        self.model = model
        self._dimensions = dimensions
        self._batch_size = batch_size
        self._options = {"timeout": timeout} if timeout is not None else _shorter_timeout(client)
        self.dimension = dimensions or _KNOWN_DIMENSIONS.get(model, 0)
        self.name = f"openai/{model}" + (f"@{dimensions}" if dimensions else "")

    def embed(self, texts: Sequence[str]) -> Vectors:
        rows: list[list[float]] = []
        extra = {"dimensions": self._dimensions} if self._dimensions else {}
        for start in range(0, len(texts), self._batch_size):
            batch = list(texts[start : start + self._batch_size])
            response = self._client.embeddings.create(
                model=self.model, input=batch, **self._options, **extra
            )
            ordered = sorted(response.data, key=lambda item: item.index)
            rows.extend(item.embedding for item in ordered)
        if not rows:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = normalize_rows(rows)
        self.dimension = vectors.shape[1]
        return vectors

    def __repr__(self) -> str:  # never shows the client (its repr may carry the API key)
        return f"OpenAIEmbedder(model={self.model!r}, dimension={self.dimension})"
