"""Follow-ups: terse messages whose subject is in the user's previous message.

``benchmarks/followups.jsonl`` holds 120 items written blind for this (2026-12-05, stop 38) by a
model instance that read no file of the repository: a fact about the user; an earlier message
that sets up a topic where the fact matters without naming it ("I'm starting a new billing
service at work this week"); a ``follow_up`` of 2-6 words that needs the fact and whose subject
is only clear from the earlier message ("which language for it?"); and an ``aside``, another
possible next message that needs no fact ("ok thanks", "btw what's 15% of 80"). Items with an
odd number are the development half, even ones the held-out half.

The user holds the 120 facts (planted with consolidation off: they stand for many users) and
0 or 10k synthetic memories besides (``population``); then again with the keys a model writes
with each memory (``benchmarks/followups_keys.jsonl``: topic words, the question the memory
answers and three situation questions, written by another instance from the facts alone),
among synthetic memories with keys, as the wrappers store them. Each follow-up and aside is
searched as a wrapper searches the latest message (``chat_message=True``), alone and joined to
the earlier message (the two searched as one text: a candidate rule that read a short message
the gate turns away with the previous one was judged so, and not adopted: look 12 of
``benchmarks/paraphrase_fresh_log.md``): hit@5 of the follow-ups (the fact among what is
injected), how often they get nothing, and how often an aside gets anything. The earlier
messages are asked alone too, as a reference.

``benchmarks/followups2.jsonl`` to ``followups5.jsonl`` (keys in ``followups2_keys.jsonl`` to
``followups5_keys.jsonl``) are four more sets of 120 written the same way (stops 39 and 40),
each of which judged a rule of the engine's before it was adopted or not: the second look 15
(adopted), the third look 16 (not), the fourth look 17 (adopted), the fifth look 18 (adopted);
their rows say "second set" to "fifth set".

At the largest size, with keys, each set also times what a short message costs: searched
alone, and after its earlier message searched for its own turn (whose vector is then cached,
as in a chat), as the engine searches it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headroom_memory_integrations import ChromaStorage, LocalEmbedder, MemoryStore, NewMemory

from .common import ROOT, Context, Row, SectionResult, clock, latency, log, ms_since
from .paraphrase import KEYED, fact_keys
from .population import VectorCache, fill, keyed_memory_cache, memory_cache

NAME = "followups"
ITEMS = ROOT / "benchmarks" / "followups.jsonl"
KEYS = ROOT / "benchmarks" / "followups_keys.jsonl"
SETS = {
    "": (ITEMS, KEYS),
    **{
        f", {which} set": (
            ROOT / "benchmarks" / f"followups{number}.jsonl",
            ROOT / "benchmarks" / f"followups{number}_keys.jsonl",
        )
        for number, which in ((2, "second"), (3, "third"), (4, "fourth"), (5, "fifth"))
    },
}
"""The sets, by the words their rows' sizes end with: items and their keys."""
SIZES = (0, 10_000)
HALVES = {"dev": 1, "held-out": 0}  # the id's number modulo 2
ENGINE_FOLLOW_UP = "follow-up after the earlier message (the engine)"
ENGINE_ASIDE = "aside after the earlier message (the engine)"
"""The ways the wrappers ask now: the earlier message passed as the previous one
(``search(..., previous_message=...)``)."""


