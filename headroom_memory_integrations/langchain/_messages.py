"""The core :class:`~..flow.MemoryFlow` translated to LangChain messages, with no I/O.

:class:`MessagesFlow` is what :class:`~.chat_model.MemoryChatModel` (and, through it, the
agent middleware) uses around every call of the model it wraps, sync or async, streamed or not:

1. :meth:`MessagesFlow.before`: the flow's prompt becomes a ``SystemMessage`` just before the
   latest ``HumanMessage`` (or, with ``injection="user"``, the start of that message). The
   caller's list and messages are never changed.
2. The wrapper calls the model with :attr:`Call.messages`.
3. :meth:`MessagesFlow.after` (a whole ``ChatResult``) or a :class:`ChunkEditor` (chunk by
   chunk): the memory block is cut from the answer's text (a ``str`` content, or the ``text``
   blocks of a list content) and the first generation's memories go to the flow.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.agents import AgentAction, AgentStep
from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from ..engine import MemoryStore
from ..flow import (
    AnswerStream,
    ConversationTail,
    MemoryFlow,
    Turn,
    conversation_key,
    holds_agent_text,
    insert_before,
    latest_index,
    user_words,
)
from ..prompts import (
    MODEL_CALLS,
    fetches_outside_text,
    field_value,
    inline_extraction_allowed,
    message_text,
    outside_role,
)

Injection = Literal["system", "user"]
"""Where the memory prompt goes: a system message just before the latest user message, or the
start of that user message (for providers that refuse a system message after the first)."""


@dataclass
class Call:
    """One model call on its way through the flow: the flow's turn and the messages to send."""

    turn: Turn
    messages: list[BaseMessage]


def is_notification(message: BaseMessage) -> bool:
    """Whether a ``HumanMessage`` was added by the agent harness, not typed by the user: it
    carries ``additional_kwargs["lc_source"]``, as LangChain's ``add_notification_metadata``
    sets it (``SummarizationMiddleware``'s summary of the conversation, which can hold
    summarised tool output, has ``lc_source="summarization"``). Marking a message so only
    makes it count as untrusted text: it never makes text trusted."""
    kwargs = getattr(message, "additional_kwargs", None)
    return isinstance(kwargs, Mapping) and isinstance(kwargs.get("lc_source"), str)


def conversation_of(messages: Sequence[BaseMessage], index: int) -> str | ConversationTail:
    """What tells the turn of the user message at ``index`` apart from others, for the flow's
    later steps (:meth:`~..flow.MemoryFlow.start`'s ``conversation``): the message's id, when it
    is a UUID, else :func:`~..flow.conversation_key` of the messages before it. LangGraph gives
    every message of an agent's state a UUID and keeps it while middleware edit, clear, trim or
    summarise the messages around it (``ContextEditingMiddleware``,
    ``SummarizationMiddleware``) between two steps of a turn, which change those messages. An
    id of another form may be numbered per conversation ("3", a chat platform's message id),
    so two conversations of one user could share it: such an id tells nothing apart."""
    message_id = messages[index].id
    if isinstance(message_id, str) and _is_uuid(message_id):
        return f"message id {message_id}"
    return conversation_key((m.type, message_text(m)) for m in messages[:index])


def _is_uuid(text: str) -> bool:
    """Whether ``text`` is a UUID (any version, any of its written forms)."""
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def is_harness_call(metadata: Mapping[str, Any] | None) -> bool:
    """Whether a model call was made by the agent harness for its own work, not as a turn of
    the user's conversation: its run's metadata carries a string ``lc_source``, as LangChain's
    ``SummarizationMiddleware`` (``"summarization"``), ``LLMToolSelectorMiddleware``
    (``"tool_selection"``) and ``LLMToolEmulator`` (``"tool_emulation"``) set it on their own
    model calls. The "user" message of such a call is the harness's prompt (a transcript to
    summarise, tool output included; a tool call to emulate), never the user's words: nothing
    may be learned from it, and the user's memories have no business in it."""
    return isinstance(metadata, Mapping) and isinstance(metadata.get("lc_source"), str)


