"""What ``with_raw_response`` and ``with_streaming_response`` return on a memory client.

The objects below stand in for openai's ``LegacyAPIResponse`` (``with_raw_response``) and
``APIResponse`` / ``AsyncAPIResponse`` (``with_streaming_response``): every attribute they do not
define (``headers``, ``status_code``, ``request_id``, ``http_response``, ``retries_taken``,
``elapsed``, ``close()``, ...) is the original's. They change what carries the answer's text:

The same objects serve ``chat.completions`` and the Responses API's ``responses``; the flow
(:class:`.flow.CompletionsFlow` or :class:`.responses_flow.ResponsesFlow`) knows the shapes.

- ``parse()`` returns the completion (or response) with the memory block cut from every text
  (for ``stream=True``, a stream whose chunks or events never contain any part of it). The memory
  work (storing, or queueing background extraction) happens once per call, however often
  ``parse()`` is called.
- The body accessors (``content`` and ``text`` of a raw response; ``read()``, ``text()``,
  ``json()``, ``iter_bytes()``, ``iter_text()``, ``iter_lines()`` of a streaming response) return
  the body with the block cut out: a completion's JSON as received, except that each choice's
  ``message.content`` is the visible text (re-serialized compactly), or a response's with each
  ``output_text`` edited; a stream's server-sent events re-rendered from the filtered chunks
  (``data: {chunk}`` events, then ``data: [DONE]``; named ``event: {type}`` events for the
  Responses API). Reading the body does the memory work too.
- ``http_response`` is the httpx response as received: reading its body directly shows the
  model's raw output, block included. Hand it to nothing that shows text to the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from .flow import Call, CompletionsFlow
from .responses_flow import ResponsesFlow
from .streams import AsyncMemoryStream, MemoryStream, _Passthrough

P = TypeVar("P", str, bytes)

DONE_EVENT = "data: [DONE]\n\n"


class ResponseEdits:
    """One call's memory work and edits, shared by the accessors of its response.

    Args:
        flow: The client's flow.
        call: The call the response answers.
        streamed: Whether the call asked for ``stream=True``.
        asynchronous: Whether streams are async (an ``AsyncOpenAI`` client).
    """

    def __init__(
        self,
        flow: CompletionsFlow | ResponsesFlow,
        call: Call,
        *,
        streamed: bool,
        asynchronous: bool,
    ) -> None:
        self.flow = flow
        self.call = call
        self.streamed = streamed
        self.asynchronous = asynchronous
        self._finished = False
        self._stream: Any = None

    def completion(self, parsed: Any) -> Any:
        """The parsed completion with the block cut out; the memory work happens the first
        time only (openai returns the same cached object on every ``parse()``)."""
        if not self._finished:
            self._finished = True
            return self.flow.after(self.call, parsed)
        return parsed

    async def acompletion(self, parsed: Any) -> Any:
        """:meth:`completion`, its memory work (a write to the job queue file) done off the
        event loop."""
        if self._finished:
            return parsed
        return await asyncio.to_thread(self.completion, parsed)

    def stream(self, parsed: Any) -> Any:
        """The filtered stream around openai's parsed one (the same one on every call)."""
        if self._stream is None:
            stream_type = AsyncMemoryStream if self.asynchronous else MemoryStream
            self._stream = stream_type(parsed, self.flow.editor(self.call))
        return self._stream

    def sse(self, chunk: Any) -> str:
        """One server-sent event carrying ``chunk`` as the API sent it (the fields it set),
        named by its type for the Responses API."""
        to_json = getattr(chunk, "to_json", None)
        data = to_json(indent=None) if callable(to_json) else json.dumps(chunk)
        name = f"event: {chunk.type}\n" if self.flow.named_events else ""
        return f"{name}data: {data}\n\n"

    @property
    def closing(self) -> str:
        """What ends a re-rendered stream: ``[DONE]`` for chat completions, nothing for the
        Responses API (its last event says it is done)."""
        return "" if self.flow.named_events else DONE_EVENT

    def body(self, raw: bytes) -> bytes:
        """A completion's (or response's) JSON body with the block cut from every text."""
        try:
            decoded = json.loads(raw)
        except ValueError:  # not JSON (an odd server): cut the block from the text as it is
            return self.flow.flow.strip(self.call.turn, raw.decode("utf-8", "replace")).encode()
        edited = self.flow.strip_json(self.call, decoded)
        return json.dumps(edited, ensure_ascii=False, separators=(",", ":")).encode()

    def other_form(self, to: type, body: Callable[[], bytes], parse: Callable[[], Any]) -> Any:
        """``parse(to=...)`` of a whole completion for a type other than the default one."""
        if to is str:
            return body().decode()
        if to in (dict, object):
            return json.loads(body())
        return self.flow.strip(self.call, parse())

    def refuse_other_stream_form(self, to: Any) -> None:
        if to is not None:
            raise TypeError(
                "parse(to=...) is not supported for a streamed completion on a memory client; "
                "call parse() and iterate the stream it returns"
            )


