"""An in-memory copy of one collection's vectors, searched exactly.

Chroma answers a nearest-neighbour query in ~1.5-2.5 ms, most of it fixed cost. When this process
is a collection's only writer (embedded storage), it can hold every vector itself and answer in
~0.2 ms for 10k memories: one matrix-vector product (for a batch of queries, one matrix
product). :class:`ChromaCollection` builds the copy in the background and keeps it in step with
its own writes.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np

from ..embeddings.base import Vectors


class VectorIndex:
    """Unit vectors by id; :meth:`nearest` ranks them all by cosine similarity.

    Thread-safe: each method holds the index's lock for its own short work.
    """

    def __init__(self, dimension: int) -> None:
        self._lock = threading.Lock()
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._matrix = np.zeros((64, dimension), dtype=np.float32)  # rows past len(ids): spare
        # the stored rows' sum, for centroid(); float64 keeps adding and taking away float32
        # rows exact
        self._sum = np.zeros(dimension, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._rows

    def put(self, ids: Sequence[str], vectors: Vectors) -> None:
        """Add these vectors, or replace the vectors of ids already present."""
        with self._lock:
            for memory_id, vector in zip(ids, vectors):
                row = self._rows.get(memory_id)
                if row is None:
                    row = self._rows[memory_id] = len(self._ids)
                    self._ids.append(memory_id)
                    if row == len(self._matrix):
                        self._matrix = np.concatenate([self._matrix, np.zeros_like(self._matrix)])
                else:
                    self._sum -= self._matrix[row]
                self._matrix[row] = vector
                self._sum += self._matrix[row]

    def remove(self, ids: Sequence[str]) -> None:
        """Forget these ids (unknown ones are ignored); the last row fills each gap."""
        with self._lock:
            for memory_id in ids:
                row = self._rows.pop(memory_id, None)
                if row is None:
                    continue
                self._sum -= self._matrix[row]
                last = len(self._ids) - 1
                moved = self._ids.pop()
                if row != last:
                    self._ids[row] = moved
                    self._rows[moved] = row
                    self._matrix[row] = self._matrix[last]

    def centroid(self) -> tuple[Vectors, int] | None:
        """The mean of the stored vectors and how many there are (None when empty)."""
        with self._lock:
            count = len(self._ids)
            if not count:
                return None
            return (self._sum / count).astype(np.float32), count

    def nearest(self, vector: Vectors, limit: int) -> list[tuple[str, float]]:
        """The ``limit`` most similar ids with their cosine similarity, most similar first."""
        return self.nearest_many(vector.reshape(1, -1), limit)[0]

    def nearest_many(self, vectors: Vectors, limit: int) -> list[list[tuple[str, float]]]:
        """:meth:`nearest` for each row of ``vectors``, the stored matrix read once for all."""
        with self._lock:
            count = len(self._ids)
            if not count or limit <= 0:
                return [[] for _ in vectors]
            stored = self._matrix[:count]
            if len(vectors) < _BATCH_ROWS:
                # einsum's own loop, not BLAS: a BLAS matrix-vector product runs on every core
                # by default, and on a small busy machine its threads wait on each other (3-7x
                # slower than one thread, measured on 2 cores); einsum is as fast as one BLAS
                # thread and leaves the process's BLAS settings alone.
                similarities = np.einsum("ij,kj->ki", stored, vectors)
            else:  # a batch: one matrix product on one BLAS thread, ~6x faster than row by row
                with one_blas_thread():
                    similarities = vectors @ stored.T
            return [self._best(row, limit) for row in similarities]

    def _best(self, similarities: Vectors, limit: int) -> list[tuple[str, float]]:
        top = most_similar(similarities, limit)
        ids = self._ids
        return list(zip([ids[i] for i in top.tolist()], similarities[top].tolist()))


def most_similar(similarities: Vectors, limit: int) -> np.ndarray:
    """The positions of the ``limit`` highest ``similarities``, highest first."""
    if limit < len(similarities):
        top = np.argpartition(-similarities, limit - 1)[:limit]
    else:
        top = np.arange(len(similarities))
    return top[np.argsort(-similarities[top], kind="stable")]


_BATCH_ROWS = 4  # from this many query rows, one BLAS matrix product beats einsum row by row
_blas: Any = None
_blas_lock = threading.Lock()
_blas_users = 0  # threads inside few_blas_threads
_blas_original: list[int] | None = None  # each BLAS library's threads before the first limit
_blas_threads = 0  # the limit now in force while some are inside


@contextmanager
def few_blas_threads(threads: int = 1) -> Iterator[None]:
    """Limit BLAS to ``threads`` threads (process-wide: BLAS has one setting) while inside.

    Threads may be inside at once: the settings are saved once, by the first to enter in
    the process, and restored by the last to leave, and meanwhile the lowest limit any of
    them asked for holds. (threadpoolctl's own ``limit`` restores what it saw on entry: two
    threads whose limits overlapped left the whole process at one BLAS thread for good.)"""
    global _blas, _blas_users, _blas_original, _blas_threads
    with _blas_lock:
        if _blas is None:
            from threadpoolctl import ThreadpoolController

            _blas = ThreadpoolController().select(user_api="blas")
            _blas_original = [lib.num_threads for lib in _blas.lib_controllers]
        if _blas_users == 0 or threads < _blas_threads:
            for lib in _blas.lib_controllers:
                _set_blas_threads(lib, threads)
            _blas_threads = threads
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                for lib, original in zip(_blas.lib_controllers, _blas_original or ()):
                    _set_blas_threads(lib, original)


def _set_blas_threads(lib: Any, threads: int) -> None:
    """Set a BLAS library's thread count, and leave the next setting to any thread.

    threadpoolctl (from 3.8) lets one thread set OpenBLAS's count: the first to set it, for
    as long as that thread lives; other threads' settings are silently ignored. A thread that
    limited BLAS and lived on (the main thread, a worker) made every other thread's limit do
    nothing, and its restore too when it was the last to leave: the process stayed at one
    BLAS thread. Giving the control back right after each setting lets the next one, from
    whichever thread, take effect (ours are made one at a time, under ``_blas_lock``)."""
    lib.set_num_threads(threads)
    give_back = getattr(lib, "clear_controlling_thread", None)  # threadpoolctl >= 3.8, OpenBLAS
    if give_back is not None:
        give_back()


def one_blas_thread() -> AbstractContextManager[None]:
    """Limit BLAS to one thread for a matrix product: on a small busy machine, BLAS threads
    competing for cores make it several times slower (see :meth:`VectorIndex.nearest_many`).
    Safe to overlap between threads (see :func:`few_blas_threads`)."""
    return few_blas_threads(1)


def vectors_to_text(vectors: Vectors) -> str:
    """``vectors`` as text for a journal file: their little-endian float32 bytes in base64."""
    return base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode("ascii")


def vectors_from_text(text: str, dimension: int) -> Vectors:
    """The vectors :func:`vectors_to_text` wrote, one row of ``dimension`` each."""
    flat = np.frombuffer(base64.b64decode(text), dtype="<f4")
    return flat.reshape(-1, dimension).astype(np.float32)
