"""Chroma storage: one collection per user, embedded on disk or on a Chroma server.

- Embedded (default): ``ChromaStorage.at("~/.headroom-memory")`` opens a ``PersistentClient``.
  One process at a time should write to a folder.
- Server: ``ChromaStorage.connect("127.0.0.1", 8000)`` talks to ``chroma run``, which several
  processes or machines can share.
- Your own client: ``ChromaStorage(client)``.

Chroma never embeds here (``embedding_function=None``; the engine passes vectors) and its
telemetry is off. Collections use cosine space, so a score is ``1 - distance``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

from ..embeddings.base import Vectors
from ..errors import EmbeddingMismatchError, HeadroomMemoryError, StorageError
from ..types import Category, Memory, Revision, Source, parse_time
from .base import collection_name
from .vectors import VectorIndex

SCHEMA_VERSION = 1
_BATCH = 1000  # rows per Chroma call when reading or deleting many
# A user's memories are read ahead into memory (a few KB each) up to this many; a sole writer
# then searches them there. Larger collections are searched by Chroma.
WARM_LIMIT = 20_000
# Memories held read ahead in one process, over all users; past it, the users searched least
# recently are let go (their searches go back to Chroma until they are read ahead again).
READ_AHEAD_BUDGET = 100_000
_WARM_RETRY_SECONDS = 5.0  # after a write overlapped a read-ahead, wait this long to retry
# A search that runs while another thread's first write to a new collection is being flushed
# fails with this (Chroma 1.5): wait a little and try again (5 ms doubling, ~0.3 s in all).
_UNWRITTEN_INDEX = "Nothing found on disk"
_UNWRITTEN_INDEX_TRIES = 7
T = TypeVar("T")
logger = logging.getLogger(__name__)

_stopping = threading.Event()
_warmers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


class _ReadAheads:
    """The collections held read ahead in this process, least recently searched first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sizes: OrderedDict[ChromaCollection, int] = OrderedDict()

    def add(self, handle: ChromaCollection, size: int) -> None:
        """Hold ``handle``'s read-ahead, letting the least recently searched ones go."""
        with self._lock:
            self._sizes[handle] = size
            self._sizes.move_to_end(handle)
            evicted = []
            while sum(self._sizes.values()) > READ_AHEAD_BUDGET and len(self._sizes) > 1:
                evicted.append(self._sizes.popitem(last=False)[0])
        for old in evicted:
            old.forget_read_ahead()

    def touch(self, handle: ChromaCollection) -> None:
        with self._lock:
            if handle in self._sizes:
                self._sizes.move_to_end(handle)

    def remove(self, handle: ChromaCollection) -> None:
        with self._lock:
            self._sizes.pop(handle, None)


_read_aheads = _ReadAheads()


@atexit.register
def _stop_warming() -> None:
    """Let read-ahead threads finish their page and stop before the interpreter goes away."""
    _stopping.set()
    for thread in list(_warmers):
        thread.join(timeout=2.0)


def _settings() -> Any:
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False, allow_reset=False)


@contextmanager
def _storage_errors(action: str) -> Iterator[None]:
    """Re-raise Chroma's and the network's errors as :class:`StorageError`."""
    try:
        yield
    except HeadroomMemoryError:
        raise
    except Exception as exc:  # chromadb raises many unrelated types
        raise StorageError(f"could not {action}: {type(exc).__name__}: {exc}") from exc


def _to_record(memory: Memory) -> tuple[str, dict[str, Any]]:
    metadata = {
        "category": memory.category.value,
        "source": memory.source.value,
        "created_at": memory.created_at.timestamp(),
        "updated_at": memory.updated_at.timestamp(),
        "metadata": json.dumps(dict(memory.metadata), ensure_ascii=False),
        "history": json.dumps([r.to_dict() for r in memory.history], ensure_ascii=False),
    }
    return memory.text, metadata


def _from_record(user_id: str, memory_id: str, text: str, meta: dict[str, Any]) -> Memory:
    return Memory(
        id=memory_id,
        user_id=user_id,
        text=text,
        category=Category.parse(meta["category"]),
        created_at=parse_time(meta["created_at"]),
        updated_at=parse_time(meta["updated_at"]),
        source=Source.parse(meta.get("source", "manual")),
        metadata=MappingProxyType(json.loads(meta.get("metadata") or "{}")),
        history=tuple(Revision.from_dict(r) for r in json.loads(meta.get("history") or "[]")),
    )


