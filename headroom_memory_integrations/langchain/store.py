"""A LangGraph long-term store over the memory engine: :class:`HeadroomStore`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langgraph.store.base import (
    BaseStore,
    GetOp,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    get_text_at_path,
    tokenize_path,
    validate_op_namespace,
)
from langgraph.store.base import InvalidNamespaceError as _InvalidNamespaceError

from ..embeddings import Embedder
from ..engine import (
    DEFAULT_MIN_SCORE,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    MAX_TOP_K,
    MemoryStore,
    check_memory_id,
    clean_metadata,
    clean_text,
    search_text,
    validate_user_id,
)
from ..errors import InvalidInputError, MemoryNotFoundError
from ..storage import Storage
from ..types import Category, Memory
from ..wiring import UserStores

SEPARATOR = "\x1f"
"""A namespace's engine user is its labels joined by this (the ASCII unit separator, refused in
labels here). Not ``"."``: a dotted user id of a wrapper (an e-mail, ``"alice.smith"``) must never
be a descendant of a namespace (``("alice",)``)."""

_FORBIDDEN_IN_LABELS = (".", "\x00", SEPARATOR)

_VALUE_KEY = "langgraph_value_"  # metadata keys holding the value's JSON, in numbered pieces
_TEXT_FIELD_KEY = "langgraph_text_field"  # the top-level field the text came from, or ""
_INDEXED_KEY = "langgraph_indexed"  # digest of the indexed text, to notice rewrites elsewhere
MAX_VALUE_CHARS = (MAX_METADATA_KEYS - 2) * MAX_METADATA_VALUE_CHARS
"""Longest value an item holds, measured as its JSON (non-ASCII characters count as their
``\\uXXXX`` escapes)."""
_TEXT_FIELDS = ("text", "content")
_FIRST_SEARCH_DEPTH = 10
_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")

DESCENDANTS_MAX_AGE = 5.0
"""Seconds: how old the list of users may be that a search finds a prefix's descendants in
(see :class:`HeadroomStore`)."""


class InvalidNamespaceError(_InvalidNamespaceError, InvalidInputError):
    """A namespace this store cannot map to a user (LangGraph's error, and ours)."""


def namespace_user(namespace: Sequence[str]) -> str:
    """The engine user of ``namespace``: its labels joined by :data:`SEPARATOR` (``"\\x1f"``).

    A one-label namespace ``("alice",)`` is user ``"alice"``; ``("acme", "bob")`` is user
    ``"acme\\x1fbob"``, which a wrapper reaches with ``user_id=namespace_user(("acme", "bob"))``.

    Raises:
        InvalidNamespaceError: the namespace is not a tuple (or list) of labels, is empty, or
            a label is not a non-empty string without ``"."``, NUL or ``"\\x1f"``; or the
            joined id is too long for a user id.
    """
    _check_labels_type(namespace, "namespace")
    if not namespace:
        raise InvalidNamespaceError("an empty namespace names no user")
    validate_op_namespace(GetOp(tuple(namespace), ""))
    for label in namespace:
        if isinstance(label, str) and not label.strip():
            raise InvalidNamespaceError(
                f"namespace {tuple(namespace)!r}: a label cannot be blank (only spaces)"
            )
        if SEPARATOR in label:
            raise InvalidNamespaceError(
                f"namespace {tuple(namespace)!r}: a label cannot contain the unit separator "
                "'\\x1f' (it joins the labels into the user id)"
            )
    try:
        return validate_user_id(SEPARATOR.join(namespace))
    except InvalidInputError as exc:
        raise InvalidNamespaceError(f"namespace {tuple(namespace)!r}: {exc}") from exc


def _check_labels_type(labels: object, what: str) -> None:
    """Refuse a namespace (or match path) that is not a tuple or list of labels: a string
    would be read as one label per character (``"alice"`` as ``("a", "l", "i", "c", "e")``)."""
    if isinstance(labels, (tuple, list)):
        return
    if isinstance(labels, str):
        raise InvalidNamespaceError(
            f"a {what} is a tuple of labels, not a string: pass ({labels!r},), not {labels!r}"
        )
    raise InvalidNamespaceError(
        f"a {what} is a tuple of labels (strings), got {type(labels).__name__}"
    )


def user_namespace(user_id: str) -> tuple[str, ...] | None:
    """The namespace whose user is ``user_id``, or None if no namespace maps to it: a label
    would be empty, or contain ``"."`` or NUL (LangGraph forbids them). So a wrapper's dotted
    user id (``"alice.smith"``, an e-mail) is never part of any namespace."""
    labels = tuple(user_id.split(SEPARATOR))
    if any(not label.strip() or any(c in label for c in _FORBIDDEN_IN_LABELS) for label in labels):
        return None
    return labels


# -- values <-> memories ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoded:
    """An item ready to store as a memory."""

    user_id: str
    key: str
    text: str
    category: Category
    metadata: Mapping[str, Any]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _check_keys(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{where} has a key {key!r} that is not a string")
            _check_keys(inner, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            _check_keys(inner, f"{where}[{index}]")


def _category_of(value: Mapping[str, Any]) -> Category | None:
    named = value.get("category")
    if not isinstance(named, str):
        return None
    try:
        return Category.parse(named)
    except InvalidInputError:
        return None


def _one_field(value: Mapping[str, Any], index: list[Any]) -> str | None:
    """The field ``index`` names when it is one top-level string field (``["title"]``, not
    ``["a.b"]``, ``["tags[*]"]`` or two fields), else None."""
    if len(index) != 1 or not isinstance(path := index[0], str):
        return None
    if tokenize_path(path) != [path] or path == "*" or path[0] in "[{":
        return None
    return path if isinstance(value.get(path), str) else None


def _indexed_text(value: Mapping[str, Any], index: Any) -> tuple[str | None, str, str]:
    """``(field, text, what)``: the text to embed, the top-level field it is (or None), and how
    to name it in an error."""
    if isinstance(index, list) and index:
        texts = [text for path in index for text in get_text_at_path(value, path)]
        if any(text.strip() for text in texts):
            return _one_field(value, index), "\n".join(texts), f"the text of the fields {index!r}"
    for field in _TEXT_FIELDS:
        text = value.get(field)
        if isinstance(text, str) and text.strip():
            return field, text, f"value[{field!r}]"
    rendered = get_text_at_path(value, "$")[0]
    return None, rendered, "the value rendered as text (put the text to search by in 'text')"


def encode_item(namespace: Sequence[str], key: str, value: Any, index: Any = None) -> _Encoded:
    """Check an item and turn it into a memory's text, category and metadata; nothing is
    written. See :class:`HeadroomStore` for the rules."""
    user_id = namespace_user(namespace)
    place = f"item {tuple(namespace)!r}/{key!r}"
    try:
        key = check_memory_id(key)
        if not isinstance(value, Mapping):
            raise InvalidInputError(f"the value must be a dict, got {type(value).__name__}")
        _check_keys(value, "the value")
        try:
            data = json.dumps(dict(value), ensure_ascii=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"the value must be JSON data: {exc}") from exc
        if len(data) > MAX_VALUE_CHARS:
            raise InvalidInputError(
                f"the value is {len(data)} characters as JSON; the maximum is {MAX_VALUE_CHARS}"
            )
        field, raw_text, what = _indexed_text(value, index)
        text = clean_text(raw_text, what)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{place}: {exc}") from exc
    pieces = range(0, len(data), MAX_METADATA_VALUE_CHARS)
    metadata = {
        f"{_VALUE_KEY}{n}": data[start : start + MAX_METADATA_VALUE_CHARS]
        for n, start in enumerate(pieces)
    }
    metadata[_TEXT_FIELD_KEY] = field or ""
    metadata[_INDEXED_KEY] = _digest(text)
    category = _category_of(value) or Category.FACT
    return _Encoded(user_id, key, text, category, clean_metadata(metadata))


def memory_value(memory: Memory) -> dict[str, Any]:
    """The value of the item a memory shows as: what was put, or ``{"text", "category"}`` for a
    memory written otherwise (learned by a wrapper, added through the API). If the memory's
    text was rewritten since it was put (updated by a tool, superseded by a wrapper), the put
    field that held its text (``text``, ``content``, or the one top-level field ``index``
    named) shows the new text; without such a field, the plain form shows.
    The other fields keep the values put: they are the application's, and which of them
    described the old text only it can tell (the item's ``updated_at`` says when the text
    changed)."""
    plain = {"text": memory.text, "category": memory.category.value}
    meta = memory.metadata
    pieces: list[str] = []
    while isinstance(piece := meta.get(f"{_VALUE_KEY}{len(pieces)}"), str):
        pieces.append(piece)
    if not pieces:
        return plain
    try:
        value = json.loads("".join(pieces))
    except ValueError:
        return plain
    if not isinstance(value, dict):
        return plain
    if meta.get(_INDEXED_KEY) != _digest(memory.text):
        field = meta.get(_TEXT_FIELD_KEY)
        if not field or not isinstance(field, str) or not isinstance(value.get(field), str):
            return plain
        value[field] = memory.text
    put_category = _category_of(value)
    if put_category is not None and put_category != memory.category:
        value["category"] = memory.category.value
    return value


# -- filters and namespace matching -------------------------------------------------------------


def _compare(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, Mapping):
        if any(isinstance(k, str) and k.startswith("$") for k in wanted):
            return all(_apply(actual, op, operand) for op, operand in wanted.items())
        return isinstance(actual, Mapping) and all(
            _compare(actual.get(k), v) for k, v in wanted.items()
        )
    if isinstance(wanted, (list, tuple)):
        return (
            isinstance(actual, (list, tuple))
            and len(actual) == len(wanted)
            and all(_compare(a, w) for a, w in zip(actual, wanted))
        )
    return bool(actual == wanted)


def _apply(actual: Any, operator: str, operand: Any) -> bool:
    if operator not in _OPERATORS:
        raise InvalidInputError(f"unknown filter operator {operator!r}; use one of {_OPERATORS}")
    if operator == "$eq":
        return bool(actual == operand)
    if operator == "$ne":
        return bool(actual != operand)
    try:
        left, right = float(actual), float(operand)
    except (TypeError, ValueError, OverflowError):  # an int beyond a float's range too
        return False  # a missing or non-numeric field does not match a comparison
    return {
        "$gt": left > right,
        "$gte": left >= right,
        "$lt": left < right,
        "$lte": left <= right,
    }[operator]


def matches(value: Mapping[str, Any], filter: Mapping[str, Any] | None) -> bool:
    """Whether an item's value passes a LangGraph search filter: exact values (nested dicts
    and lists compared field by field) or ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``,
    ``$lte``."""
    return not filter or all(_compare(value.get(k), v) for k, v in filter.items())


def _namespace_matches(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    if condition.match_type == "prefix":
        part = namespace[: len(path)]
    elif condition.match_type == "suffix":
        part = namespace[len(namespace) - len(path) :]
    else:
        raise InvalidInputError(f"unknown match type {condition.match_type!r}")
    return all(p in ("*", n) for p, n in zip(path, part))


def _check_filter(filter: Any) -> None:
    """A search filter this store can apply (see :func:`matches`), or ``InvalidInputError``."""
    if filter is None:
        return
    if not isinstance(filter, Mapping):
        raise InvalidInputError(f"filter must be a dict, got {type(filter).__name__}")
    for wanted in filter.values():
        _check_wanted(wanted)


def _check_wanted(wanted: Any) -> None:
    if isinstance(wanted, Mapping):
        operators = [key for key in wanted if isinstance(key, str) and key.startswith("$")]
        if operators:  # every key is then an operator, its operand a plain value
            for key in wanted:
                if key in operators and key not in _OPERATORS:
                    raise InvalidInputError(
                        f"unknown filter operator {key!r}; use one of {_OPERATORS}"
                    )
                if key not in operators:
                    raise InvalidInputError(
                        f"a filter condition mixes operators with the field {key!r}: "
                        f"{dict(wanted)!r}; put a field's conditions under its own key"
                    )
            return
        for value in wanted.values():
            _check_wanted(value)
    elif isinstance(wanted, (list, tuple)):
        for value in wanted:
            _check_wanted(value)


def _check_listing(op: ListNamespacesOp) -> None:
    for condition in op.match_conditions or ():
        if condition.match_type not in ("prefix", "suffix"):
            raise InvalidInputError(
                f"unknown match type {condition.match_type!r}; use 'prefix' or 'suffix'"
            )
        if not all(isinstance(label, str) for label in condition.path):
            raise InvalidInputError(f"a match path holds labels (strings), got {condition.path!r}")
    depth = op.max_depth
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise InvalidInputError(f"max_depth must be a positive integer or None, got {depth!r}")


def _check_page(limit: int, offset: int) -> None:
    for name, number in (("limit", limit), ("offset", offset)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise InvalidInputError(f"{name} must be a non-negative integer, got {number!r}")


def _possible_key(key: object) -> bool:
    """Whether a memory could have ``key`` (one imported may have an id ``put`` refuses, with a
    tab, say): a ``get`` of another finds nothing and a ``delete`` deletes nothing, as for a
    key never written, rather than fail in the storage."""
    if not isinstance(key, str) or not key:
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a model's tool arguments
        return False
    return True


# -- the store ----------------------------------------------------------------------------------


class HeadroomStore(BaseStore):
    """LangGraph's long-term memory store (``BaseStore``), kept by the memory engine: every
    item is a user's memory, searched by meaning.

    **Namespaces are users.** The engine user of a namespace is its labels joined by the unit
    separator ``"\\x1f"`` (:data:`SEPARATOR`, refused in labels, as are ``"."``, NUL and empty
    labels), so no two namespaces share a user. A namespace is a tuple (or list) of labels: a
    string (``"alice"``) is refused with :class:`InvalidNamespaceError`, not read as
    ``("a", "l", "i", "c", "e")``. ``("alice",)`` is user ``"alice"`` and holds
    exactly the memories of ``MemoryStore("alice")`` and of the chat-model wrappers built with
    ``user_id="alice"`` on the same ``db_path``: a store sees what the wrappers learned, and the
    wrappers recall what an agent put. A multi-label namespace's user is
    :func:`namespace_user` of it: wrappers reach the memories of ``("acme", "bob")`` with
    ``user_id=namespace_user(("acme", "bob"))``. A get, put or delete touches one namespace's
    user only. A search covers the namespace and its descendants (LangGraph's prefix
    semantics): ``("acme",)`` also finds the items of ``("acme", "bob")``, never those of
    ``("acmex",)``. An empty prefix, which would cover every user, is refused with
    :class:`InvalidNamespaceError`. A user id with a ``"."`` (``"alice.smith"``, an e-mail) or
    an empty label (``"a\\x1f\\x1fb"``) is never part of a namespace: no search or
    ``list_namespaces`` reaches it (``("alice",)`` never finds ``"alice.smith"``'s memories);
    such users are reachable only through :class:`~headroom_memory_integrations.MemoryStore`
    and the wrappers.

    **Items are memories.** ``put(ns, key, value)`` stores a memory with the id ``key`` (1-256
    printable characters): created, or replaced in place (the old value is not kept as the
    memory's history; its text is erased from an embedded folder's files when the item is
    deleted), never merged with a similar one.
    ``get`` returns a value equal to the one put (values are kept as JSON, up to
    :data:`MAX_VALUE_CHARS`; tuples come back as lists). The memory's text, which search and
    the wrappers see, is ``value["text"]``, else ``value["content"]`` when it is a string, else
    the value as JSON; ``put(..., index=["a.b", "c[*]"])`` uses the text at those fields
    instead. When the memory's text is rewritten (a tool's update, a wrapper's supersede),
    ``get`` shows the new text in the field it came from (``text``, ``content``, or the one
    top-level string field ``index`` named), other fields as put; with no such field, as
    ``{"text": ..., "category": ...}``. ``index=False`` is treated like ``None``: every
    memory is searchable. The text may have up to 2,000 characters. A valid
    ``value["category"]`` (``preference``, ``fact``, ``context``) becomes the memory's
    category, else ``fact``. A memory not written through a store (learned by a wrapper)
    shows as ``{"text": ..., "category": ...}`` with its id as key. ``put(ns, key, None)``
    and ``delete`` remove the item. Bad input raises
    :class:`~headroom_memory_integrations.InvalidInputError` (a ``ValueError``) naming the
    limit; a batch is checked whole before anything is written.

    **Search.** With ``query``, items come most relevant first, each with its score (the
    similarity of meaning, :func:`~headroom_memory_integrations.engine.centred_query`, plus a
    bonus for shared words; higher is more relevant); only items above the
    relevance floor ``min_score`` come back, so an unrelated query finds nothing
    (``min_score=-1`` ranks everything), at most 1,000 deep per namespace; over several
    namespaces, each one's matches merged by score. A query with nothing visible (blanks,
    control characters, a lone zero-width space) is no query. Without ``query``, items come
    oldest first, namespace by namespace. ``filter`` matches value fields exactly or with
    ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``; ``limit`` and ``offset`` page.
    ``list_namespaces`` lists users' namespaces (one whose items were all deleted may still
    be listed). A search reads the prefix's own namespace directly; its descendants come from
    a list of the storage's users reused for up to ``descendants_max_age`` seconds, because
    listing the users costs about 0.4 ms per user (200 ms for 500): a descendant namespace
    first written by this store is found at once, one first written elsewhere (another
    process, a wrapper, another store object) by the searches that start that long after. TTL is not
    supported (``supports_ttl`` is False; a ``ttl`` raises ``NotImplementedError``).

    Setup::

        from langchain.agents import create_agent
        from headroom_memory_integrations.langchain import HeadroomStore

        store = HeadroomStore(db_path="./memories")

    Put, get, search::

        store.put(("alice",), "language", {"text": "Prefers Python", "category": "preference"})
        store.get(("alice",), "language").value
        # {'text': 'Prefers Python', 'category': 'preference'}
        found = store.search(("alice",), query="Which programming language should I use?")
        [(i.key, round(i.score, 2)) for i in found]  # [('language', 0.46)]

    In an agent (tools reach it as ``runtime.store``)::

        agent = create_agent(model, tools=[...], store=store)
        graph = builder.compile(store=store)  # or any LangGraph StateGraph

    Async: ``aget``, ``aput``, ``asearch``, ``adelete``, ``alist_namespaces`` run the same code
    in a worker thread.

    **While the storage is down** (a Chroma server stopped), every call raises
    :class:`~headroom_memory_integrations.StorageError`, at once for a while after the first
    failure (1 s, doubling to 16 s): unlike the chat-model wrapper, the store does not go on
    without memories, and a tool or node that calls it ends the run with the error unless it
    catches it.

    Args:
        db_path: A folder for embedded Chroma or a Chroma server's URL, as for
            :class:`~headroom_memory_integrations.MemoryStore` (default ``~/.headroom-memory``).
        storage: A storage object instead of ``db_path``.
        embedder: Default: the local all-MiniLM-L6-v2.
        min_score: The relevance floor of searches with a query.
        descendants_max_age: Seconds (default :data:`DESCENDANTS_MAX_AGE`): how old the list of
            users may be that searches find descendant namespaces in; ``0`` lists every user
            on every search (exact, slow with many users). ``list_namespaces`` always lists.
    """

    supports_ttl = False

    def __init__(
        self,
        db_path: str | os.PathLike[str] | None = None,
        *,
        storage: Storage | None = None,
        embedder: Embedder | None = None,
        min_score: float = DEFAULT_MIN_SCORE,
        descendants_max_age: float = DESCENDANTS_MAX_AGE,
    ) -> None:
        if (
            isinstance(descendants_max_age, bool)
            or not isinstance(descendants_max_age, (int, float))
            or not descendants_max_age >= 0
        ):
            raise InvalidInputError(
                f"descendants_max_age must be a number of seconds, 0 or more, got "
                f"{descendants_max_age!r}"
            )
        self.stores = UserStores(db_path, storage=storage, embedder=embedder, min_score=min_score)
        self._users = _Users(self.stores.users, float(descendants_max_age))

    def memory(self, namespace: tuple[str, ...]) -> MemoryStore:
        """The engine's store of ``namespace``'s user (to ``flush``, ``export``, ...)."""
        return self.stores(namespace_user(namespace))

    # -- batches -------------------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops`` in order. Every op is checked first (namespaces, keys, values, limits):
        one bad op raises and nothing is written."""
        ops = list(ops)
        encoded = [self._check(op) for op in ops]
        return [self._run(op, item) for op, item in zip(ops, encoded)]

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        return await asyncio.to_thread(self.batch, list(ops))

    def _check(self, op: Op) -> _Encoded | None:
        if isinstance(op, (GetOp, PutOp)):
            _check_labels_type(op.namespace, "namespace")
        elif isinstance(op, SearchOp):
            _check_labels_type(op.namespace_prefix, "namespace prefix")
        elif isinstance(op, ListNamespacesOp):
            for condition in op.match_conditions or ():
                _check_labels_type(condition.path, f"{condition.match_type} path")
        validate_op_namespace(op)
        if isinstance(op, PutOp):
            if op.ttl is not None:
                raise NotImplementedError("HeadroomStore does not support TTL; pass ttl=None")
            if op.value is not None:
                return encode_item(op.namespace, op.key, op.value, op.index)
            namespace_user(op.namespace)
        elif isinstance(op, GetOp):
            namespace_user(op.namespace)
        elif isinstance(op, SearchOp):
            if not op.namespace_prefix:
                raise InvalidNamespaceError(
                    "HeadroomStore searches one namespace (a user) and its descendants; the "
                    "empty prefix would cover every user's memories. Pass a namespace."
                )
            namespace_user(op.namespace_prefix)
            _check_page(op.limit, op.offset)
            if op.query is not None and not isinstance(op.query, str):
                raise InvalidInputError(f"query must be a string, got {type(op.query).__name__}")
            _check_filter(op.filter)
        elif isinstance(op, ListNamespacesOp):
            _check_page(op.limit, op.offset)
            _check_listing(op)
        else:
            raise InvalidInputError(f"unknown store operation {type(op).__name__}")
        return None

    def _run(self, op: Op, encoded: _Encoded | None) -> Result:
        if isinstance(op, GetOp):
            return self._get(op)
        if isinstance(op, SearchOp):
            return self._search(op)
        if isinstance(op, ListNamespacesOp):
            return self._list_namespaces(op)
        if encoded is not None:
            self._put(encoded)
        else:
            self._delete(namespace_user(op.namespace), op.key)
        return None

    # -- operations ----------------------------------------------------------------------------

    def _get(self, op: GetOp) -> Item | None:
        user_id = namespace_user(op.namespace)
        if not _possible_key(op.key):
            return None
        # reading a user who has no collection (never written, or forgotten) creates none
        found = self.stores(user_id).get_many([op.key])
        return _item(op.namespace, found[0]) if found else None

    def _put(self, item: _Encoded) -> None:
        self.stores(item.user_id).put(
            item.key, item.text, item.category, item.metadata, keep_history=False
        )
        self._users.add(item.user_id)

    def _delete(self, user_id: str, key: str) -> None:
        if not _possible_key(key):
            return  # no item has it: nothing to delete
        # a key no memory can have (a tab, a newline, spaces around it: not an id) is one no
        # item has either
        with contextlib.suppress(MemoryNotFoundError, InvalidInputError):
            self.stores(user_id).delete(key)

    def _search(self, op: SearchOp) -> list[SearchItem]:
        prefix = namespace_user(op.namespace_prefix)
        users = sorted(
            user
            for user in self._users.recent() | {prefix}  # the prefix itself: always read
            if (user == prefix or user.startswith(prefix + SEPARATOR))
            and user_namespace(user) is not None
        )
        wanted = op.offset + op.limit
        if not users or wanted == 0:
            return []
        found: list[tuple[float | None, str, Memory]]
        # a query with nothing visible to look for (a lone zero-width space) lists, as None does
        query = search_text(op.query) if op.query else None
        if query is not None:
            found = [*self._ranked(users, query, op.filter, wanted)]
        else:
            found = [
                (None, user, memory)
                for user in users
                for memory in self.stores(user).get_all()
                if matches(memory_value(memory), op.filter)
            ]
        return [
            _search_item(user, memory, score)
            for score, user, memory in found[op.offset : op.offset + op.limit]
        ]

    def _ranked(
        self, users: list[str], query: str, filter: Mapping[str, Any] | None, wanted: int
    ) -> list[tuple[float, str, Memory]]:
        """The best ``wanted`` matches across ``users`` that pass ``filter``, best first (with
        more after them), as merging each user's own search would give.

        Each user is searched ``depth`` deep. A user whose page came back full (its memories
        did not run out) may hold more matches below it, all scoring at most the page's last
        score: it is searched deeper while fewer than ``wanted`` matches are found, or while
        its last score is above the ``wanted``-th match's (a deeper match could rank before
        that one). Without a filter, or with one namespace and enough matches, one search
        each suffices."""
        first = min(MAX_TOP_K, max(wanted, _FIRST_SEARCH_DEPTH))
        depth = dict.fromkeys(users, first)
        # per user: whether its page was full, the page's last score, the matches in it
        pages: dict[str, tuple[bool, float, list[tuple[float, str, Memory]]]] = {}
        deeper = users
        while True:
            for user in deeper:
                found = self.stores(user).search(query, top_k=depth[user])
                passing = [
                    (score, user, memory)
                    for memory, score in found
                    if matches(memory_value(memory), filter)
                ]
                full = len(found) == depth[user] < MAX_TOP_K
                pages[user] = (full, found[-1][1] if found else 0.0, passing)
            hits = sorted(
                (hit for _, _, passing in pages.values() for hit in passing),
                key=lambda hit: hit[0],
                reverse=True,
            )
            bar = hits[wanted - 1][0] if len(hits) >= wanted else None
            deeper = [
                user
                for user, (full, last, _) in pages.items()
                if full and (bar is None or last > bar)
            ]
            if not deeper:
                return hits
            for user in deeper:
                depth[user] = min(MAX_TOP_K, depth[user] * 4)

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        namespaces = {
            namespace
            for user in self._users.listed()
            if (namespace := user_namespace(user)) is not None
            and all(_namespace_matches(c, namespace) for c in op.match_conditions or ())
        }
        if op.max_depth is not None:
            namespaces = {namespace[: op.max_depth] for namespace in namespaces}
        return sorted(namespaces)[op.offset : op.offset + op.limit]

    def __repr__(self) -> str:
        return f"HeadroomStore(storage={self.stores.storage.location!r})"


class _Users:
    """The users of a storage, for finding a search prefix's descendants without listing every
    user on each search: the last listing while it is at most ``max_age`` seconds old (``0``:
    listed on every call), plus the users this store wrote since. An older listing is replaced
    on the caller's path, so a search never relies on one older than ``max_age``. A user in it
    that was deleted meanwhile costs one read that finds nothing."""

    def __init__(self, list_users: Callable[[], list[str]], max_age: float) -> None:
        self._list_users = list_users
        self._max_age = max_age
        self._lock = threading.Lock()
        self._listed: frozenset[str] | None = None
        self._listed_at = 0.0  # when the listing in _listed started
        self._written: set[str] = set()  # written by this store (never forgotten: cheap)

    def listed(self) -> list[str]:
        """Every user, listed now (sorted)."""
        started = time.monotonic()
        users = self._list_users()
        with self._lock:
            if self._listed is None or started >= self._listed_at:
                self._listed, self._listed_at = frozenset(users), started
        return users

    def recent(self) -> frozenset[str]:
        """The users as listed at most ``max_age`` seconds ago, with those this store wrote."""
        with self._lock:
            listed = self._listed
            fresh = listed is not None and time.monotonic() - self._listed_at <= self._max_age
        if not fresh:
            listed = frozenset(self.listed())
        with self._lock:
            return (listed or frozenset()) | self._written

    def add(self, user_id: str) -> None:
        with self._lock:
            self._written.add(user_id)


def _item(namespace: Sequence[str], memory: Memory) -> Item:
    return Item(
        value=memory_value(memory),
        key=memory.id,
        namespace=tuple(namespace),
        created_at=memory.created_at,
        updated_at=memory.updated_at,
    )


def _search_item(user_id: str, memory: Memory, score: float | None) -> SearchItem:
    return SearchItem(
        namespace=user_namespace(user_id) or (user_id,),
        key=memory.id,
        value=memory_value(memory),
        created_at=memory.created_at,
        updated_at=memory.updated_at,
        score=score,
    )