class _Rechunker(Generic[P]):
    """Cuts text or bytes into pieces of ``size`` (None: as they come)."""

    def __init__(self, size: int | None) -> None:
        self._size = size
        self._buffer: P | None = None

    def feed(self, piece: P) -> list[P]:
        if not self._size:
            return [piece] if piece else []
        buffer = piece if self._buffer is None else self._buffer + piece
        out = [buffer[i : i + self._size] for i in range(0, len(buffer), self._size)]
        self._buffer = out.pop() if out and len(out[-1]) < self._size else None
        return out

    def flush(self) -> list[P]:
        buffer, self._buffer = self._buffer, None
        return [buffer] if buffer else []


def _lines(text: str) -> list[str]:
    return text.splitlines()


class _EditedResponse(_Passthrough):
    """An openai response object with the memory block cut out by ``edits``."""

    def __init__(self, response: Any, edits: ResponseEdits) -> None:
        super().__init__(response)
        self._edits = edits

    def __repr__(self) -> str:
        return f"<memory {self._wrapped!r}>"


class _SyncEditedResponse(_EditedResponse):
    """A sync response: ``parse()`` edits the completion or the stream; other forms
    (``parse(to=str)``, ...) are read from :meth:`_body`, the edited body."""

    def _body(self) -> bytes:
        raise NotImplementedError

    def parse(self, *, to: Any = None) -> Any:
        edits = self._edits
        if edits.streamed:
            edits.refuse_other_stream_form(to)
            return edits.stream(self._wrapped.parse())
        completion = edits.completion(self._wrapped.parse())
        if to is None:
            return completion
        return edits.other_form(to, self._body, lambda: self._wrapped.parse(to=to))

    def finish(self) -> None:
        """Do a whole answer's memory work now (an async client's call does, in a thread);
        an answer that cannot be parsed is left for :meth:`parse` to report."""
        with contextlib.suppress(Exception):
            self.parse()


class MemoryRawResponse(_SyncEditedResponse):
    """What ``chat.completions.with_raw_response.create`` / ``.parse`` return on a memory
    client (sync or async): openai's ``LegacyAPIResponse`` with the block cut from the parsed
    completion and the body (see the module docstring).

    ``raw = client.chat.completions.with_raw_response.create(model=..., messages=...)``;
    ``raw.headers`` as before; ``raw.parse()`` the completion (or, with ``stream=True``, a
    stream to iterate, ``async for`` on an async client).
    """

    def _body(self) -> bytes:
        return self.content

    @property
    def content(self) -> bytes:
        """The body with the block cut out (see the module docstring)."""
        if not self._edits.streamed:
            self.parse()
            return self._edits.body(self._wrapped.content)
        if self._edits.asynchronous:
            raise TypeError(
                "the body of an async streamed response cannot be read synchronously; "
                "iterate `async for chunk in raw.parse()`"
            )
        edits = self._edits
        return "".join([*map(edits.sse, self.parse()), edits.closing]).encode()

    @property
    def text(self) -> str:
        return self.content.decode()


class MemoryStreamedResponse(_SyncEditedResponse):
    """What ``chat.completions.with_streaming_response.create`` / ``.parse`` yield on a sync
    memory client, inside ``with``: openai's ``APIResponse`` with the block cut from the parsed
    completion and from every body accessor (see the module docstring)."""

    def _body(self) -> bytes:
        return self.read()

    def _events(self) -> Iterator[str]:
        if self._edits.streamed:
            yield from map(self._edits.sse, self.parse())
            yield self._edits.closing
        else:
            self.parse()
            yield self._edits.body(self._wrapped.read()).decode()

    def read(self) -> bytes:
        return "".join(self._events()).encode()

    def text(self) -> str:
        return "".join(self._events())

    def json(self) -> object:
        return json.loads(self.text())

    def iter_text(self, chunk_size: int | None = None) -> Iterator[str]:
        yield from _rechunk(self._events(), chunk_size)

    def iter_bytes(self, chunk_size: int | None = None) -> Iterator[bytes]:
        yield from _rechunk((event.encode() for event in self._events()), chunk_size)

    def iter_lines(self) -> Iterator[str]:
        for event in self._events():
            yield from _lines(event)