def load(path: Path = ITEMS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _half(item: dict[str, Any]) -> str:
    number = int(item["id"].rsplit("-", 1)[1])
    return next(name for name, rest in HALVES.items() if number % 2 == rest)


def _injected(
    reader: MemoryStore, message: str, earlier: str | None, *, engine: bool = False
) -> list[str]:
    """What is injected for ``message`` searched alone, joined to ``earlier`` (if given), or,
    with ``engine``, as the wrappers search it now: with ``earlier`` as the previous message
    (joined only when that brings a memory nearer: look 15)."""
    if engine:
        found = reader.search(message, top_k=5, chat_message=True, previous_message=earlier)
    else:
        asked = message if earlier is None else f"{earlier}\n{message}"
        found = reader.search(asked, top_k=5, chat_message=True)
    return [result.memory.id for result in found]


def _measure(
    reader: MemoryStore, items: Sequence[dict[str, Any]], targets: Sequence[str]
) -> dict[str, dict[str, float]]:
    """For each way of asking: hit@5 and nothing returned of the follow-ups, and false
    injection of the asides."""
    # (way, the message asked, after the earlier message?, as the engine does it?)
    ways = (
        ("earlier message alone", "earlier", False, False),
        ("follow-up alone", "follow_up", False, False),
        ("follow-up joined to the earlier message", "follow_up", True, False),
        (ENGINE_FOLLOW_UP, "follow_up", True, True),
        ("aside alone", "aside", False, False),
        ("aside joined to the earlier message", "aside", True, False),
        (ENGINE_ASIDE, "aside", True, True),
    )
    measured: dict[str, dict[str, float]] = {}
    for way, asked, after, engine in ways:
        found = [
            _injected(reader, item[asked], item["earlier"] if after else None, engine=engine)
            for item in items
        ]
        if asked == "aside":
            measured[way] = {"false injection": sum(bool(ids) for ids in found) / len(items)}
            continue
        measured[way] = {
            "hit@5": sum(t in ids for t, ids in zip(targets, found)) / len(items),
            "nothing": sum(not ids for ids in found) / len(items),
        }
    return measured


QUICK_TIMED = 12
"""Items whose follow-up and aside are timed in the quick mode (a check that the section runs,
whose times mean nothing): all of them otherwise."""


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    real = LocalEmbedder()
    sizes = ctx.pick(SIZES, (0,))
    plain_cache = memory_cache(ctx.cache, real)
    keyed_cache = keyed_memory_cache(ctx.cache, real, max(sizes))
    for which, (path, keys_path) in SETS.items():
        items = load(path)
        plain: list[str | NewMemory] = [item["fact"] for item in items]
        _run_variant(ctx, result, real, items, plain, plain_cache, sizes, which)
        keyed: list[str | NewMemory] = [
            NewMemory(item["fact"], keys=keys)
            for item, keys in zip(items, fact_keys(items, keys_path))
        ]
        reader = _run_variant(ctx, result, real, items, keyed, keyed_cache, sizes, KEYED + which)
        _time(
            result,
            reader,
            ctx.pick(items, items[:QUICK_TIMED]),
            f"{len(items)} facts + {_size_label(max(sizes))} memories{KEYED}{which}",
        )
    return result


def _size_label(size: int) -> str:
    return f"{size // 1000}k" if size else "0"


def _time(
    result: SectionResult, store: MemoryStore, items: Sequence[dict[str, Any]], where: str
) -> None:
    """Each follow-up and aside timed as a chat message: alone, on a store that has not seen
    it, and after its earlier message, searched first for its own turn (its vector cached, as
    in a chat), as the engine searches it."""
    alone = MemoryStore(store.user_id, storage=store.storage, embedder=store.embedder)
    after = MemoryStore(store.user_id, storage=store.storage, embedder=store.embedder)
    for warm in (alone, after):
        warm.search("a first message opens the store", chat_message=True)
    spent: dict[str, list[float]] = {"alone": [], "after": []}
    for item in items:
        for message in (item["follow_up"], item["aside"]):
            start = clock()
            alone.search(message, chat_message=True)
            spent["alone"].append(ms_since(start))
            after.search(item["earlier"], chat_message=True)  # the earlier turn
            start = clock()
            after.search(message, chat_message=True, previous_message=item["earlier"])
            spent["after"].append(ms_since(start))
    note = "follow-ups and asides, one thread"
    result.add(latency(NAME, f"{where}: a short message alone", spent["alone"], note=note))
    result.add(
        latency(
            NAME,
            f"{where}: a short message after the earlier one (the engine)",
            spent["after"],
            note=note,
        )
    )


def _run_variant(
    ctx: Context,
    result: SectionResult,
    real: LocalEmbedder,
    items: Sequence[dict[str, Any]],
    facts: Sequence[str | NewMemory],
    cache: VectorCache,
    sizes: Sequence[int],
    variant: str,
) -> MemoryStore:
    """The items asked with ``facts`` planted among each of ``sizes`` memories of ``cache``;
    the rows' names end the size with ``variant``. Returns the store at the last size."""
    storage = ChromaStorage.at(ctx.scratch(NAME + re.sub(r"\W+", "-", variant).rstrip("-")))
    planted = MemoryStore(
        "followups-user", storage=storage, embedder=real, duplicate_threshold=None
    ).add_many(facts)
    if len({memory.id for memory in planted}) != len(items):
        raise RuntimeError("two facts of the follow-ups file are the same wording")
    writer = MemoryStore("followups-user", storage=storage, embedder=cache.embedder())
    targets = [memory.id for memory in planted]
    for size in sizes:
        if size:
            fill(writer, cache, size + len(items))
        reader = MemoryStore("followups-user", storage=storage, embedder=real)
        size_label = _size_label(size)
        label = size_label + variant  # the details' key: "10k", "10k, with model-written keys"
        where = f"{len(items)} facts + {size_label} memories{variant}"
        log(f"followups: {where} ({reader.count()} stored); asking")
        for half in HALVES:
            chosen = [i for i, item in enumerate(items) if _half(item) == half]
            measured = _measure(reader, [items[i] for i in chosen], [targets[i] for i in chosen])
            result.details.setdefault(label, {})[half] = measured
            for way, values in measured.items():
                for measure, value in values.items():
                    name = f"{where}, {half}: {way}: {measure}"
                    result.add(Row(NAME, name, round(value, 4), "", n=len(chosen)))
    return reader