def is_user(message: BaseMessage) -> bool:
    """A message the user wrote: a ``HumanMessage`` (or chunk), or a ``ChatMessage`` whose
    role is ``"user"`` (sent as one), that is no notification."""
    said = isinstance(message, HumanMessage) or (
        isinstance(message, ChatMessage) and message.role in ("user", "human")
    )
    return said and not is_notification(message)


def is_tool_result(message: BaseMessage) -> bool:
    """Text the user did not write in a conversation: a tool's or function's result (or
    chunk), a ``ChatMessage`` of a role that is not the user's, the application's or the
    model's (Llama's ``ipython``, any role not known: :func:`~...prompts.outside_role`), a
    harness notification such as a conversation summary, or an ``AIMessage`` whose
    ``additional_kwargs["tool_outputs"]`` holds what provider-run tools found (``ChatOpenAI``'s
    Responses API answers with ``output_version="v0"``). Content blocks that carry such text
    inside any message (a ``tool_result``, ``search_result``, ``server_tool_result`` or
    ``non_standard`` block, an attached file or image, any type not known) are found by
    :func:`~...prompts.fetches_outside_text`, for every adapter alike (see
    :data:`~...prompts.OWN_PARTS`)."""
    if isinstance(message, (ToolMessage, FunctionMessage)):
        return True
    if isinstance(message, ChatMessage):  # a role not the user's, the app's or the model's
        return outside_role(message.role)
    if isinstance(message, HumanMessage):
        return is_notification(message)
    kwargs = getattr(message, "additional_kwargs", None)
    if not isinstance(message, AIMessage) or not isinstance(kwargs, Mapping):
        return False
    outputs = kwargs.get("tool_outputs")  # an image the model drew is no outside text
    listed = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return bool(outputs) and not all(
        field_value(output, "type") in MODEL_CALLS for output in listed
    )


def holds_outside_text(
    messages: Sequence[BaseMessage], call_kwargs: Mapping[str, Any] | None = None
) -> bool:
    """Whether a call (its messages, and the keyword arguments it is made with) lets the model
    read text the user did not write: a tool result or harness notification
    (:func:`is_tool_result`), a content block that is not the words of the user, the
    application or the model, or a provider-run tool among the bound ``tools``
    (:func:`~...prompts.fetches_outside_text`)."""
    return fetches_outside_text({**(call_kwargs or {}), "messages": messages}) or any(
        is_tool_result(message) for message in messages
    )


