"""What LlamaIndex's instrumentation shows of a :class:`~.llm.MemoryLLM` call.

The wrapped LLM emits its own events (``LLMChatEndEvent``, ``LLMChatInProgressEvent``,
``LLMCompletionEndEvent``, ...) with the answer as the model wrote it, memory block included,
before ``MemoryLLM`` gets the answer back. LlamaIndex's dispatcher hands one event object to
every handler in turn, so one handler placed first can edit it for all the others. That is
:data:`_EDITOR`: first on the root dispatcher and on the dispatcher of LlamaIndex's LLM
callbacks (where the wrapped LLM's events start), it does nothing but during a ``MemoryLLM``
call (a context variable set around each step of the wrapped LLM), when it hands the event to
that call's :class:`EventView`, which swaps the answer for the one the caller gets.
:data:`_CALLBACK_EDITOR` does the same, first among the wrapped LLM's ``CallbackManager``
handlers (LlamaIndex's older callbacks).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

from llama_index.core.callbacks import CallbackManager, CBEventType
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent

from ..flow import aclose_quietly, close_quietly
from ..redaction import logger_without_secrets

T = TypeVar("T")
log = logger_without_secrets("headroom_memory_integrations")

LLM_EVENTS_DISPATCHER = "llama_index.core.llms.callbacks"
"""The dispatcher of ``llm_chat_callback`` / ``llm_completion_callback``, through which
LlamaIndex's LLMs emit their events."""


class EventView(Protocol):
    def show(self, event: BaseEvent) -> None:
        """Edit ``event`` (one of the wrapped LLM's) in place to show what the caller gets."""

    def show_payload(self, payload: dict[str, Any]) -> None:
        """The same for the payload of a ``CallbackManager``'s LLM event end."""


_VIEW: ContextVar[EventView | None] = ContextVar("headroom_llama_index_event_view", default=None)


class _EventEditor(BaseEventHandler):
    """Hands the events emitted during a ``MemoryLLM`` call to that call's view."""

    @classmethod
    def class_name(cls) -> str:
        return "HeadroomMemoryEventEditor"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        view = _VIEW.get()
        if view is not None:
            try:
                view.show(event)
            except Exception:  # never fail the call (the dispatcher would hide it anyway)
                log.warning("could not cut the memory block from an LLM event", exc_info=True)


_EDITOR = _EventEditor()


class _CallbackEditor(BaseCallbackHandler):
    """The same for LlamaIndex's older callbacks: a ``CallbackManager`` hands one payload dict
    to its handlers in turn, and gives its LLM's answer before any event is dispatched."""

    def __init__(self) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])

    def on_event_start(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        parent_id: str = "",
        **kwargs: Any,
    ) -> str:
        return event_id

    def on_event_end(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        **kwargs: Any,
    ) -> None:
        view = _VIEW.get()
        if view is not None and payload is not None and event_type == CBEventType.LLM:
            try:
                view.show_payload(payload)
            except Exception:  # a CallbackManager does not catch: never fail the call
                log.warning("could not cut the memory block from an LLM callback", exc_info=True)

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(
        self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None
    ) -> None:
        return None


_CALLBACK_EDITOR = _CallbackEditor()


def _first(handlers: list[Any], editor: Any) -> None:
    """Put ``editor`` first in ``handlers`` (again, if an application replaced them)."""
    if handlers and handlers[0] is editor:
        return
    for index in range(len(handlers) - 1, -1, -1):
        if handlers[index] is editor:
            del handlers[index]
    handlers.insert(0, editor)


@contextmanager
def viewed(view: EventView, callbacks: CallbackManager | None) -> Generator[None, None, None]:
    """Events emitted inside (on LlamaIndex's dispatchers, and through ``callbacks``, the
    wrapped LLM's ``CallbackManager``) are shown through ``view``."""
    for name in (LLM_EVENTS_DISPATCHER, "root"):
        _first(get_dispatcher(name).event_handlers, _EDITOR)
    if isinstance(callbacks, CallbackManager):
        _first(callbacks.handlers, _CALLBACK_EDITOR)
    token = _VIEW.set(view)
    try:
        yield
    finally:
        _VIEW.reset(token)


_DONE: Any = object()


def stepped(
    items: Iterator[T], scope: Callable[[], AbstractContextManager[Any]]
) -> Generator[T, None, None]:
    """``items``, each produced inside a fresh ``scope()`` (never held across a ``yield``: the
    caller's own code between two items stays out of it). Left early, it closes ``items``."""
    ended = False
    try:
        while True:
            with scope():
                item = next(items, _DONE)
            if item is _DONE:
                ended = True
                return
            yield item
    finally:
        if not ended:
            close_quietly(items)


async def astepped(
    items: AsyncIterator[T], scope: Callable[[], AbstractContextManager[Any]]
) -> AsyncGenerator[T, None]:
    """The async form of :func:`stepped`."""
    ended = False
    try:
        while True:
            with scope():
                item = await anext(items, _DONE)
            if item is _DONE:
                ended = True
                return
            yield item
    finally:
        if not ended:
            await aclose_quietly(items)
