"""Durable background jobs: a SQLite-backed queue and a worker thread that drains it.

The OpenAI wrappers store memories off the caller's critical path: they :meth:`JobQueue.put` a
job ("store these memories for user X") and :meth:`JobWorker.notify` a worker thread, which runs
the handler and deletes the job once it returned. Jobs live in one SQLite file (WAL mode,
``synchronous=NORMAL``: a commit survives a crash or ``kill -9`` of the process, though not a
power cut of the last few commits), so whatever a process did not finish, the next process that
opens the same file resumes. A finished job leaves no trace of its payload (turn text) in the
files: its row is deleted with ``secure_delete`` (the space is zeroed), and when the worker goes
idle it checkpoints the WAL and truncates it to nothing. A job may run more than once (a crash
after the handler's write but before ``complete``), so handlers must be idempotent; it is never
silently dropped: retryable errors are retried forever with capped exponential backoff, the rest
are dead-lettered (status ``failed``, kept in the file; :meth:`JobQueue.retry_failed` requeues
them).

Example::

    queue = JobQueue("~/.headroom-memory/jobs.sqlite3")
    worker = JobWorker(queue, handle)   # handle(job) raises PermanentJobError to dead-letter
    queue.put("store", "alice", {"texts": ["Prefers Python"]})
    worker.notify()                     # starts the thread on first use
    worker.flush(timeout=5)             # True once everything pending is done or dead-lettered
"""

from __future__ import annotations

import atexit
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import socket
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any
from urllib.parse import quote

from .errors import HeadroomMemoryError, InvalidInputError
from .redaction import logger_without_secrets, without_secrets

logger = logger_without_secrets(__name__)

MAX_PAYLOAD_BYTES = 1_000_000
MAX_ERROR_CHARS = 2_000
DEFAULT_LEASE_SECONDS = 300.0
_HOST = socket.gethostname()
_CHECKPOINT_EVERY = 0.5  # seconds, at most, between the worker's WAL checkpoints
_QUIET_TRIES = 60  # while the queue keeps failing, one log line per this many tries
_COLUMNS = "id, kind, user_id, payload, attempts, created_at, last_error"
_ALL_COLUMNS = (
    "id, kind, user_id, payload, status, attempts, created_at, not_before, owner, lease_until,"
    " last_error"
)
# How long a statement waits, with the queue's lock held, for another connection's lock on the
# file; past that the lock is let go of while the wait goes on (see JobQueue._begin)
_STATEMENT_BUSY_SECONDS = 0.05
_IDS_PER_STATEMENT = 500  # job ids asked about in one statement (SQLite's limit is 999 at least)
_SQLITE_NOTADB = 26  # "file is not a database" (sqlite3.SQLITE_NOTADB from Python 3.11)

