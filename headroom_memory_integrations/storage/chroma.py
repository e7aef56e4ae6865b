"""Chroma storage: one collection per user, embedded on disk or on a Chroma server.

- Embedded (default): ``ChromaStorage.at("~/.headroom-memory")`` opens a ``PersistentClient``.
  One process at a time writes to a folder (it holds the folder's lock, see :mod:`.folder`);
  others may read it.
- Server: ``ChromaStorage.connect("127.0.0.1", 8000)`` talks to ``chroma run``, which several
  processes or machines can share. Every request has a timeout (:data:`DEFAULT_TIMEOUT`).
- Your own client: ``ChromaStorage(client)``.

Nothing is opened or contacted until the first call, so a store can be built while its storage
is down (a stopped server, a read-only folder); calls then raise :class:`StorageError` until it
is back (see :mod:`.guard`). In a process, every store of a user shares one
:class:`ChromaCollection` per storage, and with it one search index and one cache, whoever writes.

Chroma never embeds here (``embedding_function=None``; the engine passes vectors) and its
telemetry is off. Collections use cosine space, so a score is ``1 - distance``.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import itertools
import json
import os
import re
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, TypeVar
from urllib.parse import quote, unquote, urlsplit

import numpy as np

from ..embeddings.base import Vectors
from ..errors import (
    EmbeddingMismatchError,
    HeadroomMemoryError,
    InvalidInputError,
    StorageError,
)
from ..jobs import user_tag
from ..redaction import logger_without_secrets, without_credentials
from ..types import Category, Memory, Revision, Source, parse_time
from .base import Catalogued, collection_name
from .chroma_import import import_chromadb, import_http_client
from .closing import announce_closed
from .deferred import (
    MAX_DEFERRED_RECORDS,
    SETTLE_SECONDS,
    DeferredWrites,
    PendingWrite,
    clear_journal,
    journaled,
    merged,
)
from .folder import (
    DATABASE_FILE,
    DATABASE_WAIT_SECONDS,
    FolderLock,
    check_free_space,
    database_free,
    directory_bytes,
    erase_noted,
    folder_identity,
    logged_deletes,
    make_private_folder,
    note_erase,
    scrub_freed_memory,
    vector_segment,
)
from .guard import (
    Availability,
    DeadlineExceeded,
    PendingStart,
    bound_http_requests,
    check_deadline,
    forget_broken_system,
    is_rust_panic,
    is_unreachable,
    request_starts,
    request_was_cut,
    requests_bounded_while_built,
    start_with_deadline,
    time_left,
    within_deadline,
)
from .rollback import Rollback, discard, keep, left
from .vectors import VectorIndex

SCHEMA_VERSION = 2
"""How memories are stored, as recorded in the metadata of the collections this version
creates. Format 2: a memory's fields (text, category, source, times, metadata, history, keys)
are one JSON metadata value, ``record``, and Chroma is given no document. Format 1 (before
2026-12) gave the text as the document and each field a metadata value of its own; Chroma
indexes every document's trigrams for a full-text search this package never makes, and with
one row per field that made a single write ~40% dearer. Records of format 1 are read as they
are and rewritten in format 2 when they change."""
_BATCH = 1000  # rows per Chroma call when reading or deleting many
_IDS_PER_READ = 5000
"""Most ids one read by ids (``get(ids=...)``) names: SQLite refuses a statement of too many
variables (tens of thousands of ids: 'too many SQL variables')."""
HNSW_SYNC_THRESHOLD = 100
"""Writes after which Chroma saves a collection's vector index to disk; until then it keeps
them in its write log too, and each write costs more the longer that log is. Chroma's default,
1,000, made a single write at 10k memories 6.8 ms at the median (rising from ~5 ms to ~8 ms
between two saves); at 100 it is 4.8 ms (50k: 8.3 -> 5.3 ms; 100k: 8.0 -> 5.4 ms), and a batch
of 100 costs the same within ~0.1 ms per record. Collections of older versions are set to it
when opened (before Chroma loads their index, which reads it)."""
# A user's memories are read ahead into memory (a few KB each) up to this many; a sole writer
# then searches them there. Larger collections are searched by Chroma.
WARM_LIMIT = 20_000
# Seconds a read-ahead waits after the search that starts it. The search is usually made for
# a model call, whose own work (the request, parsing the answer) would otherwise share the
# interpreter with the read: with a fast model, the first answer of a process came 17-34 ms
# later (a 1k user, docs/benchmarks.md); searches meanwhile go to Chroma, as before the read.
READ_AHEAD_DELAY = 0.25
# Memories held read ahead in one process, over all users; past it, the users searched least
# recently are let go (their searches go back to Chroma until they are read ahead again).
READ_AHEAD_BUDGET = 100_000
# Users' handles (ChromaCollection) a storage keeps open when nothing else holds them: the most
# recently opened. Each holds what it read and wrote (up to CACHE_LIMIT records) and maybe a
# read-ahead, so one handle kept for every user ever opened grew without bound in a long-running
# server (~32 KB a user of one memory, more with a cache). A handle still held (by a store, a
# thread using it) stays the one every caller gets; one let go of is collected and its user's
# next call opens a fresh one, which reads from Chroma (with every deferred write in it).
OPEN_COLLECTIONS = 1024
# Records of one user held in memory, at most (those read ahead, written, or read on demand:
# a user above WARM_LIMIT has each search's candidates read and kept); past it, the oldest
# half is let go and read again from Chroma when needed.
CACHE_LIMIT = 2 * WARM_LIMIT
# Without an in-memory index (a user above WARM_LIMIT, a Chroma server, or a search before the
# read-ahead is done), the mean of the stored vectors that searches are centred on (see
# engine.QUERY_CENTERING) is that of the first this many memories, read at most every
# CENTROID_SECONDS (sooner for a user with fewer, after a write of this process).
CENTROID_SAMPLE = 1000
CENTROID_SECONDS = 300.0
_ABSENT_LIMIT = 4096  # ids known not to exist, kept at most (see ChromaCollection._absent)
_WARM_RETRY_SECONDS = 5.0  # after a write overlapped a read-ahead, wait this long to retry
DEFAULT_TIMEOUT = 5.0
"""Seconds a request to a Chroma server may take before it fails (chromadb's own client waits
forever). The memory work before a chat call's model call, however many requests it makes,
ends within this plus :data:`~headroom_memory_integrations.flow.READ_YOUR_WRITES_SECONDS` in
all (:func:`~headroom_memory_integrations.flow.recall_seconds`, :func:`.guard.memory_deadline`);
the call then goes on without memories. After a request took this whole timeout, later calls
fail at once until the server answers again (see :class:`.guard.Availability`)."""
# Chroma (1.5) fails reads that race a write or a drop of the same collection with these (and,
# in another process, reads that race the rewrite that erases deleted text); they pass on their
# own: wait a little and try again (5 ms doubling, ~0.3 s in all).
_TRANSIENT = (
    "Nothing found on disk",
    "Missing metadata segment",
    "disk I/O error",
    "Error finding id",  # a server's read by id racing another client's delete of that id
)
_TRANSIENT_TRIES = 7
# Chroma (1.5, embedded or a server) keeps the vector indexes of at most (the soft open-file
# limit) / 5 collections in memory (204 at the usual 1,024), and saves an index to disk only
# every HNSW_SYNC_THRESHOLD writes. It rebuilds an index from its log the first time the
# process reads the collection, and when it writes it; a later read of a collection whose
# index it let go of, before any save, finds no index on disk and fails with _UNLOADED, every
# time, until the collection is written or the process restarts. A write that changes nothing
# (the delete of an id no memory has: memory ids are printable) makes Chroma rebuild it.
_UNLOADED = "Nothing found on disk"
_RELOAD_ID = "\x00headroom-memory-reload-index"
T = TypeVar("T")
logger = logger_without_secrets(__name__)

_stopping = threading.Event()
_warmers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
# Whether this process (or the one it was forked from) has opened an embedded folder: chromadb's
# embedded client starts threads of its own, and in a child forked after that every call of a
# chromadb embedded client, even one made in the child, waits forever (chromadb 1.5, measured).
_embedded_opened = False
_forked_after_embedded = False  # this process was forked after that: embedded use is refused
_storages: weakref.WeakSet[ChromaStorage] = weakref.WeakSet()
_inherited: list[Any] = []  # clients a forked child inherited: never used, closed or collected


class _ReadAheads:
    """The collections held read ahead in this process, least recently searched first. Held
    weakly: a storage dropped without :meth:`ChromaStorage.close` is still collected (and its
    client closed, see ``ChromaStorage._adopt``); its entries leave with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sizes: OrderedDict[weakref.ref[ChromaCollection], int] = OrderedDict()
        # entries of collected handles, dropped at the next call (a collection may happen
        # while the lock is held, by this very thread)
        self._dead: list[weakref.ref[ChromaCollection]] = []

    def add(self, handle: ChromaCollection, size: int) -> None:
        """Hold ``handle``'s read-ahead, letting the least recently searched ones go."""
        with self._lock:
            self._drop_dead()
            key = weakref.ref(handle, self._collected)
            self._sizes[key] = size
            self._sizes.move_to_end(key)
            evicted = []
            while sum(self._sizes.values()) > READ_AHEAD_BUDGET and len(self._sizes) > 1:
                evicted.append(self._sizes.popitem(last=False)[0]())
        for old in evicted:
            if old is not None:
                old.forget_read_ahead()

    def touch(self, handle: ChromaCollection) -> None:
        with self._lock:
            self._drop_dead()
            key = weakref.ref(handle)
            if key in self._sizes:
                self._sizes.move_to_end(key)

    def remove(self, handle: ChromaCollection) -> None:
        with self._lock:
            self._drop_dead()
            self._sizes.pop(weakref.ref(handle), None)

    def held(self) -> list[ChromaCollection]:
        """The handles held, least recently searched first."""
        with self._lock:
            self._drop_dead()
            return [h for h in (key() for key in self._sizes) if h is not None]

    def _collected(self, key: weakref.ref[ChromaCollection]) -> None:
        self._dead.append(key)

    def _drop_dead(self) -> None:
        while self._dead:
            self._sizes.pop(self._dead.pop(), None)


_read_aheads = _ReadAheads()


def _close_client(client: Any) -> None:
    """Close a chromadb client this package made, and its HTTP connections: chromadb stops
    the systems of a client (and of the admin client it makes inside) with their last
    client, but leaves a server client's HTTP sessions (their pooled connections) open. Each
    is closed once its system has stopped: no client uses it any more."""
    close = getattr(client, "close", None)
    if callable(close):
        close()
    shared = sys.modules.get("chromadb.api.shared_system_client")
    systems = getattr(getattr(shared, "SharedSystemClient", None), "_identifier_to_system", None)
    if not isinstance(systems, dict):
        return
    for part in (client, getattr(client, "_admin_client", None)):
        session = getattr(getattr(part, "_server", None), "_session", None)
        identifier = getattr(part, "_identifier", None)
        if identifier is not None and identifier not in systems:  # stopped
            session_close = getattr(session, "close", None)
            if callable(session_close):
                session_close()


