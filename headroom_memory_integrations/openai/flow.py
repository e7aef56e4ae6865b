"""What happens around one chat completion, with no I/O of its own.

:class:`MemoryFlow` is shared by the sync and async clients and by both wrappers; only the call to
the model differs between them. For each request:

1. :meth:`MemoryFlow.before`: search the user's memories with the latest user message, and put
   the injected context (and, inline, the extraction instruction with a fresh nonce) in a system
   message just before that user message. The caller's list and dicts are never changed, and the
   prompt's prefix stays byte-identical across turns, so provider prompt caching keeps working.
2. The wrapper calls the model with :attr:`Turn.request`.
3. :meth:`MemoryFlow.after` (a whole completion) or a :class:`StreamEditor` (chunk by chunk):
   inline, the memory block is cut from every choice and the first choice's memories are queued
   for storing; in the background mode, the turn is queued for a separate extraction call.

Memory never fails a chat call: any error here is logged, counted in ``memory.stats()``, and the
request goes on without memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..engine import MAX_TEXT_CHARS, MemoryStore
from ..jobs import user_tag
from ..prompts import (
    ExtractedMemory,
    MemoryStreamFilter,
    extraction_instruction,
    format_memory_context,
    inline_extraction_allowed,
    message_text,
    new_nonce,
    parse_memory_block,
    short_ids,
)

log = logging.getLogger("headroom_memory_integrations.openai")

Injection = Literal["system", "user"]


class MemoryJobs(Protocol):
    """Where a flow sends work that must not hold up the caller (see :mod:`.writer`)."""

    def store(self, memory: MemoryStore, memories: Sequence[Mapping[str, Any]]) -> None: ...

    def extract(
        self,
        memory: MemoryStore,
        exchange: Sequence[Mapping[str, str]],
        injected: Mapping[str, str],
        model: str | None,
    ) -> None: ...


@dataclass
class Turn:
    """One request on its way through the flow.

    Attributes:
        request: The keyword arguments to send to the model.
        nonce: The memory block's nonce, when the inline instruction was added.
        injected: Short id shown to the model -> id of the injected memory.
        user_text: The latest user message, for background extraction.
    """

    request: dict[str, Any]
    nonce: str | None = None
    injected: dict[str, str] = field(default_factory=dict)
    user_text: str | None = None


def latest_user_message(messages: Sequence[Any]) -> int | None:
    """Index of the last message with role ``user``, or None."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if isinstance(message, Mapping) and message.get("role") == "user":
            return index
    return None


def _inject(messages: list[Any], index: int, text: str, injection: Injection) -> list[Any]:
    if injection == "system":
        return [*messages[:index], {"role": "system", "content": text}, *messages[index:]]
    user = dict(messages[index])
    content = user.get("content")
    if isinstance(content, list):
        user["content"] = [{"type": "text", "text": text}, *content]
    else:
        user["content"] = f"{text}\n\n{content or ''}"
    return [*messages[:index], user, *messages[index + 1 :]]


class MemoryFlow:
    """Memory around chat completions for one user.

    Args:
        memory: The user's store.
        jobs: Where storing and extraction work goes.
        inline: True for ``with_fast_memory`` (the model writes the memory block), False for
            ``with_memory`` (a separate extraction call; responses untouched).
        top_k: Memories injected at most.
        injection: ``"system"`` (default) puts the context in a system message just before the
            latest user message; ``"user"`` prepends it to that message, for chat templates
            that refuse a system message after the first turn.
    """

    def __init__(
        self,
        memory: MemoryStore,
        jobs: MemoryJobs,
        *,
        inline: bool,
        top_k: int = 5,
        injection: Injection = "system",
    ) -> None:
        if injection not in ("system", "user"):
            raise ValueError(f"injection must be 'system' or 'user', got {injection!r}")
        self.memory = memory
        self.jobs = jobs
        self.inline = inline
        self.top_k = top_k
        self.injection = injection

    def before(self, kwargs: Mapping[str, Any]) -> Turn:
        """Build the request to send: never raises for memory's sake."""
        try:
            return self._prepare(kwargs)
        except Exception:
            self._failed("inject_failures", "could not prepare memories; calling without them")
            return Turn(request=dict(kwargs))

    def _prepare(self, kwargs: Mapping[str, Any]) -> Turn:
        turn = Turn(request=dict(kwargs))
        messages = kwargs.get("messages")
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            return turn  # let the API report its own error
        index = latest_user_message(messages)
        if index is None:
            return turn
        turn.user_text = message_text(messages[index]).strip() or None
        parts = []
        if turn.user_text:
            context = self._recall(turn, turn.user_text)
            parts += [context] if context else []
        if self.inline and inline_extraction_allowed(kwargs):
            turn.nonce = new_nonce()
            parts.append(extraction_instruction(turn.nonce, allow_replace=bool(turn.injected)))
        if parts:
            injected = _inject(list(messages), index, "\n\n".join(parts), self.injection)
            turn.request["messages"] = injected
        return turn

    def _recall(self, turn: Turn, query: str) -> str:
        """The context block of the memories relevant to ``query`` ("" if none or on failure)."""
        try:
            found = self.memory.search(query[-MAX_TEXT_CHARS:], top_k=self.top_k)
        except Exception:
            self._failed("inject_failures", "could not search memories; answering without them")
            return ""
        labelled = [(label, memory) for label, (memory, _) in zip(short_ids(len(found)), found)]
        turn.injected = {label: memory.id for label, memory in labelled}
        return format_memory_context(labelled)

    def after(self, turn: Turn, completion: Any) -> Any:
        """Strip the memory block from every choice of a whole completion; queue the work."""
        try:
            choices = list(getattr(completion, "choices", None) or [])
            if turn.nonce:
                answers = {}
                for choice in choices:
                    message = getattr(choice, "message", None)
                    if message is not None and isinstance(message.content, str):
                        answer = parse_memory_block(message.content, turn.nonce)
                        message.content = answer.visible
                        answers[choice.index] = answer
                first = answers.get(0)
                if first is not None:
                    self.finish_inline(turn, first.memories, first.problem, first.block_found)
            elif choices and getattr(choices[0], "message", None) is not None:
                self.finish_background(turn, choices[0].message.content)
        except Exception:
            self._failed("store_failures", "could not process the answer's memories")
        return completion

    def finish_inline(
        self,
        turn: Turn,
        memories: Sequence[ExtractedMemory],
        problem: str | None,
        block_found: bool,
    ) -> None:
        if problem:
            self.memory.counters["malformed_blocks"] += 1
            log.info("memory block problem (user %s): %s", self._user(), problem)
        elif not block_found:
            self.memory.counters["missing_blocks"] += 1
        if not memories:
            return
        items = [
            {
                "text": m.text,
                "category": m.category.value,
                "replaces": turn.injected.get(m.replaces) if m.replaces else None,
            }
            for m in memories
        ]
        self.jobs.store(self.memory, items)

    def finish_background(self, turn: Turn, answer: str | None) -> None:
        if not turn.user_text:
            return
        exchange = [{"role": "user", "content": turn.user_text}]
        if answer:
            exchange.append({"role": "assistant", "content": answer})
        model = turn.request.get("model")
        self.jobs.extract(
            self.memory, exchange, turn.injected, model if isinstance(model, str) else None
        )

    def _failed(self, counter: str, message: str) -> None:
        self.memory.counters[counter] += 1
        log.warning("%s (user %s)", message, self._user(), exc_info=True)

    def _user(self) -> str:
        return user_tag(self.memory.user_id)


