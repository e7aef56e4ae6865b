"""End-to-end wrapper overhead against the scripted OpenAI-compatible server on 127.0.0.1.

A user holds 1k memories (embedded Chroma). Each pair of calls sends the same new question
through the raw ``openai.OpenAI`` client and through ``with_fast_memory`` around an identical
client, in random order, after a warm-up; the overhead is the paired difference. The scripted
model answers the same text to both, plus an empty memory block to the wrapped client (the
instruction asks for one), so nothing is stored and no background work runs.

Streaming: time to the first chunk the caller receives, wrapped minus raw. The wrapper searches
the memories before sending the request, so that difference includes retrieval (the injection
section's subject); the wrapped store's ``search`` is timed on the instance so the streaming
path's own cost (difference minus search) can be reported apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from headroom_memory_integrations.openai import with_fast_memory
from headroom_memory_integrations.testing import ScriptedOpenAIServer

from .common import Context, SectionResult, at_most, latency, log
from .population import embedded_user
from .scripted import InlineModel, call_ms, stream_ms, timing_search

NAME = "e2e"
SIZE = 1_000
T = TypeVar("T")


class Pairs:
    """Raw and wrapped clients, called in random order on the same question."""

    def __init__(self, raw: Any, wrapped: Any) -> None:
        self.raw = raw
        self.wrapped = wrapped
        self.searches = timing_search(wrapped.memory)
        self.rng = random.Random(3)

    def run(
        self, measure: Callable[[Any, str], T], questions: Sequence[str]
    ) -> list[tuple[T, T, float]]:
        """(raw timing, wrapped timing, the wrapped call's search ms) per question."""
        out = []
        for question in questions:
            order = [self.raw, self.wrapped]
            self.rng.shuffle(order)
            timings = {id(client): measure(client, question) for client in order}
            out.append((timings[id(self.raw)], timings[id(self.wrapped)], self.searches[-1]))
        return out


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    folder = ctx.scratch("e2e")
    result.details["population"] = embedded_user(folder, "e2e-user", SIZE, ctx.cache)
    count, warmup = ctx.pick(300, 60), 20
    with ScriptedOpenAIServer(responder=InlineModel()) as server:
        wrapped = with_fast_memory(server.client(), "e2e-user", db_path=folder)
        pairs = Pairs(server.client(), wrapped)

        log(f"e2e: {count} non-streamed pairs, 1k memories")
        pairs.run(call_ms, ctx.queries.take(warmup))
        calls = pairs.run(call_ms, ctx.queries.take(count))
        result.add(latency(NAME, "non-streamed: raw call", [r for r, _, _ in calls]))
        result.add(latency(NAME, "non-streamed: wrapped call", [w for _, w, _ in calls]))
        result.add(
            latency(NAME, "non-streamed: added by the wrapper", [w - r for r, w, _ in calls])
        )

        log(f"e2e: {count} streamed pairs")
        pairs.run(stream_ms, ctx.queries.take(warmup))
        streams = pairs.run(stream_ms, ctx.queries.take(count))
        first_added = [w[0] - r[0] for r, w, _ in streams]
        result.add(latency(NAME, "streamed: first chunk, raw", [r[0] for r, _, _ in streams]))
        result.add(
            latency(
                NAME,
                "streamed: first chunk, added (incl. memory search)",
                first_added,
                note="retrieval happens before the request is sent",
            )
        )
        result.add(
            latency(
                NAME,
                "streamed: first chunk, added beyond the search",
                [a - s for a, (_, _, s) in zip(first_added, streams)],
                at_most(p50=1),
                note="formatting, instruction, bigger request, stream filter",
            )
        )
        whole = [w[1] - r[1] for r, w, _ in streams]
        result.add(latency(NAME, "streamed: whole stream, added", whole))
        search_ms = [s for _, _, s in streams]
        result.details["search_in_wrapped_streams"] = latency(NAME, "search", search_ms).to_dict()
        result.details["counters"] = dict(wrapped.memory.counters)
    return result