def holds_tool_steps(value: object) -> bool:
    """Whether a chain's input or output value holds text the user did not write: an agent's
    tool steps (an ``AgentAction`` or ``AgentStep``, or the ``(action, observation)`` pairs of
    an ``AgentExecutor``'s ``intermediate_steps``), a retrieved ``Document`` (a retrieval
    chain's ``source_documents`` or ``context``), or messages that hold a tool's result or
    other outside text (:func:`holds_outside_text`). A value is looked into one level deep:
    itself, or the items of a list or tuple."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    messages: list[BaseMessage] = []
    for item in items:
        if isinstance(item, (AgentAction, AgentStep, Document)):
            return True
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], AgentAction):
            return True  # an (action, observation) pair
        if isinstance(item, BaseMessage):
            messages.append(item)
    return holds_outside_text(messages)


def _prepend(message: BaseMessage, text: str) -> BaseMessage:
    content = message.content
    if isinstance(content, list):
        new_content: Any = [{"type": "text", "text": text}, *content]
    else:
        new_content = f"{text}\n\n{content or ''}"
    return message.model_copy(update={"content": new_content})


def _text_of(block: Any) -> str | None:
    """The text of a content block that is answer text (a ``str`` or a ``text`` block)."""
    if isinstance(block, str):
        return block
    if isinstance(block, Mapping) and block.get("type") == "text":
        text = block.get("text")
        return text if isinstance(text, str) else None
    return None


def _with_text(block: Any, text: str) -> Any:
    return text if isinstance(block, str) else {**block, "text": text}


class MessagesFlow:
    """Memory around a LangChain chat model's calls for one user.

    Args:
        flow: The core flow (the user's store and the job queue; inline extraction).
        injection: ``"system"`` (default) or ``"user"``; see :data:`Injection`.
    """

    def __init__(self, flow: MemoryFlow, injection: Injection = "system") -> None:
        if injection not in ("system", "user"):
            raise ValueError(f"injection must be 'system' or 'user', got {injection!r}")
        self.flow = flow
        self.injection: Injection = injection

    @property
    def memory(self) -> MemoryStore:
        return self.flow.memory

    def before(self, messages: Sequence[BaseMessage], call_kwargs: Mapping[str, Any]) -> Call:
        """The messages to send. Never raises for memory's sake.

        Args:
            messages: The call's messages (left unchanged).
            call_kwargs: The call's keyword arguments (bound tools, ``tool_choice``,
                ``response_format``, ...): a request whose answer must stay machine-readable
                gets memories but no extraction instruction.
        """
        call = Call(Turn(), list(messages))
        index = latest_index(call.messages, is_user)
        if index is None:
            return call
        previous = latest_index(call.messages[:index], is_user)
        said = message_text(call.messages[index])
        call.turn = self.flow.start(
            user_words(said),
            previous_text=None
            if previous is None
            else user_words(message_text(call.messages[previous])),
            instruct=inline_extraction_allowed(call_kwargs),
            untrusted=holds_outside_text(call.messages, call_kwargs)
            or any(holds_agent_text(message_text(m)) for m in call.messages if is_user(m)),
            later_step=any(is_tool_result(m) for m in call.messages[index + 1 :]),
            conversation=conversation_of(call.messages, index),
        )
        prompt = call.turn.prompt
        if prompt:
            if self.injection == "system":
                call.messages = insert_before(call.messages, index, SystemMessage(content=prompt))
            else:
                user = _prepend(call.messages[index], prompt)
                call.messages = [*call.messages[:index], user, *call.messages[index + 1 :]]
        return call

    def after(self, call: Call, result: ChatResult) -> ChatResult:
        """``result`` with the block cut from every generation; the first one's memories queued."""
        if not call.turn.nonce:
            return result
        generations = []
        for position, generation in enumerate(result.generations):
            message = generation.message
            content = self._visible(call.turn, message, remember=position == 0)
            if content is not message.content:
                generation = ChatGeneration(
                    message=message.model_copy(update={"content": content}),
                    generation_info=generation.generation_info,
                )
            generations.append(generation)
        return ChatResult(generations=generations, llm_output=result.llm_output)

    def editor(self, call: Call) -> ChunkEditor:
        """A filter for the chunks of a streamed answer to ``call``."""
        return ChunkEditor(self.flow, call.turn)

    def _visible(self, turn: Turn, message: BaseMessage, *, remember: bool) -> Any:
        """``message``'s content without the block (the same object when nothing was cut): a
        string or a list of blocks, through one :class:`~..flow.AnswerStream` as a streamed
        answer is, so both shapes treat an answer alike (a tool call with no text has no block
        to miss, whichever shape its content has)."""
        content = message.content
        stream = self.flow.stream(turn, remember=remember)
        visible = _with_tail(
            _feed_content(stream, content),
            stream.finish(tool_call=bool(getattr(message, "tool_calls", None))),
        )
        return content if visible == content else visible


def _feed_content(stream: AnswerStream, content: str | list[Any]) -> Any:
    """``content`` with its text fed through ``stream``: a string, or the blocks with each
    text block's text fed (see :func:`_feed_blocks`)."""
    if isinstance(content, str):
        return stream.feed(content)
    return _feed_blocks(stream, content)


def _with_tail(visible: Any, tail: str) -> Any:
    """``visible`` content (a string or blocks) with the text a stream held back at its end."""
    if not tail:
        return visible
    return visible + tail if isinstance(visible, str) else _append_tail(visible, tail)


def _feed_blocks(stream: AnswerStream, content: list[Any]) -> list[Any]:
    """``content`` with each text block fed through ``stream``; emptied text blocks dropped."""
    blocks: list[Any] = []
    for block in content:
        text = _text_of(block)
        if text is None:
            blocks.append(block)
            continue
        visible = stream.feed(text)
        if visible:
            blocks.append(_with_text(block, visible))
    return blocks