_RECORD = ["documents", "metadatas"]


class _Record:
    """A stored memory as Chroma returns it; parsed into a :class:`Memory` on first need."""

    __slots__ = ("_memory", "category", "meta", "text")

    def __init__(self, text: str, meta: Any, memory: Memory | None = None) -> None:
        self.text = text
        self.meta = meta
        self.category = Category.parse(meta["category"])
        self._memory = memory

    def memory(self, user_id: str, memory_id: str) -> Memory:
        if self._memory is None:
            self._memory = _from_record(user_id, memory_id, self.text, dict(self.meta))
        return self._memory


def _page_records(page: dict[str, Any]) -> dict[str, _Record]:
    """The records of one Chroma ``get`` answer (documents and metadatas), by id."""
    return {
        i: _Record(text, meta)
        for i, text, meta in zip(page["ids"], page["documents"], page["metadatas"])
    }


class ChromaCollection:
    """A user's memories in one Chroma collection (see :class:`UserCollection`).

    If the collection is dropped behind its back (``clear()`` from another process or
    client), the next call opens it afresh instead of failing on a stale handle.
    """

    def __init__(
        self,
        user_id: str,
        reopen: Callable[[], Any],
        write_lock: threading.RLock,
        binding: tuple[str, int],
        *,
        sole_writer: bool = False,
    ) -> None:
        self._user_id = user_id
        self._reopen = reopen
        self._collection = reopen()
        self._write_lock = write_lock
        self.binding = binding  # (embedder, dimension) it was opened with
        # Records read before, by id. This handle's writes keep them current; when it is the
        # only writer of the collection (embedded storage), get() may be served from them.
        self._cache: dict[str, _Record] = {}
        self._sole_writer = sole_writer
        # Odd while a write is under way; a read that overlaps a write caches nothing.
        self._write_stamp = 0
        # A sole writer's copy of every vector, once read ahead in the background (see _warm).
        self._index: VectorIndex | None = None
        self._warm_lock = threading.Lock()
        self._warm_after: float | None = 0.0  # monotonic time; None: running or given up
        self._retired = False

    def _call(self, action: str, run: Callable[[Any], T]) -> T:
        from chromadb.errors import InternalError, NotFoundError

        with _storage_errors(action):
            for attempt in range(_UNWRITTEN_INDEX_TRIES):
                try:
                    return run(self._collection)
                except NotFoundError:  # dropped behind our back: open it afresh, once
                    self._collection = self._reopen()
                    return run(self._collection)
                except InternalError as exc:
                    if _UNWRITTEN_INDEX not in str(exc) or attempt == _UNWRITTEN_INDEX_TRIES - 1:
                        raise
                    time.sleep(0.005 * 2**attempt)
            raise AssertionError("unreachable")  # the loop returns or raises

    def upsert(self, memories: Sequence[Memory], vectors: Vectors) -> None:
        if not memories:
            return
        records = [_to_record(m) for m in memories]
        written = {m.id: _Record(text, meta, m) for m, (text, meta) in zip(memories, records)}
        with self._writing(list(written), written, vectors):
            self._call(
                "write memories",
                lambda c: c.upsert(
                    ids=[m.id for m in memories],
                    embeddings=vectors,
                    documents=[text for text, _ in records],
                    metadatas=[meta for _, meta in records],
                ),
            )

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
            return [index.nearest(row, limit) for row in matrix]
        self._start_warming()
        found = self._call(
            "search memories",
            lambda c: c.query(query_embeddings=matrix, n_results=limit, include=["distances"]),
        )
        return [
            [(i, 1.0 - float(distance)) for i, distance in zip(ids, distances)]
            for ids, distances in zip(found["ids"], found["distances"])
        ]

    def catalog(self, ids: Sequence[str]) -> dict[str, tuple[str, Category]]:
        records = self._records(list(dict.fromkeys(ids)), cached=True)
        return {i: (record.text, record.category) for i, record in records.items()}

    def delete(self, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), _BATCH):
            batch = list(ids[start : start + _BATCH])
            with self._writing(batch):
                self._call("delete memories", lambda c: c.delete(ids=batch))  # noqa: B023

    def retire(self) -> None:
        """The collection was dropped and this handle replaced, or the storage closed: stop
        reading ahead and trusting the cache."""
        self._retired = True
        self._sole_writer = False
        self._index = None
        self._cache.clear()
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
        an index that :meth:`nearest` then searches instead of Chroma. Nothing is kept if a
        write of this handle overlapped the reading, and the index only if it holds every
        memory."""
        retry = False
        try:
            stamp = self._write_stamp
            if stamp % 2 or self.count() > WARM_LIMIT:
                retry = bool(stamp % 2)
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
                if stamp != self._write_stamp or _stopping.is_set() or self._retired:
                    retry = not self._retired
                    return
                for memory_id, record in records.items():
                    self._cache.setdefault(memory_id, record)
                if index is not None:
                    if len(index) == self.count() and self._sole_writer:
                        self._index = index
                    else:
                        retry = True
            _read_aheads.add(self, len(records))
        except HeadroomMemoryError as exc:
            logger.warning("reading memories ahead failed; Chroma serves searches: %s", exc)
        finally:
            if retry:
                self._warm_after = time.monotonic() + _WARM_RETRY_SECONDS

    def count(self) -> int:
        return int(self._call("count memories", lambda c: c.count()))

    def _pages(self, include: list[str]) -> Iterator[dict[str, Any]]:
        """Every record of the collection, :data:`_BATCH` at a time, until a page is empty."""
        offset = 0
        while True:
            page = self._call(
                "read memories",
                lambda c: c.get(limit=_BATCH, offset=offset, include=include),  # noqa: B023
            )
            if not page["ids"]:
                return
            yield page
            offset += len(page["ids"])

    def _records(self, ids: list[str], *, cached: bool) -> dict[str, _Record]:
        """The records of ``ids`` that exist (ids must be unique: Chroma refuses repeats),
        from the cache where ``cached`` and present, else read from Chroma."""
        found = {i: self._cache[i] for i in ids if i in self._cache} if cached else {}
        missing = [i for i in ids if i not in found]
        if not missing:
            return found
        stamp = self._write_stamp
        read = _page_records(
            self._call("read memories", lambda c: c.get(ids=missing, include=_RECORD))
        )
        if stamp % 2 == 0 and stamp == self._write_stamp:  # no write overlapped the read
            self._cache.update(read)
        found.update(read)
        return found

    @contextmanager
    def _writing(
        self,
        ids: Sequence[str],
        written: dict[str, _Record] | None = None,
        vectors: Vectors | None = None,
    ) -> Iterator[None]:
        """Hold the write lock around a write of ``ids`` (an upsert of ``written`` records
        with ``vectors``, or a delete) and keep what is held in memory honest: after a
        sole writer's write it holds what was written; otherwise the ids are forgotten."""
        with self._write_lock:
            self._write_stamp += 1
            try:
                yield
            except BaseException:
                # the write may have half happened: search with Chroma, read ahead again later
                if self._index is not None:
                    self._index = None
                    self._warm_after = time.monotonic() + _WARM_RETRY_SECONDS
                raise
            finally:
                for i in ids:
                    self._cache.pop(i, None)
                self._write_stamp += 1
            if self._sole_writer and written:
                self._cache.update(written)
            if self._index is not None:
                if vectors is None:
                    self._index.remove(ids)
                else:
                    self._index.put(ids, vectors)


