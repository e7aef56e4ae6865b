"""LlamaIndex chat messages to and from the plain text the core works with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole, TextBlock, ToolCallBlock

from ..flow import (
    REACT_OBSERVATION,
    REACT_STEP,
    ConversationTail,
    agent_observations,
    conversation_key,
    holds_agent_text,
    user_words,
)
from ..prompts import fetches_outside_text, message_text

# ReAct (``llama_index.core.agent.react``) uses tools through text: its formatter sends each
# tool output back as ``ObservationReasoningStep.get_content()`` in a message of its
# ``observation_role`` (USER by default), and at the end of a turn the whole scratchpad is stored
# as one assistant message, the steps joined by newlines. CodeActAgent
# (``llama_index.core.agent.workflow.codeact_agent``) sends the output of the code it runs back
# as a USER message too, and stores both as they were sent. See ``flow.agent_observations``.


def _observations(messages: Sequence[ChatMessage]) -> set[int]:
    """Indices of the user messages that are an agent's tool output sent back as if the user
    wrote it (ReAct's observations and retry prompts, CodeAct's code output)."""
    return agent_observations([(m.role.value, text_of(m)) for m in messages])


def is_observation(messages: Sequence[ChatMessage], index: int) -> bool:
    """Whether ``messages[index]`` is an agent's tool output sent as a user message: a ReAct
    "Observation: ..." right after the agent's own step (or another observation), or the
    output of code a CodeActAgent ran."""
    return index in _observations(messages[: index + 1])


def is_react_transcript(message: ChatMessage) -> bool:
    """Whether ``message`` is a ReAct agent's stored scratchpad that holds a tool observation."""
    text = text_of(message)
    return (
        message.role == MessageRole.ASSISTANT
        and text.lstrip().startswith(REACT_STEP)
        and f"\n{REACT_OBSERVATION}" in text
    )


def is_tool_output(message: ChatMessage) -> bool:
    """Whether ``message`` is a tool's output: a tool or function message, or an assistant
    message that is one (an agent's ``return_direct`` answer carries the tool's call id) or
    that holds one (a ReAct transcript)."""
    if message.role in (MessageRole.TOOL, MessageRole.FUNCTION):
        return True
    return message.role == MessageRole.ASSISTANT and (
        "tool_call_id" in message.additional_kwargs or is_react_transcript(message)
    )


def user_index(messages: Sequence[ChatMessage]) -> int | None:
    """Index of the latest message the user wrote (an agent's observation, see
    :func:`is_observation`, is not one), or None."""
    observations = _observations(messages)
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == MessageRole.USER and index not in observations:
            return index
    return None


def holds_tool_results(messages: Sequence[ChatMessage]) -> bool:
    """Whether any message is or holds a tool's result (text the user did not write: see
    grounding), ReAct's observations and CodeAct's code output included."""
    return bool(_observations(messages)) or any(is_tool_output(m) for m in messages)


# LlamaIndex's blocks that attach something the user did not type, by ``block_type``, as the
# core's part types (any type not in prompts.OWN_PARTS). A ``CitableBlock`` is a source's content
# given to the model to cite (text, images or documents): a document. A ``CitationBlock`` (an
# answer's citation of a source, with the words it cites) is a text part with a ``citation``
# annotation. Not counted: text, audio (mostly the user speaking), thinking, tool calls (the
# model's own) and cache points. (``ChatMessage.blocks`` is a closed union: no other type exists.)
_ATTACHED: dict[str, dict[str, Any]] = {
    "image": {"type": "image"},
    "document": {"type": "document"},
    "video": {"type": "video"},
    "citable": {"type": "document"},
    "citation": {"type": "text", "annotations": [{"type": "citation"}]},
}


def attaches_outside_text(messages: Sequence[ChatMessage]) -> bool:
    """Whether any message attaches a document, an image or a video, or is an answer that cites
    the sources it was written from (a ``CitationBlock``, or the web or file search's
    annotations ``OpenAIResponses`` keeps in ``additional_kwargs["annotations"]``): its blocks,
    as the core's part types, checked by
    :func:`~headroom_memory_integrations.prompts.fetches_outside_text`. This is text nobody in
    the conversation typed, so the call keeps only memories grounded in the user's words."""
    parts = [
        {
            "role": m.role.value,
            "annotations": m.additional_kwargs.get("annotations"),
            "content": [
                _ATTACHED[kind]
                for kind in (getattr(block, "block_type", None) for block in m.blocks)
                if kind in _ATTACHED
            ],
        }
        for m in messages
    ]
    return fetches_outside_text({"messages": parts})