def _append_tail(blocks: list[Any], tail: str) -> list[Any]:
    for position in range(len(blocks) - 1, -1, -1):
        text = _text_of(blocks[position])
        if text is not None:
            return [
                *blocks[:position],
                _with_text(blocks[position], text + tail),
                *blocks[position + 1 :],
            ]
    return [*blocks, {"type": "text", "text": tail}]


def _ends_answer(chunk: ChatGenerationChunk) -> bool:
    message = chunk.message
    if getattr(message, "chunk_position", None) == "last":
        return True
    info = chunk.generation_info or {}
    metadata = message.response_metadata or {}
    return bool(info.get("finish_reason") or metadata.get("finish_reason"))


def _carries_more(chunk: ChatGenerationChunk) -> bool:
    """Whether a chunk says anything besides its text (so it is kept even with no text left)."""
    message = chunk.message
    return bool(
        getattr(message, "tool_call_chunks", None)
        or getattr(message, "usage_metadata", None)
        or getattr(message, "chunk_position", None)
        or message.additional_kwargs
        or chunk.generation_info
    )


class ChunkEditor:
    """Edits a streamed answer chunk by chunk (for both sync and async streams).

    No chunk it returns contains any part of the memory block: the answer's text goes through
    one :class:`~..flow.AnswerStream`, which holds back only a possible tag prefix (and trailing
    whitespace). Text held back is released on the chunk that ends the answer (a finish reason
    or ``chunk_position="last"``), or by :meth:`end`. Chunks left with nothing to say are
    dropped; tool-call chunks, usage and metadata pass through.
    """

    def __init__(self, flow: MemoryFlow, turn: Turn) -> None:
        self._flow = flow
        self._turn = turn
        self._answer = flow.stream(turn)
        self._done = False
        self._last: ChatGenerationChunk | None = None
        self._tool_call = False  # the answer calls a tool

    def edit(self, chunk: ChatGenerationChunk) -> ChatGenerationChunk | None:
        """The chunk to show (a new object), or None when nothing is left of it."""
        try:
            self._last = chunk
            self._tool_call |= bool(getattr(chunk.message, "tool_call_chunks", None))
            content = chunk.message.content
            visible = _feed_content(self._answer, content)
            had_text = bool(content) if isinstance(content, str) else any(map(_text_of, content))
            if _ends_answer(chunk):
                tail = self._answer.finish(tool_call=self._tool_call)
                # anything after the end (no provider sends text there) is still filtered
                self._answer = self._flow.stream(self._turn, remember=False)
                visible = _with_tail(visible, tail)
            if visible == content:
                return chunk
            if had_text and not visible and not _carries_more(chunk):
                return None
            return _rebuilt(chunk, visible)
        except Exception:
            self._flow.failed("store_failures", "could not filter a streamed chunk")
            return chunk

    def end(self) -> ChatGenerationChunk | None:
        """The stream is over: queue the memory work (once); return a chunk with text that was
        still held back, or None."""
        if self._done:
            return None
        self._done = True
        tail = self._answer.finish(tool_call=self._tool_call)
        if not tail:
            return None
        last = self._last.message if self._last is not None else None
        content: Any = tail
        if last is not None and isinstance(last.content, list):
            content = [{"type": "text", "text": tail}]
        return ChatGenerationChunk(
            message=AIMessageChunk(content=content, id=getattr(last, "id", None))
        )


def _rebuilt(chunk: ChatGenerationChunk, content: Any) -> ChatGenerationChunk:
    return ChatGenerationChunk(
        message=chunk.message.model_copy(update={"content": content}),
        generation_info=chunk.generation_info,
    )


def as_chunk(generation: ChatGeneration) -> ChatGenerationChunk:
    """A whole answer as the one chunk of a stream (for models that cannot stream)."""
    message = generation.message
    fields = message.model_dump(exclude={"type"})
    if isinstance(message, AIMessage):
        fields.pop("tool_call_chunks", None)
        fields.pop("chunk_position", None)
        chunk = AIMessageChunk(**fields, chunk_position="last")
    else:
        chunk = AIMessageChunk(content=message.content, id=message.id, chunk_position="last")
    return ChatGenerationChunk(message=chunk, generation_info=generation.generation_info)
