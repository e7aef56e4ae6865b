"""How a wrapper or an adapter gets its store, job queue and flow from what users pass.

Every constructor in this package takes memory the same way: ``user_id=`` with ``db_path=`` (or
``storage=``, ``embedder=``), or an existing ``memory=MemoryStore(...)``. :func:`open_memory`
reads those arguments; :func:`build_flow` adds the durable job queue and the
:class:`~.flow.MemoryFlow` that the OpenAI wrappers, the LangChain and the LlamaIndex adapters all
use. Adapters that serve many users (a LangGraph store, per-run agent tools) open each user's
store through one :class:`UserStores`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from .embeddings import DEFAULT_LOCAL_MODEL, Embedder, LocalEmbedder
from .engine import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_MIN_SCORE,
    MemoryStore,
    check_embedder,
    check_min_score,
    check_top_k,
    check_user_id,
    resolve_storage,
    validate_user_id,
)
from .errors import InvalidInputError
from .flow import KeptTurns, MemoryFlow
from .jobs import Backoff
from .storage import ChromaStorage, Storage
from .writer import BackgroundExtractor, queue_path_for, writer_for


def open_memory(
    memory: MemoryStore | None = None,
    user_id: str | None = None,
    db_path: str | os.PathLike[str] | None = None,
    *,
    storage: Storage | None = None,
    embedder: Embedder | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    duplicate_threshold: float | None = DEFAULT_DUPLICATE_THRESHOLD,
) -> MemoryStore:
    """``memory`` itself, or a new :class:`MemoryStore` for ``user_id``.

    Raises:
        InvalidInputError: neither or both of ``memory`` and ``user_id``; or ``memory`` together
            with options that only a new store would use.
    """
    if memory is not None:
        if user_id is not None and user_id != memory.user_id:
            raise InvalidInputError(
                f"user_id={user_id!r} does not match memory.user_id={memory.user_id!r}; "
                "pass one of them"
            )
        if db_path is not None or storage is not None or embedder is not None:
            raise InvalidInputError(
                "pass memory=MemoryStore(...) or db_path/storage/embedder, not both"
            )
        if not isinstance(memory, MemoryStore):
            raise InvalidInputError(f"memory must be a MemoryStore, got {type(memory).__name__}")
        return memory
    if user_id is None:
        raise InvalidInputError("pass user_id= (with db_path=, storage= or embedder=) or memory=")
    return MemoryStore(
        check_user_id(user_id),
        db_path,
        storage=storage,
        embedder=embedder,
        min_score=min_score,
        duplicate_threshold=duplicate_threshold,
    )


def reopening_arguments(memory: MemoryStore) -> dict[str, Any]:
    """The :class:`MemoryStore` arguments, besides ``user_id``, that open ``memory`` again in
    another process (what a saved configuration carries): ``db_path`` (an embedded folder,
    absolute, or a Chroma server's ``scheme://host:port``), and ``min_score`` and
    ``duplicate_threshold`` when they are not the defaults. Never credentials: a server's
    headers, or a URL's user and password, stay out.

    Raises:
        InvalidInputError: ``memory`` cannot be opened again from arguments: its storage is not
            an embedded folder or a server (a Chroma client built by hand, another backend), or
            it embeds with something other than the default local model, which a reopened store
            would use and this one refuses.
    """
    embedder = memory.embedder
    if not (isinstance(embedder, LocalEmbedder) and embedder.name == DEFAULT_LOCAL_MODEL):
        raise InvalidInputError(
            f"the memories of {memory.user_id!r} are embedded with {embedder!r}, which cannot "
            f"be saved (it may hold a client or a key); a reopened store would embed with the "
            f"default {DEFAULT_LOCAL_MODEL} and be refused. Use the default embedder, or "
            "reopen the store yourself and pass it as memory=MemoryStore(...)"
        )
    arguments: dict[str, Any] = {"db_path": _reopening_location(memory.storage)}
    if memory.min_score != DEFAULT_MIN_SCORE:
        arguments["min_score"] = memory.min_score
    if memory.duplicate_threshold != DEFAULT_DUPLICATE_THRESHOLD:
        arguments["duplicate_threshold"] = memory.duplicate_threshold
    return arguments


def _reopening_location(storage: Storage) -> str:
    db_path = storage.db_path if isinstance(storage, ChromaStorage) else None
    if db_path is not None:
        return db_path
    raise InvalidInputError(
        f"the memories are in {storage!r}, which cannot be opened again from a db_path (only "
        "an embedded Chroma folder or a Chroma server's URL can). Build the store with "
        "db_path=<folder or http://host:port>, or reopen it yourself and pass it as "
        "memory=MemoryStore(...)"
    )


def build_flow(
    memory: MemoryStore,
    *,
    inline: bool,
    top_k: int = 5,
    extractor: BackgroundExtractor | None = None,
    queue_path: str | os.PathLike[str] | None = None,
    backoff: Backoff | None = None,
    untrusted_context: bool = False,
    kept_turns: KeptTurns | None = None,
) -> MemoryFlow:
    """A flow for ``memory``, its work queued in the process's writer of ``queue_path`` (default:
    beside embedded memories, or in ``~/.headroom-memory`` for a server).

    Args:
        inline: The model writes the memory block (True) or ``extractor`` extracts in the
            background (False).
        extractor: Required when ``inline`` is False.
        untrusted_context: Every call's context holds untrusted text (e.g. retrieved
            documents): keep only memories grounded in the user's words (:mod:`.grounding`).
        kept_turns: The turns an earlier flow of the same user kept, to go on with
            (:class:`~.flow.KeptTurns`).
    """
    if not inline and extractor is None:
        raise InvalidInputError("background extraction needs an extractor")
    top_k = checked_setting("top_k", top_k)  # as the searches will: refused now, not each call
    untrusted_context = checked_setting("untrusted_context", untrusted_context)
    path = Path(queue_path).expanduser() if queue_path else queue_path_for(memory)
    # (a new writer of the file if the one found stopped meanwhile: its last store closed)
    writer = writer_for(path, backoff=backoff).register(memory, extractor)
    return MemoryFlow(
        memory,
        writer,
        inline=inline,
        top_k=top_k,
        untrusted_context=untrusted_context,
        kept_turns=kept_turns,
    )


FLOW_SETTINGS = ("top_k", "untrusted_context")
"""The settings of a :class:`MemoryFlow` that the adapters' classes have as fields."""

