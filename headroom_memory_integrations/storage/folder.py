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
  (``embeddings_queue``), in freed database pages and in its full-text index, its id there
  and in its vector index's id map, and its vector in that index's elements file; this
  removes them. :func:`note_erase` records the erase
  before the delete, so that a process killed in between leaves it to the next one
  (:func:`erase_noted`).
- :func:`scrub_freed_memory`: Chroma's vector index files hold bytes of memory it never
  cleared, which can hold any text the process freed (another user's memories, a deleted one);
  this has the C allocator clear memory as it is freed and handed out.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import pickle
import secrets
import shutil
import sqlite3
import struct
import sys
import time
import weakref
from collections.abc import Iterable, Mapping
from contextlib import closing
from pathlib import Path, PurePath

import numpy as np

from ..errors import StorageError
from ..jobs import sqlite_uri
from ..redaction import logger_without_secrets

logger = logger_without_secrets(__name__)

LOCK_FILE = ".headroom-memory.lock"
ERASE_FILE = ".headroom-memory.erase"
"""The erases of deleted records still to be done (see :func:`note_erase`)."""
INDEX_ID_MAP = "index_metadata.pickle"
"""The file of a Chroma vector index folder that maps records' ids to the index's numbers."""
INDEX_HEADER = "header.bin"
"""The file of a Chroma vector index folder that gives its layout (see :data:`_HEADER`)."""
INDEX_ELEMENTS = "data_level0.bin"
"""The file of a Chroma vector index folder that holds each record's links, vector and number."""
DATABASE_FILE = "chroma.sqlite3"
"""Chroma's database in an embedded folder: a folder without it holds no store."""
MIN_FREE_BYTES = 64 * 2**20
"""An embedded write starts only if at least this much disk space (plus twice the size of the
user's index files and four times the size of the write) stays free."""
_MB = 2**20
DATABASE_WAIT_SECONDS = 10.0
"""The longest an embedded Chroma call waits for another process's lock on ``chroma.sqlite3``
(see :func:`database_free`): chromadb's core waits for it itself, without letting go of
Python's interpreter lock, so the whole process would stand still for as long as it is held."""
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


_SQLITE_WRITE_LOCKS = ((0x40000000, 2, "F_WRLCK"), (0x40000002, 510, "F_RDLCK"))
"""What another process's write to an SQLite database holds (``os_unix.c``): its pending
and reserved bytes (any lock on them), or its shared bytes locked for writing (an exclusive
lock), as (start, length, the kind of lock asked about). A reader's shared lock is not one."""
_FLOCK = "@hhqqi"  # Linux's struct flock: type, whence, start, length, pid


def database_lock_holder(fd: int) -> int | None:
    """The pid of another process holding a write lock (reserved, pending or exclusive) on
    the SQLite database open as ``fd`` (``F_GETLK``: asks, takes nothing; this process's own
    locks are never reported), or None. Linux only (elsewhere always None: the layout of
    ``struct flock`` differs)."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl
    import struct

    for start, length, kind in _SQLITE_WRITE_LOCKS:
        query = struct.pack(_FLOCK, getattr(fcntl, kind), os.SEEK_SET, start, length, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query.ljust(64, b"\0"))
        held, _, _, _, pid = struct.unpack_from(_FLOCK, answer)
        if held != fcntl.F_UNLCK:
            return int(pid)
    return None


def database_free(fd: int, seconds: float) -> bool:
    """Whether no other process holds a lock on the Chroma database open as ``fd`` (another
    program holding a transaction on ``chroma.sqlite3``: a backup tool, an ``sqlite3``
    shell, a process frozen mid-write), waiting up to ``seconds`` for it to let go.
    chromadb's core waits for such a lock holding Python's interpreter lock, so every thread
    of the process stood still while another process held the file. This asks the kernel
    and waits with the interpreter lock let go of; it takes no lock itself (a lock taken
    here would be one of this process's, which Chroma's own calls would wait for).

    A check before the call, not a bound on it: a lock taken between the two is waited for
    by Chroma as before."""
    deadline = time.monotonic() + seconds
    pause = 0.002
    while database_lock_holder(fd) is not None:
        if time.monotonic() + pause > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return True


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
        uri = sqlite_uri(PurePath(os.path.abspath(folder / DATABASE_FILE)), "ro")
        with closing(sqlite3.connect(uri, uri=True)) as db:
            row = db.execute(
                "SELECT id FROM segments WHERE collection = ? AND scope = 'VECTOR'",
                (collection_id,),
            ).fetchone()
    except sqlite3.Error:
        return None
    return folder / row[0] if row else None


# A log entry keeps its vector's length (zeros: replayed, an entry upserts a zero vector that a
# later entry deletes), loses its record, whose JSON holds the text, and gets its placeholder id.
_BLANK = (
    "UPDATE embeddings_queue SET id = ?, metadata = NULL, "
    "vector = CASE WHEN vector IS NULL THEN NULL ELSE zeroblob(length(vector)) END"
)


_DELETE_OPERATION = 3
"""How Chroma's log (``embeddings_queue.operation``) writes a delete (0 to 2: add, update,
upsert)."""


def placeholders(ids: Iterable[str]) -> dict[str, str]:
    """A random id for each of ``ids``, to stand in for it once it is deleted (see
    :func:`erase_deleted`): nothing in it can be traced back to the id or its text."""
    return {memory_id: f"erased-{secrets.token_hex(16)}" for memory_id in ids}


def erase_deleted(
    folder: Path, collection_id: str, ids: Mapping[str, str] | None
) -> dict[str, str]:
    """Remove the text, vectors and ids of deleted records from ``folder``'s Chroma files.

    ``ids`` maps each deleted id to the placeholder (:func:`placeholders`) its entries in
    Chroma's write-ahead log are renamed to, as is the id in the vector index's id map
    (``index_metadata.pickle``) if that still holds it: a memory's id is a hash of its user's
    id and its wording (``concurrency.wording_id``), so a short text could be found again from
    it by trying every guess. The log still reads "added, then deleted" (of the placeholder),
    and the index loaded from disk still deletes what the log says; the vector the index saved
    for each is zeroed (:func:`_clear_vectors`: close Chroma's client first, or it saves the
    vector again from its memory). An id still stored is left
    as it is: if the newest entry of its log is its delete, Chroma logged the delete and has
    not applied it to its records yet (it does that in a second step, and the process was
    killed in between, or the step failed; the next chromadb to open the folder applies it at
    the collection's first read or write, see :func:`logged_deletes`), and the id is returned
    with its placeholder, for a later try; otherwise its delete never happened (the process
    was killed before Chroma logged it).

    With ``ids`` None, every record of a collection that was dropped (and nothing, if it
    still exists). The log entries are blanked (a vector becomes zeros of the same length),
    the full-text index merged (it keeps deleted documents' trigrams until merged) and the file
    rewritten (``VACUUM``) so that freed pages keep nothing. Run it after the delete, with no
    write in progress. It costs a rewrite of the file: about 0.3 s for a 6 MB database here.
    Running it again changes nothing more.

    If the index's id map holds a deleted id but cannot be read (a layout other than Chroma's
    plain one, see :class:`_PlainUnpickler`) or rewritten, the log entries keep their ids (the
    log's replay must find in the index what it deletes) and lose the rest as above; those
    ids, with their placeholders, are returned, for a later try (once Chroma has saved the map
    anew, without them), as are the ids whose delete Chroma has logged and not applied yet.
    Otherwise it returns an empty dict.

    Raises:
        sqlite3.Error: The file could not be rewritten (e.g. no room for the copy).
    """
    kept: dict[str, str] = {}
    path = folder / DATABASE_FILE
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        db.execute("PRAGMA secure_delete = ON")  # rows this connection changes are zeroed
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if "embeddings_queue" in tables:
            topic = f"%/{collection_id}"
            gone, kept = _deleted(db, collection_id, ids)
            if gone:
                segment = db.execute(
                    "SELECT id FROM segments WHERE collection = ? AND scope = 'VECTOR'",
                    (collection_id,),
                ).fetchone()
                renamed = gone
                if segment is not None:  # (first: the log's replay must find what it deletes)
                    try:
                        dimension = _dimension(db, collection_id)
                        _clear_vectors(folder / segment[0], [*gone, *gone.values()], dimension)
                    except Exception:  # (not the layout read here, or the file is unwritable)
                        logger.warning(
                            "the vectors of deleted memories may stay in %s's vector index "
                            "(their text and ids are erased)",
                            folder,
                            exc_info=True,
                        )
                    try:
                        _rename_in_index(folder / segment[0], gone)
                    except Exception:  # (not Chroma's plain layout, or no room to rewrite it)
                        logger.warning(
                            "the ids of deleted memories stay in %s: its vector index's id "
                            "map could not be rewritten (their text and vectors are erased; "
                            "the ids are tried again after the next delete)",
                            folder,
                            exc_info=True,
                        )
                        kept, renamed = {**kept, **gone}, {i: i for i in gone}
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany(
                        f"{_BLANK} WHERE id = ? AND topic LIKE ?",
                        [(placeholder, i, topic) for i, placeholder in renamed.items()],
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
    return kept


def _dimension(db: sqlite3.Connection, collection_id: str) -> int:
    """The length of the collection's vectors, from Chroma's catalog. Raises OSError if it
    has none (sqlite3.Error if it cannot be read)."""
    row = db.execute("SELECT dimension FROM collections WHERE id = ?", (collection_id,)).fetchone()
    if row is None or type(row[0]) is not int or row[0] <= 0:
        raise OSError(f"Chroma's catalog gives collection {collection_id} no dimension")
    return int(row[0])


def _deleted(
    db: sqlite3.Connection, collection_id: str, ids: Mapping[str, str] | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Of ``ids`` (every id in the dropped collection's log if None), those no longer
    stored, and those still stored whose delete Chroma has logged and not applied yet (see
    :func:`_delete_waits`), each with its placeholder. The other ids were never deleted."""
    if ids is None:
        if db.execute("SELECT 1 FROM collections WHERE id = ?", (collection_id,)).fetchone():
            return {}, {}  # not dropped
        logged = db.execute(
            "SELECT DISTINCT id FROM embeddings_queue WHERE topic LIKE ?", (f"%/{collection_id}",)
        )
        return placeholders(row[0] for row in logged), {}
    stored = _stored(db, collection_id, ids)
    gone = {i: placeholder for i, placeholder in ids.items() if i not in stored}
    waiting = {
        i: placeholder
        for i, placeholder in ids.items()
        if i in stored and _delete_waits(db, collection_id, i)
    }
    return gone, waiting


def _stored(db: sqlite3.Connection, collection_id: str, ids: Iterable[str]) -> set[str]:
    """Those of ``ids`` that the collection's records hold (its metadata segment)."""
    return {
        row[0]
        for i in ids
        for row in db.execute(
            "SELECT e.embedding_id FROM embeddings e JOIN segments s ON s.id = e.segment_id "
            "WHERE s.collection = ? AND s.scope = 'METADATA' AND e.embedding_id = ?",
            (collection_id, i),
        )
    }


def _delete_waits(db: sqlite3.Connection, collection_id: str, memory_id: str) -> bool:
    """Whether the newest entry of a stored id in the collection's log is its delete: Chroma
    writes a delete to its log, then applies it to its records in a second step (a process
    killed in between leaves it logged, not applied, until the next chromadb to open the
    folder reads or writes the collection)."""
    newest = db.execute(
        "SELECT operation FROM embeddings_queue WHERE id = ? AND topic LIKE ? "
        "ORDER BY seq_id DESC LIMIT 1",
        (memory_id, f"%/{collection_id}"),
    ).fetchone()
    return newest is not None and newest[0] == _DELETE_OPERATION


class _PlainUnpickler(pickle.Unpickler):
    """Reads a pickle of plain values only (dicts, strings, numbers, None: what Chroma writes
    in an id map) and refuses any class or function, so a file planted in the folder cannot
    run code here."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain value")


def _plain_pickle(data: bytes) -> object:
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise OSError(f"not a vector index id map: {exc}") from exc


_HEADER = struct.Struct("<IQQQQQQiiQQ")
"""The start of a vector index's ``header.bin`` (Chroma's hnswlib): its format's version,
where the elements start in ``data_level0.bin``, room, elements stored, each one's size, where
its label and its vector lie in it, the top layer, the entry point, and the most links an
element has above the bottom layer and in it (the links come first in an element)."""


def _clear_vectors(segment: Path, ids: Iterable[str], dimension: int) -> None:
    """Zero the saved vector (of ``dimension`` numbers) of each of ``ids`` in a vector index's
    elements file (``data_level0.bin``), in place, synced. The id map gives
    each id's label (an id it does not hold was not saved in the index yet); the element
    holding that label is found by reading every element's label. Only the layout read here
    is written into (its header's version, and sizes that fit the links, the vector and the
    label of an element): zeroing other bytes would break the index. Chroma keeps a deleted
    element, vector and all, and writes it out again from its own memory when it next saves
    the index: its client must be closed before this (Chroma then loads the cleared file when
    it next opens it).

    Raises:
        OSError: The files are not in the layout read here, or could not be written."""
    try:
        saved = _plain_pickle((segment / INDEX_ID_MAP).read_bytes())
    except FileNotFoundError:
        return
    to_label = saved.get("id_to_label") if isinstance(saved, dict) else None
    if not isinstance(to_label, dict):
        raise OSError(f"{segment / INDEX_ID_MAP} is not a vector index id map")
    labels = {to_label[i] for i in ids if i in to_label}
    if not labels:
        return
    if not all(type(label) is int and label >= 0 for label in labels):
        raise OSError(f"{segment / INDEX_ID_MAP} has labels that are not numbers")
    header = (segment / INDEX_HEADER).read_bytes()
    if len(header) < _HEADER.size:
        raise OSError(f"{segment / INDEX_HEADER} is too short for a vector index header")
    version, start, _, count, size, label_at, vector_at, *_, links = _HEADER.unpack_from(header)
    if not (
        version == 1
        and vector_at == 4 + 4 * links  # (a count, then the links)
        and label_at == vector_at + 4 * dimension
        and size == label_at + 8
    ):
        raise OSError(f"{segment / INDEX_HEADER} is not a header of the layout read here")
    if not count:
        return
    path = segment / INDEX_ELEMENTS
    fd = os.open(path, os.O_RDWR)
    try:
        length = os.fstat(fd).st_size
        if start + count * size > length:
            raise OSError(f"{path} is shorter than its header says")
        elements = os.pread(fd, count * size, start)
        stored = np.ndarray((count,), "<u8", elements, label_at, (size,))
        found = np.flatnonzero(np.isin(stored, np.fromiter(labels, "<u8", len(labels))))
        for element in found.tolist():
            _write_all_at(fd, bytes(label_at - vector_at), start + element * size + vector_at)
        if len(found):
            os.fsync(fd)
    finally:
        os.close(fd)


def _rename_in_index(segment: Path, renamed: Mapping[str, str]) -> None:
    """Rename ids in a vector index's id map (Chroma's ``index_metadata.pickle``: it is written
    every ``sync_threshold`` writes, so it can hold an id deleted since), written beside it,
    synced and renamed over it. The index's own files know records by number only."""
    path = segment / INDEX_ID_MAP
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if not any(i.encode() in data for i in renamed):
        return
    saved = _plain_pickle(data)
    if not isinstance(saved, dict):
        raise OSError(f"{path} is not a vector index id map")
    to_label, to_id = saved.get("id_to_label") or {}, saved.get("label_to_id") or {}
    to_seq = saved.get("id_to_seq_id") or {}
    for old, new in renamed.items():
        if old in to_label:
            label = to_label[new] = to_label.pop(old)
            to_id[label] = new
        if old in to_seq:
            to_seq[new] = to_seq.pop(old)
    replace_file(path, pickle.dumps(saved, protocol=3))  # (Chroma writes protocol 3)


