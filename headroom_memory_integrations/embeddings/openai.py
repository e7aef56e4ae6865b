"""Embeddings from OpenAI's embedding endpoint (or any compatible one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import EmbeddingError
from ..storage.guard import Availability, is_unreachable
from .base import Vectors, normalize_rows

_KNOWN_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


DEFAULT_TIMEOUT = 10.0
"""Seconds an embedding request may take (a batch of 256 texts takes ~1-2 s)."""


def _at_openai_defaults(client: Any) -> bool:
    """Whether ``client`` is an openai client left at openai's own timeout (600 s)."""
    try:
        import openai

        return bool(getattr(client, "timeout", None) == openai.DEFAULT_TIMEOUT)
    except Exception:  # no openai, or a timeout that cannot be compared
        return False


def _did_not_answer(exc: BaseException) -> bool:
    """A timeout or a failed connection (not an answer with an error status)."""
    try:
        import openai

        if isinstance(exc, openai.APIConnectionError):  # APITimeoutError is one too
            return True
    except ImportError:
        pass
    return is_unreachable(exc)


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
            :data:`DEFAULT_TIMEOUT` and no retry, since a search embeds its query on the chat
            call's path, which 600 s (or three tries of 10 s) would hold up for as long.

    When the endpoint does not answer (a timeout, a failed connection), calls fail at once with
    :class:`~headroom_memory_integrations.errors.EmbeddingError` for a while (1 s, doubling to
    16 s while it stays down), so a chat call waits for it at most once per pause; the chat
    call itself goes on without memories (a write waits in the job queue and is retried).
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
        if timeout is None and _at_openai_defaults(client):
            timeout = DEFAULT_TIMEOUT
            if hasattr(client, "with_options"):
                client = client.with_options(max_retries=0)
        self._client = client
        self.model = model
        self._dimensions = dimensions
        self._batch_size = batch_size
        self._options = {"timeout": timeout} if timeout is not None else {}
        self._availability = Availability(f"the embedding endpoint ({model})", EmbeddingError)
        self.dimension = dimensions or _KNOWN_DIMENSIONS.get(model, 0)
        self.name = f"openai/{model}" + (f"@{dimensions}" if dimensions else "")

    @property
    def location(self) -> str:
        """The endpoint, as named when it is held to be down and when it answers again
        (:func:`~headroom_memory_integrations.storage.guard.when_back`: the job queues of the
        stores that embed with it then retry their waiting work at once)."""
        return self._availability.location

    def embed(self, texts: Sequence[str]) -> Vectors:
        rows: list[list[float]] = []
        extra = {"dimensions": self._dimensions} if self._dimensions else {}
        for start in range(0, len(texts), self._batch_size):
            batch = list(texts[start : start + self._batch_size])
            self._availability.check()
            try:
                response = self._client.embeddings.create(
                    model=self.model, input=batch, **self._options, **extra
                )
            except Exception as exc:
                if _did_not_answer(exc):
                    self._availability.failed(type(exc).__name__)
                raise
            self._availability.succeeded()
            ordered = sorted(response.data, key=lambda item: item.index)
            rows.extend(item.embedding for item in ordered)
        if not rows:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = normalize_rows(rows)
        self.dimension = vectors.shape[1]
        return vectors

    def __repr__(self) -> str:  # never shows the client (its repr may carry the API key)
        return f"OpenAIEmbedder(model={self.model!r}, dimension={self.dimension})"
