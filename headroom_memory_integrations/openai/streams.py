"""Streamed completions and responses with the memory block filtered out, and the forwarding
base class of every proxy in this package."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from ..flow import ItemEditor, aedited, edited


class _Passthrough:
    """Forwards every attribute it does not define to the wrapped object: reads, and writes
    of a public attribute the wrapped object has (``client.api_key = ...`` must reach the
    client that sends the requests, as on a plain client). The proxy's own attributes stay
    its own: underscore names, what its class defines (methods, properties) and the names in
    :attr:`_OWN`."""

    _OWN: ClassVar[frozenset[str]] = frozenset()
    """Public attributes a proxy sets on itself (``chat``, ``completions``): never forwarded."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def __setattr__(self, name: str, value: Any) -> None:
        if self._forwards(name):
            self._assign(name, value)
        else:
            object.__setattr__(self, name, value)

    def _forwards(self, name: str) -> bool:
        """Whether an assignment to ``name`` goes to the wrapped object."""
        return not (
            name.startswith("_")
            or name in self._OWN
            or hasattr(type(self), name)
            or name in vars(self)
            or "_wrapped" not in vars(self)
            or not hasattr(self._wrapped, name)
        )

    def _assign(self, name: str, value: Any) -> None:
        """Set the wrapped object's attribute ``name``, as this proxy does."""
        setattr(self._wrapped, name, value)

    def __getattr__(self, name: str) -> Any:
        if hasattr(type(self), name):  # a property of ours raised AttributeError: never fall
            raise AttributeError(  # back to the wrapped object's (unedited, memory-less) one
                f"{type(self).__name__}.{name} failed"
            )
        if name.startswith("__") or "_wrapped" not in vars(self):
            # never the wrapped object's special methods (its __copy__ would copy the client
            # without memory), nor anything of a proxy not set up yet (copy.copy() asks for
            # __setstate__ before the attributes are back: it would recurse without end)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self._forward(name)

    def _forward(self, name: str) -> Any:
        """The wrapped object's attribute ``name``, as this proxy gives it."""
        return getattr(self._wrapped, name)


class MemoryStream(_Passthrough):
    """A streamed completion (or response) with the memory block filtered out. Iterate it as
    the original; ``close()``, ``response`` and the context manager work as before."""

    def __init__(self, stream: Any, editor: ItemEditor) -> None:
        super().__init__(stream)
        self._editor = editor
        self._items = edited(stream, editor)  # one iterator, as openai's own stream has

    def __iter__(self) -> Iterator[Any]:
        return self._items

    def __next__(self) -> Any:
        return next(self._items)

    def __enter__(self) -> MemoryStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._wrapped.close()


class AsyncMemoryStream(_Passthrough):
    """The async twin of :class:`MemoryStream`: the memory work at the stream's end is done
    off the event loop."""

    def __init__(self, stream: Any, editor: ItemEditor) -> None:
        super().__init__(stream)
        self._editor = editor
        self._items = aedited(stream, editor, end_in_thread=True)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items

    async def __anext__(self) -> Any:
        return await self._items.__anext__()

    async def __aenter__(self) -> AsyncMemoryStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._wrapped.close()
