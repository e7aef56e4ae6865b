"""Embeddings from OpenAI's embedding endpoint (or any compatible one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import EmbeddingError
from ..jobs import retry_after
from ..redaction import without_credentials
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


def _server_failed(exc: BaseException) -> bool:
    """An answer with a 5xx status: the endpoint is there but cannot embed now."""
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and status >= 500


def _rate_limited(exc: BaseException) -> bool:
    """An answer with status 429: the endpoint is there but will not embed for a while."""
    return getattr(exc, "status_code", None) == 429


def _endpoint_name(client: Any, model: str) -> str:
    """The endpoint as logs and errors name it: the client's base URL, without the credentials
    and the query a URL may carry, and the model (two embedders of one model on different
    endpoints are told apart: each one's coming back hurries only its own stores' queues)."""
    base_url = getattr(client, "base_url", None)
    if base_url is None:
        return f"the embedding endpoint ({model})"
    url = str(base_url).split("?", 1)[0].split("#", 1)[0].rstrip("/")
    return f"the embedding endpoint at {without_credentials(url)} ({model})"


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

    When the endpoint does not answer (a timeout, a failed connection), the request fails with
    :class:`~headroom_memory_integrations.errors.EmbeddingError` (the client's error is its
    cause), and calls fail at once with it for a while (1 s, doubling to 16 s while it stays
    down), so a chat call waits for it at most once per pause; the chat call itself goes on
    without memories (a write waits in the job queue and is retried within that longest pause).
    An answer with a 5xx status or a 429 (a rate limit) is an ``EmbeddingError`` too. A 429,
    and a 5xx that says ``Retry-After``, also hold calls back: for as long as its Retry-After
    asks, up to 16 s (a 429 without one: 1 s, doubling, as above); a 5xx without one is not
    held back (it came at once). Any other error of the client's (a bad request, a bad key)
    is raised as it is. (The client's own retries, if it has any, come first: openai's honour
    a Retry-After of up to 2 minutes; the chat call waits for them at most its recall time.)
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
        self._availability = Availability(_endpoint_name(client, model), EmbeddingError)
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
                    raise EmbeddingError(
                        f"{self.location} did not answer ({type(exc).__name__})"
                    ) from exc
                rate_limited = _rate_limited(exc)
                if rate_limited or _server_failed(exc):
                    status = getattr(exc, "status_code", "?")
                    asked = retry_after(exc)
                    if asked is not None or rate_limited:  # it asked to be left alone
                        self._availability.failed(f"{type(exc).__name__}, status {status}", asked)
                    raise EmbeddingError(
                        f"{self.location} failed with status {status} ({type(exc).__name__})"
                    ) from exc
                raise
            self._availability.succeeded()
            ordered = sorted(response.data, key=lambda item: item.index)
            rows.extend(item.embedding for item in ordered)
        if not rows:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = normalize_rows(rows)
        self.dimension = vectors.shape[1]
        return vectors

    @property
    def destination(self) -> str | None:
        """A fingerprint of where its texts go and as whom (the client's base URL, API key,
        organization, headers; the model): a hash, no secret in it. None if the client does
        not say, or has a key provider or Azure AD credentials (two tenants' would hash
        alike). A job of a user let go of is embedded only by an embedder of the same name and
        destination (see ``writer.embedder_identity``)."""
        try:
            from ..openai import client_destination  # (that module imports this one)
        except ImportError:  # the openai package is missing: a compatible client
            return None
        return client_destination(self._client, self.name)

    def __repr__(self) -> str:  # never shows the client (its repr may carry the API key)
        return f"OpenAIEmbedder(model={self.model!r}, dimension={self.dimension})"
