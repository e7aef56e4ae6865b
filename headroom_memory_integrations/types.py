"""The small value types of the memory layer: :class:`Category`, :class:`Source`,
:class:`Memory`, :class:`Revision` and :class:`SearchResult`.

Scores, everywhere in this package, are *higher is more relevant*: a search score is the
similarity of the query and the memory (their cosine similarity, discounted for memories more
typical of the user than the average one: see
:func:`~headroom_memory_integrations.engine.centred_query`) plus a bonus for shared wording
(see :data:`~headroom_memory_integrations.engine.LEXICAL_WEIGHT`). In Jupyter, memories and search
results render as HTML tables (:mod:`.display`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from .errors import InvalidCategoryError, InvalidInputError

_Named = TypeVar("_Named", bound="_NamedEnum")
_PARSE_ERRORS = {"category": (InvalidCategoryError, "categories")}


class _NamedEnum(str, Enum):
    """A string enum parsed case-insensitively, with an error that lists the valid values."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls: type[_Named], value: object) -> _Named:
        """Return the member named by ``value`` (case-insensitive, surrounding spaces ignored).

        Raises:
            InvalidInputError: ``value`` names no member; the message lists the valid ones
                (:class:`InvalidCategoryError` for categories).
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        noun = cls.__name__.lower()
        error, plural = _PARSE_ERRORS.get(noun, (InvalidInputError, noun + "s"))
        valid = ", ".join(repr(member.value) for member in cls)
        raise error(f"unknown {noun} {value!r}; valid {plural} are {valid}")


class Category(_NamedEnum):
    """What kind of thing a memory records."""

    PREFERENCE = "preference"
    """Likes, dislikes and preferred ways of working: "Prefers Python for backend work"."""
    FACT = "fact"
    """Identity, role, constraints: "Works at a fintech startup"."""
    CONTEXT = "context"
    """Current goals and ongoing tasks: "Migrating the billing service to Go"."""


class Source(_NamedEnum):
    """How a memory came to be stored."""

    INLINE = "inline"
    """Extracted from the model's own answer by ``with_fast_memory``."""
    BACKGROUND = "background"
    """Extracted by a separate call in ``with_memory``'s worker."""
    MANUAL = "manual"
    """Added through the API or the CLI."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Revision:
    """An earlier text of a memory, kept when the memory was updated or superseded."""

    text: str
    category: Category
    replaced_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "category": self.category.value,
            "replaced_at": self.replaced_at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Revision:
        return cls(
            text=str(data["text"]),
            category=Category.parse(data["category"]),
            replaced_at=parse_time(data["replaced_at"]),
        )


MAX_HISTORY = 20
"""How many earlier texts a memory keeps in ``history`` (the newest): a memory rewritten on
every turn (a "current context") must not grow without bound in storage."""


@dataclass(frozen=True)
class Memory:
    """One remembered statement about one user.

    Attributes:
        id: Stable identifier (32 hex characters).
        user_id: The user it belongs to. Set by the store, never by the text or metadata.
        text: The statement, e.g. ``"Prefers Python for backend work"``.
        category: preference, fact or context.
        created_at / updated_at: Timezone-aware UTC times.
        source: inline, background or manual.
        metadata: The caller's own scalar key/values (read-only).
        history: Earlier texts this memory replaced, oldest first: the :data:`MAX_HISTORY`
            newest.
        keys: Topic words, then a question the memory answers, indexed with the text and never
            shown in the injected context (``("diet", "seafood", "What can't I eat?")``; see
            :mod:`.keys`).
    """

    id: str
    user_id: str
    text: str
    category: Category
    created_at: datetime
    updated_at: datetime
    source: Source = Source.MANUAL
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    history: tuple[Revision, ...] = ()
    keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.history) > MAX_HISTORY:
            object.__setattr__(self, "history", tuple(self.history[-MAX_HISTORY:]))

    def __getstate__(self) -> dict[str, Any]:
        """For pickle and deepcopy, which refuse the read-only view of ``metadata``."""
        return {**self.__dict__, "metadata": dict(self.metadata)}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, the format of :meth:`MemoryStore.export` lines."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "text": self.text,
            "category": self.category.value,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "source": self.source.value,
            "metadata": dict(self.metadata),
            "history": [r.to_dict() for r in self.history],
            "keys": list(self.keys),
        }

    def __repr__(self) -> str:
        from .display import memory_repr

        return memory_repr(self)

    def _repr_html_(self) -> str:
        from .display import memory_html

        return memory_html(self)


class SearchResult(NamedTuple):
    """A memory and its relevance score (higher is more relevant). Unpacks as ``memory, score``."""

    memory: Memory
    score: float

    def _repr_html_(self) -> str:
        from .display import search_result_html

        return search_result_html(self)


_FRACTION = re.compile(r"(T\d\d:\d\d:\d\d)[.,](\d+)")


def _iso_text(text: str) -> str:
    """``text`` as ``fromisoformat`` reads it on every Python (3.10 reads only what
    ``isoformat`` writes): "Z" for UTC as "+00:00", and a fraction of a second of any length
    as six digits (nanoseconds, which other systems write, cut to microseconds)."""
    text = text.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    return _FRACTION.sub(lambda m: f"{m.group(1)}.{m.group(2)[:6].ljust(6, '0')}", text)


def in_utc(moment: datetime) -> datetime:
    """``moment`` in UTC (a naive one is UTC already): "2026-02-01T23:30:00-08:00" is
    "2026-02-02T07:30:00+00:00"."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def parse_time(value: Any) -> datetime:
    """A time in UTC from a datetime, an ISO 8601 text or a POSIX timestamp (naive times are
    UTC; one with another offset is converted). Raises ValueError for one that is no time (a
    timestamp of 1e20)."""
    try:
        if isinstance(value, datetime):
            parsed = value
        elif isinstance(value, (int, float)):
            parsed = datetime.fromtimestamp(float(value), timezone.utc)
        else:
            parsed = datetime.fromisoformat(_iso_text(str(value)))
        return in_utc(parsed)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"time out of range: {value!r}") from exc


def storable_time(value: Any) -> datetime:
    """:func:`parse_time`, refusing a time UTC cannot hold ("9999-12-31T23:59:59-12:00" is in
    the year 10000 there), which a store could write but never read back as a timestamp."""
    parsed = parse_time(value)
    try:
        parsed.timestamp()
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f"time out of range: {value!r}") from exc
    return parsed
