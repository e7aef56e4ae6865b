"""What a large import costs: ``python -m benchmarks.large_import [--memories N] [--runs R]``.

Two cases, each timed ``--runs`` times in a fresh embedded folder (median printed):

- ``new``: ``import_`` of N memories into an empty user (every record new);
- ``rewrite``: the same N ids imported again with a newer text (``consolidate=False``): every
  memory is superseded, so the write reads and keeps each one's previous record.

The embedder is a hash of the text to a random 384-dimension unit vector (the size of the
default model's), so the figures are the storage's, not the model's. See docs/reliability.md,
section 3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


class _HashedEmbedder:
    dimension = 384
    name = "benchmark-hashed-384"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            rows[row] = np.random.default_rng(seed).standard_normal(self.dimension)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _export(path: Path, count: int, version: int) -> None:
    day = f"2026-01-{version + 1:02d}T00:00:00+00:00"
    with open(path, "w", encoding="utf-8") as out:
        for n in range(count):
            line = {
                "id": f"m{n:06d}",
                "user_id": "alice",
                "text": f"Version {version} of fact {n}: likes item {n * 7} and place {n % 97}",
                "category": "fact",
                "created_at": "2026-01-01T00:00:00+00:00",
                "updated_at": day,
                "source": "manual",
                "metadata": {},
                "history": [],
                "keys": [],
            }
            out.write(json.dumps(line) + "\n")


def _timed_import(folder: Path, exports: list[Path]) -> float:
    """Import each of ``exports`` in turn into a fresh folder; the seconds the last took."""
    from headroom_memory_integrations import ChromaStorage, MemoryStore

    shutil.rmtree(folder, ignore_errors=True)
    store = MemoryStore("alice", db_path=folder, embedder=_HashedEmbedder())
    seconds = 0.0
    for export in exports:
        started = time.perf_counter()
        store.import_(export, consolidate=False)
        seconds = time.perf_counter() - started
    ChromaStorage.at(folder).close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memories", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        first, second = Path(work, "v1.jsonl"), Path(work, "v2.jsonl")
        _export(first, args.memories, 1)
        _export(second, args.memories, 2)
        for case, exports in (("new", [first]), ("rewrite", [first, second])):
            times = [_timed_import(Path(work, "db"), exports) for _ in range(args.runs)]
            print(
                f"{case}: import_ of {args.memories:,} memories: median "
                f"{statistics.median(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)})",
                flush=True,
            )


if __name__ == "__main__":
    main()
