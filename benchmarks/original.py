"""A single ``add`` side by side with the original: headroom-ai 0.2.15's ``FastMemoryStore.add``
(embed, then one SQLite row; no duplicate check) and ours (``MemoryStore.add`` on embedded
Chroma, with consolidation), both on a user of 10k memories, both embedding with our
``LocalEmbedder`` (the original's default loads sentence-transformers and downloads the model),
interleaved in rounds on the same machine.

Not a section of the main run: it needs the original's wheel, which is not a dependency::

    pip download --no-deps headroom-ai==0.2.15 -d /tmp/original
    python -m benchmarks.original /tmp/original/headroom_ai-0.2.15-py3-none-any.whl

Only ``headroom/memory/fast_store.py`` is loaded from the wheel (it needs numpy alone; the
package's ``__init__`` would import litellm and more).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from headroom_memory_integrations import ChromaStorage, LocalEmbedder, MemoryStore

from .common import RESULTS
from .corpus import memory_texts
from .population import embedded_user, memory_cache, wait_for_read_ahead
from .writes import FRESH_SEED

SIZE = 10_000
ROUNDS = 10  # each: 10 adds of one store, then 10 of the other (the order alternates)


def load_fast_store(wheel: Path) -> Any:
    """The original's ``fast_store`` module, executed from the wheel's source."""
    source = zipfile.ZipFile(wheel).read("headroom/memory/fast_store.py").decode()
    module = types.ModuleType("original_fast_store")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{wheel}/headroom/memory/fast_store.py", "exec"), module.__dict__)
    return module


def main(wheel: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="original-") as folder:
        compare(load_fast_store(wheel), Path(folder))


def compare(fast_store: Any, work: Path) -> None:
    real = LocalEmbedder()
    real.warm_up()
    cache = memory_cache(RESULTS / "cache", real)
    cache.ensure(SIZE)
    stored = dict(zip(cache.texts[:SIZE], cache.embedder().embed(cache.texts[:SIZE])))
    original = fast_store.FastMemoryStore(
        work / "original.db", embed_fn=stored.__getitem__, embedding_dim=real.dimension
    )
    for text in cache.texts[:SIZE]:  # its only write path: one row per call
        original.add("writer", text)
    original.set_embed_fn(lambda text: real.embed([text])[0])
    embedded_user(work / "ours", "writer", SIZE, RESULTS / "cache")
    ours = MemoryStore("writer", storage=ChromaStorage.at(work / "ours"), embedder=real)
    wait_for_read_ahead(ours)

    fresh = memory_texts(2 * ROUNDS * 10, FRESH_SEED)
    times: dict[str, list[float]] = {"original (headroom-ai 0.2.15)": [], "ours": []}
    add = {
        "original (headroom-ai 0.2.15)": lambda text: original.add("writer", text),
        "ours": ours.add,
    }
    names = list(times)
    for index in range(ROUNDS):
        texts = fresh[index * 20 : (index + 1) * 20]
        for turn, name in enumerate(names if index % 2 else names[::-1]):
            for text in texts[turn * 10 : (turn + 1) * 10]:
                start = time.perf_counter()
                add[name](text)
                times[name].append((time.perf_counter() - start) * 1000)
    ours.flush()  # what is pending reaches Chroma before the folder is removed
    print(f"add() on a user of {SIZE:,} memories, the same embedder; load {os.getloadavg()}")
    for name, values in times.items():
        p50, p95 = np.percentile(values, 50), np.percentile(values, 95)
        print(f"  {name}: p50 {p50:.2f} ms, p95 {p95:.2f} ms (n={len(values)})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
