"""The scripted model used by the end-to-end sections: a local OpenAI-compatible server
(:class:`~headroom_memory_integrations.testing.ScriptedOpenAIServer`) whose model follows the
``with_fast_memory`` instruction, plus helpers to time calls against it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from headroom_memory_integrations.testing import Reply

from .common import clock, ms_since

MODEL = "gpt-4o-mini"
ANSWER = (
    "Here is a suggestion that fits what you told me: keep it simple, start this week, and "
    "check back in a few days to see how it went."
)
_NONCE = re.compile(r"<memory-([0-9a-f]{8,32})>")


def instruction_nonce(body: dict[str, Any]) -> str | None:
    """The nonce of the memory instruction in a request's system messages, if any."""
    system = "\n".join(
        m["content"]
        for m in body.get("messages", [])
        if m.get("role") == "system" and isinstance(m.get("content"), str)
    )
    found = _NONCE.search(system)
    return found.group(1) if found else None


class InlineModel:
    """Answers :data:`ANSWER`; when the request carries the inline memory instruction, it
    appends the memory block with :attr:`memories` (``[]``: nothing worth remembering), as a
    model following ``with_fast_memory``'s instruction would."""

    def __init__(self, chunk_size: int = 16) -> None:
        self.memories: list[dict[str, str]] = []
        self.chunk_size = chunk_size

    def __call__(self, body: dict[str, Any]) -> Reply:
        nonce = instruction_nonce(body)
        text = ANSWER
        if nonce:
            text += f"\n\n<memory-{nonce}>{json.dumps(self.memories)}</memory-{nonce}>"
        return Reply.text(text, chunk_size=self.chunk_size)


def ask(question: str) -> dict[str, Any]:
    """The keyword arguments of one chat request."""
    return {"model": MODEL, "messages": [{"role": "user", "content": question}]}


def call_ms(client: Any, question: str) -> float:
    """Milliseconds for a whole (non-streamed) chat completion."""
    start = clock()
    client.chat.completions.create(**ask(question))
    return ms_since(start)


def stream_ms(client: Any, question: str) -> tuple[float, float]:
    """Milliseconds to the first streamed chunk and to the end of the stream."""
    start = clock()
    stream = client.chat.completions.create(**ask(question), stream=True)
    chunks = iter(stream)
    next(chunks)
    first = ms_since(start)
    for _ in chunks:
        pass
    return first, ms_since(start)


def timing_search(memory: Any) -> list[float]:
    """Record how long each ``memory.search`` takes (the wrapper's retrieval step), by wrapping
    the store's public method on this one instance. Returns the list it appends to."""
    durations: list[float] = []
    search: Callable[..., Any] = memory.search

    def timed_search(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return search(*args, **kwargs)
        finally:
            durations.append(ms_since(start))

    memory.search = timed_search
    return durations