class _EraseLock:
    """Chroma calls share it; erasing deleted text (a rewrite of the database file under
    Chroma's connections) takes it alone. A thread that already shares it (a call made from
    inside a Chroma call) does not wait for itself."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._sharers = 0
        self._erasing = False
        self._mine = threading.local()

    @contextmanager
    def shared(self) -> Iterator[None]:
        held = getattr(self._mine, "count", 0)
        counted = False
        try:  # (an interrupt anywhere in here must not leave a sharer counted: erasing waits)
            with self._condition:
                while self._erasing and not held:
                    self._condition.wait()
                self._sharers += 1
                counted = True
            self._mine.count = held + 1
            yield
        finally:
            self._mine.count = held
            if counted:
                with self._condition:
                    self._sharers -= 1
                    self._condition.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        own = getattr(self._mine, "count", 0)
        with self._condition:
            while self._erasing:
                self._condition.wait()
            try:
                self._erasing = True
                while self._sharers > own:
                    self._condition.wait()
            except BaseException:  # Ctrl-C while waiting: every later call would wait forever
                self._erasing = False
                self._condition.notify_all()
                raise
        try:
            yield
        finally:
            with self._condition:
                self._erasing = False
                self._condition.notify_all()


@atexit.register
def _stop_warming() -> None:
    """Let read-ahead threads finish their page and stop before the interpreter goes away."""
    _stopping.set()
    for thread in list(_warmers):
        thread.join(timeout=2.0)


def _settings() -> Any:
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False, allow_reset=False)


_CLIENT_SETUP_SECONDS = 10.0  # building a server client (TLS setup, ...) beyond its requests
_ABANDONED_BUILDS = 2
"""Builds of a client still running past their time (timeout + _CLIENT_SETUP_SECONDS) that a
storage leaves behind, at most, to start another: each holds a thread for as long as it hangs."""


def _import_clients() -> None:
    """Import what building a chromadb ``HttpClient`` imports, outside its deadline (it takes
    seconds on a busy machine)."""
    import_chromadb("chromadb.api.fastapi")
    import h11  # noqa: F401
    import httpcore  # noqa: F401
    import httpx  # noqa: F401


def _save_index_often(collection: Any) -> None:
    """Set a collection made by an older version to :data:`HNSW_SYNC_THRESHOLD`. Chroma reads
    it when it loads the index, at the first read or write: this comes before. Best effort:
    a collection that cannot be changed (a read-only folder) works as it is."""
    try:
        # the raw JSON: chromadb's parsed `configuration` warns of our "legacy" (absent)
        # embedding function each time it is read
        hnsw = (getattr(collection, "configuration_json", None) or {}).get("hnsw") or {}
        if int(hnsw.get("sync_threshold", 0)) > HNSW_SYNC_THRESHOLD:
            collection.modify(configuration={"hnsw": {"sync_threshold": HNSW_SYNC_THRESHOLD}})
    except Exception as exc:
        logger.debug("left the index's sync threshold of %s as it was: %s", collection, exc)


def _create_collection(client: Any, user_id: str, binding: tuple[str, int]) -> Any:
    """The user's collection, made with this package's settings if it does not exist."""
    embedder, dimension = binding
    return client.get_or_create_collection(
        name=collection_name(user_id),
        embedding_function=None,
        configuration={
            "hnsw": {"space": "cosine", "ef_search": 100, "sync_threshold": HNSW_SYNC_THRESHOLD}
        },
        metadata={
            "user_id": user_id,
            "embedder": embedder,
            "dimension": dimension,
            "schema_version": SCHEMA_VERSION,
            "created_at": time.time(),
        },
    )


def _upsert_columns(
    ids: list[str], vectors: Vectors, metas: list[dict[str, Any]], legacy: set[str]
) -> dict[str, Any]:
    """Chroma's upsert of these records. A record of format 1 being rewritten (``legacy``)
    loses its own keys and its document (Chroma keeps a record's document unless given
    another)."""
    columns: dict[str, Any] = {
        "ids": ids,
        "embeddings": vectors,
        "metadatas": [_replacing(m) if i in legacy else m for i, m in zip(ids, metas)],
    }
    if legacy:
        columns["documents"] = ["" if i in legacy else None for i in ids]
    return columns


def _store_journaled(client: Any, folder: Path) -> None:
    """Store in Chroma the deferred writes a process left journaled in ``folder`` (it exited
    or was killed with them pending), then empty the journal: gathered per user as the worker
    does (:func:`.deferred.merged`), in batches of Chroma's maximum. Each is an upsert of whole
    records, so storing one again is harmless. Raises if Chroma refuses one: the folder does
    not open, and the journal is kept."""
    writes = merged(list(journaled(folder)))
    step = int(client.get_max_batch_size())
    for write in writes:
        collection = _create_collection(client, write.user_id, (write.embedder, write.dimension))
        ids, metas = list(write.records), list(write.records.values())
        for start in range(0, len(ids), step):
            part = slice(start, start + step)
            found = collection.get(ids=ids[part], include=["metadatas"])
            metadatas = zip(found["ids"], found["metadatas"])
            legacy = {i for i, meta in metadatas if _RECORD_KEY not in (meta or {})}
            columns = _upsert_columns(ids[part], write.vectors[part], metas[part], legacy)
            collection.upsert(**columns)
    if writes:
        logger.info("stored the writes an earlier process left pending in %s", folder)
    clear_journal(folder)


def _roll_back(collection: Any, rollback: Rollback, step: int, *, create: bool = True) -> None:
    """Undo a write to ``collection``: delete the records it added, put back those it
    rewrote (their document, metadata and vector as they were). Doing it twice does no harm.

    Without ``create`` (a client that is not the collection's sole writer) those it rewrote
    are put back with Chroma's ``update``, which leaves a record missing if another process
    deleted it since: a failed write never removes one, so its delete wins (an ``upsert``
    would create it again, with its old text)."""
    for start in range(0, len(rollback.added), _BATCH):
        collection.delete(ids=rollback.added[start : start + _BATCH])
    ids = list(rollback.prior)
    restore = collection.upsert if create else collection.update
    for start in range(0, len(ids), step):
        part = ids[start : start + step]
        restore(
            ids=part,
            embeddings=rollback.vectors[start : start + step],
            documents=[rollback.prior[i][0] for i in part],
            metadatas=[_replacing(rollback.prior[i][1]) for i in part],
        )


def _apply_logged_deletes(client: Any, folder: Path) -> bool:
    """Have Chroma apply the deletes noted for erasing in ``folder`` that it has logged and
    not yet applied to its records (see :func:`.folder.logged_deletes`): reading the
    collection applies its log. The erase can then find them gone and erase them. A failure
    is logged: the erase keeps them noted for a later try. Returns whether Chroma was asked
    to (it then holds those collections' vector indexes in memory)."""
    asked = False
    try:
        for name in logged_deletes(folder):
            asked = True
            try:
                client.get_collection(name, embedding_function=None).count()
            except Exception as exc:
                if not _is_missing(exc):  # (dropped since: its records went with it)
                    raise
    except Exception:
        logger.warning(
            "Chroma could not apply the deletes it logged in %s; their text is erased at a "
            "later try",
            folder,
            exc_info=True,
        )
    return asked


def _roll_back_left(client: Any, folder: Path) -> str | None:
    """Undo the write a process left half-done in ``folder`` (killed between two batches of
    a write larger than one, or its own undo failed: see :mod:`.rollback`), then remove its
    record. Returns the user whose write it undid, if any. Raises if Chroma refuses: the
    record is kept, and tried again at the next open or write."""
    rollback = left(folder)
    if rollback is None:
        return None
    try:
        collection = client.get_collection(
            collection_name(rollback.user_id), embedding_function=None
        )
    except Exception as exc:
        if not _is_missing(exc):
            raise
        collection = None  # dropped since: nothing of the write is left to undo
    if collection is not None and (collection.metadata or {}).get("user_id") == rollback.user_id:
        _roll_back(collection, rollback, int(client.get_max_batch_size()))
        logger.warning(
            "undid a write of %d memories of user %s that was left half-done in %s (the "
            "process writing it was killed, or its undo failed)",
            len(rollback.added) + len(rollback.prior),
            user_tag(rollback.user_id),
            folder,
        )
    discard(folder)
    return rollback.user_id


def _is_transient(exc: BaseException) -> bool:
    from chromadb.errors import InternalError

    return isinstance(exc, InternalError) and any(text in str(exc) for text in _TRANSIENT)


def _with_vectors(page: Any) -> Any:
    """``page`` if it holds a vector for each of its ids. A server's read that races another
    client's delete may return an id without its vector, and so may an embedded read beside
    this process's own writes: that is retried, as a transient error."""
    from chromadb.errors import InternalError

    vectors = page.get("embeddings") if page is not None else None
    if page is not None and len(page["ids"]) != (0 if vectors is None else len(vectors)):
        raise InternalError("Error finding id: a record came back without its vector")
    return page


def _is_missing(exc: BaseException) -> bool:
    """The collection does not exist (any more): chromadb raises NotFoundError, older
    versions a ValueError."""
    from chromadb.errors import NotFoundError

    return isinstance(exc, NotFoundError) or (
        isinstance(exc, ValueError) and "does not exist" in str(exc)
    )


def _record_bytes(meta: dict[str, Any], dimension: int) -> int:
    """About how many bytes one record adds to the files (text and fields, vector)."""
    return len(json.dumps(meta)) + 8 * dimension + 200


_RECORD_KEY = "record"
_V1_KEYS = ("category", "source", "created_at", "updated_at", "metadata", "history", "keys")


def _fields_of(memory: Memory) -> dict[str, Any]:
    """What is stored of ``memory``, JSON-ready (format 2, see :data:`SCHEMA_VERSION`)."""
    return {
        "text": memory.text,
        "category": memory.category.value,
        "source": memory.source.value,
        "created_at": memory.created_at.timestamp(),
        "updated_at": memory.updated_at.timestamp(),
        "metadata": dict(memory.metadata),
        "history": [r.to_dict() for r in memory.history],
        "keys": list(memory.keys),
    }


def _metadata(fields: dict[str, Any]) -> dict[str, Any]:
    """The Chroma metadata of a record of format 2: its fields as one JSON value."""
    return {_RECORD_KEY: json.dumps(fields, ensure_ascii=False)}


def _fields(document: str | None, meta: Any) -> dict[str, Any]:
    """A stored memory's fields, from a record of either format."""
    if _RECORD_KEY in meta:
        fields: dict[str, Any] = json.loads(meta[_RECORD_KEY])
        return fields
    return {  # format 1: the text is the document, each field a metadata value of its own
        "text": document or "",
        "category": meta["category"],
        "source": meta.get("source", "manual"),
        "created_at": meta["created_at"],
        "updated_at": meta["updated_at"],
        "metadata": json.loads(meta.get("metadata") or "{}"),
        "history": json.loads(meta.get("history") or "[]"),
        "keys": json.loads(meta.get("keys") or "[]"),
    }


def _from_fields(user_id: str, memory_id: str, fields: dict[str, Any]) -> Memory:
    return Memory(
        id=memory_id,
        user_id=user_id,
        text=fields["text"],
        category=Category.parse(fields["category"]),
        created_at=parse_time(fields["created_at"]),
        updated_at=parse_time(fields["updated_at"]),
        source=Source.parse(fields.get("source", "manual")),
        metadata=MappingProxyType(dict(fields.get("metadata") or {})),
        history=tuple(Revision.from_dict(r) for r in fields.get("history") or ()),
        keys=tuple(fields.get("keys") or ()),
    )


def _replacing(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` to write over a stored record: Chroma merges a rewrite's metadata into the
    record's, so every other key of either format is removed (None) explicitly."""
    return {**{key: None for key in (_RECORD_KEY, *_V1_KEYS) if key not in meta}, **meta}


_RECORD = ["documents", "metadatas"]


class _Record:
    """A stored memory as Chroma returns it; parsed into a :class:`Memory` on first need, and
    what a search reads of it (:attr:`entry`) parsed once, when it is read."""

    __slots__ = ("_memory", "entry", "fields")

    def __init__(self, fields: dict[str, Any], memory: Memory | None = None) -> None:
        self.fields = fields
        self.entry = Catalogued(
            fields["text"], Category.parse(fields["category"]), tuple(fields.get("keys") or ())
        )
        self._memory = memory

    def memory(self, user_id: str, memory_id: str) -> Memory:
        if self._memory is None:
            self._memory = _from_fields(user_id, memory_id, self.fields)
        return self._memory


def _page_records(page: dict[str, Any]) -> dict[str, _Record]:
    """The records of one Chroma ``get`` answer (documents and metadatas), by id."""
    return {
        i: _Record(_fields(document, meta))
        for i, document, meta in zip(page["ids"], page["documents"], page["metadatas"])
    }


_NO_PAGE: dict[str, Any] = {"ids": [], "documents": [], "metadatas": [], "embeddings": []}


class _Write(NamedTuple):
    """Records to write to Chroma: their ids, Chroma metadata and vectors, row by row, and the
    records by id (None for a deferred write the worker stores: what is held in memory holds
    them already)."""

    ids: list[str]
    metas: list[dict[str, Any]]
    vectors: Vectors
    records: dict[str, _Record] | None = None

    def without(self, gone: Collection[str]) -> _Write:
        """This write less the records of ``gone``: rewrites of memories deleted meanwhile,
        which are not written."""
        if not gone:
            return self
        keep = [n for n, i in enumerate(self.ids) if i not in gone]
        records = None
        if self.records is not None:
            records = {i: r for i, r in self.records.items() if i not in gone}
        return _Write(
            [self.ids[n] for n in keep], [self.metas[n] for n in keep], self.vectors[keep], records
        )


class _Change:
    """A write as it affects what is held in memory: ``ids`` rewritten with ``written``
    records (None: not known, forget them) and ``vectors``, or deleted (``vectors`` None)."""

    def __init__(
        self, ids: Sequence[str], written: dict[str, _Record] | None, vectors: Vectors | None
    ) -> None:
        self.ids = list(ids)
        self.written = written
        self.vectors = vectors

    def replay(self, records: dict[str, _Record], index: VectorIndex | None) -> None:
        """Make ``records`` (by id) and ``index`` hold what this write left."""
        for memory_id in self.ids:
            records.pop(memory_id, None)
        if self.written:
            records.update(self.written)
        if index is not None:
            if self.vectors is None:
                index.remove(self.ids)
            else:
                index.put(self.ids, self.vectors)


class ChromaCollection:
    """A user's memories in one Chroma collection (see :class:`UserCollection`).

    :meth:`ChromaStorage.open` hands every store of the user the same handle, so its cache and
    search index follow every write made in this process. The Chroma collection is opened on
    first use; a read of a collection that does not exist finds nothing (and creates nothing);
    a write creates it. If it is dropped behind this handle's back (``clear()`` from another
    client of a server), the next call opens it afresh.
    """

    def __init__(self, storage: ChromaStorage, user_id: str, binding: tuple[str, int]) -> None:
        self._storage = storage
        self._user_id = user_id
        self._name = collection_name(user_id)
        self.binding = binding  # (embedder, dimension) it is used with
        self._collection: Any = None  # the chromadb collection, once opened
        # It was opened (it exists, its owner checked): kept while Chroma is closed and opened
        # anew (an erase), which lets go of the chromadb collection but not of the collection
        self._exists = False
        self._segment: Path | None = None  # an embedded collection's index folder, once known
        self._write_lock = storage._write_lock
        self._user_lock = threading.RLock()
        # Records read before, by id. This handle's writes keep them current; when it is the
        # only writer of the collection (embedded storage), get() may be served from them.
        self._cache: dict[str, _Record] = {}
        # Ids a sole writer's read found missing, with no write between: a new memory's id is
        # read before the write (is it taken?) and again as the write starts (what to restore
        # if it fails); the second read is answered from here. Written ids leave it.
        self._absent: dict[str, None] = {}
        self._sole_flag = storage._sole_writer
        # Odd while a write is under way; a read that overlaps a write caches nothing.
        self._write_stamp = 0
        # A sole writer's copy of every vector, once read ahead in the background (see _warm).
        self._index: VectorIndex | None = None
        self._warm_lock = threading.Lock()
        self._warm_after: float | None = 0.0  # monotonic time; None: running or given up
        # While a read-ahead runs: the writes made meanwhile, replayed on what it read.
        self._warm_log: list[_Change] | None = None
        self._retired = False
        # Without the index: the mean of a sample of the vectors, with when it was read.
        self._sampled_centroid: tuple[float, tuple[Vectors, int] | None] | None = None

    @property
    def _sole_writer(self) -> bool:
        """True while nothing but this process writes the collection: an embedded folder
        whose lock this process holds, or a storage built with ``sole_writer=True``."""
        return self._sole_flag and self._storage._holds_folder()

    @_sole_writer.setter
    def _sole_writer(self, value: bool) -> None:
        self._sole_flag = value

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this user's write lock: read, decide, then write with no other write of the
        user in between (consolidation). Every store of the user in this process shares it;
        with embedded storage this process is the folder's only writer, so nothing else writes
        meanwhile. A Chroma server has no lock: another process can still write meanwhile.
        Reentrant; writes made inside take it again."""
        with self._user_lock:
            yield

    # -- calling Chroma ---------------------------------------------------------------------

    def _chroma(self, *, create: bool) -> Any:
        """The chromadb collection, opened on first need; None if it does not exist and
        ``create`` is False. Raises if it belongs to another user or embedder."""
        if self._collection is not None:
            return self._collection
        storage = self._storage
        client = storage._client_now()
        embedder, dimension = self.binding
        if create:
            collection = _create_collection(client, self._user_id, self.binding)
        else:
            try:
                collection = client.get_collection(self._name, embedding_function=None)
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise
        storage._check_owner(collection.metadata or {}, self._user_id, embedder, dimension)
        _save_index_often(collection)
        self._collection = collection
        self._exists = True
        return collection

    def _let_go_of_collection(self) -> None:
        """Forget the chromadb collection, its index folder and that it exists: it may be
        gone (dropped), or belong to another client (a fork). (Chroma opened anew keeps all
        but the chromadb collection: see :meth:`ChromaStorage._reopen_client`.)"""
        self._collection = self._segment = None
        self._exists = False

    def _call(self, action: str, run: Callable[[Any], T], *, write: bool = False) -> T | None:
        """``run(collection)``, its errors raised as :class:`StorageError`. Returns None when
        the collection does not exist and ``write`` is False (nothing to read or delete).
        A collection dropped meanwhile is opened afresh; transient Chroma errors are retried.
        A handle of a closed storage raises that it is closed (not chromadb's error about the
        client it let go of)."""
        storage = self._storage
        if storage._closed:
            raise storage._closed_error()
        storage._settle()  # Chroma is read and written with every deferred write in it
        reload = False  # the last try failed with _UNLOADED: rebuild the index, then read
        for attempt in range(_TRANSIENT_TRIES):
            last = attempt == _TRANSIENT_TRIES - 1
            with (
                storage._guard(action),
                storage._erase_lock.shared(),
                storage._reload_lock if reload else nullcontext(),
            ):
                storage._wait_for_database(action)
                try:
                    collection = self._chroma(create=write)
                    if collection is None:
                        return None
                    if reload:
                        self._reload_index()
                    return run(collection)
                except Exception as exc:
                    if storage._closed:  # closed while this call ran
                        raise storage._closed_error() from exc
                    if _is_missing(exc) and not last:
                        self._let_go_of_collection()  # dropped: open it afresh
                        continue
                    if not _is_transient(exc) or last:
                        raise
                    reload = _UNLOADED in str(exc) and storage._holds_folder()
            time.sleep(0.005 * 2**attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _reload_index(self) -> None:
        """Make Chroma rebuild the collection's vector index from its log, which a read does
        not do once the index has left Chroma's cache unsaved (see ``_UNLOADED``): a write
        that changes nothing. Only by the process that may write (the folder's holder, or
        any client of a server); if it fails, the read is retried and fails as before."""
        collection = self._collection
        if collection is None:
            return
        try:
            collection.delete(ids=[_RELOAD_ID])
        except Exception as exc:
            logger.debug("could not make Chroma reload the index of %s: %s", self._name, exc)

    # -- writing ----------------------------------------------------------------------------

    def upsert(self, memories: Sequence[Memory], vectors: Vectors, *, behind: bool = False) -> None:
        """Store ``memories`` (new ones, or new versions of existing ones) with their vectors:
        :meth:`rewrite` with no rewrites."""
        self.rewrite(memories, vectors, rewrites=(), behind=behind)

    def rewrite(
        self,
        memories: Sequence[Memory],
        vectors: Vectors,
        *,
        rewrites: Collection[str],
        behind: bool = False,
    ) -> set[str]:
        """Store ``memories`` (new ones, or new versions of existing ones) with their vectors.

        Written in batches of at most the server's maximum. If any batch fails, what the
        earlier ones wrote is undone (new memories deleted, rewritten ones restored) before
        :class:`StorageError` is raised, so a write that raised leaves nothing half-stored.

        With ``behind``, a small write of a sole writer that holds the user read ahead is
        journaled, made in memory and stored in Chroma behind the caller (see
        :mod:`.deferred`).

        The memories of ``rewrites`` are only rewritten, never created: one that is not
        stored as the write starts is not written. A server's client, which another process
        may delete it from until the write is made, writes them with Chroma's ``update``
        (which leaves a missing record missing) and reads them back after. Returns the ids of
        ``rewrites`` that were gone (deleted meanwhile): they were not stored.
        """
        if not memories:
            return set()
        fields = [_fields_of(m) for m in memories]
        records = {m.id: _Record(f, m) for m, f in zip(memories, fields)}
        write = _Write(list(records), [_metadata(f) for f in fields], vectors, records)
        if len(write.ids) != len(memories):
            raise StorageError("a write may not name the same memory twice")
        size = sum(_record_bytes(meta, self.binding[1]) for meta in write.metas)
        rewriting = records.keys() & set(rewrites)
        with self._user_lock, self._write_lock:
            deferred = self._storage._deferred
            if (
                behind
                and deferred is not None
                and deferred.last_error is None  # Chroma refuses writes: the caller hears it
                and self._deferrable(len(write.ids))
            ):
                self._storage._ready_to_write(self, size)
                index = self._index  # complete: a missing memory is not in it
                gone = {i for i in rewriting if index is None or i not in index}
                pending = write.without(gone)
                if not pending.ids:
                    return gone
                embedder, dimension = self.binding
                if deferred.add(
                    PendingWrite(
                        self._user_id,
                        embedder,
                        dimension,
                        dict(zip(pending.ids, pending.metas)),
                        pending.vectors,
                    )
                ):
                    return self._writing(lambda: gone, write.ids, write)  # made in memory

            def store() -> set[str]:
                self._storage._ready_to_write(self, size)
                return self._store(write, rewriting)

            return self._writing(store, write.ids, write)

    def _deferrable(self, records: int) -> bool:
        """Whether a write of ``records`` records may be stored behind the caller: this
        process holds everything it changes (a sole writer's complete read-ahead, not being
        read again meanwhile), the collection exists (the first write makes it at once), and
        the write is small."""
        return (
            records <= MAX_DEFERRED_RECORDS
            and self._exists
            and self._index is not None
            and self._warm_log is None
            and self._sole_writer
            and not self._retired
        )

    def _store(self, records: _Write, rewrites: set[str]) -> set[str]:
        """Write these records to Chroma, undoing what was written if a batch fails. A write
        of more than one batch to an embedded folder first records its undo on disk, so that
        it is undone even if the process is killed halfway (see :mod:`.rollback`).

        Those of ``rewrites`` that are not stored are not written; a client that is not the
        sole writer writes the others with ``update`` and reads them back. Returns the ids of
        ``rewrites`` not stored. A read-back that fails (the server went away just after the
        write) is logged, and the write reported stored: it was, and nothing is undone."""
        prior = self._prior(records.ids)
        gone = {i for i in rewrites if i not in prior}
        written = records.without(gone)
        if not written.ids:
            return gone
        ids, metas, vectors = written.ids, written.metas, written.vectors
        # Another process may delete them until they are written: Chroma's update leaves a
        # deleted record deleted, where an upsert would create it again.
        updated = set() if self._sole_writer else rewrites & prior.keys()
        legacy = {i for i, r in prior.items() if _RECORD_KEY not in (r["metadata"] or {})}
        batch = self._storage._batch_size()
        rollback = Rollback.of(self._user_id, self.binding[1], ids, prior)
        kept = len(ids) > batch and self._storage._keep_rollback(rollback)
        try:
            for start in range(0, len(ids), batch):
                part = range(start, min(start + batch, len(ids)))
                for write, rows in (
                    ("upsert", [n for n in part if ids[n] not in updated]),
                    ("update", [n for n in part if ids[n] in updated]),
                ):
                    if not rows:
                        continue
                    columns = _upsert_columns(
                        [ids[n] for n in rows], vectors[rows], [metas[n] for n in rows], legacy
                    )
                    self._call(
                        "write memories",
                        lambda c: getattr(c, write)(**columns),  # noqa: B023
                        write=True,
                    )
            if kept:
                self._storage._discard_rollback()
        except BaseException as error:
            self._undo(rollback, error, kept=kept)
            raise
        if updated:
            try:
                return gone | (updated - self._stored(list(updated)))
            except StorageError as exc:  # stored all the same: a delete meanwhile wins anyway
                logger.warning(
                    "could not read back %d rewritten memories of user %s after writing them "
                    "(%s); they are reported stored",
                    len(updated),
                    user_tag(self._user_id),
                    exc,
                )
        return gone

    def _stored(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` are stored, read from Chroma."""
        found: set[str] = set()
        for start in range(0, len(ids), _IDS_PER_READ):
            part = ids[start : start + _IDS_PER_READ]
            page = self._call("read memories", lambda c: c.get(ids=part, include=[]))  # noqa: B023
            found.update(page["ids"] if page else ())
        return found

    def _prior(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The stored records (document, metadata, vector) of those ``ids`` that exist, to
        restore them if a write fails halfway."""
        index = self._index
        if index is not None and self._sole_writer and not any(i in index for i in ids):
            return {}  # a sole writer's complete index: none of them exists
        if self._sole_writer:
            ids = [i for i in ids if i not in self._absent]  # read missing, not written since
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), _BATCH):
            page = self._call(
                "read memories",
                lambda c: _with_vectors(
                    c.get(
                        ids=ids[start : start + _BATCH],  # noqa: B023
                        include=["documents", "metadatas", "embeddings"],
                    )
                ),
            )
            if page is None:
                break  # no collection: none of them exists
            for position, memory_id in enumerate(page["ids"]):
                found[memory_id] = {
                    "document": page["documents"][position],
                    "metadata": page["metadatas"][position],
                    "embedding": page["embeddings"][position],
                }
        return found

    def _undo(self, rollback: Rollback, error: BaseException, *, kept: bool) -> None:
        """Delete what a failed write added and restore what it replaced; then remove the
        write's undo record, if ``kept`` on disk. If the undo fails, the record stays (and the
        storage undoes the write before its next write, or the next process at its open)."""
        step = self._storage._batch_size()
        create = self._sole_writer  # (else another process may have deleted one since)
        try:
            self._call(
                "undo a failed write", lambda c: _roll_back(c, rollback, step, create=create)
            )
            if kept:
                self._storage._discard_rollback()
        except StorageError as undo_error:
            if not isinstance(error, Exception):  # an interrupt stays one (Ctrl-C, an exit)
                logger.warning(
                    "undoing a write cut short by %s failed (%s): part of it may be stored",
                    type(error).__name__,
                    undo_error,
                )
                return
            raise StorageError(
                f"{error}; undoing the write failed too ({undo_error}), so part of it may be stored"
            ) from error

    def delete(self, ids: Sequence[str], *, erase: bool = True) -> None:
        """Delete these memories (unknown ids are ignored).

        Args:
            erase: Also remove their text from the files of an embedded folder (Chroma keeps
                it in its log and in freed pages otherwise): costs a rewrite of the database
                file, about 0.3 s per 6 MB.
        """
        unique = list(dict.fromkeys(ids))
        if not unique:
            return
        storage = self._storage

        def delete(collection: Any, batch: list[str]) -> None:
            if erase:  # (first: a process killed after the delete leaves the erase noted)
                storage._note_erase(str(collection.id), batch)
            collection.delete(ids=batch)

        def delete_batch(batch: list[str]) -> set[str]:
            storage._ready_to_write(self, 0)
            storage._settle_journal()
            self._call("delete memories", lambda c: delete(c, batch))
            return set()  # (a delete finds nothing gone)

        with self._user_lock:
            for start in range(0, len(unique), _BATCH):
                batch = unique[start : start + _BATCH]
                self._writing(functools.partial(delete_batch, batch), batch)
            if erase:
                storage._erase()

    # -- reading ----------------------------------------------------------------------------

    def get(self, ids: Sequence[str] | None = None) -> list[Memory]:
        if ids is not None:
            unique = list(dict.fromkeys(ids))
            records = self._records(unique, cached=self._sole_writer)
            return [records[i].memory(self._user_id, i) for i in unique if i in records]
        return [
            record.memory(self._user_id, i)
            for page in self._pages(_RECORD)
            for i, record in _page_records(page).items()
        ]

    def nearest(self, vectors: Vectors, limit: int) -> list[list[tuple[str, float]]]:
        matrix = vectors.reshape(-1, vectors.shape[-1])
        _read_aheads.touch(self)
        index = self._index
        if index is not None:
            return index.nearest_many(matrix, limit)
        found = self._call(
            "search memories",
            lambda c: c.query(query_embeddings=matrix, n_results=limit, include=["distances"]),
        )
        self._start_warming()  # Chroma answered: read the collection ahead for later searches
        if found is None:
            return [[] for _ in matrix]
        return [
            [(i, 1.0 - float(distance)) for i, distance in zip(ids, distances)]
            for ids, distances in zip(found["ids"], found["distances"])
        ]

    def centroid(self) -> tuple[Vectors, int] | None:
        """The mean of the stored vectors and how many memories it stands for: exact from the
        in-memory index, else the mean of the first :data:`CENTROID_SAMPLE` vectors read from
        Chroma at most every :data:`CENTROID_SECONDS` (the mean of thousands of memories moves
        slowly), standing for the collection's count. Those are the user's oldest memories:
        on the paraphrase benchmark at 10k they rank a little worse than the exact mean
        (docs/benchmarks.md, "Centred queries")."""
        index = self._index
        if index is not None:
            return index.centroid()
        sampled, now = self._sampled_centroid, time.monotonic()
        if sampled is not None and now - sampled[0] < CENTROID_SECONDS:
            return sampled[1]
        # One read of the first records (Chroma returns them in the order they were written).
        # Pages spread over the collection: 8 ranked no better on the benchmarks, 32 as well as
        # the exact mean, but each page costs a scan to its offset (~20 ms at 50k memories).
        # (ids without their vectors, seen under concurrent writes, are read again)
        found = self._call(
            "read memories",
            lambda c: _with_vectors(c.get(limit=CENTROID_SAMPLE, include=["embeddings"])),
        )
        mean = None
        if found and found["ids"]:
            matrix = np.asarray(found["embeddings"], dtype=np.float32)
            count = len(matrix) if len(matrix) < CENTROID_SAMPLE else self.count()
            mean = (matrix.mean(axis=0), max(count, len(matrix)))  # it stands for them all
        self._sampled_centroid = (now, mean)
        return mean

    def catalog(self, ids: Sequence[str]) -> dict[str, Catalogued]:
        records = self._records(list(dict.fromkeys(ids)), cached=True)
        return {i: record.entry for i, record in records.items()}

    def count(self) -> int:
        return int(self._call("count memories", lambda c: c.count()) or 0)

    def _pages(self, include: list[str]) -> Iterator[dict[str, Any]]:
        """Every record of the collection, :data:`_BATCH` at a time, until a page is empty."""
        offset = 0
        while True:
            page = self._call(
                "read memories",
                lambda c: c.get(limit=_BATCH, offset=offset, include=include),  # noqa: B023
            )
            if not page or not page["ids"]:
                return
            yield page
            offset += len(page["ids"])

    def _records(self, ids: list[str], *, cached: bool) -> dict[str, _Record]:
        """The records of ``ids`` that exist (ids must be unique: Chroma refuses repeats),
        from the cache where ``cached`` and present, else read from Chroma. A sole writer's
        complete index tells which ids do not exist without asking Chroma."""
        found = {i: self._cache[i] for i in ids if i in self._cache} if cached else {}
        missing = [i for i in ids if i not in found]
        index = self._index
        if cached and missing and index is not None and self._sole_writer:
            missing = [i for i in missing if i in index]
        if not missing:
            return found
        stamp = self._write_stamp
        read: dict[str, _Record] = {}
        for start in range(0, len(missing), _IDS_PER_READ):
            part = missing[start : start + _IDS_PER_READ]
            page = self._call("read memories", lambda c: c.get(ids=part, include=_RECORD))  # noqa: B023
            if page:
                read.update(_page_records(page))
        if stamp % 2 == 0 and stamp == self._write_stamp:  # no write overlapped the read
            self._cache.update(read)
            self._within_cache_limit()
            if self._sole_writer:
                self._note_absent([i for i in missing if i not in read], stamp)
        found.update(read)
        return found

    # -- what is held in memory -------------------------------------------------------------

    def _note_absent(self, ids: list[str], stamp: int) -> None:
        """Remember that a read begun at write stamp ``stamp`` found ``ids`` missing, unless a
        write has begun since (or holds the lock now: then it is skipped, not waited for)."""
        if not ids or not self._write_lock.acquire(blocking=False):
            return
        try:
            if stamp == self._write_stamp:
                self._absent.update((i, None) for i in ids)
                while len(self._absent) > _ABSENT_LIMIT:
                    del self._absent[next(iter(self._absent))]
        finally:
            self._write_lock.release()

    def _within_cache_limit(self) -> None:
        """Past :data:`CACHE_LIMIT` records (read or written), keep the newest half (the cache
        is in the order they were read or written); an index read ahead stays whole."""
        if len(self._cache) <= CACHE_LIMIT:
            return
        with self._write_lock:
            surplus = len(self._cache) - CACHE_LIMIT // 2
            for memory_id in list(itertools.islice(self._cache, max(surplus, 0))):
                del self._cache[memory_id]

    def _index_bytes(self) -> int:
        """The size of an embedded collection's vector index files (a write may rewrite them)."""
        if self._storage._folder is None or self._collection is None:
            return 0
        if self._segment is None:
            self._segment = self._storage._index_folder(str(self._collection.id))
        return directory_bytes(self._segment) if self._segment is not None else 0

    def dropped(self) -> None:
        """The collection was deleted (:meth:`ChromaStorage.drop`, with the write lock held):
        forget what is held of it. The handle stays in use; the next write creates the
        collection again, and the next search reads it ahead again."""
        self._write_stamp += 2  # a read that overlapped keeps nothing
        self._warm_log = None  # nor does a read-ahead under way
        self._let_go_of_collection()
        self._index = None
        self._cache.clear()
        self._absent.clear()
        _read_aheads.remove(self)
        self._warm_after = 0.0

    def written_elsewhere(self) -> None:
        """Another process wrote the collection until now (this one just became the folder's
        writer; held with the write lock): forget every record, vector and id held, and any
        read under way, as :meth:`dropped` does; the chromadb collection stays open."""
        self._write_stamp += 2  # a read that overlapped keeps nothing
        self._warm_log = None  # nor does a read-ahead under way
        self._index = None
        self._cache.clear()
        self._absent.clear()
        self._sampled_centroid = None
        _read_aheads.remove(self)
        self._warm_after = 0.0

    def _forked(self) -> None:
        """In a child forked from the process that made this handle: its locks may be held by
        threads that do not exist here, and its chromadb collection belongs to the parent's
        client. Forget them and everything held, as :meth:`written_elsewhere` does."""
        self._write_lock = self._storage._write_lock
        self._user_lock = threading.RLock()
        self._warm_lock = threading.Lock()
        self._let_go_of_collection()
        self._write_stamp = self._write_stamp // 2 * 2  # (a parent's write under way: over)
        self.written_elsewhere()

    def retire(self) -> None:
        """The storage was closed: stop reading ahead and trusting the cache."""
        self._retired = True
        self._sole_writer = False
        self._index = None
        self._cache.clear()
        self._absent.clear()
        _read_aheads.remove(self)

    def forget_read_ahead(self) -> None:
        """Let go of what was read ahead (to stay within :data:`READ_AHEAD_BUDGET`); it is
        read again on a later search."""
        with self._write_lock:
            self._index = None
            self._cache.clear()
            if self._warm_after is None:
                self._warm_after = time.monotonic() + _WARM_RETRY_SECONDS

    def _start_warming(self) -> None:
        """Start reading the collection ahead (once, or again a while after a write spoilt
        the last attempt)."""
        if _stopping.is_set() or self._retired:
            return
        with self._warm_lock:
            if self._warm_after is None or time.monotonic() < self._warm_after:
                return
            self._warm_after = None
        thread = threading.Thread(target=self._warm, name="headroom-memory-read-ahead", daemon=True)
        _warmers.add(thread)
        thread.start()

    def _warm(self) -> None:
        """Read every record (up to :data:`WARM_LIMIT`) in pages into the cache, which then
        serves the candidates' texts for ranking. A sole writer also reads the vectors, into
        an index that :meth:`nearest` then searches instead of Chroma.

        Writes may go on meanwhile: each one is logged (see :meth:`_writing`) and replayed on
        what was read, so a user who keeps writing still gets the read-ahead. Nothing is kept
        if a write failed or the collection was dropped meanwhile, and the index only if it
        then holds every memory (a page read while others were deleted can miss some)."""
        # the search that started this was made for a call (a model's answer, usually): let
        # that call's own Python work go first rather than share the interpreter with this read
        if _stopping.wait(READ_AHEAD_DELAY) or self._retired:
            return
        retry = False
        log: list[_Change] = []
        try:
            with self._write_lock:
                self._warm_log = log
            if self.count() > WARM_LIMIT:
                return
            index = VectorIndex(self.binding[1]) if self._sole_writer else None
            include = [*_RECORD, "embeddings"] if index is not None else _RECORD
            records: dict[str, _Record] = {}
            for page in self._pages(include):
                if _stopping.is_set() or self._retired:
                    break
                if index is not None:
                    index.put(page["ids"], page["embeddings"])
                records.update(_page_records(page))
            with self._write_lock:
                if self._warm_log is not log or _stopping.is_set() or self._retired:
                    retry = not self._retired
                    return
                for change in log:
                    change.replay(records, index)
                for memory_id, record in records.items():
                    self._cache.setdefault(memory_id, record)
                if index is not None:
                    if len(index) == self.count() and self._sole_writer:
                        self._index = index
                    else:
                        retry = True
            _read_aheads.add(self, len(records))
        except HeadroomMemoryError as exc:
            # the storage was closed under the read (this handle may not be retired yet: close()
            # marks the storage closed first): nothing to warn of, nor to try again
            closed = self._retired or self._storage._closed
            if closed:
                logger.debug("reading memories ahead stopped by close(): %s", exc)
            else:
                logger.warning("reading memories ahead failed; Chroma serves searches: %s", exc)
            retry = not closed
        finally:
            with self._write_lock:
                if self._warm_log is log:
                    self._warm_log = None
            if retry:
                self._warm_after = time.monotonic() + _WARM_RETRY_SECONDS

    def _writing(
        self, write: Callable[[], set[str]], ids: Sequence[str], upsert: _Write | None = None
    ) -> set[str]:
        """Make ``write``, a write of ``ids`` (an ``upsert``, or a delete), holding the write
        lock, and keep what is held in memory honest: after a sole writer's write it holds
        what was written; otherwise the ids are forgotten. Returns what ``write`` returns:
        the ids of rewrites it found gone (deleted meanwhile), not written and not stored."""
        with self._write_lock:
            self._write_stamp += 1
            try:
                gone = write()
            except BaseException:
                # the write may have half happened: search with Chroma, read ahead again later
                self._warm_log = None
                if self._index is not None:
                    self._index = None
                    self._warm_after = time.monotonic() + _WARM_RETRY_SECONDS
                raise
            finally:
                for i in ids:
                    self._cache.pop(i, None)
                    self._absent.pop(i, None)
                self._write_stamp += 1
            changes = [_Change(ids, None, None)]  # a delete
            if upsert is not None:
                stored = upsert.without(gone)
                records = stored.records if self._sole_writer else None
                changes = [_Change(stored.ids, records, stored.vectors)]
                if gone:  # (as a delete: they are not stored)
                    changes.insert(0, _Change(list(gone), None, None))
            for change in changes:
                change.replay(self._cache, self._index)
            sampled = self._sampled_centroid
            if sampled is not None and (sampled[1] is None or sampled[1][1] < CENTROID_SAMPLE):
                self._sampled_centroid = None  # a few writes move the mean of a few memories
            self._within_cache_limit()
            if self._warm_log is not None:
                self._warm_log.extend(changes)
            return gone


_NOT_IN_A_HOST = re.compile(r"[/?#@\s]")
"""Characters of a URL that a host name or address never holds."""


def server_address(url: str) -> str | None:
    """A Chroma server's URL as ``scheme://host:port`` (the host lowercased, an IPv6 host in
    brackets, the port spelled out), with its path if it has one (a server behind a reverse
    proxy at ``/chroma``); None if ``url`` is not an http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number, an unbracketed IPv6 host
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = port or (443 if parts.scheme == "https" else 8000)
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def client_place(client: Any) -> str | None:
    """Where the memories of an application's chromadb ``client`` are, from its settings: the
    real path of a ``PersistentClient``'s folder, or an ``HttpClient``'s server address, with
    the tenant and database when they are not the defaults. None for an in-memory client, or
    when the client does not say (not a chromadb client, settings of another version)."""
    try:
        settings = client.get_settings()
        tenant, database = getattr(client, "tenant", None), getattr(client, "database", None)
        where: str | None
        if getattr(settings, "is_persistent", False) and settings.persist_directory:
            where = os.path.realpath(os.path.expanduser(str(settings.persist_directory)))
        elif getattr(settings, "chroma_server_host", None):
            scheme = "https" if settings.chroma_server_ssl_enabled else "http"
            port = settings.chroma_server_http_port or (443 if scheme == "https" else 8000)
            where = server_address(f"{scheme}://{settings.chroma_server_host}:{port}")
            if where is None and ":" in str(settings.chroma_server_host):  # a bare IPv6 host
                where = server_address(f"{scheme}://[{settings.chroma_server_host}]:{port}")
        else:
            return None
    except Exception:  # anything but a chromadb client of a known version: no place
        return None
    if where is None:
        return None
    if (tenant, database) not in ((None, None), ("default_tenant", "default_database")):
        where += f" (tenant {tenant!r}, database {database!r})"
    return where


def _checked_headers(headers: object) -> dict[str, str]:
    """``headers`` as the dict :meth:`ChromaStorage.connect` sends, or :class:`InvalidInputError`
    for anything but a mapping of names to values that are strings (a list of pairs, a
    "Name: value" line, a number as a value), which failed only at its first use, or as an
    AttributeError. What the headers hold is never shown: a value may be a token."""
    if not isinstance(headers, Mapping) or not all(
        isinstance(name, str) and isinstance(value, str) for name, value in headers.items()
    ):
        got = (
            f"a {type(headers).__name__}"
            if not isinstance(headers, Mapping)
            else "a name or value that is not a string"
        )
        raise InvalidInputError(
            "headers must be a dict of header names to values, all strings, such as "
            f'{{"Authorization": "Bearer ..."}}; got {got}'
        )
    return dict(headers)


def headers_digest(headers: dict[str, str]) -> str:
    """What tells apart the headers a storage sends its server, never saying them: the first
    16 hex digits of a SHA-256 of the names (in lower case, as HTTP reads them) and values,
    in order of name. Two dicts of the same headers have the same digest."""
    named = sorted((str(name).lower(), str(value)) for name, value in headers.items())
    return hashlib.sha256(json.dumps(named).encode()).hexdigest()[:16]


class ChromaStorage:
    """Users' memory collections in Chroma.

    Args:
        client: A chromadb client (``PersistentClient``, ``HttpClient``, ...).
        location: A human-readable description of where the data is.
        sole_writer: Promise that nothing but this object writes to the client's memory
            collections (what :meth:`at` makes sure of with the folder's lock). Reads of
            records this process has seen are then served from memory, and searches from an
            in-memory index; otherwise every :meth:`ChromaCollection.get` reads from Chroma.
        connect: Instead of ``client``: a function that makes one, called on first use (and
            again after it failed), so the storage can be built while the backend is down.
        timeout: Seconds that making the client and each of its requests may take, for a
            server (:meth:`connect` passes :data:`DEFAULT_TIMEOUT`). None waits forever.
    """

    _embedded: ClassVar[dict[str, ChromaStorage]] = {}
    _embedded_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        client: Any = None,
        location: str = "chroma client",
        *,
        sole_writer: bool = False,
        connect: Callable[[], Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        if (client is None) == (connect is None):
            raise TypeError("pass a chromadb client or a connect function, not both or neither")
        import_http_client()  # here, not on the thread that opens Chroma: see the function
        self._client = client
        self._connect = connect
        self.location = location
        self.timeout = timeout
        self._sole_writer = sole_writer
        self._folder: Path | None = None
        self._folder_lock: FolderLock | None = None
        self._opened_identity: tuple[int, int] | None = None  # the folder it opened
        self._database: int | None = None  # a descriptor of its chroma.sqlite3 (embedded)
        self._database_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._client_lock = threading.Lock()
        self._starting: PendingStart | None = None
        self._abandoned: list[PendingStart] = []  # builds given up on that may still end
        self._adopt_lock = threading.Lock()
        self._availability = Availability(location)
        # Every handle alive in the process, held weakly, so that there is never more than one
        # per user (two would each keep a cache, an index and a user lock of their own), and
        # strong references to the OPEN_COLLECTIONS most recently opened (least recent first).
        self._collections: weakref.WeakValueDictionary[tuple[str, str, int], ChromaCollection] = (
            weakref.WeakValueDictionary()
        )
        self._recent: OrderedDict[tuple[str, str, int], ChromaCollection] = OrderedDict()
        self._collections_lock = threading.Lock()
        self._max_batch: int | None = None
        self._erase_lock = _EraseLock()
        # Held by a read while it makes Chroma rebuild an index and reads it (see _UNLOADED),
        # so that two such reads do not let each other's index go in between.
        self._reload_lock = threading.RLock()
        self._closed = False
        self._release: weakref.finalize[Any, Any] | None = None
        self._deferred: DeferredWrites | None = None  # an embedded folder's (see at())
        # This process left the undo of a write on disk that is still to be done (its own undo
        # failed, or the record could not be removed): done before its next write.
        self._rollback_left = False
        self._applications = client is not None  # a client the application made, not ours
        self._client_place = client_place(client) if self._applications else None
        self._headers_digest: str | None = None  # of the headers connect() sends, if any
        if client is not None and timeout is not None:
            bound_http_requests(client, timeout)
        _storages.add(self)

    def _forked(self) -> None:
        """In a child forked from the process that made this storage: let go of what belongs
        to the parent (the client this package made, locks that a parent's thread may hold,
        every handle's state; the folder lock and the deferred writes reset themselves), so the
        child opens the backend afresh, as a process of its own would. A client of the
        application's is left as it is (the application forked with it)."""
        if not self._applications:
            _inherited.append(self._client)  # closing it here would touch the parent's threads
            self._client = None
            if self._release is not None:
                self._release.detach()
                self._release = None
        self._starting = None
        self._abandoned = []
        self._adopt_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._client_lock = threading.Lock()
        self._collections_lock = threading.Lock()
        self._erase_lock = _EraseLock()
        self._database_lock = threading.Lock()
        self._reload_lock = threading.RLock()
        self._availability = Availability(self.location)
        self._rollback_left = False  # (the parent's; a child that takes the lock reads it)
        for handle in list(self._collections.values()):
            handle._forked()

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> ChromaStorage:
        """Embedded storage in the folder ``path`` (created on first write), shared in the
        process. Opened on first use; the process that writes first holds the folder's lock
        until it closes the storage or exits, and writes from other processes are refused."""
        folder = str(Path(path).expanduser().resolve())
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InvalidInputError(
                f"db_path {os.fspath(path)!r} is a file: it names a folder, where the memories "
                "are kept (chroma.sqlite3 and the job queue inside it); name another path"
            )
        stale: ChromaStorage | None = None
        with cls._embedded_lock:
            storage = cls._embedded.get(folder)
            if storage is not None and storage._removed():
                stale, storage = cls._embedded.pop(folder), None
            if storage is None:
                storage = cls(connect=lambda: None, location=folder, sole_writer=True)
                storage._folder = Path(folder)
                storage._folder_lock = FolderLock(Path(folder))
                storage._connect = storage._open_folder
                storage._deferred = DeferredWrites(Path(folder), storage._store_pending)
                cls._embedded[folder] = storage
        if stale is not None:
            logger.warning(
                "the memory folder %s was removed since this process opened it: opening it "
                "afresh (what was stored in the removed one stays there)",
                folder,
            )
            stale.close()
        return storage

    def _removed(self) -> bool:
        """Whether the embedded folder this storage opened was removed (or replaced by
        another folder at the same path) since: its open files are no longer the folder's."""
        opened = self._opened_identity
        return (
            opened is not None
            and self._folder is not None
            and (folder_identity(self._folder) != opened)
        )

    @classmethod
    def connect(
        cls,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        ssl: bool = False,
        headers: dict[str, str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> ChromaStorage:
        """Storage on a Chroma server (``chroma run --path DIR --host HOST --port PORT``),
        contacted on first use. Each request fails after ``timeout`` seconds. An IPv6
        ``host`` (``"::1"``) is written in brackets in URLs, as it must be. ``headers`` (an
        auth token, say: a dict of names to values, all strings, or :class:`InvalidInputError`)
        may choose the tenant and database the server serves, so they are part of the storage's
        :attr:`place` (as a digest: :func:`headers_digest`). ``host`` is a host name or
        address, never a URL (:class:`InvalidInputError`: use :meth:`from_url`)."""
        if not isinstance(host, str) or not host or _NOT_IN_A_HOST.search(host):
            raise InvalidInputError(
                f"host must be a host name or address, got {without_credentials(str(host))!r}:"
                " for a URL (a path such as /chroma included) use ChromaStorage.from_url(url)"
            )
        return cls._server(host, port, ssl=ssl, headers=headers, timeout=timeout)

    @classmethod
    def _server(
        cls,
        host: str,
        port: int,
        *,
        ssl: bool,
        headers: dict[str, str] | None = None,
        timeout: float | None,
        prefix: str = "",
    ) -> ChromaStorage:
        """Storage on the server at ``host``:``port``, its API under the path ``prefix``
        (unquoted, no trailing slash; "" for none: a server behind a reverse proxy at
        ``/chroma`` has ``/chroma``)."""
        if headers is not None:
            headers = _checked_headers(headers)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        url = f"{'https' if ssl else 'http'}://{host}:{port}{quote(prefix)}"
        # chromadb's client takes a path only within a whole URL given as its host
        client_host = url if prefix else host

        def make_client() -> Any:
            import httpx

            chromadb = import_chromadb("chromadb.api.fastapi")

            # chromadb's client talks to the server while it is built, on a session with no
            # timeout: ask for a heartbeat first, so a server that does not answer fails at
            # once, and give the build's own requests the timeout too (a connection lost
            # without a reset after the heartbeat held the build, so memory, forever)
            httpx.get(f"{url}/api/v2/heartbeat", headers=headers, timeout=timeout)
            with requests_bounded_while_built(timeout) if timeout is not None else nullcontext():
                return chromadb.HttpClient(
                    host=client_host, port=port, ssl=ssl, headers=headers, settings=_settings()
                )

        storage = cls(connect=make_client, location=url, timeout=timeout)
        if headers:
            storage._headers_digest = headers_digest(headers)
        return storage

    @classmethod
    def from_url(cls, url: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> ChromaStorage:
        """Storage on the Chroma server at ``http://host:port`` (or https), with a path if
        it is served under one (``https://gateway.example/chroma``: its API is then
        ``/chroma/api/v2``).

        Raises:
            StorageError: Not an http(s) URL with a host.
            InvalidInputError: The URL carries credentials, a query (``?...``) or a fragment
                (``#...``), which chromadb's client cannot send: they are refused, never
                dropped; or its port is not a number.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError(
                f"not a Chroma server URL: {without_credentials(url)!r} (expected http://host:port)"
            )
        if parts.username is not None or parts.password is not None:
            raise InvalidInputError(
                f"the Chroma server URL {parts.hostname!r} carries credentials, which this "
                "package does not send: remove them from the URL (the server must accept its "
                "clients without them)"
            )
        ssl = parts.scheme == "https"
        try:
            port = parts.port or (443 if ssl else 8000)
        except ValueError:  # (its text would quote the "port": a password holding "#" or "/")
            raise InvalidInputError(
                f"not a Chroma server URL: {without_credentials(url)!r} (its port is not a number)"
            ) from None
        if "?" in url or "#" in url:  # (credentials, refused above, may not hold them here)
            raise InvalidInputError(
                f"the Chroma server URL {without_credentials(url)!r} has a query ('?...') or a "
                "fragment ('#...'), which chromadb's client cannot send: remove it (a path, "
                "such as /chroma, is kept)"
            )
        prefix = unquote(parts.path).rstrip("/")
        return cls._server(parts.hostname, port, ssl=ssl, timeout=timeout, prefix=prefix)

    # -- the client -------------------------------------------------------------------------

    def _open_folder(self, *, recover: bool = True) -> Any:
        """Make the embedded client: create the folder, take its lock if no other process
        holds it, open Chroma, and as its writer first finish what an earlier writer left
        (not with ``recover`` False: this process opens Chroma anew, see :meth:`_erase`). A
        failed open leaves nothing behind to spoil the next one."""
        chromadb = import_chromadb("chromadb.api.rust")

        assert self._folder is not None and self._folder_lock is not None
        folder = str(self._folder)
        make_private_folder(self._folder)
        self._opened_identity = folder_identity(self._folder)
        scrub_freed_memory()  # before Chroma allocates an index it writes out uncleared
        writer = self._folder_lock.acquire()
        try:
            global _embedded_opened
            _embedded_opened = True  # (before: the client starts chromadb's threads)
            self._wait_for_database("open the memory store")
            client = chromadb.PersistentClient(path=folder, settings=_settings())
            if writer and recover:
                # the erase of records the last writer deleted (it was killed before it, and
                # a search could load a vector index that still knows their ids; a delete it
                # left logged and not applied is applied first, and Chroma then opened anew,
                # so that it loads the index whose deleted vectors the erase cleared), then a
                # write it left half-done is undone, then the journal replayed: a journaled
                # write came before that write (which waited for it), or was that write (the
                # worker's), which the replay then stores whole
                if self._erase_left(client):
                    _close_client(client)
                    client = chromadb.PersistentClient(path=folder, settings=_settings())
                _roll_back_left(client, self._folder)
                _store_journaled(client, self._folder)
            return client
        except BaseException:
            self._folder_lock.release()
            forget_broken_system(folder)
            raise

    def _wait_for_database(self, action: str) -> None:
        """Before a call into an embedded folder's Chroma: wait, up to
        :data:`~.folder.DATABASE_WAIT_SECONDS` or the chat call's time left, for another
        process's lock on its database (:func:`~.folder.database_free`), rather than let
        chromadb wait for it with the whole process stopped.

        Raises:
            StorageError: The lock was still held then (:class:`DeadlineExceeded` on a chat
                call, which answers without memories)."""
        if self._folder is None or _forked_after_embedded:  # (refused at once: _client_now)
            return
        fd = self._database_fd()
        if fd is None:
            return
        seconds, cut = within_deadline(DATABASE_WAIT_SECONDS)
        if database_free(fd, seconds):
            return
        database = self._folder / DATABASE_FILE
        if cut:
            raise DeadlineExceeded(
                f"could not {action} in the chat call's time: {database} is locked by another"
                " process"
            )
        raise StorageError(
            f"could not {action}: another process kept {database} locked for {seconds:.0f} s"
            " (a program holding a transaction on it); nothing was done, try again once it"
            " lets go"
        )

    def _database_fd(self) -> int | None:
        """A descriptor of the folder's ``chroma.sqlite3``, opened once and kept until the
        storage is closed (closing a descriptor of a file drops every POSIX lock the process
        holds on it, Chroma's included: it is never closed while Chroma may hold one). None
        while the file does not exist."""
        with self._database_lock:
            if self._database is None:
                assert self._folder is not None
                try:
                    self._database = os.open(self._folder / DATABASE_FILE, os.O_RDONLY)
                except OSError:
                    return None
        return self._database

    def _keep_rollback(self, rollback: Rollback) -> bool:
        """Before the first batch of a write larger than one: record its undo on an embedded
        folder's disk (see :mod:`.rollback`). False for a server or a client of the
        application's, which have no folder: a failed write is undone by this process only.

        Raises:
            StorageError: The record could not be written; nothing was written."""
        if self._folder is None:
            return False
        if self._rollback_left:  # (the writes of this process undo it first: never here)
            raise StorageError(
                f"an earlier write to {self._folder} is still to be undone; nothing was written"
            )
        try:
            keep(self._folder, rollback)
        except OSError as exc:
            records = len(rollback.added) + len(rollback.prior)
            raise StorageError(
                f"could not record how to undo a write of {records} memories in "
                f"{self._folder} ({exc}); nothing was written"
            ) from exc
        self._rollback_left = True
        return True

    def _discard_rollback(self) -> None:
        """The write whose undo :meth:`_keep_rollback` recorded is stored, or undone: remove
        the record (with the text it holds).

        Raises:
            StorageError: It could not be removed (it is done before the next write)."""
        assert self._folder is not None
        try:
            discard(self._folder)
        except OSError as exc:
            raise StorageError(
                f"could not remove the undo record in {self._folder}: {exc}"
            ) from exc
        self._rollback_left = False

    def _undo_left_write(self) -> None:
        """With the write lock held, before a write: undo the write a process left half-done
        in the folder (see :func:`_roll_back_left`); every handle of its user then reads
        afresh (what it read meanwhile may have been half of it)."""
        assert self._folder is not None
        action = f"undo a write left half-done in {self._folder}"
        with self._guard(action), self._erase_lock.shared():
            user_id = _roll_back_left(self._client_now(), self._folder)
        self._rollback_left = False
        if user_id is not None:
            name = collection_name(user_id)
            with self._collections_lock:
                handles = [h for key, h in list(self._collections.items()) if key[0] == name]
            for handle in handles:
                handle.written_elsewhere()

    def _store_pending(self, write: PendingWrite) -> None:
        """Write a deferred write to Chroma (in the worker thread of :mod:`.deferred`)."""
        handle = self.open(write.user_id, write.embedder, write.dimension)
        handle._store(
            _Write(list(write.records), list(write.records.values()), write.vectors), set()
        )

    def _settle(self) -> None:
        """Wait for this folder's deferred writes to be in Chroma (see :mod:`.deferred`)."""
        if self._deferred is not None:
            self._deferred.settle()

    def _settle_journal(self) -> None:
        """Before a delete (with the write lock held): every deferred write in Chroma and the
        journal empty, so that no process replays a deleted record from it (see
        :meth:`.DeferredWrites.empty_stored`)."""
        if self._deferred is not None:
            self._deferred.settle()
            self._deferred.empty_stored()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the writes an embedded folder stores behind its callers are in Chroma
        (they are journaled and searchable in this process already; see :mod:`.deferred`).
        Returns False if ``timeout`` seconds passed first or Chroma keeps refusing them."""
        if self._deferred is None:
            return True
        try:
            self._deferred.settle(SETTLE_SECONDS if timeout is None else timeout)
        except StorageError:
            return False
        return True

    def _closed_error(self) -> StorageError:
        """What using this storage after :meth:`close` raises."""
        return StorageError(
            f"the storage at {self.location} is closed: stores built on it cannot be used "
            "any more; make new ones (or call ChromaStorage.at again) to open it afresh"
        )

    def _client_now(self) -> Any:
        """The chromadb client, made on first need (see ``connect``)."""
        client = self._client
        if client is not None:
            return client
        if self._folder is not None and _forked_after_embedded:
            raise StorageError(
                f"the memory folder {self._folder} cannot be opened in this process (pid "
                f"{os.getpid()}): it was forked from a process that had opened an embedded "
                "memory folder, and Chroma's embedded client hangs in a child forked after it "
                "was used (nothing was read or written). Open memory stores in processes "
                "started with multiprocessing's 'spawn' or 'forkserver' method "
                "(multiprocessing.get_context('spawn')), or fork before the first use of a "
                "store; to share memories between processes, run a Chroma server (chroma run "
                "--path DIR) and pass db_path='http://host:port'."
            )
        cut = False
        if self.timeout is None:
            wait = -1.0
        else:
            wait, cut = within_deadline(self.timeout)
        if not self._client_lock.acquire(timeout=wait):
            error = DeadlineExceeded if cut else StorageError
            raise error(f"still connecting to {self.location}")
        try:
            if self._client is not None:
                return self._client
            if self._closed or self._connect is None:
                raise self._closed_error()
            self._availability.check()
            self._let_hung_build_be()
            what = (
                f"open the memory store at {self.location}"
                if self._folder is not None
                else f"connect to {self.location}"
            )
            try:
                if self.timeout is None:
                    self._adopt(self._connect())
                else:
                    _import_clients()  # slow the first time, and not the server's fault
                    check_deadline(what)
                    # the client is made on a helper thread, waited for at most its own
                    # bound or the chat call's time left; it is kept if it comes later
                    allowed = self.timeout + _CLIENT_SETUP_SECONDS
                    deadline, cut = within_deadline(allowed)
                    self._starting = start_with_deadline(
                        self._connect, self._adopt, deadline, what, give_up_after=allowed
                    )
                    if self._starting is not None:
                        if cut:  # the call's time is up, not the server's: no pause
                            raise DeadlineExceeded(f"could not {what} in the chat call's time")
                        raise StorageError(f"could not {what}: no answer in {deadline:.0f} s")
            except DeadlineExceeded:
                raise
            except Exception as exc:
                if isinstance(exc, StorageError):
                    self._availability.failed(str(exc))
                    raise
                self._availability.failed(f"{type(exc).__name__}: {exc}")
                raise StorageError(f"could not {what}: {type(exc).__name__}: {exc}") from exc
            return self._client
        finally:
            self._client_lock.release()

    def _let_hung_build_be(self) -> None:
        """Raise while a build of the client started earlier still runs (another would block
        behind the same server), unless it has run past its time: its requests are then stuck
        where no timeout reaches, and it is left to end on its own (a client it makes is still
        kept) while another is started, up to :data:`_ABANDONED_BUILDS` left running."""
        starting = self._starting
        if starting is None or not starting.running:
            return
        self._abandoned = [build for build in self._abandoned if build.running]
        if not starting.abandoned or len(self._abandoned) >= _ABANDONED_BUILDS:
            raise StorageError(f"{self.location} has not answered yet")
        logger.warning(
            "connecting to %s has not ended in %.0f s; trying again beside it",
            self.location,
            (self.timeout or 0.0) + _CLIENT_SETUP_SECONDS,
        )
        self._abandoned.append(starting)
        self._starting = None

    def _adopt(self, client: Any) -> None:
        """Keep a client just made (possibly late, by a helper thread; the first of several
        builds to end wins, the others' clients are closed)."""
        if self.timeout is not None:
            bound_http_requests(client, self.timeout)
        with self._adopt_lock:
            keep = not self._closed and self._client is None
            if keep:
                self._client = client
        if not keep:
            close = getattr(client, "close", None)
            if callable(close) and client is not self._client:
                close()
            return
        if self._connect is not None and self._folder is None:
            # a server's client made here: closed by close(), or once this is collected (not
            # at exit: work still draining then may need it; embedded storages stay in
            # ChromaStorage._embedded until closed)
            self._release = weakref.finalize(self, _close_client, client)
            self._release.atexit = False

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Fail at once while the backend is known to be down; raise Chroma's and the
        network's errors as :class:`StorageError`, noting when the backend did not answer."""
        self._availability.check()
        check_deadline(action)  # the chat call's time for memory is up: no more requests
        request_starts()
        try:
            yield
        except HeadroomMemoryError:
            raise
        except Exception as exc:  # chromadb raises many unrelated types
            if is_unreachable(exc):
                left = time_left()
                if left is not None and (left <= 0 or request_was_cut()):
                    # cut short by the chat call's deadline, not by its own timeout: the
                    # backend may be merely slow, so later calls are not held back
                    raise DeadlineExceeded(
                        f"could not {action} in the chat call's time: {type(exc).__name__}"
                    ) from exc
                self._availability.failed(f"{type(exc).__name__}: {exc}")
            raise StorageError(f"could not {action}: {type(exc).__name__}: {exc}") from exc
        except BaseException as exc:
            if not is_rust_panic(exc):
                raise  # an interrupt, an exit or a cancellation: never turned into a failure
            raise StorageError(
                f"could not {action}: chromadb failed inside ({exc}); a folder written by a "
                "newer chromadb than the one installed does this"
            ) from exc
        self._availability.succeeded()

    def _batch_size(self) -> int:
        """The most records Chroma takes in one write (5,461 in Chroma 1.5)."""
        if self._max_batch is None:
            with self._guard("ask Chroma for its largest batch"):
                size = int(self._client_now().get_max_batch_size())
            self._max_batch = size if size > 0 else _BATCH
        return self._max_batch

    @property
    def down(self) -> bool:
        """Whether the storage is held to be down now: it did not answer (a server that
        refused or timed out, a folder that could not be opened), and its calls fail at once
        for a while."""
        return self._availability.down

    # -- an embedded folder -----------------------------------------------------------------

    @property
    def folder(self) -> Path | None:
        """The embedded folder (:meth:`at`), whether or not it exists yet; None otherwise."""
        return self._folder

    @property
    def db_path(self) -> str | None:
        """The ``db_path`` that opens these memories again: the embedded folder, or the
        server's ``scheme://host:port`` (never credentials); None for a storage on a chromadb
        client of the application's (it may need the client's own headers or settings)."""
        if self._folder is not None:
            return str(self._folder)
        if self._applications:
            return None
        return server_address(self.location)

    @property
    def place(self) -> str | None:
        """Where these memories are, as one string that two storages share only when they
        hold the same memories: :attr:`db_path`, or for a storage on a chromadb client of the
        application's, what the client's settings say (:func:`client_place`). A server
        storage made with headers (:meth:`connect`) adds their digest: a server or a gateway
        may serve another tenant's database to each token (the client of :meth:`connect` asks
        for the default tenant and database, so they say nothing more). None when nothing
        tells it apart: an in-memory client, or one whose settings cannot be read."""
        place = self.db_path or self._client_place
        if place is not None and self._headers_digest is not None:
            place += f" (headers sha256 {self._headers_digest})"
        return place

    def _holds_folder(self) -> bool:
        """True unless this is an embedded folder whose lock another process holds."""
        return self._folder_lock is None or self._folder_lock.held

    def _ready_to_write(self, handle: ChromaCollection | None, write_bytes: int) -> None:
        """Refuse a write to an embedded folder that another process writes to, or whose
        disk is (almost) full. Called with the write lock held, before anything is written.

        Raises:
            StorageError: The write would not be safe; nothing was written.
        """
        lock, folder = self._folder_lock, self._folder
        if lock is None or folder is None:
            return
        with self._guard(f"open the memory store at {folder}"):
            self._client_now()
        if not lock.held:
            if not lock.acquire():
                raise StorageError(
                    f"another process (pid {lock.holder()}) is writing to the memory folder "
                    f"{folder}. One process at a time may write to an embedded folder; this "
                    "one can read it. To share memories between processes, run a Chroma "
                    "server (chroma run --path DIR) and pass db_path='http://host:port'."
                )
            self._take_over()
        if self._rollback_left:
            self._undo_left_write()
        check_free_space(folder, handle._index_bytes() if handle is not None else 0, write_bytes)

    def _take_over(self) -> None:
        """This process has just taken the lock of a folder it opened while another process
        wrote it (that process closed its storage, exited or was killed). With the write lock
        held, before this process writes anything: undo a write the last writer left half-done
        (see :mod:`.rollback`) and store what it left journaled (its deferred writes,
        acknowledged to its callers; see :mod:`.deferred`), as opening the folder would have,
        then forget what this process holds of any user (another process wrote until now, and
        the replay may have changed records). If either fails, the lock is given back and the
        write refused: the records are kept, and the next write (of this process or another)
        tries again.

        Raises:
            StorageError: Chroma refused the undo or a journaled write; nothing was written."""
        assert self._folder is not None and self._folder_lock is not None
        action = f"store the writes left pending in {self._folder}"
        try:
            with self._erase_lock.alone():
                self._reopen_client()
                self._erase_left()  # (first: see _open_folder)
            with self._guard(action), self._erase_lock.shared():
                _roll_back_left(self._client_now(), self._folder)  # (first: see _open_folder)
                _store_journaled(self._client_now(), self._folder)
        except BaseException:
            self._folder_lock.release()
            raise
        finally:
            with self._collections_lock:  # another process wrote until now: read afresh
                handles = list(self._collections.values())
            for other in handles:
                other.written_elsewhere()

    def _reopen_client(self) -> None:
        """On taking a folder over, and before erasing deleted records (with Chroma unused:
        the erase lock held alone): close this process's chromadb client, so that the next
        call opens the folder afresh and Chroma loads each vector index from disk. Chroma
        keeps an index it loaded in memory and, when it next writes, replays only the log
        entries after it; the other process may have renamed a deleted record's entries since
        (see :func:`.folder.erase_deleted`), so that replay would delete the placeholder and
        keep the real id in the index (and save it in the index's id map). And it keeps a
        deleted record's vector in memory and saves it again with the index's next save, over
        the erase's cleared copy. Every handle opens its chromadb collection again. (A chromadb
        client the application opened on the same folder keeps Chroma's memory alive: then
        nothing is reloaded.)"""
        client, self._client = self._client, None
        with self._collections_lock:
            handles = list(self._collections.values())
        for handle in handles:
            handle._collection = None
        if client is not None:
            _close_client(client)

    def _note_erase(
        self, collection_id: str, ids: list[str] | None, index: Path | None = None
    ) -> None:
        """Before a delete from an embedded folder (``ids``; the whole collection if None,
        with its vector ``index`` folder): record its erase on disk (see
        :func:`.folder.note_erase`), done by :meth:`_erase` after it, or by the next process
        to write the folder if this one is killed first.

        Raises:
            StorageError: It could not be recorded; nothing was deleted."""
        if self._folder is None:
            return
        try:
            note_erase(self._folder, collection_id, ids, index)
        except OSError as exc:
            raise StorageError(
                f"could not record the erase of deleted memories in {self._folder} ({exc}); "
                "nothing was deleted"
            ) from exc

    def _erase(self) -> None:
        """After a delete: remove deleted records' text, vectors and ids from an embedded
        folder's files, as :meth:`_note_erase` recorded (see :func:`.folder.erase_deleted`).
        Held with the write lock. If that fails (e.g. no room to rewrite the file), it is
        logged and tried again after the next delete or clear, and when a process next opens
        the folder as its writer."""
        if self._folder is None:
            return
        with self._write_lock, self._erase_lock.alone():
            # Chroma keeps the deleted records' vectors in its memory and would save them
            # again: it is closed, and opened anew on the cleared index files (_reopen_client)
            self._reopen_client()
            try:
                self._erase_left()
            finally:
                self._open_again()

    def _open_again(self) -> None:
        """After an erase (the write lock and the erase lock held): open the folder's Chroma
        again at once, without what an open does for an earlier writer's leftovers: what the
        folder holds of them now is this process's own (its worker's journal, which that worker
        is storing; a delete it left to the next process), and an open's recovery would only
        store the journal twice. If that fails, it is logged, and the next call opens it, with
        the recovery: harmless then too, as no write of this process has an undo record on disk
        without holding the write lock with the client open (``_ready_to_write`` opens it
        before ``_store`` records the undo, and only an erase or a take-over, both under the
        write lock, closes it)."""
        try:
            self._adopt(self._open_folder(recover=False))
        except Exception:
            logger.warning("could not open %s again after an erase", self._folder, exc_info=True)

    def _erase_left(self, client: Any = None) -> bool:
        """Do the erases recorded in the folder (with Chroma unused meanwhile); a failure is
        logged, and the record kept for the next try. With the ``client`` just made on
        opening the folder, a delete Chroma logged and did not apply (a process killed in
        between, or the second step failed) is applied first, then erased; otherwise it stays
        noted until then (the erase must come after it: see :func:`.folder.logged_deletes`).
        (A process's chromadb that failed to apply a delete does not try again: the next one
        to open the folder applies it.) Returns whether ``client`` was used: it must then be
        closed, as it holds vector indexes whose deleted vectors the erase cleared on disk."""
        assert self._folder is not None
        used = False
        try:
            if client is not None:
                used = _apply_logged_deletes(client, self._folder)
            erase_noted(self._folder)
        except Exception:
            logger.warning(
                "deleted memories' text could not yet be erased from %s; trying again "
                "after the next delete",
                self._folder,
                exc_info=True,
            )
        return used

    # -- users ------------------------------------------------------------------------------

    def open(self, user_id: str, embedder: str, dimension: int) -> ChromaCollection:
        """The user's collection: the same handle for every caller in this process (nothing is
        read until it is used; a mismatched embedder raises then)."""
        key = (collection_name(user_id), embedder, dimension)
        with self._collections_lock:
            handle = self._collections.get(key)
            if handle is None or handle._retired:
                handle = self._collections[key] = ChromaCollection(
                    self, user_id, (embedder, dimension)
                )
            # bounded: past OPEN_COLLECTIONS, the least recently opened handle is let go. It
            # lives on while a store or a thread holds it (and open() returns it); otherwise it
            # is collected with its cache and read-ahead. Nothing of it is lost: its deferred
            # writes are the storage's (stored in order by its worker, which reopens the
            # user), and a later handle reads Chroma only once they are in it (_call settles).
            self._recent[key] = handle
            self._recent.move_to_end(key)
            while len(self._recent) > OPEN_COLLECTIONS:
                self._recent.popitem(last=False)
            return handle

    def _check_owner(self, meta: Any, user_id: str, embedder: str, dimension: int) -> None:
        if meta.get("user_id") != user_id:
            raise StorageError("a collection named for this user belongs to another; refusing it")
        if meta.get("embedder") != embedder or int(meta.get("dimension", dimension)) != dimension:
            raise EmbeddingMismatchError(
                f"the memories of user {user_tag(user_id)} in {self.location} were embedded with "
                f"{meta.get('embedder')!r} ({meta.get('dimension')} dimensions), but this store "
                f"uses {embedder!r} ({dimension} dimensions). Use the original embedder, another "
                "db_path, or export the memories, clear() them and import them again "
                "(import_(..., consolidate=False))."
            )

    def users(self) -> list[str]:
        """The ids of every user with a memory collection here, sorted."""
        self._settle()
        with self._guard("list the users"), self._erase_lock.shared():
            client = self._client_now()
            listed = []
            offset = 0
            while True:
                page = client.list_collections(limit=_BATCH, offset=offset)
                listed += page
                if len(page) < _BATCH:
                    break
                offset += len(page)
        found = set()
        for collection in listed:
            meta = collection.metadata or {}
            user_id = meta.get("user_id")
            if isinstance(user_id, str) and collection.name == collection_name(user_id):
                found.add(user_id)
        return sorted(found)

    def drop(self, user_id: str, *, erase: bool = True) -> int:
        """Delete the user's collection; return how many memories it held. Every handle of
        the user in this process stays usable (empty until written again).

        Args:
            erase: Also remove the memories' text from an embedded folder's files.
        """
        name = collection_name(user_id)
        with self._collections_lock:
            handles = [h for key, h in list(self._collections.items()) if key[0] == name]
        with ExitStack() as held:
            for handle in handles:
                held.enter_context(handle.exclusive())
            held.enter_context(self._write_lock)
            self._settle()
            self._ready_to_write(None, 0)
            self._settle_journal()  # no journaled line of the user outlives the drop
            with self._guard(f"clear the memories of user {user_tag(user_id)}"):
                client = self._client_now()
                try:
                    collection = client.get_collection(name, embedding_function=None)
                except Exception as exc:
                    if not _is_missing(exc):
                        raise
                    collection = None
                if collection is not None:
                    if (collection.metadata or {}).get("user_id") != user_id:
                        raise StorageError(
                            "a collection named for this user belongs to another; refusing it"
                        )
                    count = int(collection.count())
                    if erase:
                        index_files = self._index_folder(str(collection.id))
                        self._note_erase(str(collection.id), None, index_files)
                    try:
                        client.delete_collection(name)
                    except Exception:
                        if erase:  # the noted erase: done if the drop went through in part,
                            self._erase()  # let go of if the collection is still there
                        raise
            # and a handle opened meanwhile (its user's was let go of, or never opened): it
            # may have read what was just deleted
            with self._collections_lock:
                opened = [h for key, h in list(self._collections.items()) if key[0] == name]
            for handle in dict.fromkeys([*handles, *opened]):
                handle.dropped()
            if collection is None:
                return 0
            if erase:
                self._erase()  # (and removes the index folder)
            return count

    def _index_folder(self, collection_id: str) -> Path | None:
        """An embedded collection's vector index folder: Chroma may leave it behind when the
        collection is deleted, and its files may hold stray bytes of the deleted texts."""
        if self._folder is None:
            return None
        # read with Python's sqlite3 while no Chroma call of this process runs: it is another
        # copy of SQLite, and POSIX locks are the process's, not a connection's, so its locking
        # and unlocking of the file would change or drop the locks of a Chroma transaction
        # under way; a reader in another process could then take Chroma's unfinished write
        # for one whose writer died, and roll it back under it
        with self._erase_lock.alone():
            return vector_segment(self._folder, collection_id)

    def close(self) -> None:
        """Stop this storage's background reads and release its client (a server's
        connections, an embedded folder's files and lock). Do not use it, or stores built on
        it, afterwards. :meth:`at` shares one storage per folder in a process: closing it
        closes it for every store of that folder, and the next :meth:`at` opens the folder
        afresh. The job queue serving its stores stops first and closes its file, unless
        stores on another storage of the same place still use it (their work left stays in
        the file for the next process)."""
        announce_closed(self)
        if self._deferred is not None:
            self._deferred.stop()  # what cannot be stored now stays journaled for next time
        with self._write_lock:
            self._closed = True
            with self._collections_lock:
                for handle in list(self._collections.values()):
                    handle.retire()
                self._collections.clear()
                self._recent.clear()
        with self._embedded_lock:
            for folder, storage in list(self._embedded.items()):
                if storage is self:
                    del self._embedded[folder]
        client, self._client = self._client, None
        if self._release is not None:
            self._release.detach()
        _close_client(client)
        database, self._database = self._database, None
        if database is not None:
            os.close(database)
        if self._folder_lock is not None:
            self._folder_lock.release()

    def __repr__(self) -> str:
        return f"ChromaStorage(location={self.location!r})"


def _after_fork_in_child() -> None:
    """A forked child starts with none of the parent's Chroma state (see
    ``ChromaStorage._forked``); embedded folders are refused in it if the parent had opened
    one (see :data:`_embedded_opened`)."""
    global _forked_after_embedded
    _forked_after_embedded = _forked_after_embedded or _embedded_opened
    ChromaStorage._embedded_lock = threading.Lock()
    _read_aheads._lock = threading.Lock()
    _read_aheads._sizes.clear()
    _read_aheads._dead.clear()
    for storage in list(_storages):
        storage._forked()
    # chromadb shares one system per folder or server in a process: the parent's are not to
    # be used here (a server client's pooled connections are the parent's sockets)
    shared = sys.modules.get("chromadb.api.shared_system_client")
    client_class = getattr(shared, "SharedSystemClient", None)
    for name in ("_identifier_to_system", "_identifier_to_refcount"):
        registry = getattr(client_class, name, None)
        if isinstance(registry, dict):
            _inherited.append(dict(registry))
            registry.clear()
    if client_class is not None and hasattr(client_class, "_refcount_lock"):
        client_class._refcount_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
