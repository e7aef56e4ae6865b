"""Injection overhead: what the wrapper does before each chat request.

``MemoryFlow.before`` is timed: embed the latest user message, search the user's memories
(top 5, the default relevance floor), format the injected context and the inline extraction
instruction, and build the new message list. One user holds 100 / 1k / 10k / 100k memories,
among other users' memories in the same store; embedded Chroma, then a real ``chroma run``.

- *cold query*: a question no store has seen in this run, so the query is embedded by the
  model (the engine caches query vectors per store).
- *repeated query*: the same question again, so its vector comes from the engine's cache (and
  the candidates' texts from the storage handle's cache).

Cold and repeated calls are interleaved, after a warm-up on throwaway questions. The stores are
written by another process (``population.populate_elsewhere``), so this process opens them
afresh, like an application started after the memories were stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from headroom_memory_integrations import ChromaStorage, LocalEmbedder, MemoryStore
from headroom_memory_integrations.flow import MemoryFlow
from headroom_memory_integrations.openai.flow import CompletionsFlow
from headroom_memory_integrations.prompts import format_memory_context, short_ids
from headroom_memory_integrations.storage import Storage

from .common import Context, SectionResult, Stats, at_most, chroma_server, latency, log, timed
from .population import populate_elsewhere
from .scripted import ask

NAME = "injection"
TARGETS = {10_000: at_most(p50=8, p95=12), 100_000: at_most(p50=20, p95=20)}


class _NoJobs:
    """Stands in for the wrappers' job queue: ``before`` never sends it work."""

    def store(self, *args: Any) -> None:
        raise AssertionError("before() stored something")

    def extract(self, *args: Any) -> bool:
        raise AssertionError("before() extracted something")

    def settle(self, memory: MemoryStore) -> bool:
        return True


def _label(size: int) -> str:
    return f"{size // 1000}k" if size >= 1000 else str(size)


def measure_store(
    ctx: Context, result: SectionResult, storage: Storage, backend: str, size: int
) -> None:
    """Time ``before`` for the user holding ``size`` memories in ``storage``."""
    memory = MemoryStore(f"user-{size}", storage=storage, embedder=LocalEmbedder())
    flow = CompletionsFlow(MemoryFlow(memory, _NoJobs(), inline=True, top_k=5))
    warmups = ctx.queries.take(ctx.pick(30, 15))
    first = timed(lambda: flow.before(ask(warmups[0])))[1]  # opens the collection
    for question in warmups[1:]:
        flow.before(ask(question))
    repeated_question = ctx.queries.take(1)[0]
    flow.before(ask(repeated_question))
    cold: list[float] = []
    repeated: list[float] = []
    injected: list[int] = []
    for question in ctx.queries.take(ctx.pick(400, 100)):
        call, elapsed = timed(partial(flow.before, ask(question)))
        cold.append(elapsed)
        injected.append(len(call.turn.injected))
        repeated.append(timed(lambda: flow.before(ask(repeated_question)))[1])
    where = f"{_label(size)} memories, {backend}"
    note = f"{sum(injected) / len(injected):.1f} memories injected on average"
    result.add(latency(NAME, f"{where}: cold query", cold, TARGETS.get(size), note))
    result.add(latency(NAME, f"{where}: repeated query (cached)", repeated))
    parts = breakdown(ctx, memory, ctx.pick(200, 50))
    parts["first_request_after_opening_ms"] = round(first, 1)
    quarter = len(cold) // 4
    parts["cold_p50_first_quarter_ms"] = round(Stats.of(cold[:quarter]).p50, 3)
    parts["cold_p50_last_quarter_ms"] = round(Stats.of(cold[-quarter:]).p50, 3)
    result.details.setdefault("breakdown", {})[f"{backend}/{size}"] = parts


def breakdown(ctx: Context, memory: MemoryStore, repeat: int) -> dict[str, Any]:
    """Medians and p95 of the parts of ``before``: embedding a new query with the model,
    a search repeating an earlier query (vector and texts cached), and formatting the context."""
    embedder = memory.embedder
    embed = [timed(partial(embedder.embed, [q]))[1] for q in ctx.queries.take(repeat)]
    question = ctx.queries.take(1)[0]
    found = memory.search(question)
    search = [timed(lambda: memory.search(question))[1] for _ in range(repeat)]
    items = list(zip(short_ids(len(found)), [m for m, _ in found]))
    fmt = [timed(lambda: format_memory_context(items))[1] for _ in range(repeat)]

    def summary(values: Sequence[float]) -> dict[str, float]:
        stats = Stats.of(values)
        return {"p50_ms": round(stats.p50, 3), "p95_ms": round(stats.p95, 3)}

    return {
        "embed_new_query": summary(embed),
        "search_repeated_query": summary(search),
        "format_memory_context": summary(fmt),
    }


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    sizes = ctx.pick((100, 1_000, 10_000, 100_000), (100, 1_000))
    server_sizes = ctx.pick((100, 1_000, 10_000, 100_000), (1_000,))
    others = ctx.pick(1000, 200)
    LocalEmbedder().warm_up()

    log(f"injection: embedded Chroma, {others} other users and users of {sizes} memories")
    folder = ctx.scratch("injection-embedded")
    result.details["embedded_population"] = populate_elsewhere(
        folder, users(sizes), ctx.cache, others
    )
    storage = ChromaStorage.at(folder)
    for size in sizes:
        measure_store(ctx, result, storage, "embedded", size)

    log(f"injection: chroma run server, {others} other users, users of {server_sizes}")
    with chroma_server(ctx.scratch("injection-server")) as url:
        result.details["server_population"] = populate_elsewhere(
            url, users(server_sizes), ctx.cache, others
        )
        server = ChromaStorage.from_url(url)
        for size in server_sizes:
            measure_store(ctx, result, server, "chroma server", size)
    return result


def users(sizes: Sequence[int]) -> dict[str, int]:
    return {f"user-{size}": size for size in sizes}
