"""Thin proxies that put a :class:`CompletionsFlow` around every way of sending a chat
completion request through ``chat.completions``, and a :class:`ResponsesFlow` around every way of
sending one through ``responses``.

Covered, sync and async: ``create`` and ``parse`` of ``chat.completions`` (and of
``beta.chat.completions``, through the same flow) and of ``responses``, plain and
``stream=True``, directly, through ``with_raw_response`` and through
``with_streaming_response`` (also reached as ``client.with_raw_response.chat.completions`` and
``client.with_raw_response.responses``), and openai's ``stream`` helpers. The parts that send
messages to a model without memory (the beta Assistants and Realtime APIs, legacy completions)
still work and log a warning once (see :mod:`.unwrapped`). Everything else (``models``,
``embeddings``, ``files``, ``responses.retrieve``, ...) is the wrapped client's own, untouched.
Sync and async proxies differ only in how they call the model; the logic is the flows'."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from ..display import client_html
from ..engine import MemoryStore
from ..flow import finished_in_thread
from ..redaction import logger_without_secrets
from .flow import CompletionsFlow
from .responses import (
    AsyncMemoryResponseManager,
    MemoryRawResponse,
    MemoryResponseManager,
    ResponseEdits,
)
from .responses_flow import ResponsesFlow
from .streams import AsyncMemoryStream, MemoryStream, _Passthrough
from .unwrapped import Unwrapped, UnwrappedCalls, warning_first

__all__ = ["TWIN_SETTINGS", "AsyncMemoryStream", "MemoryClient", "MemoryStream"]

log = logger_without_secrets("headroom_memory_integrations.openai")
_NOT_COMPLETIONS = ("create", "parse", "stream")
_NOT_COVERED = ("connect",)
"""Methods of ``responses`` that reach the model without memory (``responses.connect``, a
WebSocket session): they work, after a warning (see :mod:`.unwrapped`)."""
TWIN_SETTINGS = ("api_key", "organization", "project", "base_url", "timeout", "max_retries")
"""The settings a synchronous twin of an async client (``sync_twin``: for background
extraction or OpenAI embeddings) is made with. Assigned on the memory client whose twins they
are (``aclient.api_key = ...``, a key rotation), they are set on its twins too, so the
background work goes where the calls go, as whom."""
CLOSE_FLUSH_SECONDS = 5.0
"""How long closing a memory client waits for its user's memories to be stored (what is left
stays queued for the next process, as at exit)."""


def _whole_client_error(name: str) -> AttributeError:
    return AttributeError(
        f"a memory client has no {name!r}: it wraps the whole OpenAI client, not "
        f"chat.completions. Call client.chat.completions.{name}(...). For LangChain: "
        "ChatOpenAI(client=client.chat.completions, root_client=client, "
        "async_client=aclient.chat.completions, root_async_client=aclient), with "
        "aclient = with_fast_memory(AsyncOpenAI(...), memory=client.memory)"
    )


class _Calls(_Passthrough):
    """``chat.completions`` or ``responses`` of a sync client, with memory through ``flow``:
    ``create`` and ``parse`` (plain and ``stream=True``), directly, through ``with_raw_response``
    and ``with_streaming_response``, and openai's ``stream`` helper. Everything else
    (``responses.retrieve``, ``input_items``, ...) is the client's own."""

    def __init__(
        self,
        wrapped: Any,
        flow: CompletionsFlow | ResponsesFlow,
        unwrapped: UnwrappedCalls | None = None,
        client: MemoryClient | None = None,
    ) -> None:
        super().__init__(wrapped)
        self._flow = flow
        self._unwrapped = unwrapped
        if client is not None:
            # openai <1.92's beta.chat.completions.stream sends its request through
            # self._client.chat.completions.create: the memory client's, then
            self._client = client

    def _forward(self, name: str) -> Any:
        value = getattr(self._wrapped, name)
        if self._unwrapped is not None and name in _NOT_COVERED and callable(value):
            api = f"responses.{name}"
            return warning_first(value, self._unwrapped, api=api, path=api)
        return value

    def create(self, **kwargs: Any) -> Any:
        """``create`` with memory; same arguments, same result types."""
        return self._call(self._wrapped.create, kwargs)

    def parse(self, **kwargs: Any) -> Any:
        """``parse`` (structured outputs) with memory: memories are injected; a structured
        format leaves out the extraction instruction."""
        return self._call(self._wrapped.parse, kwargs)

    def _call(self, method: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
        call = self._flow.before(kwargs)
        result = method(**call.request)
        if kwargs.get("stream"):
            return MemoryStream(result, self._flow.editor(call))
        return self._flow.after(call, result)

    def stream(self, **kwargs: Any) -> Any:
        """openai's ``stream`` helper with memory: openai's own helper, with this proxy as its
        resource, so its request goes through :meth:`create` and everything it accumulates
        (each event's snapshot, the final answer) is built from the filtered stream."""
        return type(self._wrapped).stream(self, **kwargs)

    @property
    def with_raw_response(self) -> _RawCalls:
        return _RawCalls(self._wrapped.with_raw_response, self._flow)

    @property
    def with_streaming_response(self) -> _StreamingCalls:
        return _StreamingCalls(self._wrapped.with_streaming_response, self._flow)


class _AsyncCalls(_Calls):
    """:class:`_Calls` of an async client: the memory work before and after the model call
    (searching; queueing what the answer left, a write to the job queue file) runs off the
    event loop, in a thread (openai's async ``stream`` helper calls the async ``create``)."""

    async def create(self, **kwargs: Any) -> Any:
        """``await create(...)`` with memory; same arguments and results."""
        return await self._call_async(self._wrapped.create, kwargs)

    async def parse(self, **kwargs: Any) -> Any:
        """``await parse(...)`` with memory (see the sync ``parse``)."""
        return await self._call_async(self._wrapped.parse, kwargs)

    async def _call_async(self, method: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
        call = await asyncio.to_thread(self._flow.before, kwargs)
        result = await method(**call.request)
        if kwargs.get("stream"):
            return AsyncMemoryStream(result, self._flow.editor(call))
        return await finished_in_thread(self._flow.after, call, result)

    @property
    def with_raw_response(self) -> _RawCalls:
        return _AsyncRawCalls(self._wrapped.with_raw_response, self._flow)

    @property
    def with_streaming_response(self) -> _StreamingCalls:
        return _AsyncStreamingCalls(self._wrapped.with_streaming_response, self._flow)


class _RawCalls(_Passthrough):
    """``with_raw_response`` of a sync client's ``chat.completions`` or ``responses``."""

    def __init__(self, completions: Any, flow: CompletionsFlow | ResponsesFlow) -> None:
        super().__init__(completions)
        self._flow = flow

    def create(self, **kwargs: Any) -> Any:
        return self._call(self._wrapped.create, kwargs)

    def parse(self, **kwargs: Any) -> Any:
        return self._call(self._wrapped.parse, kwargs)

    def _call(self, method: Callable[..., Any], kwargs: Mapping[str, Any]) -> MemoryRawResponse:
        call = self._flow.before(kwargs)
        edits = ResponseEdits(
            self._flow, call, streamed=bool(kwargs.get("stream")), asynchronous=False
        )
        return MemoryRawResponse(method(**call.request), edits)


class _AsyncRawCalls(_RawCalls):
    """``with_raw_response`` of an async client's ``chat.completions`` or ``responses``: the
    memory work of a whole answer is done before the call returns, in a thread (openai's
    ``parse()`` of it is synchronous, so it would do it on the event loop)."""

    async def create(self, **kwargs: Any) -> Any:
        return await self._call_async(self._wrapped.create, kwargs)

    async def parse(self, **kwargs: Any) -> Any:
        return await self._call_async(self._wrapped.parse, kwargs)

    async def _call_async(
        self, method: Callable[..., Any], kwargs: Mapping[str, Any]
    ) -> MemoryRawResponse:
        call = await asyncio.to_thread(self._flow.before, kwargs)
        edits = ResponseEdits(
            self._flow, call, streamed=bool(kwargs.get("stream")), asynchronous=True
        )
        raw = MemoryRawResponse(await method(**call.request), edits)
        if not edits.streamed:
            await finished_in_thread(raw.finish)
        return raw


class _StreamingCalls(_Passthrough):
    """``with_streaming_response`` of a sync client's ``chat.completions`` or ``responses``."""

    def __init__(self, completions: Any, flow: CompletionsFlow | ResponsesFlow) -> None:
        super().__init__(completions)
        self._flow = flow

    def create(self, **kwargs: Any) -> Any:
        return MemoryResponseManager(self._wrapped.create, self._flow, kwargs)

    def parse(self, **kwargs: Any) -> Any:
        return MemoryResponseManager(self._wrapped.parse, self._flow, kwargs)


class _AsyncStreamingCalls(_StreamingCalls):
    """``with_streaming_response`` of an async client's ``chat.completions`` or
    ``responses``."""

    def create(self, **kwargs: Any) -> Any:
        return AsyncMemoryResponseManager(self._wrapped.create, self._flow, kwargs)

    def parse(self, **kwargs: Any) -> Any:
        return AsyncMemoryResponseManager(self._wrapped.parse, self._flow, kwargs)


class _Chat(_Passthrough):
    """``chat`` of a memory client: ``completions`` is the memory one, also through
    ``chat.with_raw_response`` and ``chat.with_streaming_response``."""

    _OWN = frozenset({"completions"})

    def __init__(self, chat: Any, completions: Any) -> None:
        super().__init__(chat)
        self.completions = completions

    @property
    def with_raw_response(self) -> _Chat:
        return _Chat(self._wrapped.with_raw_response, self.completions.with_raw_response)

    @property
    def with_streaming_response(self) -> _Chat:
        return _Chat(
            self._wrapped.with_streaming_response, self.completions.with_streaming_response
        )


class _Beta(Unwrapped):
    """``client.beta`` of a memory client: ``beta.chat.completions`` (whose ``stream``
    LangChain's structured output uses) has memory, through the same flow as
    ``chat.completions``; the other beta APIs (Assistants threads, Realtime, ...) reach the
    model without memory and warn, as any unwrapped part does."""

    _OWN = frozenset({"chat"})

    def __init__(self, beta: Any, chat: _Chat, unwrapped: UnwrappedCalls) -> None:
        super().__init__(beta, unwrapped, api="beta", path="beta")
        self.chat = chat

    def __repr__(self) -> str:
        return "<beta of a memory client: beta.chat.completions has memory, the rest has not>"


class _ClientView(_Passthrough):
    """``client.with_raw_response`` / ``client.with_streaming_response`` of a memory client:
    ``.chat.completions`` and ``.responses`` are the memory ones; unwrapped APIs warn."""

    _OWN = frozenset({"chat"})

    def __init__(self, client: MemoryClient, name: str) -> None:
        view = getattr(client._wrapped, name)
        super().__init__(view)
        self.chat = _Chat(view.chat, getattr(client.chat.completions, name))
        self._client = client
        self._unwrapped = client._unwrapped
        self._name = name

    @property
    def responses(self) -> _RawCalls | _StreamingCalls:
        views: _RawCalls | _StreamingCalls = getattr(self._client.responses, self._name)
        return views

    def _forward(self, name: str) -> Any:
        if name in _NOT_COMPLETIONS:
            raise _whole_client_error(f"{self._name}.{name}")
        return self._unwrapped.guard(name, getattr(self._wrapped, name), f"{self._name}.")


class MemoryClient(_Passthrough):
    """An OpenAI-compatible client with memory. Use it as the client it wraps.

    Assigning a setting (``client.api_key = ...``, ``base_url``, ``timeout``, ``max_retries``,
    ...: any public attribute of the wrapped client) sets it on the wrapped client, so the next
    request uses it, as on a plain client, and so does a ``with_options()`` copy made after.
    On the client the wrapper was made for, the :data:`TWIN_SETTINGS` go to its synchronous
    twins too (an async client's background work); a copy's assignments are its own, as a
    plain client's copy's are.

    Attributes:
        memory: The user's :class:`MemoryStore` (search, add, get_all, clear, stats, flush, ...).
    """

    _OWN = frozenset({"chat"})

    def __init__(
        self,
        client: Any,
        flow: CompletionsFlow,
        *,
        asynchronous: bool,
        unwrapped: UnwrappedCalls | None = None,
        owned: tuple[Any, ...] = (),
        responses_flow: ResponsesFlow | None = None,
        twins_follow: bool = True,
    ) -> None:
        super().__init__(client)
        self._flow = flow
        # shared with the copies with_options makes: they continue the same stored turns
        self._responses_flow = responses_flow or ResponsesFlow(flow)
        self._asynchronous = asynchronous
        self._owned = owned  # synchronous twins made for an async client's background work
        self._twins_follow = twins_follow  # made from this client: its settings go to them
        self._unwrapped = unwrapped or UnwrappedCalls(flow.memory.user_id)
        self._calls_type = _AsyncCalls if asynchronous else _Calls
        self.chat = _Chat(client.chat, self._calls_type(client.chat.completions, flow))
        self._responses: _Calls | None = None

    def _forward(self, name: str) -> Any:
        if name in _NOT_COMPLETIONS:
            raise _whole_client_error(name)
        return self._unwrapped.guard(name, getattr(self._wrapped, name))

    def _assign(self, name: str, value: Any) -> None:
        setattr(self._wrapped, name, value)
        if self._twins_follow and name in TWIN_SETTINGS:
            for twin in self._owned:
                setattr(twin, name, value)

    @property
    def memory(self) -> MemoryStore:
        return self._flow.memory

    @property
    def beta(self) -> Any:
        """The client's ``beta``: ``beta.chat.completions`` has memory, the rest warns.

        Its calls go to the wrapped client's own ``beta.chat.completions``: up to openai 1.91
        only that one has ``parse`` and ``stream``, and its ``stream`` sends the request
        through ``chat.completions.create`` of its client, this memory client here."""
        beta = self._wrapped.beta
        if not hasattr(beta, "chat"):
            return self._unwrapped.guard("beta", beta)
        completions = self._calls_type(beta.chat.completions, self._flow, client=self)
        return _Beta(beta, _Chat(beta.chat, completions), self._unwrapped)

    @property
    def responses(self) -> _Calls:
        """The Responses API with memory (made on first use: openai imports it lazily, and the
        import costs ~50-90 ms)."""
        if self._responses is None:
            responses = self._calls_type(
                self._wrapped.responses, self._responses_flow, self._unwrapped
            )
            self._responses = responses
            return responses
        return self._responses

    @property
    def with_raw_response(self) -> _ClientView:
        """The client's ``with_raw_response``; ``.chat.completions`` and ``.responses`` have
        memory."""
        return _ClientView(self, "with_raw_response")

    @property
    def with_streaming_response(self) -> _ClientView:
        """The client's ``with_streaming_response``; ``.chat.completions`` and ``.responses``
        have memory."""
        return _ClientView(self, "with_streaming_response")

    def with_options(self, **options: Any) -> MemoryClient:
        """The wrapped client's ``with_options``, keeping the memory."""
        return MemoryClient(
            self._wrapped.with_options(**options),
            self._flow,
            asynchronous=self._asynchronous,
            unwrapped=self._unwrapped,
            owned=self._owned,
            responses_flow=self._responses_flow,
            twins_follow=False,  # the twins were made from this client's settings
        )

    def close(self) -> Any:
        """Wait (up to :data:`CLOSE_FLUSH_SECONDS`) until what this user's calls left to
        store is stored, then close the wrapped client and any synchronous twin made for an
        async client's background work. Await it for an async client. ``with`` (``async
        with``) does the same on leaving the block. Memory never keeps the client open nor
        makes this raise: a failure of the memory layer while waiting (an unwritable folder, a
        server down) is logged and counted in ``memory.stats()["events"]["flush_failures"]``,
        and the client is closed all the same; what was not stored stays queued."""
        if self._asynchronous:
            return self._close_async()
        try:  # flush never raises for memory's sake: it logs, counts and returns False
            self.memory.flush(CLOSE_FLUSH_SECONDS)
        finally:
            try:
                self._wrapped.close()
            finally:
                self._close_owned()
        return None

    async def _close_async(self) -> None:
        try:
            await asyncio.to_thread(self.memory.flush, CLOSE_FLUSH_SECONDS)
        except Exception:  # e.g. no thread to wait in (the interpreter is shutting down)
            self.memory.survived(
                "flush_failures",
                "could not wait for the background writes while closing; they stay queued",
            )
        finally:
            try:
                await self._wrapped.close()
            finally:
                self._close_owned()

    def _close_owned(self) -> None:
        for twin in self._owned:
            twin.close()

    def __enter__(self) -> MemoryClient:
        if self._asynchronous:
            raise TypeError("an async memory client is used with 'async with'")
        self._wrapped.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> MemoryClient:
        if not self._asynchronous:
            raise TypeError("a synchronous memory client is used with 'with'")
        await self._wrapped.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close_async()

    copy = with_options

    def __repr__(self) -> str:  # never the wrapped client's repr: it could show an API key
        kind = "with_fast_memory" if self._flow.flow.inline else "with_memory"
        return f"{kind}({type(self._wrapped).__name__}, user_id={self.memory.user_id!r})"

    def _repr_html_(self) -> str:  # the same facts as the repr, plus the store's settings
        kind = "with_fast_memory" if self._flow.flow.inline else "with_memory"
        return client_html(kind, type(self._wrapped).__name__, self.memory)
