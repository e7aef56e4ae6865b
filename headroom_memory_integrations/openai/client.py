"""Thin proxies that put a :class:`CompletionsFlow` around ``chat.completions.create``.

Everything else (``models``, ``embeddings``, ``files``, ``with_raw_response``, ``parse``, ...)
is the wrapped client's own, untouched. Sync and async proxies differ only in how they call the
model; the logic is the flow's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..engine import MemoryStore
from .flow import CompletionsFlow, StreamEditor


class _Passthrough:
    """Forwards every attribute it does not define to the wrapped object."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class MemoryStream(_Passthrough):
    """A streamed completion with the memory block filtered out. Iterate it as the original;
    ``close()``, ``response`` and the context manager work as before."""

    def __init__(self, stream: Any, editor: StreamEditor) -> None:
        super().__init__(stream)
        self._editor = editor

    def __iter__(self) -> Iterator[Any]:
        try:
            for chunk in self._wrapped:
                edited = self._editor.edit(chunk)
                if edited is not None:
                    yield edited
            last = self._editor.end()
            if last is not None:
                yield last
        finally:
            self._editor.end()

    def __enter__(self) -> MemoryStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._wrapped.close()


class AsyncMemoryStream(_Passthrough):
    """The async twin of :class:`MemoryStream`."""

    def __init__(self, stream: Any, editor: StreamEditor) -> None:
        super().__init__(stream)
        self._editor = editor

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            async for chunk in self._wrapped:
                edited = self._editor.edit(chunk)
                if edited is not None:
                    yield edited
            last = self._editor.end()
            if last is not None:
                yield last
        finally:
            self._editor.end()

    async def __aenter__(self) -> AsyncMemoryStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._wrapped.close()


class _Completions(_Passthrough):
    def __init__(self, completions: Any, flow: CompletionsFlow) -> None:
        super().__init__(completions)
        self._flow = flow

    def create(self, **kwargs: Any) -> Any:
        """``chat.completions.create`` with memory; same arguments, same result types."""
        call = self._flow.before(kwargs)
        result = self._wrapped.create(**call.request)
        if kwargs.get("stream"):
            return MemoryStream(result, self._flow.editor(call))
        return self._flow.after(call, result)


class _AsyncCompletions(_Passthrough):
    def __init__(self, completions: Any, flow: CompletionsFlow) -> None:
        super().__init__(completions)
        self._flow = flow

    async def create(self, **kwargs: Any) -> Any:
        """``await chat.completions.create(...)`` with memory; searching runs off the loop."""
        call = await asyncio.to_thread(self._flow.before, kwargs)
        result = await self._wrapped.create(**call.request)
        if kwargs.get("stream"):
            return AsyncMemoryStream(result, self._flow.editor(call))
        return self._flow.after(call, result)


class _Chat(_Passthrough):
    def __init__(self, chat: Any, completions: _Passthrough) -> None:
        super().__init__(chat)
        self.completions = completions


class MemoryClient(_Passthrough):
    """An OpenAI-compatible client with memory. Use it as the client it wraps.

    Attributes:
        memory: The user's :class:`MemoryStore` (search, add, get_all, clear, stats, flush, ...).
    """

    def __init__(self, client: Any, flow: CompletionsFlow, *, asynchronous: bool) -> None:
        super().__init__(client)
        self._flow = flow
        self._asynchronous = asynchronous
        completions_type = _AsyncCompletions if asynchronous else _Completions
        self.chat = _Chat(client.chat, completions_type(client.chat.completions, flow))

    @property
    def memory(self) -> MemoryStore:
        return self._flow.memory

    def with_options(self, **options: Any) -> MemoryClient:
        """The wrapped client's ``with_options``, keeping the memory."""
        return MemoryClient(
            self._wrapped.with_options(**options), self._flow, asynchronous=self._asynchronous
        )

    copy = with_options

    def __repr__(self) -> str:  # never the wrapped client's repr: it could show an API key
        kind = "with_fast_memory" if self._flow.flow.inline else "with_memory"
        return f"{kind}({type(self._wrapped).__name__}, user_id={self.memory.user_id!r})"
