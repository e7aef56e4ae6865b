"""The core :class:`~..flow.MemoryFlow` translated to OpenAI chat completions, with no I/O.

:class:`CompletionsFlow` is shared by the sync and async clients, by ``create``,
``with_raw_response.create`` and ``with_streaming_response.create``, and by both wrappers; only
the call to the model differs between them. For each request:

1. :meth:`CompletionsFlow.before`: the flow's prompt goes in a system message just before the
   latest user message (or, with ``injection="user"``, at the start of it). The caller's list and
   dicts are never changed, and the prompt's prefix stays byte-identical across turns, so
   provider prompt caching keeps working.
2. The wrapper calls the model with :attr:`Call.request`.
3. :meth:`CompletionsFlow.after` (a whole completion) or a :class:`StreamEditor` (chunk by chunk):
   the block is cut from every choice, and the first choice's memories (or, in the background
   mode, its text) go to the flow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..engine import MemoryStore
from ..flow import (
    AnswerStream,
    MemoryFlow,
    Turn,
    agent_observations,
    conversation_key,
    harness_request,
    holds_agent_text,
    insert_before,
    latest_index,
    user_words,
)
from ..prompts import (
    fetches_outside_text,
    field_value,
    inline_extraction_allowed,
    message_text,
    outside_role,
)

Injection = Literal["system", "user"]


@dataclass
class Call:
    """One request on its way through the flow: the flow's turn and the keyword arguments to
    send to the model."""

    turn: Turn
    request: dict[str, Any]


def _is_user(message: Any) -> bool:
    return isinstance(message, Mapping) and message.get("role") == "user"


def _is_tool_result(message: Any) -> bool:
    """A message of a role that is not the user's, the application's or the model's: a tool's
    or function's result, Llama's ``ipython`` tool output, any role not known
    (:func:`~..prompts.outside_role`)."""
    return outside_role(field_value(message, "role"))


def prepend(message: Mapping[str, Any], text: str, part_type: str = "text") -> dict[str, Any]:
    """A copy of a user message with ``text`` first (a part of ``part_type`` in a list)."""
    user = dict(message)
    content = user.get("content")
    if isinstance(content, list):
        user["content"] = [{"type": part_type, "text": text}, *content]
    else:
        user["content"] = f"{text}\n\n{content or ''}"
    return user


def text_parts(content: Any) -> list[dict[str, Any]] | None:
    """The text parts of a message's ``content`` given as a list of parts, as some
    OpenAI-compatible servers answer (a reasoning model's ``[{"type": "thinking", ...},
    {"type": "text", "text": ...}]``), in order; None when ``content`` is no list."""
    if not isinstance(content, list):
        return None
    return [
        part
        for part in content
        if isinstance(part, dict)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    ]


def filter_parts(answer: AnswerStream, parts: list[dict[str, Any]]) -> None:
    """Feed the texts of ``parts`` (:func:`text_parts`), in order, through one ``answer``, each
    part's text replaced by what it shows: a block split between two parts is cut whole."""
    for part in parts:
        part["text"] = answer.feed(part["text"])


def _filter_answer(answer: AnswerStream, parts: list[dict[str, Any]], tool_call: bool) -> None:
    """:func:`filter_parts` for all of an answer's text parts, then the text held back to its
    last part (``answer`` finished, ``tool_call`` as :meth:`AnswerStream.finish` takes it)."""
    filter_parts(answer, parts)
    tail = answer.finish(tool_call=tool_call)
    if parts:
        parts[-1]["text"] += tail


def _refused(message: Any) -> bool:
    """Whether a message or a streamed delta carries the model's ``refusal`` (its text is
    passed on as it is: it is no answer, never read for a memory block)."""
    refusal = getattr(message, "refusal", None)
    return isinstance(refusal, str) and refusal != ""


