"""Measure the relevance floor's points: ``python -m benchmarks.floor``.

For each size of :data:`engine.FLOOR_RISE` (and the sizes of the paraphrase section), the
similarity that the best memory of a user reaches for an unrelated question, at the 95th
percentile of the dev half of ``benchmarks/paraphrase_unrelated.jsonl``: the floor that keeps
false injection at 5% on dev. Below 132 memories, the users are 100 random draws of that many
facts of ``benchmarks/paraphrase_pairs.jsonl``; from 132, the 132 facts, then with 1k and 10k
synthetic memories of the same form (``corpus.memory_texts``, vectors from the benchmark
cache; the first texts of the list, not merged as a store would merge a few), and 100k for
memories without keys. Similarities
are those a search computes (the question's vector moved by the query adapter, then
``engine.centred_query`` with the exact mean). Printed for
memories written as plain texts and with model-written keys; a keyed memory's floor is the
same as the plain one (the engine holds both to it), which must cover the difference.
Nothing here reads the held-out half or the fresh set.
"""

from __future__ import annotations

import numpy as np

from headroom_memory_integrations import LocalEmbedder, NewMemory
from headroom_memory_integrations.embeddings.query_adapter import adapt_queries
from headroom_memory_integrations.engine import (
    DEFAULT_MIN_SCORE,
    centred_query,
    relevance_floor,
)
from headroom_memory_integrations.keys import clean_keys, memory_vectors

from .common import ROOT
from .paraphrase import PAIRS, UNRELATED, fact_keys, load
from .population import VectorCache, keyed_memory_cache, memory_cache

SMALL_SIZES = (1, 3, 10, 30, 100)
DRAWS = 100
DISTRACTORS = (0, 1_000, 10_000)
PLAIN_ONLY = (100_000,)  # the keyed texts of 100k memories are not cached (an hour to embed)
QUANTILE = 0.95


def best_similarities(memories: np.ndarray, questions: np.ndarray) -> np.ndarray:
    """For each question, the highest similarity a search gives any of ``memories``."""
    centroid = (memories.mean(axis=0), len(memories))
    best = []
    for question in questions:
        centred = centred_query(question, centroid)
        best.append(float(centred.similarity_of(memories).max()))
    return np.asarray(best)


def _stored(cache: VectorCache, count: int, keyed: bool) -> np.ndarray:
    """The vectors the engine stores the first ``count`` memories of ``cache`` with (for
    memories with keys, ``keys.memory_vectors``, from the cache's table)."""
    if not keyed:
        return np.stack([cache.table[text] for text in cache.texts[:count]])
    items = [item for item in cache.items[:count] if isinstance(item, NewMemory)]
    return memory_vectors(cache.embedder().embed, [(m.text, clean_keys(m.keys)) for m in items])


def main() -> None:
    real = LocalEmbedder()
    cache_dir = ROOT / "benchmarks" / "results" / "cache"
    pairs, unrelated = load(PAIRS), load(UNRELATED)
    questions = adapt_queries(
        real.name, real.embed([row["question"] for row in unrelated if row["split"] == "dev"])
    )
    keyed = [(row["fact"], clean_keys(k)) for row, k in zip(pairs, fact_keys(pairs))]
    variants = {
        "plain": (None, memory_cache(cache_dir, real), PLAIN_ONLY),
        "keyed": (keyed, keyed_memory_cache(cache_dir, real, max(DISTRACTORS)), ()),
    }
    draw = np.random.default_rng(0)
    print(f"the floor for false injection <= {1 - QUANTILE:.0%}, {len(questions)} dev questions")
    for name, (with_keys, cache, larger) in variants.items():
        cache.ensure(max((*DISTRACTORS, *larger)))
        fact_vectors = (
            real.embed([row["fact"] for row in pairs])
            if with_keys is None
            else memory_vectors(real.embed, with_keys)
        )
        row = []
        for size in SMALL_SIZES:
            chosen = [draw.choice(len(pairs), size, replace=False) for _ in range(DRAWS)]
            best = np.concatenate([best_similarities(fact_vectors[c], questions) for c in chosen])
            row.append((size, float(np.quantile(best, QUANTILE))))
        for extra in (*DISTRACTORS, *larger):
            memories = fact_vectors
            if extra:
                others = _stored(cache, extra, with_keys is not None)
                memories = np.vstack([fact_vectors, others])
            best = best_similarities(memories, questions)
            row.append((len(memories), float(np.quantile(best, QUANTILE))))
        print(f"{name:6s} " + "  ".join(f"{n}: {v:.3f}" for n, v in row))
        floors = "  ".join(f"{n}: {relevance_floor(DEFAULT_MIN_SCORE, n):.3f}" for n, _ in row)
        print(f"{'engine':6s} {floors}")


if __name__ == "__main__":
    main()