#: Schema migrations, applied in order; ``PRAGMA user_version`` is how many have run.
#: Append new scripts, never edit old ones. One statement per ``;``-terminated line group.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are never reused
        kind        TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        payload     TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'running', 'failed')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        not_before  REAL NOT NULL,
        owner       TEXT,
        lease_until REAL,
        last_error  TEXT
    );
    CREATE INDEX jobs_by_status ON jobs (status, id);
    """,
)

#: Indexes made on every open if missing, outside the schema's version: a file that has them
#: is still one an older version of the package opens (it refuses a newer ``user_version``),
#: so downgrading keeps the queued jobs. An index only speeds queries up; none needs it.
INDEXES: tuple[str, ...] = (
    # each user's jobs in order, for claims that take them in order (see JobQueue.claim)
    "CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user_id, id)",
)


class PermanentJobError(HeadroomMemoryError):
    """Raised by a handler when retrying cannot help; the job is dead-lettered."""


class PartlyDone(Exception):
    """Raised by a handler that did the costly part of its job but not the rest (an
    extraction's model answered, then storing its memories failed): the job becomes the job
    left to do, ``kind`` with ``payload`` (a store of those memories), retried or dead-lettered
    as ``cause`` would be, so that its retries redo only what is left, not the model call.

    The change is one update of the job's row, made as the try is released: a crash before it
    leaves the job as it was (it runs whole again), after it the job left; never both, never
    neither. A job deleted meanwhile (its user forgotten) stays deleted."""

    def __init__(self, kind: str, payload: dict[str, Any], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.kind, self.payload, self.cause = kind, payload, cause


class QueueBusy(TimeoutError):
    """:meth:`JobQueue.put` with a ``wait`` found the queue busy that long: nothing written."""


class QueueGone(OSError):
    """:meth:`JobQueue.put` found the queue file's folder removed (or replaced by another)
    while the queue was open: nothing written (nothing is made again where the user removed
    their memories). The jobs left in the removed file are run from it while the process lasts."""


@dataclass(frozen=True)
class Job:
    """A queued job as handed to a handler. ``attempts`` counts starts, this one included."""

    id: int
    kind: str
    user_id: str
    payload: dict[str, Any]
    attempts: int
    created_at: float
    last_error: str | None


@dataclass(frozen=True)
class Backoff:
    """Retry delays: ``initial * factor ** (attempt - 1)``, capped, with +-``jitter`` spread."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.2

    def delay(self, attempts: int) -> float:
        """Seconds to wait before the next try, after ``attempts`` failed tries."""
        base = min(self.maximum, self.initial * self.factor ** min(max(attempts - 1, 0), 64))
        return max(0.0, base * (1 + _jitter_source.uniform(-self.jitter, self.jitter)))


RETRIES_WARNED = 5
RETRIES_WARNED_EVERY = 60
"""A job that keeps failing (a full disk, storage that is down) is logged at WARNING at its 5th
try (~15 s of failing with the default backoff) and every 60th after (~an hour at its 60 s
cap); its other retries at INFO, where a passing failure (a 429) stays."""

_jitter_source = random.Random()  # private: never touches (or reseeds) the global random state
DEFAULT_BACKOFF = Backoff()


def default_retryable(exc: BaseException) -> bool:
    """Everything but :class:`PermanentJobError` is worth retrying (timeouts, 429, 5xx, ...)."""
    return not isinstance(exc, PermanentJobError)


def retry_after(exc: BaseException) -> float | None:
    """The seconds the server that answered with ``exc`` asked to be left alone for: its HTTP
    response's ``retry-after-ms``, else ``retry-after`` (seconds, or an HTTP date), as OpenAI's
    SDK reads them (a 429 or 503 says it; ``exc.response.headers``, on ``exc`` or an exception
    it was raised from). None when no response says so (or says nonsense)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        headers = getattr(getattr(cause, "response", None), "headers", None)
        if headers is not None and callable(getattr(headers, "get", None)):
            seconds = _retry_after_seconds(headers)
            if seconds is not None:
                return seconds
        cause = cause.__cause__ or cause.__context__
    return None


def _retry_after_seconds(headers: Any) -> float | None:
    """``retry-after-ms`` or ``retry-after`` of ``headers`` in seconds, if one makes sense."""
    with suppress(TypeError, ValueError):
        milliseconds = headers.get("retry-after-ms")
        if milliseconds is not None and 0 <= float(milliseconds) < math.inf:
            return float(milliseconds) / 1000
    value = headers.get("retry-after")
    if not isinstance(value, str):
        return None
    with suppress(ValueError):
        seconds = float(value)
        return seconds if 0 <= seconds < math.inf else None
    with suppress(TypeError, ValueError, IndexError, OverflowError):
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    return None


def _is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (or busy): another connection kept the
    file's write lock longer than the busy timeout, a passing state worth no traceback."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


def _owner_is_dead(owner: str) -> bool:
    """True only if ``owner`` ("host:pid") is a process on this host that no longer exists."""
    host, _, pid = owner.rpartition(":")
    if host != _HOST or not pid.isdigit() or int(pid) == os.getpid() or os.name == "nt":
        return False  # another host, or Windows (where signal 0 is CTRL_C): wait for the lease
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, under another user
        return False
    return False


def _kind_filter(
    kinds: Collection[str] | None, column: str = "kind"
) -> tuple[str, tuple[str, ...]]:
    """An SQL condition (and its parameters) restricting jobs to ``kinds``; None is all."""
    if kinds is None:
        return "", ()
    return f" AND {column} IN ({','.join('?' * len(kinds))})", tuple(kinds)


def _not_running_users(kind_sql: str, kind_args: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """An SQL condition (and its parameters) leaving out the jobs of users who have a job (of
    the kinds ``kind_sql`` selects) running."""
    sql = f" AND user_id NOT IN (SELECT user_id FROM jobs WHERE status = 'running'{kind_sql})"
    return sql, kind_args


HOLDS_THE_LINE_TRIES = 10
"""A user's job that has failed this many tries (about 4 minutes of failing with the default
backoff) no longer holds the user's later jobs back (:meth:`JobQueue.claim`'s ``in_order``):
it keeps being retried, but one turn that always fails (a document too long for the
extraction model's time limit, an input the model always errors on) must not stop the
user's background memory for good. An outage longer than that may let a later turn run
first."""


def _holds_the_line(table: str) -> str:
    """An SQL condition: ``table``'s job still holds its user's later jobs back (it is neither
    dead-lettered nor past :data:`HOLDS_THE_LINE_TRIES` tries)."""
    return f"{table}.status != 'failed' AND {table}.attempts < {HOLDS_THE_LINE_TRIES}"


def _held_in_line(
    waits_for: Collection[str] | None, earlier_sql: str = "", earlier_args: tuple[object, ...] = ()
) -> tuple[str, tuple[object, ...]]:
    """An SQL expression (and its parameters), true for a job of ``jobs`` that an earlier job
    of its user (of the kinds ``waits_for``, None: of any kind; meeting ``earlier_sql`` too, a
    condition on ``earlier`` with ``earlier_args``) waits for or runs before. A dead-lettered
    job is out of the line, and so is one that keeps failing (:data:`HOLDS_THE_LINE_TRIES`).
    One index walk per job (``jobs_by_user``: see :data:`INDEXES`), over the user's earlier
    jobs only."""
    kind_sql, kind_args = _kind_filter(waits_for, "earlier.kind")
    sql = (
        "EXISTS (SELECT 1 FROM jobs AS earlier WHERE earlier.user_id = jobs.user_id"
        f" AND earlier.id < jobs.id AND {_holds_the_line('earlier')}{earlier_sql}{kind_sql})"
    )
    return sql, (*earlier_args, *kind_args)


def _in_order(waits_for: Collection[str] | None) -> tuple[str, tuple[object, ...]]:
    """An SQL condition (and its parameters) leaving out the jobs that an earlier job of their
    user (of the kinds ``waits_for``; None: of any kind) waits for or runs before
    (:func:`_held_in_line`): only the first job of each user's line is taken."""
    held_sql, held_args = _held_in_line(waits_for)
    return f" AND NOT {held_sql}", held_args


def _waiting(
    kinds: Collection[str] | None,
    one_per_user: bool,
    in_order: bool,
    waits_for: Collection[str] | None,
) -> tuple[str, tuple[object, ...]]:
    """An SQL condition (and its parameters) leaving out the pending jobs that wait for
    another job of their user (see :meth:`JobQueue.claim`'s ``one_per_user`` and
    ``in_order``)."""
    sql = ""
    args: tuple[object, ...] = ()
    if one_per_user:
        sql, args = _not_running_users(*_kind_filter(kinds))
    if in_order:
        running_sql, running_args = _not_running_users(*_kind_filter(waits_for))
        order_sql, order_args = _in_order(waits_for)
        sql, args = sql + running_sql + order_sql, args + running_args + order_args
    return sql, args


def _statements(script: str) -> Iterator[str]:
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""


def _use_wal(conn: sqlite3.Connection, seconds: float) -> None:
    """Put the file in WAL mode. SQLite answers "database is locked" at once, without waiting
    for its busy timeout, when another process is switching a new file's journal mode at the
    same moment: try again until ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause * (1 + random.random()))
        pause = min(pause * 2, 0.2)


def _create_private(path: str) -> None:
    """Create the queue file ``path``, empty, readable by its owner alone (0600; SQLite gives
    its -wal and -shm files the same mode), if it does not exist: its jobs hold turn texts and
    their errors. A file that exists keeps its mode; one that cannot be made is left to SQLite,
    which says why."""
    with suppress(OSError):  # it exists, or its folder does not
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _first_id() -> int:
    """The number a new queue file's jobs are numbered after: the time in microseconds. A
    file made later numbers its jobs above every job of a file made earlier (which would
    have to take more than a job a microsecond to reach them), so the jobs of a deleted file
    keep their ids when they are moved into the one made in its place, also when another
    process made it and queued jobs there first (see :meth:`JobQueue._move_jobs`)."""
    return int(time.time() * 1_000_000)


def _identity(path: str) -> tuple[int, int] | None:
    """The file at ``path`` (device, inode), or None if there is none or it cannot be read."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def sqlite_uri(path: PurePath, mode: str = "rw") -> str:
    """The SQLite URI of the file at the absolute ``path``, opened only if it exists (``mode``
    "rw" or "ro": a plain path would make an empty file). Its characters
    are quoted as a URI's (spaces, ``%``, ``?``, ``#``, non-ASCII letters), as pathlib's
    ``as_uri()`` does, and a Windows path is written ``file:///C:/...``; a UNC path
    ``file:////server/share/...``, which SQLite reads (``as_uri()`` would write the server
    as the URI's authority, which SQLite refuses)."""
    posix = path.as_posix()  # its bytes are quoted: a name not in UTF-8 is kept as it is
    quoted = quote(os.fsencode(posix), safe=b"/:")
    return f"file://{'' if posix.startswith('/') else '/'}{quoted}?mode={mode}"


def _not_a_database(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc`` is SQLite's "file is not a database" (a file whose header is not
    SQLite's), not a lock, a permission or another passing state."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return bool(code == _SQLITE_NOTADB)
    return "file is not a database" in str(exc)


class JobQueue:
    """A durable FIFO of jobs in one SQLite file, safe across threads and processes.

    One connection per queue, guarded by a lock: every operation is one short transaction
    (well under a millisecond), SQLite serialises writers anyway, and a single connection
    closes deterministically. Each runs in a ``BEGIN IMMEDIATE`` transaction, so two processes
    never claim the same job; ``busy_timeout`` absorbs their contention. While another process
    holds the file's write lock, a thread waits for it with the queue's lock let go of, so
    the lock is held only while a statement runs here (a fork waits for it: see
    :func:`_before_fork`).

    Args:
        path: The SQLite file; created with its schema on first open.
        busy_timeout: Seconds to wait for another process's write lock.
        open_later: If the file cannot be opened now (a read-only or missing folder), do not
            raise: try again on each use, which raises until it can be opened.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0, open_later: bool = False
    ) -> None:
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self._lock = threading.Lock()
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._opened: tuple[int, int] | None = None  # the (device, inode) _conn has open
        self._folder: tuple[int, int] | None = None  # its folder's, when it was opened
        self._lost_told = False  # whether the folder was found removed (told once)
        self._closed = False
        with _FORK_GUARD:  # listed before its first transaction: a fork waits for it
            _QUEUES.add(self)
        try:
            with self._locked():  # opened (and its schema made) now
                pass
        except (sqlite3.Error, OSError):
            if not open_later:
                raise
            logger.warning("job queue %s cannot be opened yet; retrying on use", self.path)

    def _open(self) -> sqlite3.Connection:
        """Connect, with the lock held (on first use, if the constructor could not), waiting
        briefly for another process's write lock (:meth:`_begin` waits for the rest).

        A file that is not an SQLite database (a bad sector, a partial copy) is set aside
        (:meth:`_set_aside`) and a fresh queue made in its place: left there, it would turn
        background memory off for as long as the process runs. A file that is locked or
        cannot be opened (its folder's permissions) is left as it is."""
        if self._conn is not None:
            return self._conn
        _create_private(self.path)
        identity = _identity(self.path)
        conn = self._connect()
        try:
            self._prepare(conn)
        except sqlite3.DatabaseError as exc:
            # set aside before closing: the last connection's close deletes the -wal
            again = _not_a_database(exc) and self._set_aside(identity)
            conn.close()
            if not again:
                raise
            _create_private(self.path)
            conn = self._connect()
            try:
                self._prepare(conn)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._opened = _identity(self.path)
        self._folder = _identity(os.path.dirname(self.path))
        return conn

    def _set_aside(self, identity: tuple[int, int] | None) -> bool:
        """Rename the queue file that is not a database, and its -wal and -shm, to
        ``<name>.corrupt-<UTC time>`` (their modes kept), logging an ERROR naming both paths.
        Returns whether the queue may be opened again: also when the file was replaced since
        ``identity`` was read (another process set it aside first), which is left alone."""
        if identity is None or _identity(self.path) != identity:
            return identity is not None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = f"{self.path}.corrupt-{stamp}"
        number = 1
        while os.path.lexists(aside):
            number += 1
            aside = f"{self.path}.corrupt-{stamp}-{number}"
        try:
            os.rename(self.path, aside)
            for suffix in ("-wal", "-shm"):
                with suppress(FileNotFoundError):
                    os.rename(self.path + suffix, aside + suffix)
        except OSError as exc:
            logger.error(
                "job queue %s is not an SQLite database and cannot be moved aside (%s): "
                "background memory is off until it is moved or deleted",
                self.path,
                exc,
            )
            return False
        logger.error(
            "job queue %s is not an SQLite database (a damaged or partly copied file): moved "
            "to %s, and a new empty queue started; the jobs it held are not run",
            self.path,
            aside,
        )
        return True

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path,
            timeout=_STATEMENT_BUSY_SECONDS,
            isolation_level=None,
            check_same_thread=False,
        )

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Put the file in WAL mode and make its schema."""
        _use_wal(conn, _STATEMENT_BUSY_SECONDS)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA secure_delete=ON")  # deleted payloads are zeroed, not left
        self._migrate(conn)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise HeadroomMemoryError(f"{self.path} has a newer job schema ({version})")
            for number in range(version + 1, len(MIGRATIONS) + 1):
                for statement in _statements(MIGRATIONS[number - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            if version == 0:  # a new file: see _first_id
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)", (_first_id(),)
                )
            for index in INDEXES:
                conn.execute(index)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _begin(self, wait: float | None = None, *, adding: bool = False) -> sqlite3.Connection:
        """Take the queue's lock and open a ``BEGIN IMMEDIATE`` transaction (the file's write
        lock) on its connection; return the connection, both held.

        A statement waits only briefly for another connection's lock with the queue's lock
        held; then the queue's lock is let go of and taken again after a pause, until ``wait``
        seconds (None: ``busy_timeout``) have passed. So the queue's lock is never held for
        long while another process writes the file, and a fork never waits for that.

        The file at the path is checked to be the one open first (:meth:`_follow`);
        ``adding``: a new job is to be written (refused if the folder is gone).

        Raises:
            QueueBusy: With ``wait``, this process's other threads kept the queue that long.
            QueueGone: ``adding``, and the file's folder was removed.
            sqlite3.OperationalError: "database is locked": another connection kept the file
                that long. Or the file cannot be opened.
            RuntimeError: The queue is closed.
        """
        deadline = time.monotonic() + (self._busy_timeout if wait is None else wait)
        pause = 0.002
        while True:
            if wait is None:
                self._lock.acquire()
            elif not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise QueueBusy(f"job queue {self.path} stayed busy in this process for {wait} s")
            try:
                if self._closed:
                    raise RuntimeError(f"job queue {self.path} is closed")
                conn = self._follow(self._open(), adding)
                conn.execute("BEGIN IMMEDIATE")
                return conn
            except sqlite3.OperationalError as exc:
                self._lock.release()
                if not _is_locked(exc) or time.monotonic() + pause > deadline:
                    raise
            except BaseException:
                self._lock.release()
                raise
            time.sleep(pause * (1 + random.random()))
            pause = min(pause * 2, 0.05)

    def _follow(self, conn: sqlite3.Connection, adding: bool) -> sqlite3.Connection:
        """``conn``, or a connection to the file now at the path if it is not the one
        ``conn`` has open, with the jobs moved there (with the lock held, before each
        transaction: one ``stat``).

        Before, a queue file deleted while the process ran (the folder emptied by hand, a
        cleanup script) was used on, unlinked, until the process exited: the jobs queued
        meanwhile went with it, and another process opening the folder found another queue.
        Now a queue file made afresh at the path (or the one another process made there)
        takes every job of the old one (:meth:`_move_jobs`), their ids kept, and is used
        from then on. If the folder itself was removed (or replaced by another folder at
        the same path), nothing is made there (what was deleted stays deleted): the jobs
        still in the old file are run from it while the process lasts, and new ones are
        refused (:class:`QueueGone`)."""
        here = _identity(self.path)
        if here == self._opened or self._opened is None:
            return conn
        folder = _identity(os.path.dirname(self.path))
        if folder is None or folder != self._folder:
            if not self._lost_told:
                self._lost_told = True
                logger.warning(
                    "job queue %s: its folder was removed while in use; the jobs left in it"
                    " are run while this process lasts, and new ones are refused",
                    self.path,
                )
            if adding:
                raise QueueGone(f"the folder of job queue {self.path} was removed while in use")
            return conn
        _create_private(self.path)
        fresh = self._connect()
        try:
            self._prepare(fresh)
            moved = self._move_jobs(conn, fresh)
        except BaseException:
            fresh.close()
            raise
        conn.close()
        self._conn, self._opened = fresh, _identity(self.path)
        logger.log(  # (another queue of this process on the file may have moved them)
            logging.WARNING if moved else logging.INFO,
            "job queue %s was deleted or replaced while in use: %d job(s) moved to the file"
            " now at that path",
            self.path,
            moved,
        )
        return fresh

    def _move_jobs(self, old: sqlite3.Connection, new: sqlite3.Connection) -> int:
        """Move every job of the file ``old`` has open into ``new``'s, keeping their ids
        (and their state: a running job stays claimed by its worker, which completes it in
        the new file), and delete them from the old file in the same transaction of it, so
        that another process still on the old file does not move them again. An id the new
        file has already (both files numbered from one: made by an older version) is given
        a new one, and its job made pending, to run again (a handler is idempotent); this
        process's claim of the old id is let go of (:data:`_MOVED_AWAY`). Returns how many
        were moved."""
        old.execute("BEGIN IMMEDIATE")
        try:
            rows = old.execute(f"SELECT {_ALL_COLUMNS} FROM jobs ORDER BY id").fetchall()
            row = old.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
            new.execute("BEGIN IMMEDIATE")
            try:
                renumbered = self._insert_moved(new, rows, int(row[0]) if row else 0)
                new.execute("COMMIT")
            except BaseException:
                new.execute("ROLLBACK")
                raise
            old.execute("DELETE FROM jobs")
            old.execute("COMMIT")
        except BaseException:
            if old.in_transaction:
                with suppress(sqlite3.Error):
                    old.execute("ROLLBACK")
            raise
        if renumbered:
            with _QUEUED_HERE_LOCK:
                _MOVED_AWAY.setdefault(self.path, {}).update(renumbered)
                ids = _QUEUED_HERE.get(self.path)
                for old_id, new_id in renumbered.items():
                    if ids is not None and ids.pop(old_id, False) is None:
                        ids[new_id] = None
        return len(rows)

    @staticmethod
    def _insert_moved(new: sqlite3.Connection, rows: list[Any], sequence: int) -> dict[int, int]:
        """Insert the moved ``rows`` into ``new``'s file (in its transaction), and number its
        later jobs after ``sequence`` (the old file's: ids are never reused). Returns the ids
        that were taken there, each with the new id its job got."""
        renumbered: dict[int, int] = {}
        columns = _ALL_COLUMNS.split(", ")
        marks = ", ".join("?" * len(columns))
        for row in rows:
            inserted = new.execute(
                f"INSERT OR IGNORE INTO jobs ({_ALL_COLUMNS}) VALUES ({marks})", row
            ).rowcount
            if not inserted:
                values = dict(zip(columns, row, strict=True))
                values.update(status="pending" if row[4] == "running" else row[4], owner=None)
                values["lease_until"] = None
                del values["id"]
                renumbered[row[0]] = int(
                    new.execute(
                        f"INSERT INTO jobs ({', '.join(values)})"
                        f" VALUES ({', '.join('?' * len(values))})",
                        tuple(values.values()),
                    ).lastrowid
                    or 0
                )
        new.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'jobs'", (sequence,))
        return renumbered

    @contextmanager
    def _locked(
        self, wait: float | None = None, *, adding: bool = False
    ) -> Iterator[sqlite3.Connection]:
        """The connection, in a transaction that commits at the end (rolled back on an error),
        with the queue's lock held (see :meth:`_begin`)."""
        conn = self._begin(wait, adding=adding)
        try:
            yield conn
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._lock.release()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._locked() as conn:
            yield conn

    @staticmethod
    def encode(kind: str, user_id: str, payload: dict[str, Any]) -> str:
        """The text :meth:`put` stores for a job: the checks of its input, without the file.

        Raises:
            InvalidInputError: Empty ``kind``/``user_id``, a payload that is not a dict, not
                JSON-serialisable, or larger than ``MAX_PAYLOAD_BYTES`` once encoded.
        """
        for name, value in (("kind", kind), ("user_id", user_id)):
            if not isinstance(value, str) or not value.strip() or len(value) > 2048:
                raise InvalidInputError(f"{name} must be a non-empty string (<= 2048 chars)")
        if not isinstance(payload, dict):
            raise InvalidInputError(f"payload must be a dict, not {type(payload).__name__}")
        try:
            text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            size = len(text.encode())
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            raise InvalidInputError(f"payload is not JSON-serialisable: {exc}") from exc
        if size > MAX_PAYLOAD_BYTES:
            raise InvalidInputError(f"payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}")
        return text

    def put(
        self,
        kind: str,
        user_id: str,
        payload: dict[str, Any],
        *,
        wait: float | None = None,
        created_at: float | None = None,
        on_queued: Callable[[int], None] | None = None,
    ) -> int:
        """Queue a job and return its id. Nothing is written if the input is invalid.

        Args:
            wait: Seconds to wait, at most, for this queue (another thread's statement) and
                for another process's write lock (also to open a queue not opened yet);
                None waits up to ``busy_timeout``.
            created_at: When the job was made (``time.time()``), if not now.
            on_queued: Called with the new job's id before any thread of this process can
                claim the job (with the queue's lock held: it must not use the queue).

        Raises:
            InvalidInputError: Empty ``kind``/``user_id``, a payload that is not a dict, not
                JSON-serialisable, or larger than ``MAX_PAYLOAD_BYTES`` once encoded.
            QueueBusy: With ``wait``, the queue or the file stayed busy that long (nothing
                was written).
            sqlite3.Error, OSError: The file cannot be opened or written (nothing was).
        """
        text = self.encode(kind, user_id, payload)
        now = time.time()
        stamp = now if created_at is None else created_at
        row = (kind, user_id, text, stamp, now)
        insert = (
            "INSERT INTO jobs (kind, user_id, payload, created_at, not_before)"
            " VALUES (?, ?, ?, ?, ?)"
        )
        try:
            with self._locked(wait, adding=True) as conn:
                job_id = int(conn.execute(insert, row).lastrowid or 0)
                _queued_here(self.path, job_id)  # before a thread here can claim it
                if on_queued is not None:
                    on_queued(job_id)
        except sqlite3.OperationalError as exc:
            if wait is not None and _is_locked(exc):
                raise QueueBusy(
                    f"job queue {self.path} stayed locked by another connection for {wait} s"
                ) from exc
            raise
        return job_id

    def claim(
        self,
        limit: int = 1,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        kinds: Collection[str] | None = None,
        one_per_user: bool = False,
        held: Collection[int] = (),
        in_order: bool = False,
        waits_for: Collection[str] | None = None,
    ) -> list[Job]:
        """Atomically take up to ``limit`` jobs (of ``kinds``, if given), oldest first.

        Takes due pending jobs, running jobs whose lease expired, and running jobs whose owner
        ("host:pid") is a dead process on this host, so a restart resumes a killed process's
        jobs at once. A claim lasts ``lease_seconds``; a recycled pid looks alive, and jobs
        of another host's process wait for the lease. ``held``: ids of jobs the caller is
        running itself, never taken back here even once their lease has expired. With
        ``one_per_user``, a pending job waits while another job of its user (of ``kinds``)
        runs, and one claim takes at most one job of each user, so that several threads run
        the jobs of different users side by side and each user's one at a time.

        With ``in_order``, each user's jobs are taken in the order they were queued, across
        threads and processes: a pending job waits while an earlier job of its user (of the
        kinds ``waits_for``; None: of any kind) is pending (waiting out a backoff, say) or
        running, and while another job of its user of those kinds runs. A dead-lettered job
        does not hold its user's later jobs back (:meth:`retry_failed` puts it back in line).
        """
        owner, now = f"{_HOST}:{os.getpid()}", time.time()
        kind_sql, kind_args = _kind_filter(kinds)
        busy_sql, busy_args = _waiting(kinds, one_per_user, in_order, waits_for)
        with self._write() as conn:
            owners = conn.execute("SELECT DISTINCT owner FROM jobs WHERE status = 'running'")
            dead = [row[0] for row in owners if row[0] and _owner_is_dead(row[0])]
            rows = conn.execute(  # two index walks in id order, not a sort of the backlog
                f"SELECT * FROM (SELECT {_COLUMNS} FROM jobs WHERE status = 'pending'"
                f" AND not_before <= ?{kind_sql}{busy_sql} ORDER BY id LIMIT ?) UNION ALL"
                f" SELECT * FROM (SELECT {_COLUMNS} FROM jobs WHERE status = 'running'{kind_sql}"
                f" AND (lease_until <= ? OR owner IN ({','.join('?' * len(dead))}))"
                f" AND id NOT IN ({','.join('?' * len(held))})"
                " ORDER BY id LIMIT ?) ORDER BY id LIMIT ?",
                (now, *kind_args, *busy_args, limit, *kind_args, now, *dead, *held, limit, limit),
            ).fetchall()
            if one_per_user:  # the oldest of each user's
                rows = [row for i, row in enumerate(rows) if row[2] not in {r[2] for r in rows[:i]}]
            conn.executemany(
                "UPDATE jobs SET status = 'running', owner = ?, lease_until = ?,"
                " attempts = attempts + 1 WHERE id = ?",
                [(owner, now + lease_seconds, row[0]) for row in rows],
            )
        return [Job(r[0], r[1], r[2], json.loads(r[3]), r[4] + 1, r[5], r[6]) for r in rows]

    def complete(self, job_id: int) -> None:
        """The job succeeded: delete it (done jobs do not accumulate; its payload is zeroed in
        the file, and gone from the WAL after the next :meth:`erase_wal`)."""
        if not _moved_away(self.path, job_id):
            with self._locked() as conn:
                conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        _done_here(self.path, job_id)

    def forget_user(self, user_id: str) -> tuple[int, int]:
        """Delete the user's jobs that are not running now: pending, dead-lettered, and those
        a process left running when it died or whose claim expired (as :meth:`claim` sees them).

        Returns:
            (deleted, still running): running jobs are left to their worker.
        """
        now = time.time()
        with self._write() as conn:
            owners = conn.execute(
                "SELECT DISTINCT owner FROM jobs WHERE user_id = ? AND status = 'running'",
                (user_id,),
            )
            dead = [row[0] for row in owners if row[0] and _owner_is_dead(row[0])]
            deleted = conn.execute(
                "DELETE FROM jobs WHERE user_id = ? AND (status != 'running' OR lease_until <= ?"
                f" OR owner IN ({','.join('?' * len(dead))}))",
                (user_id, now, *dead),
            ).rowcount
            running = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE user_id = ? AND status = 'running'", (user_id,)
            ).fetchone()[0]
        return deleted, int(running)

    def erase_wal(self, busy_timeout: float = 0.1) -> bool:
        """Copy the WAL into the file and truncate it to nothing, so deleted jobs' payloads
        are gone from every file. Uses a connection of its own, so puts never wait for it,
        which opens the file only if it exists (it never makes one). Returns False if
        another connection (or process) kept part of it: try again later; True, with nothing
        done, when the path names no file any more (see :meth:`_follow`)."""
        if self._closed:
            return False
        try:
            with _FORK_GUARD:
                if _identity(self.path) is None:  # deleted: the next use moves the jobs to
                    return True  # a new file there (see _follow); none is made here
                uri = sqlite_uri(PurePath(self.path))
                with closing(sqlite3.connect(uri, uri=True, timeout=busy_timeout)) as conn:
                    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except (sqlite3.Error, ValueError):  # ValueError: a path SQLite cannot be given
            return False
        return not busy

    def retry_later(
        self,
        job_id: int,
        error: str,
        delay_seconds: float,
        *,
        becomes: tuple[str, str] | None = None,
    ) -> None:
        """Put the job back, claimable again in ``delay_seconds``. ``becomes``: the kind and
        the encoded payload (:meth:`encode`) of the job left to do, which it turns into in the
        same update (see :class:`PartlyDone`); a job deleted meanwhile stays deleted."""
        self._release(job_id, "pending", error, time.time() + delay_seconds, becomes)

    def fail(self, job_id: int, error: str, *, becomes: tuple[str, str] | None = None) -> None:
        """Dead-letter the job: kept with status 'failed', never run again automatically
        (``becomes`` as in :meth:`retry_later`)."""
        self._release(job_id, "failed", error, time.time(), becomes)

    def _release(
        self,
        job_id: int,
        status: str,
        error: str,
        not_before: float,
        becomes: tuple[str, str] | None = None,
    ) -> None:
        if _moved_away(self.path, job_id):  # it runs again under its new id
            return
        changes = "" if becomes is None else ", kind = ?, payload = ?"
        values = () if becomes is None else becomes
        with self._locked() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, last_error = ?, not_before = ?, owner = NULL,"
                f" lease_until = NULL{changes} WHERE id = ?",
                (status, without_secrets(error)[:MAX_ERROR_CHARS], not_before, *values, job_id),
            )
        if status == "failed":
            _done_here(self.path, job_id)

    def make_due(self, kinds: Collection[str] | None = None) -> int:
        """Make the pending jobs (of ``kinds``, if given) waiting out a backoff due now (the
        backend they failed on answers again). Returns how many."""
        now = time.time()
        kind_sql, kind_args = _kind_filter(kinds)
        with self._locked() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET not_before = ? WHERE status = 'pending' AND not_before > ?"
                f"{kind_sql}",
                (now, now, *kind_args),
            )
        return cursor.rowcount

    def retry_failed(self) -> int:
        """Requeue every dead-lettered job (attempts reset); return how many."""
        with self._locked() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = 'pending', attempts = 0, not_before = ?"
                " WHERE status = 'failed'",
                (time.time(),),
            )
        return cursor.rowcount

    def failed(self, limit: int = 100) -> list[Job]:
        """The dead-lettered jobs, oldest first, with their ``last_error``."""
        with self._locked() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status = 'failed' ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [Job(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6]) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per status in the file: ``{"pending": n, "running": n, "failed": n}``."""
        counts = dict.fromkeys(("pending", "running", "failed"), 0)
        with self._locked() as conn:
            counts.update(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
        return counts

    def present(self, ids: Collection[int]) -> set[int]:
        """Which of ``ids`` are jobs of the file still (pending, running or dead-lettered):
        the others were done, here or by another process, or deleted. Each id is looked up
        (with the file's lock held for as long as that takes, not for a walk of the backlog
        from the oldest one asked for)."""
        asked = sorted(set(ids))
        found: set[int] = set()
        if not asked:  # (the file is not opened)
            return found
        with self._locked() as conn:
            for start in range(0, len(asked), _IDS_PER_STATEMENT):
                part = asked[start : start + _IDS_PER_STATEMENT]
                found.update(
                    row[0]
                    for row in conn.execute(
                        f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(part))})", part
                    )
                )
        return found

    def _scalar(self, sql: str, *args: object) -> Any:
        with self._locked() as conn:
            return conn.execute(sql, args).fetchone()[0]

    def close(self) -> None:
        """Close the connection. Idempotent; later calls raise ``RuntimeError``."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def user_tag(user_id: str) -> str:
    """A short hash that names a user in logs without showing the id itself."""
    return hashlib.sha256(user_id.encode("utf-8", "replace")).hexdigest()[:10]


