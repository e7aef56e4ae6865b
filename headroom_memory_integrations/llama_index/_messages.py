"""LlamaIndex chat messages to and from the plain text the core works with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole, TextBlock, ToolCallBlock

from ..flow import latest_index
from ..prompts import message_text


def is_user(message: ChatMessage) -> bool:
    return message.role == MessageRole.USER


def holds_tool_results(messages: Sequence[ChatMessage]) -> bool:
    """Whether any message is a tool's result (text the user did not write: see grounding)."""
    return any(m.role in (MessageRole.TOOL, MessageRole.FUNCTION) for m in messages)


def text_of(message: ChatMessage) -> str:
    """The text of ``message`` (its text blocks; images and tool calls left out)."""
    return message_text(message)


def latest_user_text(messages: Sequence[ChatMessage]) -> str | None:
    """The text of the last user message, or None when there is none."""
    index = latest_index(messages, is_user)
    return None if index is None else text_of(messages[index])


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
