"""What clearing freed memory costs: ``python -m benchmarks.scrub``.

Opening an embedded folder has glibc clear memory as it is freed and handed out
(``storage.folder.scrub_freed_memory``), so that Chroma's index files hold no stray text. This
alternates fresh processes with the clearing (as users get it) and without it (the call
replaced by a no-op), ``ROUNDS`` of each. Each process copies one embedded store of 10,000
synthetic memories, reads it ahead, times ``SEARCHES`` searches of questions it has not seen
(embedded with the real model), then adds ``WRITES`` cached memories to a new user with
``add_many`` in batches of ``WRITE_BATCH``. Printed: the median over rounds of each process's
search p50 and p95, and of its ``add_many`` time per memory.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from itertools import count
from pathlib import Path

from headroom_memory_integrations import LocalEmbedder, MemoryStore

from .common import ROOT, percentile, run_python, sample
from .population import embedded_user, memory_cache, wait_for_read_ahead

ROUNDS = 4
SIZE = 10_000
SEARCHES = 200
WRITES = 3_000
WRITE_BATCH = 100
CACHE = ROOT / "benchmarks" / "results" / "cache"


def measure(folder: Path) -> dict[str, float]:
    """One process's figures on a copy of ``folder``."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "store"
        shutil.copytree(folder, copy)
        store = MemoryStore("reader", db_path=copy)
        wait_for_read_ahead(store)
        questions = (f"what did I say about plan {n} for the weekend trip" for n in count())
        times = sample(lambda: store.search(next(questions)), SEARCHES)
        cache = memory_cache(CACHE, LocalEmbedder())
        cache.ensure(SIZE + WRITES)
        writer = MemoryStore("writer", db_path=copy, embedder=cache.embedder())
        items = cache.items[SIZE : SIZE + WRITES]
        batches = (items[start : start + WRITE_BATCH] for start in range(0, WRITES, WRITE_BATCH))
        writing = sum(sample(lambda: writer.add_many(next(batches)), WRITES // WRITE_BATCH))
    return {
        "search_p50_ms": percentile(times, 50),
        "search_p95_ms": percentile(times, 95),
        "add_many_ms_per_memory": writing / WRITES,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "store"
        embedded_user(folder, "reader", SIZE, CACHE)
        runs: dict[str, list[dict[str, float]]] = {"cleared": [], "not cleared": []}
        for _ in range(ROUNDS):
            for mode in runs:
                arguments = ["-m", "benchmarks.scrub", mode, str(folder)]
                runs[mode].append(run_python(arguments))
    for mode, results in runs.items():
        figures = {key: round(statistics.median(r[key] for r in results), 3) for key in results[0]}
        print(mode, json.dumps({k: v for k, v in figures.items() if k != "wall_ms"}))


if __name__ == "__main__":
    if len(sys.argv) == 3:
        if sys.argv[1] == "not cleared":
            from headroom_memory_integrations.storage import chroma

            chroma.scrub_freed_memory = lambda: False
        print(json.dumps(measure(Path(sys.argv[2]))))
    else:
        main()