def _describe(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (never a payload: queue errors hold none)."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


_OPEN_WORKERS: weakref.WeakSet[JobWorker] = weakref.WeakSet()
_EXIT_HOOK_REGISTERED = False
_EXIT_LOCK = threading.Lock()
QUEUED_HERE_KEPT = 10_000
"""How many of the jobs this process queued in a file are remembered (the latest), for the
exit's drain to wait for them (and for no other process's)."""
_QUEUED_HERE: dict[str, OrderedDict[int, None]] = {}  # queue file -> ids queued here, not done
_QUEUED_HERE_LOCK = threading.Lock()  # never held while taking another lock
_MOVED_AWAY: dict[str, dict[int, int]] = {}
"""Queue file -> ids of jobs this process moved to a file at the same path under another id,
each with its new id (see :meth:`JobQueue._move_jobs`): completing or releasing them here
touches nothing (the id may be another job's there)."""


def renumbered(path: str) -> dict[int, int]:
    """The jobs this process moved to a new file at ``path`` under a new id: old id -> new
    id (empty unless a moved job's id was taken there; see :meth:`JobQueue._move_jobs`)."""
    with _QUEUED_HERE_LOCK:
        return dict(_MOVED_AWAY.get(path, {}))


def _moved_away(path: str, job_id: int) -> bool:
    with _QUEUED_HERE_LOCK:
        return job_id in _MOVED_AWAY.get(path, ())


def _queued_here(path: str, job_id: int) -> None:
    """This process queued job ``job_id`` in the file at ``path``."""
    with _QUEUED_HERE_LOCK:
        ids = _QUEUED_HERE.setdefault(path, OrderedDict())
        ids[job_id] = None
        if len(ids) > QUEUED_HERE_KEPT:
            ids.popitem(last=False)


def _done_here(path: str, job_id: int) -> None:
    """Job ``job_id`` of the file at ``path`` was done or dead-lettered in this process."""
    with _QUEUED_HERE_LOCK:
        ids = _QUEUED_HERE.get(path)
        if ids is not None:
            ids.pop(job_id, None)


def _ids_queued_here(path: str) -> set[int]:
    with _QUEUED_HERE_LOCK:
        return set(_QUEUED_HERE.get(path, ()))


def _drain_at_exit(worker: JobWorker) -> None:
    """Have ``worker`` drained at interpreter exit, with the process's other open workers."""
    global _EXIT_HOOK_REGISTERED
    with _EXIT_LOCK:
        _OPEN_WORKERS.add(worker)
        if not _EXIT_HOOK_REGISTERED:  # once, after the storage's own hooks: it runs first
            atexit.register(_close_open_workers)
            _EXIT_HOOK_REGISTERED = True


def _close_open_workers() -> None:
    """At exit, close every worker still open, each waiting at most its ``exit_timeout`` from
    the start of the exit for the jobs this process queued (see :meth:`JobWorker.close`'s
    ``at_exit``): they drain side by side (their threads run meanwhile), so a process with
    many queue files waits about one timeout, not one per file."""
    started = time.monotonic()
    for worker in list(_OPEN_WORKERS):
        left = max(0.0, worker.exit_timeout - (time.monotonic() - started))
        worker.close(left, at_exit=True)


def wait_until(
    condition: threading.Condition,
    done: Callable[[float | None], bool],
    deadline: float | None,
    between: Callable[[], object] = lambda: None,
) -> bool:
    """Wait, holding ``condition``, until ``done(remaining)`` is true (``remaining``: the
    seconds left until ``deadline``, a ``time.monotonic()``; None: no deadline), asking again
    each time ``condition`` is notified and at least every 0.2 s; ``between()`` runs each time
    it is not (to start a worker that has stopped, say). Returns False once the deadline has
    passed."""
    with condition:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if done(remaining):
                return True
            between()
            if remaining is not None and remaining <= 0:
                return False
            condition.wait(0.2 if remaining is None else min(remaining, 0.2))


class JobWorker:
    """A daemon thread (or a few) that claims jobs from a :class:`JobQueue` and runs
    ``handler(job)``.

    Outcomes: the handler returns -> the job is deleted; it raises an exception that
    ``retryable(exc)`` accepts -> retried after ``backoff.delay(attempts)`` (or after the
    server's Retry-After, if longer, up to ``backoff.maximum``: :func:`retry_after`), with no
    limit on attempts (a job is never dropped); it raises :class:`PermanentJobError` or a
    non-retryable exception -> dead-lettered and logged at WARNING; it raises
    :class:`PartlyDone` -> the job becomes the job left to do, retried or dead-lettered as its
    cause would be; :meth:`hurry` makes the jobs waiting out a backoff due at once. Logs name
    the job id, kind, a hash of the user id and the error type, never payload contents. The
    thread starts on the first :meth:`notify` or :meth:`start` (call ``start()`` to resume a
    previous run's leftovers at once), sleeps until notified or for ``poll_interval`` (other
    processes may enqueue), and at interpreter exit waits up to ``exit_timeout`` seconds for the
    jobs this process queued (see :meth:`close`); the rest stays in the file.

    Each user's jobs run one at a time, in the order they were queued, even when one waits
    out a backoff (``in_order``). With ``threads`` > 1, the jobs of different users run side
    by side (:meth:`JobQueue.claim`'s ``one_per_user``). The one thread above is the
    only one that waits for work: another starts only while every thread runs a job and a job
    of another user is due, and leaves once it has found nothing to claim for
    ``poll_interval`` seconds.

    Args:
        queue: The queue to drain; the worker owns it and closes it in :meth:`close`.
        handler: Called with each :class:`Job`; must be idempotent.
        kinds: The job kinds this worker takes (and flushes); None means all.
        threads: How many jobs (of different users) may run at once.
        retryable: Decides whether an exception is transient.
        backoff: Retry delays.
        longest_delay: The longest retry delay after a given exception, if shorter than
            ``backoff``'s (a storage that is down is tried again at least this often, so a
            job is stored soon after it is back, even when nothing else calls it).
        name: The thread's name.
        poll_interval: Seconds between looks at the file when idle.
        lease_seconds: How long a claim lasts before another process may take the job over.
        exit_timeout: Seconds the atexit hook waits for this process's jobs to be done.
        in_order: Run each user's jobs in the order they were queued, across threads and
            processes: a job waits while an earlier one of its user (of ``waits_for``) waits
            out a backoff or runs (:meth:`JobQueue.claim`); a dead-lettered one holds nothing
            back. False: a job whose try failed lets its user's later jobs run first.
        waits_for: The kinds of a user's earlier jobs that a job waits for; None: ``kinds``
            (all kinds if that is None). Another worker on the file takes the other kinds.
        on_released: Told of each try as its job is released: ``on_released(job, due)``,
            with the job as it is now (of the kind a :class:`PartlyDone` made it), and when
            (``time.time()``) it is due again if it is retried, else None (done or
            dead-lettered); a retry after :meth:`hurry` is due at once. Called on the
            worker's thread, after the file is updated; its errors are logged, never raised.
    """

    def __init__(
        self,
        queue: JobQueue,
        handler: Callable[[Job], object],
        *,
        kinds: Collection[str] | None = None,
        threads: int = 1,
        retryable: Callable[[BaseException], bool] = default_retryable,
        backoff: Backoff = DEFAULT_BACKOFF,
        longest_delay: Callable[[BaseException], float] | None = None,
        name: str = "headroom-memory-jobs",
        poll_interval: float = 1.0,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        exit_timeout: float = 5.0,
        in_order: bool = True,
        waits_for: Collection[str] | None = None,
        on_released: Callable[[Job, float | None], None] | None = None,
    ) -> None:
        self.queue, self.handler, self.retryable, self.backoff = queue, handler, retryable, backoff
        self.on_released = on_released
        self.in_order = in_order
        self.waits_for = tuple(waits_for or ()) or (None if kinds is None else tuple(kinds))
        self.longest_delay = longest_delay
        self.name, self.poll_interval = name, poll_interval
        self.kinds = None if kinds is None else tuple(kinds)
        self.threads = threads
        self._kind_sql, self._kind_args = _kind_filter(self.kinds)
        self.lease_seconds, self.exit_timeout = lease_seconds, exit_timeout
        self._wake, self._stop = threading.Event(), threading.Event()
        self._hurried = threading.Event()  # set by hurry(): backed-off jobs are due now
        self._progress = threading.Condition()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []  # the first one waits for work; see _spread
        self._running: dict[int, str] = {}  # the jobs the threads run: id -> user
        self._closing = self.closed = False
        self._stats = {"processed": 0, "retried": 0, "failed": 0}
        # rounds of finished jobs, and how many of them the WAL was last erased after: the
        # WAL may hold their payloads until then (any thread erases it; see _erase_wal_when_due)
        self._finished_rounds = self._erased_after = 0
        self._erase_tried = time.monotonic()
        _drain_at_exit(self)

    def _forked(self) -> None:
        """In a child forked from the process that made this worker: its threads are not
        here (nor the jobs they ran) and its locks may be held by them. Start afresh: the
        child's first use starts threads of its own; the parent's keep running the file's
        other jobs."""
        self._wake, self._stop = threading.Event(), threading.Event()
        self._hurried = threading.Event()
        self._progress = threading.Condition()
        self._lock = threading.Lock()
        self._threads = []
        self._running = {}

    def start(self) -> None:
        """Start the thread if it is not running yet."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the job worker is closed")
            if not self._threads:
                self._add_thread()

    def notify(self, user_id: str | None = None) -> None:
        """Wake the thread now (call after ``put``, with the job's user); starts it on first
        use, and another thread if every one runs a job and ``user_id`` has none running.
        No query of the file: this is on the caller's path."""
        self._wake.set()
        self.start()
        with self._lock:
            if user_id is not None and user_id not in self._running.values():
                self._grow()

    def hurry(self) -> None:
        """What the jobs waiting out a backoff failed on works again (a storage that was down
        answers): make them due now and wake the thread. No query of the file here (this may
        be on a caller's path): the thread does it, before its next claim."""
        self._hurried.set()
        self._wake.set()

    def erase_wal_later(self) -> None:
        """The queue's WAL could not be erased just now (another connection kept part of it,
        e.g. a reader in another process): the worker's first thread, started if need be, tries
        again while idle, every :data:`_CHECKPOINT_EVERY` seconds, until it succeeds."""
        with self._lock:
            if self.closed:
                return
            self._finished_rounds += 1
        self.notify()

    def _grow(self) -> None:
        """With the lock held: one more thread, if every thread runs a job and ``threads``
        allows another (and the worker is open)."""
        if not self.closed and len(self._running) == len(self._threads) < self.threads:
            self._add_thread()

    def _add_thread(self) -> None:
        """Start a thread, with the lock held (so that it is listed before it can leave)."""
        thread = threading.Thread(
            target=self._run, args=(bool(self._threads),), name=self.name, daemon=True
        )
        thread.start()
        self._threads.append(thread)
        _drain_at_exit(self)  # (again in a forked child that starts it: see _forked)

    def _spread(self) -> None:
        """With ``threads`` to spare and a job of another user due: wake the idle threads, or
        start one more if every thread runs a job. Never raises (the running threads go on).
        Called as a job starts, on its worker thread."""
        with self._lock:
            if self.closed or self.threads == 1 or len(self._running) == self.threads:
                return
        try:
            if not self._any_due():
                return
            self._wake.set()
            with self._lock:
                self._grow()
        except Exception as exc:  # a failing file, no new threads at interpreter exit
            logger.debug("job queue %s: no thread added (%s)", self.queue.path, _describe(exc))

    def _leave(self, since: float) -> bool:
        """Whether an extra thread, idle since ``since``, leaves now (unless woken meanwhile:
        a notify() or _spread() counted on it)."""
        if time.monotonic() - since < self.poll_interval:
            return False
        with self._lock:
            if self._wake.is_set():
                return False
            self._threads.remove(threading.current_thread())
            return True

    def _run(self, extra: bool = False) -> None:
        failing = 0  # failed rounds in a row: the first is logged whole, then a line a minute
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                self._wake.clear()  # before claiming, so a notify() during the claim is kept
                jobs: list[Job] = []
                try:
                    if self._hurried.is_set():
                        self._hurried.clear()  # (set again if the update fails: see below)
                        try:
                            self.queue.make_due(self.kinds)
                        except BaseException:
                            self._hurried.set()
                            raise
                    with self._lock:
                        held = list(self._running)
                    jobs = self.queue.claim(
                        1,
                        lease_seconds=self.lease_seconds,
                        kinds=self.kinds,
                        one_per_user=self.threads > 1,
                        held=held,  # a sibling's job outliving its lease is still its
                        in_order=self.in_order,
                        waits_for=self.waits_for,
                    )
                    for job in jobs:
                        self._process(job)
                    if jobs:
                        with self._lock:
                            self._finished_rounds += 1
                    idle = 0.0 if jobs else min(self._idle_seconds(), self._erase_wal_when_due())
                    if failing:
                        logger.warning(
                            "job queue %s: working again after %d failed tries",
                            self.queue.path,
                            failing,
                        )
                        failing = 0
                except Exception as exc:  # locked, disk full, unwritable, ...: try again later
                    failing += 1
                    if failing == 1 and _is_locked(exc):
                        logger.warning(
                            "job queue %s: another connection kept it locked past the busy "
                            "timeout (%s); trying again",
                            self.queue.path,
                            exc,
                        )
                    elif failing == 1:
                        logger.exception("job queue %s: claim or update failed", self.queue.path)
                    elif failing % _QUIET_TRIES == 0:
                        logger.warning(
                            "job queue %s: still failing (%d tries): %s: %s",
                            self.queue.path,
                            failing,
                            type(exc).__name__,
                            exc,
                        )
                    idle = self.poll_interval
                with self._progress:
                    self._progress.notify_all()
                if jobs:
                    idle_since = time.monotonic()
                elif extra and self._leave(idle_since):  # the first thread erases the WAL
                    return
                if idle:
                    self._wake.wait(idle)
        finally:
            with self._lock:  # the last thread to stop closes the queue
                if threading.current_thread() in self._threads:
                    self._threads.remove(threading.current_thread())
                last = not self._threads
            with self._progress:
                self._progress.notify_all()
            if self._stop.is_set() and last:
                self.queue.close()

    def _erase_wal_when_due(self) -> float:
        """After jobs finished, checkpoint the WAL and truncate it (their payloads must not
        linger there) once the worker is idle, at most every :data:`_CHECKPOINT_EVERY`
        seconds, so SQLite's automatic checkpoint (an fsync of ~5-50 ms) rarely lands on a
        put(). Any idle thread does it; the first thread, which never leaves, tries again
        while another connection keeps part of the WAL. Returns the seconds until the next
        try (inf when nothing is left to erase)."""
        with self._lock:
            finished = self._finished_rounds
            if finished == self._erased_after:
                return math.inf
            wait = _CHECKPOINT_EVERY - (time.monotonic() - self._erase_tried)
            if wait > 0:
                return wait
            self._erase_tried = time.monotonic()
        if self.queue.erase_wal():
            with self._lock:  # rounds finished meanwhile may have written after the checkpoint
                self._erased_after = max(self._erased_after, finished)
        return _CHECKPOINT_EVERY

    def _due(self) -> float:
        """When the next job this worker may claim is due (inf if none is pending). A job
        that waits for an earlier one of its user is not (nor, with ``threads``, a user's job
        while one of theirs runs): its thread looks again once that one is done."""
        busy, busy_args = self._waiting()
        due = self.queue._scalar(
            f"SELECT MIN(not_before) FROM jobs WHERE status = 'pending'{self._kind_sql}{busy}",
            *self._kind_args,
            *busy_args,
        )
        return math.inf if due is None else float(due)

    def _any_due(self) -> bool:
        """Whether a job this worker may claim is due now (:meth:`_due`, stopping at the
        first one found: this runs as each job starts)."""
        busy, busy_args = self._waiting()
        return bool(
            self.queue._scalar(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'pending' AND not_before <= ?"
                f"{self._kind_sql}{busy})",
                time.time(),
                *self._kind_args,
                *busy_args,
            )
        )

    def _waiting(self) -> tuple[str, tuple[object, ...]]:
        """The SQL condition leaving out the jobs that wait for another of their user."""
        return _waiting(self.kinds, self.threads > 1, self.in_order, self.waits_for)

    def _idle_seconds(self) -> float:
        return min(self.poll_interval, max(self._due() - time.time(), 0.005))

    def _process(self, job: Job) -> None:
        # Count and log before the write that flush() watches, so both are current when it returns.
        with self._lock:
            self._running[job.id] = job.user_id
        try:
            self._spread()  # a job of another user may start beside this one
            try:
                self.handler(job)
            except BaseException as exc:  # even a handler's SystemExit must not kill the thread
                self._handle_failure(job, exc)
            else:
                self._count("processed")
                self.queue.complete(job.id)
                self._released(job, None)
        finally:
            with self._lock:
                del self._running[job.id]

    def _handle_failure(self, job: Job, exc: BaseException) -> None:
        about = f"job {job.id} ({job.kind}, user {user_tag(job.user_id)}, attempt {job.attempts})"
        logger.debug("%s raised", about, exc_info=exc)  # may quote user text: DEBUG only
        becomes: tuple[str, str] | None = None
        if isinstance(exc, PartlyDone):  # retried (or kept) as the job left to do
            try:
                becomes = (exc.kind, JobQueue.encode(exc.kind, job.user_id, exc.payload))
                job = replace(job, kind=exc.kind, payload=exc.payload)
            except InvalidInputError:
                logger.warning("%s: the job left to do cannot be kept; kept whole", about)
            exc = exc.cause
        error = f"{type(exc).__name__}: {exc}"
        try:
            retry = not isinstance(exc, PermanentJobError) and self.retryable(exc)
        except Exception:
            logger.exception("retryable() raised for %s; dead-lettering it", about)
            retry = False
        if retry:
            delay = self.backoff.delay(job.attempts)
            asked = retry_after(exc)  # a 429's Retry-After: no sooner, up to the backoff's cap
            if asked is not None:
                delay = max(delay, min(asked, self.backoff.maximum))
            if self.longest_delay is not None:
                delay = min(delay, self.longest_delay(exc))
            self._count("retried")
            lasting = job.attempts % RETRIES_WARNED_EVERY == RETRIES_WARNED
            logger.log(
                logging.WARNING if lasting else logging.INFO,
                "%s failed with %s; retrying in %.2fs",
                about,
                type(exc).__name__,
                delay,
            )
            due = time.time() + delay
            self.queue.retry_later(job.id, error, delay, becomes=becomes)
            self._released(job, time.time() if self._hurried.is_set() else due)
        else:
            self._count("failed")
            # a PermanentJobError's message is the library's own (what to fix), never user text
            why = f"{type(exc).__name__}: {exc}" if isinstance(exc, PermanentJobError) else None
            logger.warning("%s failed with %s; dead-lettered", about, why or type(exc).__name__)
            self.queue.fail(job.id, error, becomes=becomes)
            self._released(job, None)

    def _released(self, job: Job, due: float | None) -> None:
        """Tell ``on_released`` (if any) that ``job``'s try was released."""
        if self.on_released is None:
            return
        try:
            self.on_released(job, due)
        except Exception:
            logger.exception("job queue %s: on_released raised", self.queue.path)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def stats(self) -> dict[str, Any]:
        """This worker's processed/retried/failed counts, plus the file's pending/running.

        Never raises: when the file cannot be read (a read-only folder, a closed queue),
        pending and running are None and ``error`` says why."""
        with self._lock:
            stats: dict[str, Any] = dict(self._stats)
        try:
            counts = self.queue.counts()
        except Exception as exc:
            return {**stats, "pending": None, "running": None, "error": _describe(exc)}
        return {**stats, "pending": counts["pending"], "running": counts["running"]}

    def flush(self, timeout: float | None = None, *, user_id: str | None = None) -> bool:
        """Wait until every job (of ``kinds``, and of ``user_id`` if given) queued before this
        call is done or dead-lettered.

        Jobs waiting out a backoff are waited for too, so pass a ``timeout`` to bound it.

        Returns:
            True if drained, False if ``timeout`` seconds passed first.
        """
        if threading.current_thread() in self._threads:
            raise RuntimeError("flush() from the worker's own handler would wait for itself")
        deadline = None if timeout is None else time.monotonic() + timeout
        mark = self.queue._scalar("SELECT COALESCE(MAX(id), 0) FROM jobs")
        whose, users = ("", ()) if user_id is None else (" AND user_id = ?", (user_id,))
        unfinished = (
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE id <= ? AND status != 'failed'"
            f"{self._kind_sql}{whose})"
        )
        return wait_until(
            self._progress,
            lambda _: not self.queue._scalar(unfinished, mark, *self._kind_args, *users),
            deadline,
            self.start,
        )

    def _own_left(self, until: float, user_id: str | None = None) -> int:
        """How many jobs (of ``kinds``, and of ``user_id`` if given) this process queued are
        neither done nor dead-lettered and running or due by ``until`` (``time.time()``)."""
        ids = _ids_queued_here(self.queue.path)  # none: the file is read all the same (a
        # queue that cannot be read is not drained)
        # a job that cannot run by ``until``: in order, one behind an earlier job of its user
        # that waits out a backoff past then
        behind: str = "0"
        behind_args: tuple[object, ...] = ()
        if self.in_order:
            behind, behind_args = _held_in_line(
                self.waits_for,
                " AND earlier.status = 'pending' AND earlier.not_before > ?",
                (min(until, 1e300),),
            )
        whose, users = ("", ()) if user_id is None else (" AND user_id = ?", (user_id,))
        with self.queue._locked() as conn:  # the file's backlog from this process's oldest
            rows = conn.execute(
                f"SELECT id, status, not_before, {behind} FROM jobs"
                f" WHERE id >= ? AND status != 'failed'{self._kind_sql}{whose}",
                (*behind_args, min(ids, default=2**63 - 1), *self._kind_args, *users),
            ).fetchall()
        return sum(
            1
            for id_, status, due, held_back in rows
            if id_ in ids and (status == "running" or (due <= until and not held_back))
        )

    def drain_own(
        self, timeout: float | None, *, user_id: str | None = None, runnable_only: bool = False
    ) -> bool:
        """Wait up to ``timeout`` seconds until no job (of ``kinds``, and of ``user_id`` if
        given) that this process queued is left undone, not dead-lettered: unlike
        :meth:`flush`, never for another process's jobs in the file. With ``runnable_only``
        (the exit), not for one that cannot run before the timeout ends either (waiting out a
        backoff past it, or behind such a job of its user). Returns False on timeout."""
        if threading.current_thread() in self._threads:
            raise RuntimeError("drain_own() from the worker's own handler would wait for itself")
        deadline = None if timeout is None else time.monotonic() + timeout

        def none_left(remaining: float | None) -> bool:
            until = math.inf
            if runnable_only and remaining is not None:
                until = time.time() + max(remaining, 0.0)
            return not self._own_left(until, user_id)

        return wait_until(self._progress, none_left, deadline, self.start)

    def _log_left(self) -> None:
        """At exit, after the drain: say how many jobs (of ``kinds``) stay in the file for a
        later run, in one line (a warning if some are this process's)."""
        own = self._own_left(math.inf)
        left = self.queue._scalar(
            f"SELECT COUNT(*) FROM jobs WHERE status != 'failed'{self._kind_sql}",
            *self._kind_args,
        )
        if left:
            logger.log(
                logging.WARNING if own else logging.INFO,
                "job queue %s: %d job(s) left for a later run (%d queued by this process)",
                self.queue.path,
                left,
                own,
            )

    def close(
        self, timeout: float | None = 5.0, *, at_exit: bool = False, drain: bool = True
    ) -> bool:
        """Wait up to ``timeout`` seconds for the jobs (of ``kinds``) this process queued
        (:meth:`drain_own`), not for the file's others (another process's, a turn left for an
        extraction client this process does not have), then stop the thread and close the
        queue. Idempotent. Without ``drain`` (drained already, or to stop now), the jobs are
        not waited for, only the threads, up to ``timeout``.

        With ``at_exit`` (the interpreter exits), wait only for those that can run before
        ``timeout`` ends, not for one waiting out a backoff past it; log how many jobs are
        left for a later run, if any.

        Returns:
            True if this process's jobs were done; what is left stays in the file for the
            next run.
        """
        with self._lock:
            if self._closing:
                return False
            self._closing = True
        _OPEN_WORKERS.discard(self)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            drained = self.drain_own(timeout if drain else 0, runnable_only=at_exit)
            if at_exit:
                self._log_left()
        except Exception as exc:  # no new threads at interpreter shutdown (Python >= 3.12), an
            # unreadable file (a read-only folder; at exit, read even with nothing queued here
            # to count what is left): stop all the same, and say why in one line
            logger.warning(
                "job queue %s: could not drain (%s); jobs kept for next run",
                self.queue.path,
                _describe(exc),
            )
            drained = False
        with self._lock:
            self.closed, threads = True, list(self._threads)
            self._stop.set()
        self._wake.set()
        if not threads:
            self.queue.close()
        for thread in threads:  # the last one closes the queue; a handler may still be running
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.1))
        return drained