class CompletionsFlow:
    """Memory around ``chat.completions.create`` for one user.

    Args:
        flow: The core flow (the user's store, the job queue, inline or background).
        injection: ``"system"`` (default) puts the prompt in a system message just before the
            latest user message; ``"user"`` prepends it to that message, for chat templates
            that refuse a system message after the first turn.
    """

    named_events = False  # a stream's server-sent events are unnamed, then "[DONE]"

    def __init__(self, flow: MemoryFlow, injection: Injection = "system") -> None:
        if injection not in ("system", "user"):
            raise ValueError(f"injection must be 'system' or 'user', got {injection!r}")
        self.flow = flow
        self.injection = injection

    @property
    def memory(self) -> MemoryStore:
        return self.flow.memory

    def before(self, kwargs: Mapping[str, Any]) -> Call:
        """The request to send: never raises for memory's sake."""
        return self.start_call(
            kwargs, "messages", kwargs.get("messages"), _is_user, _is_tool_result
        )

    def start_call(
        self,
        kwargs: Mapping[str, Any],
        field: str,
        messages: Any,
        is_user: Callable[[Any], bool],
        is_tool_result: Callable[[Any], bool],
        part_type: str = "text",
        earlier: str | None = None,
    ) -> Call:
        """The request ``kwargs`` with the flow's prompt put by the latest of ``messages`` for
        which ``is_user`` holds, as ``kwargs[field]`` (chat ``messages``, or the Responses
        API's ``input`` items, whose text parts are of ``part_type``). The user message before
        it is searched with it (a follow-up); ``earlier`` stands for it when ``messages`` holds
        none (the provider keeps the earlier turns)."""
        call = Call(Turn(), dict(kwargs))
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            return call  # let the API report its own error
        texts = [message_text(message) for message in messages]
        said = [(field_value(message, "role"), text) for message, text in zip(messages, texts)]
        if harness_request(said):
            return call
        observations = agent_observations(said)
        users = [is_user(m) and i not in observations for i, m in enumerate(messages)]
        index = latest_index(users, bool)
        if index is None:
            return call
        model = kwargs.get("model")
        previous = latest_index(users[:index], bool)
        later_step = any(i > index for i in observations) or any(
            is_tool_result(message) for message in messages[index + 1 :]
        )
        call.turn = self.flow.start(
            user_words(texts[index]),
            previous_text=earlier if previous is None else user_words(texts[previous]),
            instruct=inline_extraction_allowed(kwargs),
            model=model if isinstance(model, str) else None,
            untrusted=bool(observations)
            or fetches_outside_text(kwargs)
            or any(is_tool_result(message) for message in messages)
            or any(holds_agent_text(text) for text, user in zip(texts, users) if user),
            tool_loop_step=later_step,
            later_step=later_step,
            conversation=conversation_key(said[:index]),
        )
        prompt = call.turn.prompt
        if prompt:
            if self.injection == "system":
                system = {"role": "system", "content": prompt}
                call.request[field] = insert_before(messages, index, system)
            else:
                user = prepend(messages[index], prompt, part_type)
                call.request[field] = [*messages[:index], user, *messages[index + 1 :]]
        return call

    def after(self, call: Call, completion: Any) -> Any:
        """Strip the memory block from every choice of a whole completion; queue the work."""
        try:
            choices = list(getattr(completion, "choices", None) or [])
        except Exception:
            choices = []
        first = True
        for choice in sorted(choices, key=lambda c: getattr(c, "index", 0)):
            message = getattr(choice, "message", None)
            if message is None:
                continue
            if getattr(choice, "index", 0) == 0 and first:
                # a refusal, like a tool call, has no block to miss when it comes with no text
                without_text = bool(getattr(message, "tool_calls", None)) or _refused(message)
                message.content = self._finished(call.turn, message.content, without_text)
                first = False
            else:
                message.content = self._stripped(call.turn, message.content)
        return completion

    def _finished(self, turn: Turn, content: Any, tool_call: bool) -> Any:
        """A whole answer's ``content`` without its block (:meth:`MemoryFlow.finish`): a text,
        or a list of parts (:func:`text_parts`), all of whose text parts, joined, are the
        answer, read as a stream of them is (:func:`filter_parts`)."""
        parts = text_parts(content)
        if parts is None:
            return self.flow.finish(turn, content, tool_call=tool_call)
        if not turn.nonce:
            self.flow.finish(turn, "".join(p["text"] for p in parts) or None, tool_call=tool_call)
        elif parts:
            _filter_answer(self.flow.stream(turn), parts, tool_call)
        else:
            self.flow.finish(turn, None, tool_call=tool_call)  # no text: no block
        return content

    def _stripped(self, turn: Turn, content: Any) -> Any:
        """``content`` (a text or a list of parts) without a block, storing nothing."""
        parts = text_parts(content)
        if parts:
            _filter_answer(self.flow.stream(turn, remember=False), parts, tool_call=False)
        return self.flow.strip(turn, content) if isinstance(content, str) else content

    def strip(self, call: Call, completion: Any) -> Any:
        """Cut the block from every choice of a completion already finished (another parsed
        form of the same answer); stores nothing."""
        for choice in getattr(completion, "choices", None) or []:
            message = getattr(choice, "message", None)
            if message is not None:
                message.content = self._stripped(call.turn, message.content)
        return completion

    def strip_json(self, call: Call, body: Any) -> Any:
        """Cut the block from every choice of a completion's JSON body (as decoded, edited in
        place; other shapes are returned as they are); stores nothing."""
        choices = body.get("choices") if isinstance(body, dict) else None
        for choice in choices if isinstance(choices, list) else []:
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and "content" in message:
                message["content"] = self._stripped(call.turn, message["content"])
        return body

    def editor(self, call: Call) -> StreamEditor:
        return StreamEditor(self.flow, call.turn)


