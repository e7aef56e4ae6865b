"""Needle test: 10 planted facts among many similar memories, asked in other words.

The user holds the 10 needles (``corpus.NEEDLES``, e.g. "Marta's grandfather works as a
beekeeper in Porto") and 10k distractors (1k in quick mode) from templates that share their
vocabulary ("<Name>'s <relation> works as <job> in <city>", "... used to be ...", ...: the same
names, relations, jobs and cities, never a needle's name and relation together). Each needle is
asked with a reworded question ("Which city is home to the honey business run by Marta's
grandpa?"). A hit@k is the needle among the first k results of ``search(question, top_k=k)``
with the default relevance floor, i.e. among what the wrapper would inject.

Needles are written first (with the real model), then the distractors (vectors from the cache,
see ``population``), all through ``MemoryStore.add_many``.
"""

from __future__ import annotations

from typing import Any

from headroom_memory_integrations import ChromaStorage, LocalEmbedder, MemoryStore

from .common import Context, Row, SectionResult, log, value_at_least
from .corpus import NEEDLES, distractor_texts
from .population import OVERSUPPLY, VectorCache, fill

NAME = "needle"
LARGEST = 10_000


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    size = ctx.pick(LARGEST, 1_000)
    real = LocalEmbedder()
    storage = ChromaStorage.at(ctx.scratch("needle"))
    cache = VectorCache(distractor_texts(int(LARGEST * OVERSUPPLY) + 1000), ctx.cache, real)
    writer = MemoryStore("needle-user", storage=storage, embedder=cache.embedder())
    planted = writer.add_many([text for text, _ in NEEDLES])
    if len({m.id for m in planted}) != len(NEEDLES):
        raise RuntimeError("the engine merged two needles; make them more different")
    log(f"needle: 10 needles + {size} distractors")
    filled = fill(writer, cache, size + len(NEEDLES))
    reader = MemoryStore("needle-user", storage=storage, embedder=real)
    ranks: list[dict[str, Any]] = []
    for memory, (_, question) in zip(planted, NEEDLES):
        found = reader.search(question, top_k=20, min_score=-1.0)
        ids = [m.id for m, _ in found]
        rank = ids.index(memory.id) + 1 if memory.id in ids else None
        score = found[rank - 1][1] if rank else None
        ranks.append(
            {
                "needle": memory.text,
                "question": question,
                "rank": rank,
                "score": round(score, 3) if score is not None else None,
                "passes_floor": score is not None and score >= reader.min_score,
                "top_result": found[0][0].text if found else None,
            }
        )
    label = f"{size // 1000}k"
    full_target = value_at_least(10) if size == LARGEST else None  # the target is for 10k
    for k, target in ((1, None), (5, full_target)):
        hits = sum(1 for r in ranks if r["rank"] and r["rank"] <= k and r["passes_floor"])
        result.add(
            Row(
                NAME,
                f"hit@{k}, 10 needles among {label} distractors",
                hits,
                "/10",
                target=target,
                note="default relevance floor applies",
            )
        )
    result.details = {"population": filled, "needles": ranks}
    return result