_SHARED: dict[tuple[str, str], JobWorker] = {}
_SHARED_LOCK = threading.Lock()
_QUEUES: weakref.WeakSet[JobQueue] = weakref.WeakSet()
_inherited: list[sqlite3.Connection] = []  # a forked child's: never used, closed or collected
_FORK_GUARD = threading.Lock()
"""Held while a queue is listed in ``_QUEUES`` and around :meth:`JobQueue.erase_wal`'s
connection; with every listed queue's lock, it is all a fork waits for (see
:func:`_before_fork`). Never taken with a queue's lock held."""
_held_at_fork = threading.local()  # .locks: those the forking thread's _before_fork took
FORK_WAIT_SECONDS = 0.5
"""The longest a fork waits for the threads' transactions on the queue files (each is a
statement or two on a local file: they never wait for another process with the lock held)."""


def _before_fork() -> None:
    """Before ``fork()``: wait until no thread of this process is inside a transaction on a
    queue file, and hold it so until the fork is done. SQLite keeps its locks' bookkeeping in
    the process's memory; a child forked during a transaction inherits a lock that nobody
    in it will ever release, and each connection it opens to that file then finds the file
    busy for good (``database is locked``: its memory work could never be queued).

    These locks are held only while statements run on local files, never around a handler,
    the network or the wait for another process's write lock (:meth:`JobQueue._begin`), so
    this waits at most :data:`FORK_WAIT_SECONDS`. Past that (a fork from a thread that holds
    one of them itself), the fork goes on without it. The locks taken are the forking
    thread's own: another thread forking at the same time releases none of them."""
    held: list[threading.Lock] = []
    _held_at_fork.locks = held
    deadline = time.monotonic() + FORK_WAIT_SECONDS
    if not _FORK_GUARD.acquire(timeout=FORK_WAIT_SECONDS):
        return
    held.append(_FORK_GUARD)
    for queue in list(_QUEUES):
        lock = queue._lock
        if lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            held.append(lock)
        else:
            logger.warning("job queue %s: forking while a thread writes it", queue.path)