def after_outside_text(messages: Sequence[ChatMessage]) -> set[int]:
    """Indices of the messages that are a tool's output or attach something the user did not
    type (:func:`attaches_outside_text`), or that come after one in the same turn (the answers
    written with it in view), up to the next message the user wrote."""
    observations = _observations(messages)
    found: set[int] = set()
    seen = False
    for index, message in enumerate(messages):
        attached = attaches_outside_text([message])
        if message.role == MessageRole.USER and index not in observations:
            seen = attached  # a new turn: only its own attachments count
        else:
            seen = seen or attached or index in observations or is_tool_output(message)
        if seen:
            found.add(index)
    return found


def text_of(message: ChatMessage) -> str:
    """The text of ``message`` (its text blocks; images and tool calls left out)."""
    return message_text(message)


def latest_user_text(messages: Sequence[ChatMessage]) -> str | None:
    """What the user wrote in their latest message (without the state an agent sends with
    it: see ``flow.user_words``), or None when there is none."""
    index = user_index(messages)
    return None if index is None else user_words(text_of(messages[index]))


def previous_user_text(messages: Sequence[ChatMessage]) -> str | None:
    """What the user wrote in their message before their latest one, or None when there is
    none."""
    index = user_index(messages)
    return None if index is None else latest_user_text(messages[:index])


def turn_start(messages: Sequence[ChatMessage]) -> int | None:
    """Index of the message that began the turn of the user's latest message (None when there
    is no user message): that message, or the same words earlier when an agent sent them again
    with no answer in between (``AgentWorkflow`` asks ``Memory.aget(input=...)`` with the
    user's message after its tool calls; ``ReActAgent`` retrying an answer it could not parse
    sends it twice). A user message after an answer begins a new turn, even in the same
    words."""
    index = user_index(messages)
    while index is not None:
        before = user_index(messages[:index])
        if (
            before is None
            or text_of(messages[before]) != text_of(messages[index])
            or any(is_final_answer(m) for m in messages[before + 1 : index])
        ):
            return index
        index = before
    return None


def continues_a_turn(messages: Sequence[ChatMessage]) -> bool:
    """Whether the call may be a later one of the turn of the user's latest message (see
    ``MemoryFlow.start``'s ``later_step``): messages follow the message that began it (an
    agent's tool calls and their results, a retry prompt; see :func:`turn_start`)."""
    start = turn_start(messages)
    return start is not None and start < len(messages) - 1


def conversation_of(messages: Sequence[ChatMessage]) -> ConversationTail:
    """What tells apart the conversation of the user's latest message (``MemoryFlow.start``'s
    ``conversation``): ``conversation_key`` of the messages before its turn began."""
    start = turn_start(messages) or 0
    return conversation_key((str(m.role.value), text_of(m)) for m in messages[:start])


def user_message_holds_agent_text(messages: Sequence[ChatMessage]) -> bool:
    """Whether a message the user wrote comes with text an agent put in it: its state
    (``AgentWorkflow``'s ``initial_state``, which its tools can fill with text the user did not
    write) or ReAct steps with what tools returned (``flow.holds_agent_text``)."""
    observations = _observations(messages)
    return any(
        m.role == MessageRole.USER and index not in observations and holds_agent_text(text_of(m))
        for index, m in enumerate(messages)
    )


def calls_tools(message: ChatMessage) -> bool:
    """Whether an assistant message asks for tool calls (so it is not the final answer)."""
    return bool(message.additional_kwargs.get("tool_calls")) or any(
        isinstance(block, ToolCallBlock) for block in message.blocks
    )


def is_final_answer(message: ChatMessage) -> bool:
    """An assistant message with text and no tool calls: the answer that ends a turn."""
    return (
        message.role == MessageRole.ASSISTANT
        and bool(text_of(message).strip())
        and not (calls_tools(message))
    )


def with_text(message: ChatMessage, text: str | None) -> ChatMessage:
    """A copy of ``message`` whose text is ``text``; its other blocks (tool calls, images,
    thinking) and ``additional_kwargs`` are kept in order."""
    blocks: list[Any] = []
    placed = False
    for block in message.blocks:
        if isinstance(block, TextBlock):
            if not placed:
                blocks.append(TextBlock(text=text or ""))
                placed = True
            continue
        blocks.append(block)
    if not placed and text:
        blocks.insert(0, TextBlock(text=text))
    return message.model_copy(
        update={"blocks": blocks, "additional_kwargs": dict(message.additional_kwargs)}
    )


def system_message(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.SYSTEM, content=text)


def from_dicts(messages: Sequence[dict[str, str]]) -> list[ChatMessage]:
    return [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
