"""The core :class:`~..flow.MemoryFlow` translated to OpenAI's Responses API, with no I/O (as
:mod:`.flow` does for chat completions). Shared by the sync and async ``responses`` proxies, for
``create`` and ``parse``:

1. :meth:`ResponsesFlow.before`: the flow's prompt goes in a system message item just before the
   latest user message of ``input`` (a string ``input`` is that user message), or, with
   ``injection="user"``, at the start of it. ``instructions`` and every earlier item are sent as
   given, so the prompt's prefix stays byte-identical across turns.
2. The proxy calls the model with :attr:`~.flow.Call.request`.
3. :meth:`ResponsesFlow.after` (a whole response) or a :class:`ResponseEventEditor` (event by
   event): the block is cut from every output text, and the last output text's memories (or,
   in the background mode, the answer's text) go to the flow.

With ``previous_response_id`` (or ``conversation``) OpenAI keeps the earlier items, the injected
system items among them, and the model's answers as written, blocks included: an old block's
nonce is not the new one's, so it can plant nothing. The request then holds no earlier user
message to search a follow-up with, so the flow remembers the user message of each response
it saw (and of each conversation's latest turn), and passes it as the previous one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..engine import FOLLOW_UP_EARLIER_CHARS
from ..flow import AnswerStream, MemoryFlow
from ..prompts import MODEL_CALLS, field_value, outside_role
from .flow import Call, CompletionsFlow

OWN_ITEMS = frozenset(
    {
        None,  # a message given as {"role": ..., "content": ...}
        "message",
        "reasoning",
        "configuration_update",  # the application's new settings (reasoning effort, format)
        *MODEL_CALLS,  # the model's own calls: what it asked a tool to do, not what came back
    }
)
"""Input item types that hold only the words of the user, the application or the model. Every
other type carries text from elsewhere: a tool's output (``function_call_output``,
``program_output``, ``mcp_call``, a provider-run search's ``web_search_call``), descriptions
a server wrote (``mcp_list_tools``, ``tool_search_output``), earlier turns the request cannot
show (``compaction``, ``item_reference``), and any type added to the API later."""

FINAL_EVENTS = frozenset({"response.completed", "response.incomplete"})
"""Events carrying the final response of an answer that came to its end (``incomplete``: cut
short by ``max_output_tokens`` or a content filter, the model's answer as far as it went)."""

FAILED_EVENTS = frozenset({"error", "response.failed"})
"""Events of a stream that failed with the API's error: the call failed (see
:meth:`ResponseEventEditor.abandon`)."""

_REMEMBERED_TURNS = 256  # responses and conversations whose user message a flow remembers


def _is_user(item: Any) -> bool:
    return field_value(item, "role") == "user" and field_value(item, "type") in (None, "message")


def _is_tool_output(item: Any) -> bool:
    """The item carries text from outside the conversation (see :data:`OWN_ITEMS`), or is a
    message of a role that is not the user's, the application's or the model's
    (:func:`~..prompts.outside_role`)."""
    kind = field_value(item, "type")
    if not (isinstance(kind, str) or kind is None) or kind not in OWN_ITEMS:
        return True
    return outside_role(field_value(item, "role"))


def _output_texts(response: Any) -> list[Any]:
    """The ``output_text`` parts of a response's messages, in order."""
    return [
        part
        for item in field_value(response, "output") or []
        if field_value(item, "type") == "message"
        for part in field_value(item, "content") or []
        if field_value(part, "type") == "output_text" and isinstance(field_value(part, "text"), str)
    ]


def _continued(kwargs: Mapping[str, Any]) -> str | None:
    """The stored turns a request continues: its ``previous_response_id``, else its
    conversation's id."""
    previous = kwargs.get("previous_response_id")
    if isinstance(previous, str) and previous:
        return previous
    return _conversation_id(kwargs.get("conversation"))


def _conversation_id(conversation: Any) -> str | None:
    """A request's ``conversation``: its id (given as a string, or an object with an ``id``)."""
    found = conversation if isinstance(conversation, str) else field_value(conversation, "id")
    return found if isinstance(found, str) and found else None


class ResponsesFlow:
    """Memory around ``responses.create`` for one user, with the settings of the client's
    :class:`~.flow.CompletionsFlow` (its core flow and its ``injection``)."""

    named_events = True  # a stream's server-sent events are named by their type

    def __init__(self, completions: CompletionsFlow) -> None:
        self.completions = completions
        self.flow: MemoryFlow = completions.flow
        # a response's id, or a conversation's -> the user message of that turn (the latest)
        self._asked: OrderedDict[str, str] = OrderedDict()
        self._asked_lock = threading.Lock()

    def before(self, kwargs: Mapping[str, Any]) -> Call:
        """The request to send: never raises for memory's sake."""
        given = kwargs.get("input")
        items = [{"role": "user", "content": given}] if isinstance(given, str) else given
        earlier = None
        key = _continued(kwargs)
        if key is not None:
            with self._asked_lock:
                earlier = self._asked.get(key)
        return self.completions.start_call(
            kwargs,
            "input",
            items,
            _is_user,
            _is_tool_output,
            part_type="input_text",
            earlier=earlier,
        )

    def _remember_asked(self, call: Call, response: Any) -> None:
        """Note the turn's user message under the response's id and its conversation's, for
        a later call that continues either (see :func:`_continued`). A turn with no user
        message (a tool's output sent back) passes on the one it continues. A message too
        long to be searched with a follow-up is noted as "" (none), not kept."""
        asked = call.turn.user_text
        keys = [field_value(response, "id"), _conversation_id(call.request.get("conversation"))]
        with self._asked_lock:
            if not asked:
                continued = _continued(call.request)
                asked = self._asked.get(continued) if continued is not None else None
                if asked is None:
                    return
            asked = asked if len(asked) <= FOLLOW_UP_EARLIER_CHARS else ""
            for key in keys:
                if isinstance(key, str) and key:
                    self._asked[key] = asked
                    self._asked.move_to_end(key)
            while len(self._asked) > _REMEMBERED_TURNS:
                self._asked.popitem(last=False)

    def after(self, call: Call, response: Any) -> Any:
        """Cut the block from a whole response's output texts (edited in place); queue the
        memory work: the last output text holds the block, the answer is all of them."""
        try:
            parts = _output_texts(response)
        except Exception:
            parts = []
        try:
            self._remember_asked(call, response)
        except Exception:  # a follow-up next turn is searched alone
            self.flow.failed("inject_failures", "could not note a response's user message")
        turn = call.turn
        if not turn.nonce:
            self.flow.finish(turn, "".join(part.text for part in parts) or None)
            return response
        for part in parts[:-1]:
            part.text = self.flow.strip(turn, part.text)
        if parts:
            parts[-1].text = self.flow.finish(turn, parts[-1].text)
        else:
            self.flow.finish(turn, None)  # function calls only: no text, no block
        return response

    def strip(self, call: Call, response: Any) -> Any:
        """Cut the block from the output texts of a response already finished (another
        parsed form of the same answer); stores nothing."""
        for part in _output_texts(response):
            part.text = self.flow.strip(call.turn, part.text)
        return response

    def strip_json(self, call: Call, body: Any) -> Any:
        """Cut the block from the output texts of a response's JSON body (as decoded, edited
        in place; other shapes are returned as they are); stores nothing."""
        if isinstance(body, dict):
            for part in _output_texts(body):
                part["text"] = self.flow.strip(call.turn, part["text"])
        return body

    def editor(self, call: Call) -> ResponseEventEditor:
        return ResponseEventEditor(self, call)


class ResponseEventEditor:
    """Edits a streamed response event by event (for both sync and async streams).

    No event it returns contains any part of the memory block: each output text's deltas go
    through an :class:`~..flow.AnswerStream` (held back only where a tag may start), and the
    events that repeat the text (``output_text.done``, ``content_part.done``,
    ``output_item.done``, and the final ``response``) get it cut out. The memory work is queued
    once, from the final response (or, if the stream stops before it, from the text received).
    A stream that fails with the API's error (an ``error`` event, or ``response.failed``) is a
    call that failed: it is abandoned, nothing is queued or counted; the text held back so far
    is still shown, before the failure's event.
    """

    def __init__(self, flow: ResponsesFlow, call: Call) -> None:
        self._flow = flow
        self._call = call
        self._texts: dict[tuple[Any, Any], AnswerStream] = {}  # (item id, part index) -> text
        self._received: dict[tuple[Any, Any], list[str]] = {}
        self._last_delta: dict[tuple[Any, Any], Any] = {}
        self._done = False

    def edit(self, event: Any) -> list[Any]:
        """The events to show for ``event`` (edited in place)."""
        try:
            return self._edit(event)
        except Exception:
            self._flow.flow.failed("store_failures", "could not filter a streamed response event")
            return [event]

    def _edit(self, event: Any) -> list[Any]:
        kind = field_value(event, "type")
        turn = self._call.turn
        key = (field_value(event, "item_id"), field_value(event, "content_index"))
        if kind == "response.output_text.delta":
            text = self._texts.get(key)
            if text is None:
                text = self._texts[key] = self._flow.flow.stream(turn, remember=False)
            self._received.setdefault(key, []).append(event.delta)
            self._last_delta[key] = event
            event.delta = text.feed(event.delta)
            return [event] if event.delta else []
        if kind == "response.output_text.done":
            held = self._held_back(key)
            event.text = self._flow.flow.strip(turn, event.text)
            return [*held, event]
        if kind == "response.content_part.done":
            self._strip(event.part)
        elif kind == "response.output_item.done":
            for part in field_value(event.item, "content") or []:
                self._strip(part)
        elif kind in FAILED_EVENTS:
            self.abandon()
            # The text held back (the start of a code fence, of a tag) ends what was shown of
            # the answer; its streams remember nothing, so nothing is queued or counted
            held = [e for part in list(self._texts) for e in self._held_back(part)]
            if field_value(event, "response") is not None:
                self._flow.strip(self._call, event.response)  # what came of the answer
            return [*held, event]
        elif kind in FINAL_EVENTS and field_value(event, "response") is not None:
            held = [e for part in list(self._texts) for e in self._held_back(part)]
            if not self._done:
                self._done = True
                self._flow.after(self._call, event.response)
            return [*held, event]
        return [event]

    def _strip(self, part: Any) -> None:
        text = field_value(part, "text")
        if field_value(part, "type") == "output_text" and isinstance(text, str):
            part.text = self._flow.flow.strip(self._call.turn, text)

    def _held_back(self, key: tuple[Any, Any]) -> list[Any]:
        """A delta event carrying the text one output text still held back (none if none)."""
        text = self._texts.get(key)
        tail = text.finish() if text is not None else ""
        if not tail:
            return []
        event = self._last_delta[key].model_copy(deep=True)
        event.delta = tail
        return [event]

    def abandon(self) -> None:
        """The stream stopped before its end, or failed: unless its final response came, nothing
        is queued."""
        self._done = True

    def end(self) -> list[Any]:
        """The stream is over: if no final response came, queue the memory work from the text
        received, and show what was held back."""
        if self._done:
            return []
        self._done = True
        turn, flow = self._call.turn, self._flow.flow
        try:
            held = [e for part in list(self._texts) for e in self._held_back(part)]
            received = ["".join(pieces) for pieces in self._received.values()]
            if turn.nonce:
                flow.finish(turn, received[-1] if received else None)
            else:
                flow.finish(turn, "".join(received) or None)
            return held
        except Exception:
            flow.failed("store_failures", "could not finish a streamed response")
            return []