def _after_fork_in_parent() -> None:
    """The fork is done: the parent's threads may use the queue files again."""
    held: list[threading.Lock] = getattr(_held_at_fork, "locks", [])
    _held_at_fork.locks = []
    while held:
        held.pop().release()


def _after_fork_in_child() -> None:
    """A forked child uses none of the parent's SQLite connections (SQLite forbids it: it
    can corrupt the file) nor its worker threads: each queue opens a connection of its own on
    first use, each worker starts threads of its own, and :func:`shared_worker` makes new ones.
    Its locks are new ones (those :func:`_before_fork` took are held in the child)."""
    global _SHARED_LOCK, _EXIT_LOCK, _FORK_GUARD, _QUEUED_HERE_LOCK
    _held_at_fork.locks = []
    _FORK_GUARD = threading.Lock()
    for queue in list(_QUEUES):
        if queue._conn is not None:
            _inherited.append(queue._conn)
        queue._conn, queue._lock = None, threading.Lock()
    for worker in list(_OPEN_WORKERS):
        worker._forked()
    _OPEN_WORKERS.clear()  # drained at the child's exit only if the child starts them
    _SHARED.clear()
    _QUEUED_HERE.clear()  # the parent's jobs: its exit waits for them
    _SHARED_LOCK, _EXIT_LOCK = threading.Lock(), threading.Lock()
    _QUEUED_HERE_LOCK = threading.Lock()


def shared_worker(
    path: str | os.PathLike[str], key: str, handler: Callable[[Job], object], **options: Any
) -> JobWorker:
    """The process's one worker for (queue file, ``key``); made on first call, then reused.

    Later calls return the existing worker and ignore ``handler`` and ``options`` (which are
    :class:`JobWorker`'s keyword arguments).
    """
    ident = (os.path.realpath(os.path.expanduser(os.fspath(path))), key)
    with _SHARED_LOCK:
        worker = _SHARED.get(ident)
        if worker is None or worker.closed:
            worker = _SHARED[ident] = JobWorker(JobQueue(path), handler, **options)
        return worker


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