class StreamEditor:
    """Edits a streamed completion chunk by chunk (for both sync and async streams).

    No chunk it returns contains any part of the memory block: each choice's content goes
    through a :class:`MemoryStreamFilter`, which holds back only a possible tag prefix. Chunks
    left with nothing to say are dropped; tool-call deltas, finish reasons, usage chunks and
    other choices pass through as they are.
    """

    def __init__(self, flow: MemoryFlow, turn: Turn) -> None:
        self._flow = flow
        self._turn = turn
        self._filters: dict[int, MemoryStreamFilter] = {}
        self._answer: list[str] = []  # choice 0's text, for background extraction
        self._last_chunk: Any = None
        self._done = False

    def edit(self, chunk: Any) -> Any | None:
        """The chunk to show (edited in place), or None when nothing is left of it."""
        try:
            self._last_chunk = chunk
            keep = getattr(chunk, "usage", None) is not None or not getattr(chunk, "choices", None)
            for choice in chunk.choices:
                keep = self._edit_choice(choice) or keep
            return chunk if keep else None
        except Exception:
            self._flow._failed("store_failures", "could not filter a streamed chunk")
            return chunk

    def _edit_choice(self, choice: Any) -> bool:
        delta = choice.delta
        content = getattr(delta, "content", None)
        had_content = isinstance(content, str) and content != ""
        if isinstance(content, str):
            if choice.index == 0:
                self._answer.append(content)
            if self._turn.nonce:
                stream_filter = self._filters.get(choice.index)
                if stream_filter is None:
                    stream_filter = self._filters[choice.index] = MemoryStreamFilter(
                        self._turn.nonce
                    )
                delta.content = stream_filter.feed(content)
        if choice.finish_reason is not None and choice.index in self._filters:
            tail = self._finish_choice(choice.index)
            if tail:
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

    def _finish_choice(self, index: int) -> str:
        result = self._filters.pop(index).finish()
        if index == 0:
            self._flow.finish_inline(
                self._turn, result.memories, result.problem, result.answer.block_found
            )
        return result.tail

    def end(self) -> Any | None:
        """The stream is over: queue the memory work; return a last chunk carrying text that
        was still held back (only when the stream ended without a finish reason), or None."""
        if self._done:
            return None
        self._done = True
        try:
            tails = {index: self._finish_choice(index) for index in sorted(self._filters)}
            if not self._turn.nonce:
                self._flow.finish_background(self._turn, "".join(self._answer))
            tails = {i: t for i, t in tails.items() if t}
            if not tails or self._last_chunk is None or not self._last_chunk.choices:
                return None
            chunk = self._last_chunk.model_copy(deep=True)
            template = chunk.choices[0]
            chunk.choices = []
            for index, tail in tails.items():
                choice = template.model_copy(deep=True)
                choice.index, choice.finish_reason = index, None
                choice.delta.content, choice.delta.tool_calls, choice.delta.role = tail, None, None
                chunk.choices.append(choice)
            chunk.usage = None
            return chunk
        except Exception:
            self._flow._failed("store_failures", "could not finish a streamed answer")
            return None
