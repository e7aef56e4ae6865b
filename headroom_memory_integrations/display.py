"""How memories, search results, stats and memory clients look in Jupyter.

Jupyter shows an object's ``_repr_html_()`` when it has one. The value types and
:class:`~headroom_memory_integrations.MemoryStore` hook in here, so a notebook cell ending in
``memory.search("...")`` shows a table instead of a long tuple repr::

    memory.get_all()           # MemoryList: a list of Memory, shown as a table
    memory.search("language")  # SearchResults: a list of SearchResult, with the scores
    memory.stats()             # MemoryStats: a dict, shown as a two-column table
    memory                     # the store's user, storage and embedder

Every value shown (a memory's text, metadata, the user id, a path) is user data and is
HTML-escaped, so no markup or script in a memory can render. The plain-text reprs are the
ordinary ``list`` / ``dict`` / dataclass ones, and the containers compare, serialize and pickle
exactly as the ``list`` / ``dict`` they extend.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .types import Memory, SearchResult, in_utc

if TYPE_CHECKING:
    from .engine import MemoryStore

__all__ = [
    "MemoryList",
    "MemoryStats",
    "SearchResults",
    "client_html",
    "memories_html",
    "memory_html",
    "memory_repr",
    "search_result_html",
    "search_results_html",
    "stats_html",
    "store_html",
]

_TABLE = '<table class="headroom-memory" style="border-collapse: collapse">'
_CELL_STYLE = ' style="text-align: left; vertical-align: top; white-space: pre-wrap"'


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


class MemoryList(list[Memory]):
    """A list of :class:`Memory` (what ``get_all`` returns) that Jupyter shows as a table."""

    def _repr_html_(self) -> str:
        return memories_html(self)


class SearchResults(list[SearchResult]):
    """A list of :class:`SearchResult` (what ``search`` returns) that Jupyter shows as a table,
    most relevant first, with the query and the relevance floor in the caption.

    Attributes:
        query: The text searched for.
        min_score: The relevance floor the results passed (their similarity: see
            :func:`~headroom_memory_integrations.engine.centred_query`).
    """

    query: str | None = None
    min_score: float | None = None

    def __init__(
        self,
        results: Iterable[SearchResult] = (),
        *,
        query: str | None = None,
        min_score: float | None = None,
    ) -> None:
        super().__init__(results)
        self.query = query
        self.min_score = min_score

    def _repr_html_(self) -> str:
        return search_results_html(self, query=self.query, min_score=self.min_score)


class MemoryStats(dict[str, Any]):
    """The dict ``stats()`` returns, shown in Jupyter as a two-column table."""

    def _repr_html_(self) -> str:
        return stats_html(self)


# -- rendering --------------------------------------------------------------------------------


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(moment: datetime) -> str:
    return in_utc(moment).strftime("%Y-%m-%d %H:%M UTC")


def _row(cells: Sequence[object], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}{_CELL_STYLE}>{_escape(c)}</{tag}>" for c in cells) + "</tr>"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], caption: str = "") -> str:
    parts = [_TABLE]
    if caption:
        parts.append(f"<caption>{_escape(caption)}</caption>")
    if header:
        parts.append("<thead>" + _row(header, "th") + "</thead>")
    parts.append("<tbody>")
    parts.extend(_row(row) for row in rows)
    parts.append("</tbody></table>")
    return "".join(parts)


def _metadata(metadata: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in metadata.items())


def _memory_cells(memory: Memory) -> list[object]:
    earlier = " / ".join(revision.text for revision in memory.history)
    return [
        memory.text,
        memory.category.value,
        memory.source.value,
        _when(memory.updated_at),
        memory.id[:12],
        _metadata(memory.metadata),
        earlier,
    ]


_MEMORY_HEADER = ["text", "category", "source", "updated", "id", "metadata", "replaced"]


def memory_repr(memory: Memory) -> str:
    """A memory as one line of plain text: what it says and where it stands, with the full id
    (for ``get`` / ``delete``); metadata and earlier texts only when there are some."""
    parts = [
        f"id={memory.id!r}",
        f"user_id={memory.user_id!r}",
        f"text={memory.text!r}",
        f"category={memory.category.value!r}",
        f"source={memory.source.value!r}",
        f"updated_at={in_utc(memory.updated_at).isoformat(timespec='seconds')!r}",
    ]
    if memory.metadata:
        parts.append(f"metadata={dict(memory.metadata)!r}")
    if memory.history:
        parts.append(f"history={[revision.text for revision in memory.history]!r}")
    if memory.keys:
        parts.append(f"keys={list(memory.keys)!r}")
    return f"Memory({', '.join(parts)})"


def memory_html(memory: Memory) -> str:
    """One memory as a one-row table."""
    return _table(_MEMORY_HEADER, [_memory_cells(memory)], caption=f"memory of {memory.user_id}")


def memories_html(memories: Sequence[Memory]) -> str:
    """Memories as a table, one row each, in the order given."""
    users = sorted({m.user_id for m in memories})
    caption = _count(len(memories), "memory", "memories")
    caption += f" of {users[0]}" if len(users) == 1 else ""
    return _table(["#", *_MEMORY_HEADER], _numbered(map(_memory_cells, memories)), caption)


def _numbered(rows: Iterable[list[object]]) -> Iterable[list[object]]:
    return ([number, *row] for number, row in enumerate(rows, start=1))


def search_results_html(
    results: Sequence[SearchResult], *, query: str | None = None, min_score: float | None = None
) -> str:
    """Search results as a table: score first, then the memory."""
    caption = _count(len(results), "result", "results")
    if query is not None:
        caption += f" for {query!r}"
    if min_score is not None:
        caption += f" (relevance floor: similarity ≥ {min_score:g})"
    rows = ([f"{score:.3f}", *_memory_cells(memory)] for memory, score in results)
    return _table(["score", *_MEMORY_HEADER], rows, caption)


def search_result_html(result: SearchResult) -> str:
    """One search result as a one-row table."""
    return search_results_html([result])


def stats_html(stats: Mapping[str, Any]) -> str:
    """``stats()`` as a two-column table; nested dicts become ``key: value`` lists."""
    rows = [(key, _flat(value)) for key, value in stats.items()]
    return _table(["stat", "value"], rows, caption="memory stats")


def _flat(value: object) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {_flat(inner)}" for key, inner in value.items()) or "none"
    return "none" if value is None else str(value)


def _store_rows(store: MemoryStore) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("user_id", store.user_id),
        ("storage", store.storage.location),
        ("embedder", f"{store.embedder.name} ({store.embedder.dimension or '?'} dimensions)"),
        ("min_score", store.min_score),
        ("duplicate_threshold", store.duplicate_threshold),
    ]
    if store.counters:
        rows.append(("events", _flat(dict(store.counters))))
    return rows


def store_html(store: MemoryStore) -> str:
    """A memory store's user, storage and settings. Reads no memories (a repr must be cheap
    and must not create a user's collection)."""
    return _table([], _store_rows(store), caption="MemoryStore")


def client_html(kind: str, wrapped: str, store: MemoryStore) -> str:
    """A memory client: how it extracts, the class it wraps (never the wrapped client's repr,
    which could show an API key) and its store."""
    rows = [("wrapper", kind), ("client", wrapped), *_store_rows(store)]
    return _table([], rows, caption="memory client")
