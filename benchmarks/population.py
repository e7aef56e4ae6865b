"""Filling stores with many memories quickly, through the public API.

Embedding 100k texts with the real model takes ~15 minutes on 2 cores, so the synthetic memory
texts are embedded once with the real model and the vectors kept in ``benchmarks/results/cache``
(one ``.npy`` file per chunk of 1,000 texts, named by a hash of the model name and the texts).
The stores are then written through the ordinary public path, ``MemoryStore.add_many`` in
batches, with a :class:`PrecomputedEmbedder` that answers those texts from the cache. Chroma,
the duplicate check and every other part of the write are the real ones; only the embedding
step of *population* is skipped. Every measured search embeds its query with the real model.

Memories written with keys are embedded by the engine as their index text, "text (key, key,
...)" (``headroom_memory_integrations.keys.index_text``): their cache (:func:`keyed_memory_cache`)
holds the vectors of those index texts, and :func:`fill` writes them as ``NewMemory`` items with
their keys, which the engine turns back into the same index texts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headroom_memory_integrations import (
    ChromaStorage,
    LocalEmbedder,
    MemoryStore,
    NewMemory,
    StorageError,
)
from headroom_memory_integrations.keys import clean_keys, index_text, key_questions
from headroom_memory_integrations.storage import Storage

from .common import clock, log, run_python
from .corpus import keyed_memory_texts, memory_texts

CHUNK = 1000
WRITE_BATCH = 1000  # add_many checks each text against all earlier ones of its batch: keep ~1k
OVERSUPPLY = 1.15  # the engine merges near-duplicates; generate extra texts to reach a size
OTHER_USERS_SEED = 99
LARGEST = 100_000
MAX_OTHER_USERS = 1_000


def key_questions_of(items: Sequence[str | NewMemory]) -> list[str]:
    """The distinct key questions of the memories with keys among ``items``: what
    ``keys.memory_vectors`` embeds for them besides their index texts."""
    asked = [
        question
        for item in items
        if isinstance(item, NewMemory)
        for question in key_questions(clean_keys(item.keys))
    ]
    return list(dict.fromkeys(asked))


class PrecomputedEmbedder:
    """An embedder with the real model's name and dimension that answers texts it has
    vectors for from a table, and anything else with the real model."""

    def __init__(self, real: LocalEmbedder, table: dict[str, np.ndarray]) -> None:
        self.real = real
        self.name = real.name
        self.dimension = real.dimension
        self.table = table
        self.misses = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [text for text in dict.fromkeys(texts) if text not in self.table]
        if missing:  # kept in the table: the next store of the run reuses them
            self.table.update(zip(missing, self.real.embed(missing)))
        self.misses += len(missing)
        rows = [self.table[text] for text in texts]
        if not rows:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack(rows).astype(np.float32, copy=False)


class VectorCache:
    """Real-model vectors of a fixed list of texts, computed chunk by chunk on first need and
    kept on disk.

    ``items`` are what :func:`fill` writes, one per text: by default the texts themselves; for
    memories with keys, ``NewMemory(text, keys=keys)`` items whose texts here are their index
    texts (``keys.index_text``), the texts the engine embeds for them."""

    def __init__(
        self,
        texts: Sequence[str],
        directory: Path,
        real: LocalEmbedder,
        items: Sequence[str | NewMemory] | None = None,
    ) -> None:
        self.texts = list(texts)
        self.items: list[str | NewMemory] = list(self.texts if items is None else items)
        if len(self.items) != len(self.texts):
            raise ValueError(f"{len(self.items)} items for {len(self.texts)} texts")
        self.directory = directory
        self.real = real
        self.table: dict[str, np.ndarray] = {}
        self._loaded = 0  # texts[:_loaded] are in the table

    def ensure(self, count: int) -> None:
        """Make sure the first ``count`` texts have vectors in :attr:`table`."""
        count = min(count, len(self.texts))
        while self._loaded < count:
            chunk = self.texts[self._loaded : self._loaded + CHUNK]
            vectors = self._chunk_vectors(chunk)
            self.table.update(zip(chunk, vectors))
            items = self.items[self._loaded : self._loaded + len(chunk)]
            self._loaded += len(chunk)
            # a memory's key questions are embedded too (keys.memory_vectors), cached alike
            asked = [question for question in key_questions_of(items) if question not in self.table]
            if asked:
                self.table.update(zip(asked, self._chunk_vectors(asked)))

    def _chunk_vectors(self, chunk: list[str]) -> np.ndarray:
        # the vectors' form (the name, with -int8 for the 8-bit form) keys the cache: the
        # forms' vectors differ more than the float32 ones of different backends do. The 8-bit
        # form's key also says its products are exact: vectors cached before that on a CPU
        # without VNNI came from a kernel that saturated (bert_onnx.session_options)
        form = self.real.vector_form
        if form.endswith("-int8"):
            form += " exact"
        key = hashlib.sha256("\n".join([form, *chunk]).encode()).hexdigest()[:32]
        path = self.directory / f"{key}.npy"
        if path.exists():
            return np.load(path)
        start = clock()
        vectors = self.real.embed(chunk)
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        np.save(partial, vectors)
        partial.replace(path)
        rate = len(chunk) / (clock() - start)
        log(f"  embedded {self._loaded + len(chunk)} texts for the cache ({rate:.0f} texts/s)")
        return vectors

    def embedder(self) -> PrecomputedEmbedder:
        return PrecomputedEmbedder(self.real, self.table)


def memory_cache(cache_dir: Path, real: LocalEmbedder) -> VectorCache:
    """The cache of synthetic memory texts, long enough to fill a store of the largest size
    (the same list every time, so its chunks are shared by every size and every run)."""
    return VectorCache(memory_texts(int(LARGEST * OVERSUPPLY) + CHUNK), cache_dir, real)


def keyed_memory_cache(cache_dir: Path, real: LocalEmbedder, largest: int) -> VectorCache:
    """The cache of synthetic memories with their model-written keys
    (``corpus.keyed_memory_texts``), long enough to fill a store of ``largest`` memories: its
    texts are the index texts, its items the memories with their keys. Its chunks depend only
    on the texts they hold, so caches of different lengths share them."""
    keyed = keyed_memory_texts(int(largest * OVERSUPPLY) + CHUNK)
    return VectorCache(
        [index_text(text, keys) for text, keys in keyed],
        cache_dir,
        real,
        items=[NewMemory(text, keys=keys) for text, keys in keyed],
    )


def add_batch(store: MemoryStore, items: Sequence[Any]) -> int:
    """``store.add_many(items)``. If the engine raises a :class:`StorageError` for the batch
    (it then writes nothing), each half is added the same way, down to single items. Returns
    how many ``add_many`` calls raised, so callers can report it."""
    try:
        store.add_many(items)
        return 0
    except StorageError as error:
        if len(items) == 1:
            raise
        if len(items) >= 250:
            log(f"  add_many of {len(items)} raised {error}; adding it in halves")
        middle = len(items) // 2
        return 1 + add_batch(store, items[:middle]) + add_batch(store, items[middle:])


def fill(store: MemoryStore, cache: VectorCache, size: int, start: int = 0) -> dict[str, Any]:
    """Add the items of ``cache`` (from ``start`` on) to ``store`` with ``add_many`` until it
    holds ``size`` memories (near-duplicates are merged by the engine, so a few more texts than
    ``size`` are usually offered). ``store`` must use ``cache.embedder()``."""
    began = clock()
    offered, fallbacks = start, 0
    count = store.count()
    while count < size and offered < len(cache.texts):
        batch = cache.items[offered : offered + min(WRITE_BATCH, size - count)]
        cache.ensure(offered + len(batch))
        fallbacks += add_batch(store, batch)
        offered += len(batch)
        count = store.count()
    return {
        "memories": count,
        "texts_offered": offered - start,
        "seconds": round(clock() - began, 1),
        "add_many_errors": fallbacks,
    }


def add_other_users(
    storage: Storage, real: LocalEmbedder, cache_dir: Path, users: int, per_user: int = 3
) -> dict[str, Any]:
    """``users`` other users with ``per_user`` memories each, in the same storage."""
    began = clock()
    texts = memory_texts(MAX_OTHER_USERS * per_user, OTHER_USERS_SEED)  # one list: shared chunks
    cache = VectorCache(texts, cache_dir, real)
    cache.ensure(users * per_user)
    embedder = cache.embedder()
    for user in range(users):
        texts = cache.texts[user * per_user : (user + 1) * per_user]
        MemoryStore(f"other-user-{user:04d}", storage=storage, embedder=embedder).add_many(texts)
        if (user + 1) % 250 == 0:
            log(f"  {user + 1}/{users} other users written")
    return {"users": users, "memories_each": per_user, "seconds": round(clock() - began, 1)}


def populate(
    location: str, users: dict[str, int], cache_dir: Path, other_users: int = 0
) -> dict[str, Any]:
    """Fill ``location`` (an embedded Chroma folder or a server URL): ``other_users`` small
    users, then each of ``users`` (user id -> number of synthetic memories)."""
    real = LocalEmbedder()
    storage = (
        ChromaStorage.from_url(location)
        if location.startswith("http")
        else ChromaStorage.at(location)
    )
    report: dict[str, Any] = {}
    if other_users:
        report["other_users"] = add_other_users(storage, real, cache_dir, other_users)
    cache = memory_cache(cache_dir, real)
    for user_id, size in users.items():
        writer = MemoryStore(user_id, storage=storage, embedder=cache.embedder())
        report[user_id] = fill(writer, cache, size)
        log(
            f"  {user_id}: {report[user_id]['memories']} memories in {report[user_id]['seconds']} s"
        )
    return report


def populate_elsewhere(
    location: str | Path, users: dict[str, int], cache_dir: Path, other_users: int = 0
) -> dict[str, Any]:
    """:func:`populate` in a separate process, so that the process that measures opens the
    stores afresh, like an application started after the memories were written."""
    arguments = {
        "location": str(location),
        "users": users,
        "cache_dir": str(cache_dir),
        "other_users": other_users,
    }
    return run_python(["-m", "benchmarks.population", json.dumps(arguments)], show_log=True)


def embedded_user(folder: Path, user_id: str, size: int, cache_dir: Path) -> dict[str, Any]:
    """Embedded Chroma in ``folder`` holding ``size`` synthetic memories of ``user_id``
    (written by another process)."""
    report: dict[str, Any] = populate_elsewhere(folder, {user_id: size}, cache_dir)[user_id]
    return report


def wait_for_read_ahead(store: MemoryStore) -> None:
    """One search starts the read-ahead of embedded storage; wait for it, so that what is
    measured is the steady state an application sees. A user above the read-ahead limit
    (20k memories) is not read ahead: its read-ahead thread ends at once."""
    from headroom_memory_integrations.storage import chroma

    store.search("warm-up question", min_score=-1.0)
    for thread in list(chroma._warmers):  # private: the benchmark only waits for them
        if thread is not threading.current_thread():
            thread.join(timeout=120)


if __name__ == "__main__":
    options = json.loads(sys.argv[1])
    options["cache_dir"] = Path(options["cache_dir"])
    print(json.dumps(populate(**options)))
