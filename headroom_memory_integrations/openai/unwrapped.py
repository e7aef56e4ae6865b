"""The parts of an OpenAI client that the memory wrappers do not cover: never a silent bypass.

Calls through these parts reach the model without memory (nothing injected, nothing extracted).
They still work, and the first call through each of them logs a warning on the
``headroom_memory_integrations.openai`` logger, once per memory client (its ``with_options``
copies included).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any

from ..jobs import user_tag
from ..redaction import logger_without_secrets
from .streams import _Passthrough

log = logger_without_secrets("headroom_memory_integrations.openai")

UNWRAPPED = {
    "beta": "the beta APIs (Assistants threads, Realtime, ...; beta.chat.completions has memory)",
    "realtime": "the Realtime API",
    "live": "the Live API (voice sessions)",
    "responses.connect": "the Responses API's WebSocket connection (responses.connect)",
    "completions": "the legacy Completions API",
}
"""Client attributes whose calls get no memory (attribute name -> what it is)."""


_PLAIN = (str, bytes, int, float, bool, type(None), type)


class UnwrappedCalls:
    """Warns once per memory client and per unwrapped API when a call goes through it."""

    def __init__(self, user_id: str) -> None:
        self._user = user_tag(user_id)
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def warn(self, api: str, path: str) -> None:
        """Log that ``path`` (e.g. ``"completions.create"``) of ``api`` ran without memory."""
        with self._lock:
            if api in self._warned:
                return
            self._warned.add(api)
        log.warning(
            "client.%s(...) is not wrapped with memory: calls through %s get no memories "
            "injected and none extracted (user %s). Memory covers chat.completions and "
            "responses (create, parse and the stream helper, also through with_raw_response and "
            "with_streaming_response); see 'What the wrappers cover' in docs/guide.md. Logged "
            "once per memory client.",
            path,
            UNWRAPPED.get(api, f"client.{api}"),
            self._user,
        )

    def guard(self, name: str, value: Any, prefix: str = "") -> Any:
        """``value`` (the client's attribute ``name``), watched if ``name`` is unwrapped."""
        if name in UNWRAPPED:
            return Unwrapped(value, self, api=name, path=f"{prefix}{name}")
        return value


class Unwrapped(_Passthrough):
    """A part of the client that memory does not cover: each call through it (at any depth,
    e.g. ``beta.threads.runs.create``) works as before after a warning."""

    def __init__(self, wrapped: Any, calls: UnwrappedCalls, *, api: str, path: str) -> None:
        super().__init__(wrapped)
        self._calls = calls
        self._api = api
        self._path = path

    def _forward(self, name: str) -> Any:
        value = getattr(self._wrapped, name)
        path = f"{self._path}.{name}"
        if isinstance(value, _PLAIN):
            return value
        if not callable(value):
            return Unwrapped(value, self._calls, api=self._api, path=path)
        return warning_first(value, self._calls, api=self._api, path=path)

    def __repr__(self) -> str:
        return f"<{self._path} of a memory client: not wrapped with memory>"


def warning_first(
    method: Callable[..., Any], calls: UnwrappedCalls, *, api: str, path: str
) -> Callable[..., Any]:
    """``method``, which reaches the model without memory, warning (once) before each call."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def call_async(*args: Any, **kwargs: Any) -> Any:
            calls.warn(api, path)
            return await method(*args, **kwargs)

        return call_async

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        calls.warn(api, path)
        return method(*args, **kwargs)

    return call
