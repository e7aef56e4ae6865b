"""Small writes to an embedded folder, stored in Chroma behind the caller.

A single ``add`` on a user of 10k memories spent ~4.5 of its ~11 ms in Chroma's ``upsert``
(two SQLite transactions with four ``fsync`` calls each, and Chroma's own work, holding the
GIL). When the writing process holds everything the write changes in memory (the user's
records and vectors, read ahead: see ``ChromaCollection._warm``), the caller need not wait for
it:

1. the write is appended to a journal in the folder (``.headroom-memory.pending``, one JSON
   line, ``fdatasync``: ~0.2 ms) and made in memory, so every later search and read of this
   process sees it;
2. a worker thread writes it to Chroma, in order, and empties the journal once nothing is
   pending (a deleted memory's text does not stay in it);
3. everything else that reaches Chroma waits for the pending writes first (reads that memory
   cannot answer, deletes, counts, other users' writes, ``close``), so Chroma is always read
   with every earlier write in it.

A write the worker could not store (Chroma failed) stays in the journal and is tried again,
with a growing pause; meanwhile new writes are not deferred, so their callers get Chroma's
error. A process that exits or is killed with writes pending leaves them in the journal, and
the next process to write the folder stores them before anything else (one that opens it, or
one that had it open as a reader and takes its lock: ``ChromaStorage._take_over``). A full disk
is refused before anything is written.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..embeddings.base import Vectors
from ..errors import StorageError
from ..redaction import logger_without_secrets
from .folder import erase_file, replace_file
from .vectors import vectors_from_text, vectors_to_text

logger = logger_without_secrets(__name__)

JOURNAL_FILE = ".headroom-memory.pending"
MAX_DEFERRED_RECORDS = 16
"""Writes of more records than this are made at once (a batch gains little from waiting)."""
SETTLE_SECONDS = 30.0
"""How long a call that reaches Chroma waits for the pending writes before it fails."""
COMPACT_BYTES = 1 << 20
"""A journal past this size, with writes still pending, is rewritten with only those."""
FAILING_SETTLE_SECONDS = 1.0
"""How long that wait is while Chroma refuses the pending writes (the caller gets the error),
and then for the worker's try under way or next: it may be storing them by now."""
EXIT_SECONDS = 10.0
"""How long the process waits at exit for the pending writes (the rest stay journaled)."""
GROUP_SECONDS = 0.05
"""How long the worker gathers writes before storing them (unless somebody waits)."""
MAX_GROUP = 64
_RETRY_PAUSES = (0.05, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class PendingWrite:
    """One write: ``records`` (id -> Chroma metadata) of a user's collection, with vectors."""

    user_id: str
    embedder: str
    dimension: int
    records: dict[str, dict[str, Any]]
    vectors: Vectors

    def to_line(self) -> bytes:
        entry = {
            "user_id": self.user_id,
            "embedder": self.embedder,
            "dimension": self.dimension,
            "records": self.records,
            "vectors": vectors_to_text(self.vectors),
        }
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> PendingWrite:
        entry = json.loads(line)
        dimension = int(entry["dimension"])
        return cls(
            entry["user_id"],
            entry["embedder"],
            dimension,
            dict(entry["records"]),
            vectors_from_text(entry["vectors"], dimension),
        )


def merged(writes: list[PendingWrite]) -> list[PendingWrite]:
    """``writes`` as one write per collection, in the order each collection was first
    written; a record written twice keeps its last version."""
    groups: dict[tuple[str, str, int], tuple[dict[str, dict[str, Any]], dict[str, Vectors]]] = {}
    for write in writes:
        key = (write.user_id, write.embedder, write.dimension)
        records, vectors = groups.setdefault(key, ({}, {}))
        for memory_id, vector in zip(write.records, write.vectors):
            records.pop(memory_id, None)  # (re-inserted last: the order of the latest writes)
            vectors.pop(memory_id, None)
            records[memory_id] = write.records[memory_id]
            vectors[memory_id] = vector
    return [
        PendingWrite(user_id, embedder, dimension, records, np.stack(list(vectors.values())))
        for (user_id, embedder, dimension), (records, vectors) in groups.items()
    ]


def journaled(folder: Path) -> Iterator[PendingWrite]:
    """The writes a journal in ``folder`` still holds, oldest first (a torn last line, from
    a crash while it was appended, was never acknowledged: it is skipped)."""
    try:
        data = (folder / JOURNAL_FILE).read_bytes()
    except FileNotFoundError:
        return
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            yield PendingWrite.from_line(line)
        except (ValueError, KeyError, TypeError):
            logger.warning("skipping an unreadable line of %s", folder / JOURNAL_FILE)


def erase_left_compaction(folder: Path) -> None:
    """Erase the compacted journal a process left beside the journal (killed before renaming
    it over the journal, which is then whole: see :meth:`DeferredWrites._compact_journal`).
    It holds memories' text. Raises OSError."""
    erase_file(folder / (JOURNAL_FILE + ".new"))


def clear_journal(folder: Path) -> None:
    """Empty the journal once what it held is in Chroma (and erase a compacted copy left
    beside it)."""
    erase_left_compaction(folder)
    path = folder / JOURNAL_FILE
    if path.exists():
        with open(path, "r+b") as handle:
            handle.truncate(0)
            os.fsync(handle.fileno())


class DeferredWrites:
    """The pending writes of one embedded folder and the thread that stores them.

    Args:
        folder: The folder (its journal is :data:`JOURNAL_FILE` in it).
        store: Writes one :class:`PendingWrite` to Chroma (raising on failure).
    """

    def __init__(self, folder: Path, store: Callable[[PendingWrite], None]) -> None:
        self.path = folder / JOURNAL_FILE
        self._store = store
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[tuple[PendingWrite, bytes]] = deque()  # with its journal line
        self._fd: int | None = None
        self._journal_bytes = 0  # what the journal holds, stored writes included
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._urgent = False  # somebody waits for the pending writes: store them now
        self.failures = 0  # writes to Chroma that failed (and were tried again)
        self.last_error: str | None = None
        self._failed_at = float("-inf")  # when the last of them failed (time.monotonic)
        _open_queues.add(self)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _forked(self) -> None:
        """In a child forked from the process that made this queue: the pending writes are
        the parent's (its worker stores them; the child has no worker), and so are the lock
        and the journal's descriptor. Start empty."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue = deque()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._journal_bytes = 0
        self._thread = None
        self._urgent = False
        self.last_error = None
        self._failed_at = float("-inf")

    def in_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def add(self, write: PendingWrite) -> bool:
        """Journal ``write`` (durably) and queue it for the worker. Returns False, having done
        nothing, once the worker is stopped (at close or exit): the caller writes at once.

        Raises:
            StorageError: The journal could not be written; nothing was queued.
        """
        line = write.to_line()
        with self._lock:
            if self._stopped:
                return False
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.write(self._fd, line)
                os.fdatasync(self._fd) if hasattr(os, "fdatasync") else os.fsync(self._fd)
            except OSError as exc:
                raise StorageError(f"could not journal the write in {self.path}: {exc}") from exc
            self._journal_bytes += len(line)
            self._queue.append((write, line))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="headroom-memory-writer", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()
        return True

    def settle(self, timeout: float = SETTLE_SECONDS) -> None:
        """Wait until every pending write is in Chroma (at once in the worker itself).

        While Chroma is refusing them, the wait ends sooner: at the first try that fails once
        :data:`FAILING_SETTLE_SECONDS` have passed. A try under way then (Chroma accepting the
        writes again, slowly on a loaded machine) is waited for, within ``timeout``.

        Raises:
            StorageError: Writes are still pending after ``timeout`` seconds, or Chroma
                refused them again.
        """
        if not self._queue or self.in_worker():
            return
        start = time.monotonic()
        deadline = start + timeout
        refused_until = start + FAILING_SETTLE_SECONDS if self.last_error is not None else None
        with self._lock:
            self._urgent = True
            self._changed.notify_all()
            while self._queue:
                left = deadline - time.monotonic()
                refused_again = refused_until is not None and self._failed_at >= refused_until
                if left <= 0 or self._stopped or refused_again:
                    raise StorageError(
                        f"{len(self._queue)} earlier write(s) are not in Chroma yet "
                        f"({self.last_error or 'still being written'}); they are kept in "
                        f"{self.path} and stored when Chroma accepts them"
                    )
                self._changed.wait(left)

    def stop(self, timeout: float = SETTLE_SECONDS) -> None:
        """Store what is pending (for up to ``timeout`` seconds), then stop the worker; what
        is left stays journaled for the next process."""
        try:
            self.settle(timeout)
        except StorageError as exc:
            logger.warning("closing with writes not yet stored: %s", exc)
        with self._lock:
            self._stopped = True
            self._changed.notify_all()
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        _open_queues.discard(self)

    def empty_stored(self) -> None:
        """With nothing pending (after :meth:`settle`): make sure the journal holds nothing,
        before a delete. The worker empties it once the queue is empty, but only logs a
        failure (replaying stored writes is harmless, until one of them is deleted: it would
        come back at the next open).

        Raises:
            StorageError: The journal could not be emptied; the delete must not go on.
        """
        with self._lock:
            if self._queue:
                return  # (settle raised, or a write came in since: the caller holds its locks)
            try:
                if self._fd is not None:
                    empty = os.fstat(self._fd).st_size == 0
                else:
                    empty = not self.path.exists() or self.path.stat().st_size == 0
                if not empty:
                    self._truncate_journal()
                erase_left_compaction(self.path.parent)  # (a killed process's: it has text)
            except OSError as exc:
                raise StorageError(
                    f"could not empty {self.path} before a delete ({exc}); nothing was deleted"
                ) from exc

    def _run(self) -> None:
        tries = 0
        while True:
            with self._lock:
                while not self._queue and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    return
                # group commit: Chroma's write holds the GIL for its whole ~5 ms, whatever it
                # writes, so gather what a quick succession of writes brings first (unless
                # somebody waits for it)
                self._changed.wait_for(
                    lambda: self._urgent or self._stopped or len(self._queue) >= MAX_GROUP,
                    GROUP_SECONDS,
                )
                writes = [write for write, _ in self._queue]
            try:
                for write in merged(writes):
                    self._store(write)
            except Exception as exc:  # kept and tried again: never lost
                with self._lock:
                    self.failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self._failed_at = time.monotonic()
                if not self.path.parent.is_dir():  # the folder was removed: nowhere to store
                    logger.error(
                        "the memory folder %s was removed with %d write(s) pending; they are "
                        "dropped with it",
                        self.path.parent,
                        len(writes),
                    )
                    with self._lock:
                        for _ in writes:
                            self._queue.popleft()
                        self._changed.notify_all()
                    continue
                pause = _RETRY_PAUSES[min(tries, len(_RETRY_PAUSES) - 1)]
                tries += 1
                logger.warning(
                    "memory writes could not be stored in Chroma yet (they stay journaled in "
                    "%s; trying again in %.2f s): %s",
                    self.path,
                    pause,
                    self.last_error,
                )
                with self._lock:
                    self._changed.notify_all()  # (a caller waiting while Chroma refuses)
                    self._changed.wait_for(lambda: self._stopped, pause)
                continue
            tries = 0
            with self._lock:
                for _ in writes:
                    self._queue.popleft()
                self.last_error = None
                if not self._queue:
                    self._empty_journal()
                    self._urgent = False
                elif self._journal_bytes > COMPACT_BYTES:  # writes that never stop coming
                    self._compact_journal()
                self._changed.notify_all()

    def _empty_journal(self) -> None:
        """With the lock held and nothing pending: empty the journal file."""
        try:
            self._truncate_journal()
        except OSError as exc:  # what it holds is stored: replaying it is harmless
            logger.warning("could not empty %s: %s", self.path, exc)

    def _truncate_journal(self) -> None:
        """With the lock held: empty the journal file, durably (raises OSError)."""
        if self._fd is None:
            clear_journal(self.path.parent)
        else:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        self._journal_bytes = 0

    def _compact_journal(self) -> None:
        """With the lock held: replace the journal by one holding only the pending writes
        (written beside it, synced, then renamed over it), so that it stays small however
        long writes keep coming without a pause."""
        pending = b"".join(line for _, line in self._queue)
        try:
            replace_file(self.path, pending)
        except OSError as exc:  # the old journal is intact: it is only longer
            logger.warning("could not compact %s: %s", self.path, exc)
            return
        old, self._fd = self._fd, None  # the next write opens the new journal
        if old is not None:
            os.close(old)
        self._journal_bytes = len(pending)


_open_queues: weakref.WeakSet[DeferredWrites] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for queue in list(_open_queues):
        queue._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _store_pending_at_exit() -> None:
    """Give pending writes a bounded time to reach Chroma as the process exits (none if
    Chroma is refusing them: they stay journaled). Registered
    when this module is imported, before any wrapper registers its own exit work, so that it
    runs after it (exit handlers run last registered first): memories the wrappers store at
    exit are pending then too."""
    deadline = time.monotonic() + EXIT_SECONDS
    for queue in list(_open_queues):
        failing = queue.last_error is not None  # no wait for what Chroma keeps refusing
        queue.stop(0.0 if failing else max(0.0, deadline - time.monotonic()))
