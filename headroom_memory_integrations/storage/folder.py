"""What an embedded memory folder needs beyond Chroma: one writing process, room on the disk,
and erasing deleted text from the files.

- :class:`FolderLock`: the process that writes to a folder holds an exclusive lock on
  ``.headroom-memory.lock`` in it (``flock``: the kernel releases it when the process dies, so a
  crash never leaves it stuck). A second process can read, but its writes fail with a clear
  :class:`StorageError`: two processes writing one embedded folder would each keep their own
  search index and miss the other's memories.
- :func:`make_private_folder`: a folder the library creates is its owner's alone (0700): the
  memories and queued turns in it are personal.
- :func:`check_free_space`: a write starts only if the disk keeps :data:`MIN_FREE_BYTES` free
  after it, so Chroma never meets a full disk halfway through a write (which can empty its index
  files and lose acknowledged writes).
- :func:`erase_deleted`: Chroma keeps a deleted record's text in its write-ahead log
  (``embeddings_queue``), in freed database pages and in its full-text index; this removes it.
- :func:`scrub_freed_memory`: Chroma's vector index files hold bytes of memory it never
  cleared, which can hold any text the process freed (another user's memories, a deleted one);
  this has the C allocator clear memory as it is freed and handed out.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import sqlite3
import sys
import weakref
from collections.abc import Collection
from contextlib import closing
from pathlib import Path

from ..errors import StorageError

logger = logging.getLogger(__name__)

LOCK_FILE = ".headroom-memory.lock"
DATABASE_FILE = "chroma.sqlite3"
"""Chroma's database in an embedded folder: a folder without it holds no store."""
MIN_FREE_BYTES = 64 * 2**20
"""An embedded write starts only if at least this much disk space (plus twice the size of the
user's index files and four times the size of the write) stays free."""
_MB = 2**20
M_PERTURB = -6  # glibc's mallopt parameter (malloc.h)
CLEAR_FREED_VARIABLE = "HEADROOM_MEMORY_CLEAR_FREED"  # "0": leave glibc's allocator as it is
SCRUB_BYTE = 0x5A
"""What glibc writes over memory as it is freed (and its complement over memory as it is
handed out), once :func:`scrub_freed_memory` has run."""


