"""OpenAI's Responses API as :class:`~.testing.ScriptedOpenAIServer` speaks it (``POST
/v1/responses``, plain and ``stream=True``).

A request's ``instructions`` and ``input`` are read as the chat messages they stand for, so the
server's queue and responders answer both APIs alike; a :class:`~.testing.Reply` is then written
as a ``response`` object (a ``message`` item with one ``output_text`` part, or with a
``refusal`` part for :meth:`~.testing.Reply.refused`, then a
``function_call`` item per call) or as the server-sent events OpenAI streams for it.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .openai.responses_flow import OWN_ITEMS

if TYPE_CHECKING:
    from .testing import Reply


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a Responses request stands for ([] when ``input`` is missing)."""
    raw = body.get("input")
    items: list[Any] = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw or []
    if not isinstance(items, list):
        return []
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") not in OWN_ITEMS:
            output = item.get("output")
            messages.append({"role": "tool", "content": output if isinstance(output, str) else ""})
        elif isinstance(item.get("role"), str):
            messages.append({"role": item["role"], "content": item.get("content")})
    return messages


def _hex() -> str:
    return uuid.uuid4().hex[:24]


class ScriptedResponse:
    """One reply written in the Responses API's shapes."""

    def __init__(
        self, reply: Reply, body: Mapping[str, Any], tokens: tuple[int, int], chunk_size: int
    ) -> None:
        self.reply = reply
        self.chunk_size = chunk_size
        self.message_id = f"msg_{_hex()}"
        self.refusal = reply.refusal
        self.has_text = self.refusal is None and (reply.content is not None or not reply.calls)
        self.calls = [
            {
                "type": "function_call",
                "id": f"fc_{_hex()}",
                "call_id": call.id or f"call_{_hex()}",
                "name": call.name,
                "arguments": call.arguments_json,
                "status": "completed",
            }
            for call in reply.calls
        ]
        incomplete = reply.finish_reason == "length"
        prompt, completion = tokens
        self.base = {
            "id": f"resp_{_hex()}",
            "object": "response",
            "created_at": int(time.time()),
            "model": str(body.get("model") or "gpt-4o-mini"),
            "instructions": body.get("instructions"),
            "previous_response_id": body.get("previous_response_id"),
            "parallel_tool_calls": True,
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [],
            "text": body.get("text") or {"format": {"type": "text"}},
            "metadata": body.get("metadata") or {},
            "error": None,
        }
        self.final = {
            **self.base,
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": self.output(),
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            },
        }

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        return self._message(self.part(text), status)

    def _message(self, part: dict[str, Any], status: str) -> dict[str, Any]:
        content = [part] if status == "completed" else []
        return {
            "type": "message",
            "id": self.message_id,
            "role": "assistant",
            "status": status,
            "content": content,
        }

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    @staticmethod
    def refusal_part(refusal: str) -> dict[str, Any]:
        return {"type": "refusal", "refusal": refusal}

    def output(self) -> list[dict[str, Any]]:
        if self.refusal is not None:
            return [self._message(self.refusal_part(self.refusal), "completed")]
        text = [self.message(self.reply.content or "")] if self.has_text else []
        return text + self.calls

    def events(self, pieces: list[str], pause: Any) -> Iterator[dict[str, Any]]:
        """The streamed events, ``pause()`` called between text and argument pieces."""
        sequence = itertools.count()

        def event(kind: str, **fields: Any) -> dict[str, Any]:
            return {"type": kind, "sequence_number": next(sequence), **fields}

        opening = {**self.base, "status": "in_progress", "output": [], "usage": None}
        yield event("response.created", response=opening)
        yield event("response.in_progress", response=opening)
        index = 0
        if self.refusal is not None:
            yield from self._refusal_events(pieces, pause, event)
        if self.has_text:
            text = self.reply.content or ""
            where = {"item_id": self.message_id, "output_index": 0}
            yield event(
                "response.output_item.added", output_index=0, item=self.message(text, "in_progress")
            )
            yield event("response.content_part.added", **where, content_index=0, part=self.part(""))
            for step, piece in enumerate(pieces):
                if step:
                    pause()
                yield event(
                    "response.output_text.delta", **where, content_index=0, delta=piece, logprobs=[]
                )
            yield event(
                "response.output_text.done", **where, content_index=0, text=text, logprobs=[]
            )
            yield event(
                "response.content_part.done", **where, content_index=0, part=self.part(text)
            )
            yield event("response.output_item.done", output_index=0, item=self.message(text))
            index = 1
        for offset, call in enumerate(self.calls, start=index):
            where = {"item_id": call["id"], "output_index": offset}
            opened = {**call, "arguments": "", "status": "in_progress"}
            yield event("response.output_item.added", output_index=offset, item=opened)
            arguments = call["arguments"]
            for start in range(0, len(arguments), max(self.chunk_size, 1)):
                pause()
                piece = arguments[start : start + self.chunk_size]
                yield event("response.function_call_arguments.delta", **where, delta=piece)
            yield event(
                "response.function_call_arguments.done",
                **where,
                arguments=arguments,
                name=call["name"],
            )
            yield event("response.output_item.done", output_index=offset, item=call)
        done = (
            "response.incomplete" if self.final["status"] == "incomplete" else "response.completed"
        )
        yield event(done, response=self.final)

    def _refusal_events(
        self, pieces: list[str], pause: Any, event: Any
    ) -> Iterator[dict[str, Any]]:
        """A refusal's message item, its text streamed as ``response.refusal.delta`` events."""
        refusal = self.refusal or ""
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        opened = self._message(self.refusal_part(""), "in_progress")
        yield event("response.output_item.added", output_index=0, item=opened)
        yield event("response.content_part.added", **where, part=self.refusal_part(""))
        for step, piece in enumerate(pieces):
            if step:
                pause()
            yield event("response.refusal.delta", **where, delta=piece)
        yield event("response.refusal.done", **where, refusal=refusal)
        yield event("response.content_part.done", **where, part=self.refusal_part(refusal))
        item = self._message(self.refusal_part(refusal), "completed")
        yield event("response.output_item.done", output_index=0, item=item)