class StreamEditor:
    """Edits a streamed completion chunk by chunk (for both sync and async streams).

    No chunk it returns contains any part of the memory block: each choice's content goes
    through an :class:`~..flow.AnswerStream`, which holds back only a possible tag prefix.
    Chunks left with nothing to say are dropped; tool-call and refusal deltas, finish reasons,
    usage chunks and other choices pass through as they are.
    """

    def __init__(self, flow: MemoryFlow, turn: Turn) -> None:
        self._flow = flow
        self._turn = turn
        self._answers: dict[int, AnswerStream] = {}
        self._tool_calls: set[int] = set()  # the choices that call a tool
        self._refused: set[int] = set()  # the choices that refuse (OpenAI's ``refusal``)
        self._last_chunk: Any = None
        self._done = False

    def _answer(self, index: int) -> AnswerStream:
        answer = self._answers.get(index)
        if answer is None:
            answer = self._answers[index] = self._flow.stream(self._turn, remember=index == 0)
        return answer

    def edit(self, chunk: Any) -> list[Any]:
        """The chunk to show (edited in place), or none when nothing is left of it."""
        try:
            self._last_chunk = chunk
            keep = getattr(chunk, "usage", None) is not None or not getattr(chunk, "choices", None)
            for choice in chunk.choices:
                keep = self._edit_choice(choice) or keep
            return [chunk] if keep else []
        except Exception:
            self._flow.failed("store_failures", "could not filter a streamed chunk")
            return [chunk]

    def _edit_choice(self, choice: Any) -> bool:
        delta = choice.delta
        content = getattr(delta, "content", None)
        parts = text_parts(content)
        had_content = (isinstance(content, str) and content != "") or bool(parts)
        if isinstance(content, str):
            delta.content = self._answer(choice.index).feed(content)
        if parts is not None and isinstance(content, list):
            filter_parts(self._answer(choice.index), parts)
            emptied = {id(part) for part in parts if not part["text"]}  # held back, or cut
            delta.content = [part for part in content if id(part) not in emptied] or None
        if getattr(delta, "tool_calls", None):
            self._tool_calls.add(choice.index)
        if _refused(delta):
            self._refused.add(choice.index)
        if choice.finish_reason is not None and choice.index in self._answers:
            tail = self._finish(choice.index)
            if tail and isinstance(delta.content, list):
                delta.content.append({"type": "text", "text": tail})
            elif tail:
                delta.content = (delta.content or "") + tail
        other = (
            getattr(delta, "role", None),
            getattr(delta, "tool_calls", None),
            getattr(delta, "function_call", None),
            getattr(delta, "refusal", None),
            choice.finish_reason,
            getattr(choice, "logprobs", None),
        )
        return bool(delta.content) or any(v is not None for v in other) or not had_content

    def _finish(self, index: int) -> str:
        # a refusal with no text has no block to miss, as a bare tool call (and as a whole
        # refused answer, whose content is null)
        without_text = index in self._tool_calls or index in self._refused
        return self._answers[index].finish(tool_call=without_text)

    def abandon(self) -> None:
        """The stream stopped before its end: the answers that did not finish queue nothing."""
        self._done = True

    def end(self) -> list[Any]:
        """The stream is over: queue the memory work; return a last chunk carrying text that
        was still held back (only when the stream ended without a finish reason), if any."""
        if self._done:
            return []
        self._done = True
        try:
            if not self._turn.nonce:
                self._answer(0)  # a turn with no text is still extracted (the user's message)
            tails = {index: self._finish(index) for index in sorted(self._answers)}
            tails = {i: t for i, t in tails.items() if t}
            if not tails or self._last_chunk is None or not self._last_chunk.choices:
                return []
            chunk = self._last_chunk.model_copy(deep=True)
            template = chunk.choices[0]
            chunk.choices = []
            for index, tail in tails.items():
                choice = template.model_copy(deep=True)
                choice.index, choice.finish_reason = index, None
                choice.delta.content, choice.delta.tool_calls, choice.delta.role = tail, None, None
                chunk.choices.append(choice)
            chunk.usage = None
            return [chunk]
        except Exception:
            self._flow.failed("store_failures", "could not finish a streamed answer")
            return []
