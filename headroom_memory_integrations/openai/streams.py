"""Streamed completions with the memory block filtered out, and the forwarding base class of
every proxy in this package."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from .flow import StreamEditor


class _Passthrough:
    """Forwards every attribute it does not define to the wrapped object."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        if hasattr(type(self), name):  # a property of ours raised AttributeError: never fall
            raise AttributeError(  # back to the wrapped object's (unedited, memory-less) one
                f"{type(self).__name__}.{name} failed"
            )
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