def note_erase(
    folder: Path, collection_id: str, ids: Iterable[str] | None, index: Path | None = None
) -> None:
    """Before deleting records (``ids``; all of the collection, dropped, if None): record in
    :data:`ERASE_FILE` that their text, vectors and ids are to be erased, durably (0600,
    synced), so that a process killed after the delete and before :func:`erase_noted` leaves
    the erase to the next one that opens the folder. It holds the collection, the ids (with
    the random placeholder each gets), and a dropped collection's vector index folder
    (``index``), no text. Raises OSError; the delete must not go on then."""
    entry = {
        "collection": collection_id,
        "ids": None if ids is None else placeholders(ids),
        "index": None if index is None else index.name,
    }
    path = folder / ERASE_FILE
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # (after a torn last line, which is then skipped alone)
        _write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        sync_folder(folder)


def erase_noted(folder: Path) -> None:
    """Do the erases :func:`note_erase` recorded in ``folder`` (:func:`erase_deleted`), then
    erase the record. Nothing to do if there is none.

    A dropped collection's erase is done (and its vector index folder removed) only once
    Chroma's catalog has neither the collection nor a segment kept in that folder: the
    process may have been killed before the drop, or the drop failed, and the collection and
    its index are still in use; that entry is then let go of. Deleted ids that stay in the
    folder for now (see :func:`erase_deleted`) are recorded anew, for the next try.

    Raises (see :func:`erase_deleted`); the record is kept then."""
    path = folder / ERASE_FILE
    erases = _noted(path)
    if erases is None:
        return
    left: list[dict[str, object]] = []
    for collection_id, ids, index in erases:
        if not (
            isinstance(index, str) and index not in ("", ".", "..") and Path(index).name == index
        ):
            index = None
        if ids is None and _in_catalog(folder, collection_id, index):
            continue  # never dropped: nothing of it is to be erased
        if index is not None:
            remove_folder(folder / index)  # (a dropped collection's: logs a failure)
        kept = erase_deleted(folder, collection_id, ids)
        if kept:
            left.append({"collection": collection_id, "ids": kept, "index": None})
    if left:
        _rewrite_record(path, left)
    elif erase_file(path):
        sync_folder(folder)