BUILT_FROM = frozenset({"user_id", "db_path", "memory", *FLOW_SETTINGS})
"""The fields an adapter's memory and flow are built from, once: whose memories
(``user_id``, ``db_path``, ``memory``) and how the flow reads them."""


def checked_setting(name: str, value: object) -> Any:
    """``value`` for the flow setting ``name``, refused as :func:`build_flow` refuses it."""
    if name == "top_k":
        return check_top_k(value)
    if not isinstance(value, bool):  # "false" would be truthy: silently untrusted
        raise InvalidInputError(f"{name} must be True or False, got {value!r}")
    return value


class FlowSettings:
    """For a pydantic model that holds a :class:`MemoryFlow` built from its fields: once the
    flow is built, none of :attr:`built_from` can change, by assignment or by
    ``model_copy(update=...)``. A change would leave the field saying what the memory does
    not do (``user_id = "bob"`` set later would still read and write alice's memories;
    ``untrusted_context = True`` would protect nothing), and changing the flow instead would
    change every copy's, which shares it. Build a new object instead."""

    built_from: ClassVar[frozenset[str]] = BUILT_FROM

    def _settings_flow(self) -> MemoryFlow | None:
        """The flow the settings belong to (None while it is being built)."""
        raise NotImplementedError

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.built_from and self._settings_flow() is not None:
            self._refuse([name])
        super().__setattr__(name, value)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        self._refuse(update or ())
        return super().model_copy(update=update, deep=deep)  # type: ignore[misc]

    def copy(self, *args: Any, **kwargs: Any) -> Any:  # pydantic's deprecated copy(update=...)
        self._refuse(kwargs.get("update") or ())
        return super().copy(*args, **kwargs)  # type: ignore[misc]

    def _refuse(self, names: Iterable[str]) -> None:
        """Raise if ``names`` holds a setting the memory or its flow is built from."""
        for name in sorted(set(names) & self.built_from):
            raise InvalidInputError(
                f"{name} is fixed when {type(self).__name__} is built (what it wraps, its "
                "memory and memory flow, which copies share, are built from it): build a new "
                "one with the setting you want"
            )


def open_storage(
    db_path: str | os.PathLike[str] | None = None, storage: Storage | None = None
) -> Storage:
    """``storage`` itself, or the storage ``db_path`` names, resolved as :class:`MemoryStore`
    resolves it (a folder for embedded Chroma, a server URL, default ``~/.headroom-memory``)."""
    if storage is not None:
        if db_path is not None:
            raise InvalidInputError("pass db_path or storage, not both")
        return storage
    return resolve_storage(db_path)


OPEN_USERS = 256
"""Users whose stores a :class:`UserStores` keeps at most."""


class UserStores:
    """The memory stores of many users on one storage, each opened on first use, all
    sharing one embedder. For adapters that pick the user per call (a LangGraph store whose
    namespaces are users, agent tools scoped by the run's configuration).

    Args:
        db_path: As for :class:`MemoryStore` (or ``storage=``).
        embedder: Shared by every user's store (default: the local model, loaded once).
        min_score: The relevance floor of every user's store.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] | None = None,
        *,
        storage: Storage | None = None,
        embedder: Embedder | None = None,
        min_score: float = DEFAULT_MIN_SCORE,
    ) -> None:
        self.min_score = check_min_score(min_score)
        self.embedder: Embedder = (
            check_embedder(embedder) if embedder is not None else LocalEmbedder()
        )
        self.storage = open_storage(db_path, storage)
        self._stores: OrderedDict[str, MemoryStore] = OrderedDict()  # least recent first
        self._lock = threading.Lock()

    def __call__(self, user_id: str) -> MemoryStore:
        """The store of ``user_id`` (created on first use; the user's collection is created
        only when the store first reads or writes). The :data:`OPEN_USERS` most recently used
        are kept; another is built again when needed (what a store keeps is a cache of query
        vectors, and writes of one user are serialised by the storage, whichever store)."""
        user_id = validate_user_id(user_id)
        with self._lock:
            memory = self._stores.get(user_id)
            if memory is None:
                memory = self._stores[user_id] = MemoryStore(
                    user_id, storage=self.storage, embedder=self.embedder, min_score=self.min_score
                )
                while len(self._stores) > OPEN_USERS:
                    self._stores.popitem(last=False)
            else:
                self._stores.move_to_end(user_id)
            return memory

    def users(self) -> list[str]:
        """Every user with memories in the storage (a collection, possibly emptied), sorted."""
        return self.storage.users()