def _rechunk(pieces: Iterable[P], size: int | None) -> Iterator[P]:
    rechunker: _Rechunker[P] = _Rechunker(size)
    for piece in pieces:
        yield from rechunker.feed(piece)
    yield from rechunker.flush()


class AsyncMemoryStreamedResponse(_EditedResponse):
    """The async twin of :class:`MemoryStreamedResponse` (``async with``; ``await parse()``)."""

    async def parse(self, *, to: Any = None) -> Any:
        edits = self._edits
        if edits.streamed:
            edits.refuse_other_stream_form(to)
            return edits.stream(await self._wrapped.parse())
        completion = await edits.acompletion(await self._wrapped.parse())
        if to is None:
            return completion
        body = self._edits.body(await self._wrapped.read())
        other = await self._wrapped.parse(to=to) if to not in (str, dict, object) else None
        return edits.other_form(to, lambda: body, lambda: other)

    async def _events(self) -> AsyncIterator[str]:
        if self._edits.streamed:
            async for chunk in await self.parse():
                yield self._edits.sse(chunk)
            yield self._edits.closing
        else:
            await self.parse()
            yield self._edits.body(await self._wrapped.read()).decode()

    async def read(self) -> bytes:
        return (await self.text()).encode()

    async def text(self) -> str:
        return "".join([event async for event in self._events()])

    async def json(self) -> object:
        return json.loads(await self.text())

    async def iter_text(self, chunk_size: int | None = None) -> AsyncIterator[str]:
        rechunker: _Rechunker[str] = _Rechunker(chunk_size)
        async for event in self._events():
            for piece in rechunker.feed(event):
                yield piece
        for piece in rechunker.flush():
            yield piece

    async def iter_bytes(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        rechunker: _Rechunker[bytes] = _Rechunker(chunk_size)
        async for event in self._events():
            for piece in rechunker.feed(event.encode()):
                yield piece
        for piece in rechunker.flush():
            yield piece

    async def iter_lines(self) -> AsyncIterator[str]:
        async for event in self._events():
            for line in _lines(event):
                yield line


class _ResponseManager:
    """What the sync and async ``with_streaming_response.create(...)`` managers share: the
    request with memory, and the edits of its answer."""

    def __init__(
        self,
        method: Callable[..., Any],
        flow: CompletionsFlow | ResponsesFlow,
        kwargs: Mapping[str, Any],
    ) -> None:
        self._method = method
        self._flow = flow
        self._kwargs = kwargs
        self._manager: Any = None

    def _edits(self, call: Any, *, asynchronous: bool) -> ResponseEdits:
        streamed = bool(self._kwargs.get("stream"))
        return ResponseEdits(self._flow, call, streamed=streamed, asynchronous=asynchronous)


class MemoryResponseManager(_ResponseManager):
    """The context manager ``with_streaming_response.create(...)`` returns on a sync memory
    client: like openai's, the request is made on ``__enter__`` and the response closed on exit.
    """

    def __enter__(self) -> MemoryStreamedResponse:
        call = self._flow.before(self._kwargs)
        self._manager = self._method(**call.request)
        response = self._manager.__enter__()
        return MemoryStreamedResponse(response, self._edits(call, asynchronous=False))

    def __exit__(self, *exc: Any) -> None:
        if self._manager is not None:
            self._manager.__exit__(*exc)


class AsyncMemoryResponseManager(_ResponseManager):
    """The async twin of :class:`MemoryResponseManager` (``async with``)."""

    async def __aenter__(self) -> AsyncMemoryStreamedResponse:
        call = await asyncio.to_thread(self._flow.before, self._kwargs)
        self._manager = self._method(**call.request)
        response = await self._manager.__aenter__()
        return AsyncMemoryStreamedResponse(response, self._edits(call, asynchronous=True))

    async def __aexit__(self, *exc: Any) -> None:
        if self._manager is not None:
            await self._manager.__aexit__(*exc)