def _noted(path: Path) -> list[tuple[str, dict[str, str] | None, str | None]] | None:
    """The erases recorded in the erase record ``path`` (see :func:`note_erase`): each
    collection, its ids with their placeholders (None: all of it, dropped) and its vector
    index folder's name. None if there is no record."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    erases: list[tuple[str, dict[str, str] | None, str | None]] = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
            ids = None if entry["ids"] is None else dict(entry["ids"])
            erases.append((str(entry["collection"]), ids, entry.get("index")))
        except (ValueError, KeyError, TypeError):  # a torn last line: that delete never ran
            continue
    return erases


def logged_deletes(folder: Path) -> list[str]:
    """The names of the collections with a delete recorded for erasing in ``folder`` that
    Chroma has logged and not yet applied to its records (see :func:`erase_deleted`): a
    process killed between the two steps of Chroma's delete, or whose second step failed.
    The next chromadb to open the folder applies it at the collection's first read or write
    (one that failed to apply it does not try again); the erase must come after that
    (before, the id is still stored, and an erase then would leave the text that the applied
    delete frees in the file). Empty if there is no record. Raises sqlite3.Error if Chroma's
    database cannot be read."""
    erases = _noted(folder / ERASE_FILE)
    path = folder / DATABASE_FILE
    if not erases or not path.exists():
        return []
    names: list[str] = []
    with closing(sqlite3.connect(path, timeout=30.0)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if not {"collections", "embeddings", "embeddings_queue"} <= tables:
            return []
        for collection_id, ids, _ in erases:
            if not ids or not _deleted(db, collection_id, ids)[1]:
                continue
            row = db.execute("SELECT name FROM collections WHERE id = ?", (collection_id,))
            name = row.fetchone()
            if name is not None and name[0] not in names:
                names.append(name[0])
    return names


def _in_catalog(folder: Path, collection_id: str, segment: str | None) -> bool:
    """Whether Chroma's catalog in ``folder`` still has a collection, or a segment whose files
    are in the folder named ``segment``. Raises sqlite3.Error if it cannot be read."""
    path = folder / DATABASE_FILE
    if not path.exists():
        return False
    with closing(sqlite3.connect(path, timeout=30.0)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        found = (
            "collections" in tables
            and db.execute("SELECT 1 FROM collections WHERE id = ?", (collection_id,)).fetchone()
        )
        if not found and segment is not None and "segments" in tables:
            found = db.execute("SELECT 1 FROM segments WHERE id = ?", (segment,)).fetchone()
    return bool(found)


def _rewrite_record(path: Path, entries: list[dict[str, object]]) -> None:
    """Replace the erase record ``path`` with ``entries`` (written beside it, synced, renamed
    over it). Raises OSError."""
    replace_file(
        path, b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)
    )


def sync_folder(folder: Path) -> None:
    """Make a file's creation, rename or removal in ``folder`` durable."""
    with contextlib.suppress(OSError):  # (not every system opens folders: Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def erase_file(path: Path) -> bool:
    """Empty ``path`` (its text leaves the disk's file), then remove it. False if there was
    none. Raises OSError."""
    try:
        with open(path, "r+b") as handle:
            handle.truncate(0)
            os.fsync(handle.fileno())
    except FileNotFoundError:
        return False
    path.unlink(missing_ok=True)
    return True


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset`` (``os.pwrite`` may write part of it)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` durably, whole or not at all: written beside it (0600),
    synced, renamed over it, and the rename synced. On failure the copy beside it is erased (it
    may hold memories' text) and the error raised (OSError; or an interruption); ``path`` is
    as it was."""
    fresh = path.with_name(path.name + ".new")
    try:
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(fresh, path)
    except BaseException:
        with contextlib.suppress(OSError):
            erase_file(fresh)
        raise
    sync_folder(path.parent)


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