class ChromaStorage:
    """Users' memory collections in Chroma.

    Args:
        client: A chromadb client (``PersistentClient``, ``HttpClient``, ...).
        location: A human-readable description of where the data is.
        sole_writer: Promise that nothing but this object writes to the client's memory
            collections (true of :meth:`at`: one writing process per folder, one object per
            folder in a process). Reads of records this process has seen are then served
            from memory; otherwise every :meth:`ChromaCollection.get` reads from Chroma.
    """

    _embedded: ClassVar[dict[str, ChromaStorage]] = {}
    _embedded_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, client: Any, location: str = "chroma client", *, sole_writer: bool = False
    ) -> None:
        self._client = client
        self.location = location
        self._sole_writer = sole_writer
        self._write_lock = threading.RLock()
        self._collections: dict[str, ChromaCollection] = {}

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> ChromaStorage:
        """Embedded storage in the folder ``path`` (created if missing), shared in the process."""
        folder = str(Path(path).expanduser().resolve())
        with cls._embedded_lock:
            storage = cls._embedded.get(folder)
            if storage is None:
                import chromadb

                with _storage_errors(f"open the memory store at {folder}"):
                    Path(folder).mkdir(parents=True, exist_ok=True)
                    client = chromadb.PersistentClient(path=folder, settings=_settings())
                storage = cls._embedded[folder] = cls(client, folder, sole_writer=True)
            return storage

    @classmethod
    def connect(
        cls,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        ssl: bool = False,
        headers: dict[str, str] | None = None,
    ) -> ChromaStorage:
        """Storage on a Chroma server (``chroma run --path DIR --host HOST --port PORT``)."""
        import chromadb

        url = f"{'https' if ssl else 'http'}://{host}:{port}"
        with _storage_errors(f"connect to the Chroma server at {url}"):
            client = chromadb.HttpClient(
                host=host, port=port, ssl=ssl, headers=headers, settings=_settings()
            )
        return cls(client, url)

    @classmethod
    def from_url(cls, url: str) -> ChromaStorage:
        """Storage on the Chroma server at ``http://host:port`` (or https)."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError(f"not a Chroma server URL: {url!r} (expected http://host:port)")
        ssl = parts.scheme == "https"
        return cls.connect(parts.hostname, parts.port or (443 if ssl else 8000), ssl=ssl)

    def open(self, user_id: str, embedder: str, dimension: int) -> ChromaCollection:
        name = collection_name(user_id)
        cached = self._collections.get(name)
        if cached is not None and cached.binding == (embedder, dimension):
            return cached

        def get_or_create() -> Any:
            collection = self._client.get_or_create_collection(
                name=name,
                embedding_function=None,
                configuration={"hnsw": {"space": "cosine", "ef_search": 100}},
                metadata={
                    "user_id": user_id,
                    "embedder": embedder,
                    "dimension": dimension,
                    "schema_version": SCHEMA_VERSION,
                    "created_at": time.time(),
                },
            )
            self._check_owner(collection.metadata or {}, user_id, embedder, dimension)
            return collection

        with self._write_lock, _storage_errors(f"open the collection of user {user_id!r}"):
            handle = ChromaCollection(
                user_id,
                get_or_create,
                self._write_lock,
                (embedder, dimension),
                sole_writer=self._sole_writer,
            )
        self._collections[name] = handle
        return handle

    def _check_owner(self, meta: Any, user_id: str, embedder: str, dimension: int) -> None:
        if meta.get("user_id") != user_id:
            raise StorageError("a collection named for this user belongs to another; refusing it")
        if meta.get("embedder") != embedder or int(meta.get("dimension", dimension)) != dimension:
            raise EmbeddingMismatchError(
                f"the memories of user {user_id!r} in {self.location} were embedded with "
                f"{meta.get('embedder')!r} ({meta.get('dimension')} dimensions), but this store "
                f"uses {embedder!r} ({dimension} dimensions). Use the original embedder, another "
                "db_path, or export the memories, clear() them and import them again."
            )

    def users(self) -> list[str]:
        """The ids of every user with a memory collection here, sorted."""
        with _storage_errors("list the users"):
            listed = []
            offset = 0
            while True:
                page = self._client.list_collections(limit=_BATCH, offset=offset)
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

    def drop(self, user_id: str) -> int:
        from chromadb.errors import NotFoundError

        name = collection_name(user_id)
        with self._write_lock, _storage_errors(f"clear the memories of user {user_id!r}"):
            retired = self._collections.pop(name, None)
            if retired is not None:
                retired.retire()
            try:
                count = int(self._client.get_collection(name).count())
            except (NotFoundError, ValueError):
                return 0
            self._client.delete_collection(name)
            return count

    def close(self) -> None:
        """Stop this storage's background reads and release its client (a server's
        connections, an embedded folder's files). Do not use it, or stores built on it,
        afterwards. :meth:`at` shares one storage per folder in a process: closing it closes
        it for every store of that folder, and the next :meth:`at` opens the folder afresh."""
        with self._write_lock:
            for handle in self._collections.values():
                handle.retire()
            self._collections.clear()
        with self._embedded_lock:
            for folder, storage in list(self._embedded.items()):
                if storage is self:
                    del self._embedded[folder]
        close = getattr(self._client, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"ChromaStorage(location={self.location!r})"