class FolderLock:
    """The exclusive write lock of one embedded folder, for this process.

    Args:
        folder: The memory folder (it must exist).
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None
        self._pid = os.getpid()  # the process _fd belongs to
        _locks.add(self)

    @property
    def held(self) -> bool:
        """True if this process holds the lock (never in a child forked from its holder: the
        lock is the parent's)."""
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self) -> bool:
        """Take the lock if no other process holds it; True if this process holds it now."""
        if self._pid != os.getpid():
            self._forked()
        if self._fd is not None:
            return True
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one writing process is the user's promise
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd, self._pid = fd, os.getpid()
        return True

    def holder(self) -> str:
        """The process id written by the lock's holder ("unknown" if unreadable)."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._pid != os.getpid():
            self._forked()
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def _forked(self) -> None:
        """In a child forked from this lock's holder: close the inherited descriptor without
        unlocking (``flock(LOCK_UN)`` would release the parent's lock; closing the child's copy
        does not, and lets the parent's own close release it). The child holds nothing."""
        fd, self._fd, self._pid = self._fd, None, os.getpid()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


_locks: weakref.WeakSet[FolderLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_locks):
        lock._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def folder_identity(folder: Path) -> tuple[int, int] | None:
    """Which folder is at ``folder`` now (device and inode), or None if none is: a folder
    removed and made again at the same path is another folder. What a process keeps open of
    the first one (Chroma's files, the job queue) is not the second one's."""
    try:
        found = os.stat(folder)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


def make_private_folder(folder: Path) -> None:
    """Create ``folder`` (and its missing parents) if it does not exist, readable and writable
    by its owner only (0700), so another account on the machine cannot read the memories and
    queued turns its files hold. An existing folder keeps the permissions it has."""
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def directory_bytes(folder: Path) -> int:
    """Total size of the files directly in ``folder`` (0 if it does not exist)."""
    try:
        with os.scandir(folder) as entries:
            return sum(e.stat().st_size for e in entries if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def check_free_space(folder: Path, index_bytes: int, write_bytes: int) -> None:
    """Refuse a write unless the disk keeps :data:`MIN_FREE_BYTES` free after it.

    Args:
        index_bytes: The size of the index files the write may rewrite (counted twice).
        write_bytes: About how much the write adds (counted four times: log, records,
            full-text index, journal).

    Raises:
        StorageError: Not enough space; nothing was written.
    """
    if not hasattr(os, "statvfs"):  # pragma: no cover - Windows
        return
    needed = MIN_FREE_BYTES + 2 * index_bytes + 4 * write_bytes
    try:
        available = free_bytes(folder)
    except OSError as exc:  # the folder was removed (or its disk unmounted) under the store
        raise StorageError(
            f"the memory folder {folder} cannot be read ({exc.strerror or exc}): was it "
            "removed while in use? Nothing was written."
        ) from exc
    if available < needed:
        raise StorageError(
            f"the disk holding {folder} is (almost) full: {available / _MB:.1f} MB free, and a "
            f"write needs {needed / _MB:.1f} MB to be safe. Nothing was written; reading still "
            "works. Free some space and write again."
        )


def vector_segment(folder: Path, collection_id: str) -> Path | None:
    """The folder of a collection's vector index files, looked up in Chroma's catalog."""
    try:
        uri = f"file:{folder / DATABASE_FILE}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True)) as db:
            row = db.execute(
                "SELECT id FROM segments WHERE collection = ? AND scope = 'VECTOR'",
                (collection_id,),
            ).fetchone()
    except sqlite3.Error:
        return None
    return folder / row[0] if row else None


# A log entry keeps its vector's length (zeros: replayed, an entry upserts a zero vector that a
# later entry deletes) and loses its record, whose JSON holds the text.
_BLANK = (
    "UPDATE embeddings_queue SET metadata = NULL, "
    "vector = CASE WHEN vector IS NULL THEN NULL ELSE zeroblob(length(vector)) END"
)


def erase_deleted(folder: Path, collection_id: str, ids: Collection[str] | None) -> None:
    """Remove the text and vectors of deleted records from ``folder``'s Chroma database file.

    Blanks the records' entries in Chroma's write-ahead log (all of the collection's when
    ``ids`` is None; a vector becomes zeros of the same length), merges the full-text index
    (which keeps deleted documents' trigrams until merged) and rewrites the file (``VACUUM``)
    so that freed pages keep nothing. Run it after the delete, with no write in progress. It
    costs a rewrite of the file: about 0.3 s for a 6 MB database here.

    Raises:
        sqlite3.Error: The file could not be rewritten (e.g. no room for the copy).
    """
    path = folder / DATABASE_FILE
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        db.execute("PRAGMA secure_delete = ON")  # rows this connection changes are zeroed
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if "embeddings_queue" in tables:
            topic = f"%/{collection_id}"
            db.execute("BEGIN IMMEDIATE")
            try:
                if ids is None:
                    db.execute(f"{_BLANK} WHERE topic LIKE ?", (topic,))
                else:
                    db.executemany(
                        f"{_BLANK} WHERE id = ? AND topic LIKE ?", [(i, topic) for i in ids]
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if "embedding_fulltext_search" in tables:
            try:
                db.execute(
                    "INSERT INTO embedding_fulltext_search(embedding_fulltext_search) "
                    "VALUES ('optimize')"
                )
            except sqlite3.Error:  # e.g. an SQLite without the trigram tokenizer
                logger.warning("could not merge Chroma's full-text index", exc_info=True)
        db.execute("VACUUM")
    finally:
        db.close()


def remove_folder(folder: Path) -> None:
    """Delete ``folder`` and its files, overwriting each file with zeros first (a reader that
    still holds one open sees no text either). A failure is logged: the delete it follows
    succeeded."""
    try:
        for path in sorted(folder.rglob("*"), reverse=True):
            if path.is_file() and not path.is_symlink():
                with open(path, "r+b") as handle:
                    size = handle.seek(0, os.SEEK_END)
                    handle.seek(0)
                    while size > 0:
                        size -= handle.write(b"\0" * min(size, _MB))
                    handle.flush()
                    os.fsync(handle.fileno())
        shutil.rmtree(folder)
    except FileNotFoundError:
        return  # Chroma removed it already
    except OSError:
        logger.warning(
            "could not remove the deleted collection's files in %s", folder, exc_info=True
        )


def scrub_freed_memory() -> bool:
    """Have glibc's allocator overwrite memory when it is freed and when it is handed out, for
    the rest of the process; True if it now does.

    Chroma's vector index allocates room for more records than it holds and writes all of it
    to ``data_level0.bin``, unused room included, without clearing it first. Unused room is
    whatever the process's allocator last kept there: the text of a memory read, written or
    deleted moments before, of any user. So another user's forgotten memories could stay on
    disk inside a kept user's index file. With this, freed memory holds :data:`SCRUB_BYTE` and
    new memory its complement, so such room holds no text.

    It applies to the whole process, at the cost of filling each allocation and each freed
    block once (small blocks that glibc keeps in its per-thread cache are left as they are):
    0-10% of a search here. ``HEADROOM_MEMORY_CLEAR_FREED=0`` in the environment turns it off,
    for an application that cannot afford it elsewhere (deleted text may then stay in those
    files). It does nothing and returns False off glibc (macOS, Windows, musl), where this
    stray text is not cleared.
    """
    if os.environ.get(CLEAR_FREED_VARIABLE, "").strip() == "0":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only: musl's mallopt ignores this
        return bool(libc.mallopt(M_PERTURB, SCRUB_BYTE))
    except (OSError, AttributeError):
        return False
