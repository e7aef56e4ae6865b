"""The framework-free core: one user's memories, stored with embeddings, searched by meaning.

Every wrapper and adapter in this package is a thin layer over :class:`MemoryStore`.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import math
import numbers
import os
import re
import threading
import time
import unicodedata
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Protocol, TypeVar, cast

import numpy as np

from .concurrency import user_write_lock, wording_id
from .display import MemoryList, MemoryStats, SearchResults, store_html
from .embeddings.base import Embedder, Vectors
from .embeddings.local import LocalEmbedder
from .embeddings.message_gate import MAX_CHARS as GATE_MAX_CHARS
from .embeddings.message_gate import THRESHOLD as GATE_THRESHOLD
from .embeddings.message_gate import need_for_memory, reads_as_question
from .embeddings.query_adapter import adapt_queries
from .embeddings.symbols import named_symbols
from .errors import EmbeddingError, InvalidInputError, MemoryNotFoundError, StorageError
from .jobs import user_tag
from .keys import clean_keys, index_text, memory_vectors
from .late_embeddings import embed_texts
from .lexical import lexical_scores
from .redaction import logger_without_secrets, without_credentials
from .storage.base import Storage, UserCollection
from .storage.chroma import ChromaStorage
from .storage.guard import is_rust_panic
from .types import Category, Memory, Revision, SearchResult, Source, storable_time, utc_now
from .write_path import Remembered, WritePath, rewritten, write_unless_deleted

DEFAULT_DB_PATH = "~/.headroom-memory"
"""Where memories are kept when no ``db_path`` is given (``$HEADROOM_MEMORY_DB`` overrides)."""

DEFAULT_MIN_SCORE = 0.06
"""Relevance floor for a user with one memory: search returns only memories whose meaning is
at least this close to the query (cosine similarity of the memory and the query's vector, as
the query adapter moves it for the default model (:mod:`.embeddings.query_adapter`), discounted
for memories more typical of the user than the average one: :data:`QUERY_CENTERING`). The floor
rises with the number of memories the user has (:data:`FLOOR_RISE`): the more memories, the
closer the best of them comes to any question by chance. With all-MiniLM-L6-v2, "which
language?" against "Prefers Python for backend work" scores 0.073 and "What is 2+2?" -0.084.
The floor judges meaning alone: a shared word adds to the score, never to the similarity the
floor judges. Calibrated so that about 5% of unrelated questions still get a memory, for
example "What is 2+2?" against a lone "Has 2 cats" (0.12). It is calibrated for the default
model: with another, pass your own."""

FLOOR_RISE = (
    (1, 0.0),
    (3, 0.03),
    (10, 0.06),
    (30, 0.09),
    (100, 0.16),
    (1_000, 0.195),
    (10_000, 0.215),
    (100_000, 0.235),
)
"""How far the relevance floor rises above ``min_score`` with the number of memories: (memories,
rise) points, joined by straight lines over the logarithm of the number, flat past the last
one. With the default floor: 0.06 for 1 memory, 0.12 for 10, 0.22 for 100, 0.255 for 1,000,
0.275 for 10,000, 0.295 from 100,000. Measured, not chosen: at each size, the best memory of the
user is at least this close to an unrelated question (small talk, general knowledge, code) for
at most 5% of the dev half of ``benchmarks/paraphrase_unrelated.jsonl``, rounded up
(``python -m benchmarks.floor``; docs/benchmarks.md, "A query adapter"). Memories with keys
(:mod:`.keys`) are held to the same floor: measured the same way, the best memory with keys is
no closer to unrelated questions than the best memory without (at every size measured;
before the query adapter they needed 0.02-0.05 more)."""

LEXICAL_WEIGHT = 1.2
"""The score that orders search results is the similarity of query and memory (their cosine
similarity, discounted for typical memories: :func:`centred_query`) plus this weight times
their lexical overlap (0-1: the share of the query's best possible BM25 score the memory
reaches, see :mod:`.lexical`), so exact names, numbers and rare words count. Higher is more
relevant; scores lie in about [-1, 1 + LEXICAL_WEIGHT] (the discount can take a similarity a
little past either end). On LoCoMo this raises turn-level recall@10 from 0.53 to 0.69
(docs/benchmarks.md)."""

QUERY_CENTERING = 0.6
"""How much a search discounts a memory for being like the user's other memories (see
:func:`centred_query`). What all of a user's memories share (their form, "User ..." or
"[date] Name: ...", and keys of the same kind) brings each of them nearer to every question
while telling them apart not at all; a memory's similarity to a query is its cosine
similarity less this share of how much closer than the average memory it is to the mean of
them all. Chosen on the dev halves of ``benchmarks/paraphrase_pairs.jsonl`` and
``benchmarks/paraphrase_unrelated.jsonl`` (0.3 to 1.0 tried; 0.5-0.7 did best and alike) and
checked on LoCoMo, where 1.0 lost turn recall: docs/benchmarks.md, "Centred queries"."""

CENTROID_PRIOR = 300
"""The mean of few memories says little about what a user's memories share: it is taken off
in proportion ``n / (n + CENTROID_PRIOR)`` of the ``n`` memories it stands for, nearly not at all
for a handful, 0.6 x 0.97 of it at 10,000."""

SEARCH_CANDIDATES = 200
"""Nearest neighbours scored per search (their ids and similarities come from Chroma; their
texts from a per-process cache)."""

DEFAULT_DUPLICATE_THRESHOLD = 0.95
"""How close (cosine) a new memory that replaces words of an existing one, keeping every
number, date, name, negation and tense, must be to count as the same statement reworded: it
then supersedes the existing memory, whose text stays in ``history`` ("Deploys with Docker"
-> "Deploys using Docker", 0.988). It is never dropped as a duplicate: the model cannot tell
a synonym from an opposite ("Is left-handed" -> "Is right-handed", 0.958). Below it, the
word-by-word rules of :mod:`.consolidation` decide between an update and a distinct fact. Only
a text that says nothing new is a duplicate: the same words up to case, punctuation, spacing,
articles, a few empty words ("really") and the order of an "A and B" (a changed word form or a
word left out is not). Lower values retire more true memories to ``history``,
higher ones keep more stale memories beside their correction (docs/benchmarks.md,
"Consolidation")."""

_UNIT_TOLERANCE = 1e-5
"""How far from 1 the length of an embedder's vector may be for it to count as unit length:
float32 rounding of a normalised row (the local model's are within 1e-6)."""

MAX_TEXT_CHARS = 2000
"""Longest memory text accepted."""


def query_tail(text: str) -> str:
    """What a search of a long message takes: its last :data:`MAX_TEXT_CHARS` characters of
    text (the question usually comes last; the local model then reads its last 256 tokens,
    :meth:`~.embeddings.local.LocalEmbedder.embed_queries`). Trailing padding is no part of it:
    blank lines, control characters, zero-width characters. Its letters are composed first
    (NFC), as the search composes them: a letter NFC writes as two characters (a Hindi letter
    with a nukta typed as one, U+095B) counts as two, so the cut fits the search's limit."""
    stripped = text.strip()
    if len(stripped) > MAX_COMPOSED_FROM * MAX_TEXT_CHARS:  # compose a bounded tail only
        stripped = _last_chars(stripped, MAX_COMPOSED_FROM * MAX_TEXT_CHARS)  # (NFC is
        # quadratic in a run of combining marks: a long one held the GIL for seconds)
    stripped = unicodedata.normalize("NFC", stripped).strip()
    if len(stripped) <= MAX_TEXT_CHARS:
        return stripped  # the search drops its control characters itself
    return _last_chars(stripped, MAX_TEXT_CHARS)


def _last_chars(stripped: str, limit: int) -> str:
    """The last ``limit`` characters of ``stripped`` that the search keeps (no control, format
    or unpaired surrogate characters, no trailing blanks)."""
    kept: list[str] = []
    for ch in reversed(stripped):  # from the end: only the tail is read
        if (ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs", "Cf")) and (
            kept or not ch.isspace()
        ):
            kept.append(ch)
            if len(kept) == limit:
                break
    return "".join(reversed(kept)).strip()


MAX_IMPORT_LINE_CHARS = 1_000_000
"""Longest line :meth:`MemoryStore.import_` reads (an exported memory is far shorter)."""

MAX_USER_ID_CHARS = 2048
MAX_METADATA_KEYS = 32
MAX_METADATA_VALUE_CHARS = 1000
MAX_TOP_K = 1000

MAX_MEMORY_ID_CHARS = 256
"""Longest id a caller may choose (:meth:`MemoryStore.put`)."""
logger = logger_without_secrets(__name__)
_QUERY_CACHE_SIZE = 1024


@dataclass(frozen=True)
class _Query:
    """A search's text as the store compares it: its vector (adapted, see
    :mod:`.embeddings.query_adapter`) and, as a chat message, the gate's log-odds that it needs
    a memory (:mod:`.embeddings.message_gate`; None where no gate applies)."""

    vector: Vectors
    need: float | None

    @property
    def could_need_memory(self) -> bool:
        """Whether, as a chat message, it could need a memory (the gate lets it through)."""
        return self.need is None or self.need >= GATE_THRESHOLD


_Embedded = TypeVar("_Embedded", Vectors, _Query)


def _dimension_of(embedded: Vectors | _Query) -> int:
    return int((embedded.vector if isinstance(embedded, _Query) else embedded).shape[-1])


FOLLOW_UP_WORDS = 6
"""A chat message of at most this many words that reads as a question may be a follow-up of the
user's previous message ("which one for it?"), and is searched joined to it when it needs a
memory (see :data:`FOLLOW_UP_NEED`) or when joining brings a memory nearer
(``search(..., previous_message=...)``). On five sets of follow-ups written blind, with
memories stored with keys among 10k others, follow-up hit@5 is 0.40-0.47 (0.06-0.19 searched
alone), and asides ("ok thanks", "wish me luck") draw a memory about as often as alone
(docs/benchmarks.md, "Follow-ups")."""

FOLLOW_UP_EARLIER_CHARS = GATE_MAX_CHARS
"""A previous message longer than this (in characters, once cleaned) is never joined to a
follow-up: it is usually a document or pasted text, which would drown the follow-up."""

FOLLOW_UP_NEED = 0.0
"""A short question (see :data:`FOLLOW_UP_WORDS`) that the message gate, reading it alone,
scores at least this likely to need a memory (log-odds; 0 is even odds) is searched joined to
the previous message whatever the scores. When the previous message already finds the memory,
the joined text scores a little lower than it, diluted by the short message's words, and the
short message alone misses (looks 16 to 18 of ``benchmarks/paraphrase_fresh_log.md``)."""

_CATEGORY_OVERFETCH = 4  # with a category filter, fetch this many times top_k, then filter
MAX_CATEGORY_CANDIDATES = 12_800
"""Most nearest memories a search with ``categories`` widens to (x4 at a time from
:data:`SEARCH_CANDIDATES`) while too few of them are of those categories: a memory of a rare
category farther than this from the query is not found. Past it, reading and ranking the
candidates (a Chroma read of each record for users above the read-ahead limit) took over a
second per search."""
_COUNT_SECONDS = 30.0  # how long a store trusts the memory count its floor was set with


def relevance_floor(min_score: float, memories: int) -> float:
    """The similarity (see :func:`centred_query`) a memory needs to be returned by a search,
    for a user holding ``memories`` memories: ``min_score`` plus the rise of
    :data:`FLOOR_RISE`. ``min_score`` is the floor for one memory; -1 or less turns the floor
    off.

    Example::

        >>> [relevance_floor(DEFAULT_MIN_SCORE, n) for n in (1, 100, 10_000, 100_000)]
        [0.06, 0.22, 0.275, 0.295]
    """
    if min_score <= -1.0:
        return -1.0
    return round(min_score + rise_by_size(FLOOR_RISE, memories), 3)


def rise_by_size(points: Sequence[tuple[int, float]], memories: int) -> float:
    """``points`` (``(memories, rise)`` pairs, by size) at ``memories``: interpolated on the
    logarithm of the size, flat past the last point."""
    position = math.log10(max(memories, 1))
    scaled = [(math.log10(count), rise) for count, rise in points]
    for (left, low), (right, high) in pairwise(scaled):
        if position <= right:
            return low + (high - low) * (position - left) / (right - left)
    return scaled[-1][1]


@dataclass(frozen=True)
class CentredQuery:
    """A query vector as a search compares it with a user's memories (:func:`centred_query`).

    ``vector`` is what the storage's nearest-neighbour search is given (a unit vector); a
    memory's similarity to the query is its cosine similarity to ``vector`` times ``scale``
    plus ``offset`` (:meth:`similarity`)."""

    vector: Vectors
    scale: float = 1.0
    offset: float = 0.0

    def similarity(self, found: float) -> float:
        """A memory's similarity to the query, from its cosine similarity to :attr:`vector`."""
        return found * self.scale + self.offset

    def similarity_of(self, stored: Vectors) -> Any:
        """The similarity to the query of a stored unit vector (a float), or of each row of a
        matrix of them (an array)."""
        return np.asarray(stored) @ self.vector * self.scale + self.offset


def centred_query(vector: Vectors, centroid: tuple[Vectors, int] | None) -> CentredQuery:
    """How a search compares unit query ``vector`` with the memories of a user whose mean
    memory vector is ``centroid`` (:meth:`UserCollection.centroid`'s answer: the mean and how
    many memories it stands for; None for none).

    A memory's similarity is its cosine similarity to the query less ``w`` times how much
    closer than the average memory it is to the mean: ``q.m - w * (m.mean - mean.mean)``,
    with ``w`` = :data:`QUERY_CENTERING` x ``n / (n + CENTROID_PRIOR)``. A memory as typical
    of the user as the average one keeps its cosine; a more typical one scores lower, a less
    typical one higher. That is ``(q - w * mean).m + w * mean.mean``: a nearest-neighbour
    search for the unit vector along ``q - w * mean`` ranks the memories by it, and its
    cosine similarities give it back (scale and offset)."""
    if centroid is None:
        return CentredQuery(vector)
    mean, count = centroid
    weight = QUERY_CENTERING * count / (count + CENTROID_PRIOR)
    shifted = np.asarray(vector, dtype=np.float32) - np.float32(weight) * mean
    length = float(np.linalg.norm(shifted))
    if not length > 1e-6:  # the query is the mean itself: keep plain cosine
        return CentredQuery(vector)
    return CentredQuery((shifted / length).astype(np.float32), length, weight * float(mean @ mean))


class PendingWrites(Protocol):
    """Background work on a store's memories (the wrappers' durable job queue)."""

    def flush(self, timeout: float | None = None, *, user_id: str | None = None) -> bool: ...

    def retry_failed(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    def detach(self, memory: MemoryStore, timeout: float | None) -> bool: ...

    def forget(self, memory: MemoryStore, timeout: float | None) -> int: ...


@dataclass(frozen=True)
class NewMemory:
    """A memory to add with :meth:`MemoryStore.add_many`.

    Attributes:
        replaces: The id of an existing memory of the same user that this one supersedes
            ("Moved to SF" replacing "Lives in NY"). That memory is updated in place and
            keeps its old text in ``history``; if it no longer exists, this one is added.
        keys: Topic words and a question to index with the text, as a comma-separated string
            or a list (``["diet", "seafood", "What can't I eat at a fish restaurant?"]``; see
            :mod:`.keys`).
    """

    text: str
    category: Category | str = Category.FACT
    metadata: Mapping[str, Any] | None = None
    replaces: str | None = None
    keys: Sequence[str] | str | None = None


# -- validation ------------------------------------------------------------------------------


def _check_encodable(text: str, what: str) -> None:
    """Refuse strings that cannot be stored as UTF-8 (lone surrogates such as ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid Unicode text (a lone surrogate at position {exc.start})"
        ) from None


def validate_user_id(user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise InvalidInputError(f"user_id must be a non-empty string, got {user_id!r}")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise InvalidInputError(
            f"user_id is {len(user_id)} characters; the maximum is {MAX_USER_ID_CHARS}"
        )
    _check_encodable(user_id, "user_id")
    return user_id


def check_user_id(user_id: object) -> str:
    """A user id an application hands an adapter or wrapper: as :class:`MemoryStore` accepts
    it, and without control characters (a newline or NUL is never part of a real id), but for
    ``"\x1f"``, which joins the labels of a LangGraph namespace's user
    (:func:`~.langchain.store.namespace_user`). An application that takes user ids from
    untrusted input must refuse ``"\x1f"`` itself: ``"alice\x1fmallory"`` is the namespace
    ``("alice", "mallory")``, inside ``("alice",)``'s searches. The CLI's ``--user`` is checked
    the same way."""
    user_id = validate_user_id(user_id)
    if any(unicodedata.category(ch) == "Cc" and ch != "\x1f" for ch in user_id):
        raise InvalidInputError(f"user_id must not hold control characters, got {user_id!r}")
    return user_id


def check_embedder(embedder: object) -> Embedder:
    """``embedder``, if it is one: a ``name`` (text), a ``dimension`` (a whole number; 0 while
    a model is not loaded yet) and an ``embed`` method. A model's name given instead would
    otherwise be taken, and every memory operation would fail later."""
    name = getattr(embedder, "name", None)
    dimension = getattr(embedder, "dimension", None)
    if (
        not callable(getattr(embedder, "embed", None))
        or not isinstance(name, str)
        or not name
        or not isinstance(dimension, int)
        or isinstance(dimension, bool)
        or dimension < 0
    ):
        hint = (
            " (for a model by its name: LocalEmbedder(name))" if isinstance(embedder, str) else ""
        )
        raise InvalidInputError(
            "embedder must have a name, a dimension and an embed(texts) method, got "
            f"{type(embedder).__name__}{hint}"
        )
    return cast(Embedder, embedder)


def search_text(query: str) -> str | None:
    """The text a search of ``query`` looks for (:func:`query_tail`), or None when it has
    nothing visible to look for (blank, control characters or a lone zero-width space:
    :func:`has_visible_text`); what to do then is the caller's (return no memories, or say
    why)."""
    text = query_tail(query)
    return text if has_visible_text(text) else None


def has_visible_text(text: str) -> bool:
    """Whether :func:`clean_text` leaves something of ``text`` (a character that is not
    whitespace, a control character or an invisible format character such as a zero-width
    space): a search of a text without one is skipped, as a blank one is."""
    return any(
        not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cs", "Cf") for ch in text
    )


MAX_COMPOSED_FROM = 4
"""The most characters NFC composes into one (a Greek letter with three marks, "ᾇ"): a text
longer than this many times :data:`MAX_TEXT_CHARS` is too long whatever it composes to."""


def clean_text(text: object, what: str = "memory text") -> str:
    """Strip, drop control characters, compose characters (NFC: "José" typed as "Jose" and a
    combining accent, as macOS and some keyboards and PDFs write it, is stored as "José": the
    same text is then the same memory) and check the length of a text. Nothing visible
    changes: compatibility forms ("ﬁ", "²", fullwidth letters) are kept as written, and so are
    format characters (a zero-width joiner in an emoji, a ZWNJ in Persian), but a text of
    nothing else (a lone zero-width space) is empty."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a string, got {type(text).__name__}")
    cleaned = "".join(
        ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs")
    ).strip()
    if len(cleaned) > MAX_COMPOSED_FROM * MAX_TEXT_CHARS:  # too long however it composes:
        raise InvalidInputError(  # refused before NFC, which is quadratic in a run of marks
            f"{what} is {len(cleaned)} characters; the maximum is {MAX_TEXT_CHARS}"
        )
    cleaned = unicodedata.normalize("NFC", cleaned)
    if not cleaned:
        if text.strip():  # e.g. a lone surrogate, which no encoding can store
            raise InvalidInputError(
                f"{what} holds only control characters or unpaired surrogates, which are "
                "removed: nothing is left"
            )
        raise InvalidInputError(f"{what} is empty")
    if all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in cleaned):
        raise InvalidInputError(
            f"{what} holds only invisible format characters (such as zero-width spaces): "
            "nothing is left"
        )
    if len(cleaned) > MAX_TEXT_CHARS:
        raise InvalidInputError(
            f"{what} is {len(cleaned)} characters; the maximum is {MAX_TEXT_CHARS}"
        )
    return cleaned


def clean_metadata(metadata: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Check that metadata is a small mapping of string keys to scalar values."""
    if metadata is None:
        return MappingProxyType({})
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(f"metadata must be a mapping, got {type(metadata).__name__}")
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidInputError(
            f"metadata has {len(metadata)} keys; the maximum is {MAX_METADATA_KEYS}"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"metadata keys must be non-empty strings, got {key!r}")
        _check_encodable(key, "a metadata key")
        if isinstance(value, str):
            _check_encodable(value, f"metadata[{key!r}]")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise InvalidInputError(
                f"metadata[{key!r}] must be a string, number, boolean or None, "
                f"got {type(value).__name__}"
            )
        if isinstance(value, float) and not np.isfinite(value):
            raise InvalidInputError(f"metadata[{key!r}] must be a finite number")
        if isinstance(value, str) and len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidInputError(
                f"metadata[{key!r}] is {len(value)} characters; the maximum is "
                f"{MAX_METADATA_VALUE_CHARS}"
            )
    return MappingProxyType(dict(metadata))


def check_memory_id(memory_id: object) -> str:
    """A caller-chosen memory id: 1 to :data:`MAX_MEMORY_ID_CHARS` printable characters."""
    if (
        not isinstance(memory_id, str)
        or not 1 <= len(memory_id) <= MAX_MEMORY_ID_CHARS
        or not memory_id.isprintable()
        or memory_id != memory_id.strip()
    ):
        raise InvalidInputError(
            f"a memory id must be 1-{MAX_MEMORY_ID_CHARS} printable characters with no "
            f"surrounding spaces, got {memory_id!r}"
        )
    return memory_id


def check_top_k(top_k: object) -> int:
    """How many results a search may return: an integer from 1 to :data:`MAX_TOP_K`."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInputError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
    return top_k


def check_duplicate_threshold(threshold: object) -> float | None:
    """None (consolidation off) or a cosine similarity from 0 to 1."""
    if threshold is None:
        return None
    value = float(threshold) if isinstance(threshold, numbers.Real) else math.nan
    if isinstance(threshold, bool) or not 0.0 <= value <= 1.0:  # NaN fails this too
        raise InvalidInputError(
            f"duplicate_threshold must be None or a number from 0 to 1, got {threshold!r}"
        )
    return value


def check_min_score(min_score: object) -> float:
    """A relevance floor: a finite number (NaN would let every memory through or none)."""
    if (
        isinstance(min_score, bool)
        or not isinstance(min_score, numbers.Real)
        or not math.isfinite(min_score)
    ):
        raise InvalidInputError(f"min_score must be a finite number, got {min_score!r}")
    return float(min_score)


def check_said_at(said_at: object) -> datetime | None:
    """When memories were said: None (now), a datetime (naive is UTC), an ISO 8601 text or a
    POSIX timestamp; a time later than now is now."""
    if said_at is None:
        return None
    try:
        if isinstance(said_at, bool):
            raise ValueError("a bool is no time")
        return min(storable_time(said_at), utc_now())
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"said_at must be a datetime, an ISO 8601 text or a POSIX timestamp, got {said_at!r}"
        ) from exc


def _check_timeout(timeout: object) -> float | None:
    """A wait in seconds: None (no limit) or a number, 0 or more."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, numbers.Real)  # numpy's numbers too
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise InvalidInputError(
            f"timeout must be None or a number of seconds, 0 or more; got {timeout!r}"
        )
    return float(timeout)


def _failure(exc: BaseException) -> str:
    """An exception as ``Type: message`` (one line, for logs and ``stats()["error"]``)."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def resolve_storage(db_path: str | os.PathLike[str] | None) -> Storage:
    """The storage ``db_path`` names: a Chroma server for an ``http(s)://`` URL, else an
    embedded folder (default ``$HEADROOM_MEMORY_DB`` or ``~/.headroom-memory``)."""
    if db_path is None:  # an empty variable is an unset one, as in a shell
        path = os.environ.get("HEADROOM_MEMORY_DB", "").strip() or str(DEFAULT_DB_PATH)
    else:
        path = os.fspath(db_path) if isinstance(db_path, str | os.PathLike) else None
        if not isinstance(path, str) or not path.strip():
            raise InvalidInputError(
                f"db_path must name a folder or a Chroma server's URL, got {db_path!r} "
                "(None for the default)"
            )
    url = server_url(path, "db_path")
    return ChromaStorage.from_url(url) if url else ChromaStorage.at(path)


_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_MISTYPED_URL = re.compile(r"(https?)(?::[/\\]*|[/\\]{2,})", re.IGNORECASE)
"""The start of a server URL typed wrong: "http:/", "http:", "http:\\\\", "http//" (a folder
is never named so, and taking one for a folder put its password in a folder's name)."""


def server_url(path: str, what: str) -> str | None:
    """``path`` as a Chroma server's URL (spaces around it dropped, its scheme in lower case),
    or None for a folder. A URL is never taken for a folder: one of another scheme than
    ``http`` or ``https`` ("chroma://...", "ftp://...") or one typed wrong ("http:/host:8000",
    "http//host:8000") raises :class:`InvalidInputError`."""
    url = path.strip()
    scheme = _URL_SCHEME.match(url)
    if not scheme:
        mistyped = _MISTYPED_URL.match(url)
        if mistyped:
            meant = f"{mistyped.group(1).lower()}://{url[mistyped.end() :]}"
            raise InvalidInputError(
                f"{what} {without_credentials(path)!r} is neither a folder nor a URL: did you "
                f"mean {without_credentials(meant)!r}?"
            )
        return None
    name = scheme.group(1).lower()
    if name not in ("http", "https"):
        raise InvalidInputError(
            f"{what} {without_credentials(path)!r} is a {name}:// URL: a Chroma server's is "
            "http:// or https://, and a folder is a path"
        )
    return name + url[scheme.end(1) :]


# -- the store -------------------------------------------------------------------------------


_BYTE_ORDER_MARK = "\ufeff"
"""What a UTF-8 file may begin with (an export saved by a Windows editor), read as text."""


def _bounded_lines(stream: io.TextIOBase) -> Iterator[str]:
    """The lines of ``stream``, each read up to one character past
    :data:`MAX_IMPORT_LINE_CHARS` (a longer line is cut there, and refused by its length)."""
    while True:
        line = stream.readline(MAX_IMPORT_LINE_CHARS + 1)
        if not line:
            return
        yield line
        if len(line) > MAX_IMPORT_LINE_CHARS:
            return  # refused: the rest is not read


def _bounded_byte_lines(stream: io.IOBase) -> Iterator[bytes]:
    """The lines of a binary ``stream`` (an export read from ``gzip.open(path)`` or an upload),
    each read up to the bytes :data:`MAX_IMPORT_LINE_CHARS` characters can take."""
    limit = 4 * MAX_IMPORT_LINE_CHARS + 1
    while True:
        line = stream.readline(limit)
        if not line:
            return
        if len(line) >= limit:
            raise InvalidInputError(
                f"a line is longer than {MAX_IMPORT_LINE_CHARS} characters: not a line written "
                "by export()"
            )
        yield line


def _exported_time(data: Mapping[str, Any], name: str, default: datetime) -> datetime:
    """An exported memory's time ``name``, an ISO 8601 text or a POSIX timestamp (0 is 1970),
    or ``default`` if there is none.

    Raises:
        InvalidInputError: It is no time (a bool, a list, ...), or one UTC cannot hold.
    """
    value = data.get(name)
    if value is None:
        return default
    no_time = InvalidInputError(
        f"{name} must be an ISO 8601 text or a POSIX timestamp, got {value!r}"
    )
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise no_time
    try:
        return storable_time(value)
    except ValueError as exc:
        if str(exc).startswith("time out of range"):
            raise
        raise no_time from exc


def _invisible_only(data: Mapping[str, Any]) -> bool:
    """Whether an exported memory or history entry's text holds only invisible format
    characters (a lone zero-width space): earlier versions stored such a text, which is now
    refused, so an import skips it rather than refusing the file."""
    text = data.get("text")
    return (
        isinstance(text, str)
        and not has_visible_text(text)
        and any(unicodedata.category(ch) == "Cf" for ch in text)
    )


def _imported_revision(data: object, updated_at: datetime) -> Revision:
    """An exported memory's earlier text, checked as a memory's text is, replaced when the
    memory was ``updated_at`` at the latest (a later time is taken as that)."""
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"a history entry must be an object, got {type(data).__name__}")
    replaced_at = min(_exported_time(data, "replaced_at", updated_at), updated_at)
    revision = Revision.from_dict(data)
    return replace(revision, text=clean_text(data["text"], "history text"), replaced_at=replaced_at)


@dataclass
class _SkippedInvisible:
    """What an import left out as holding only invisible format characters."""

    lines: list[int] = field(default_factory=list)
    history: int = 0


SURVIVED_LOG_SECONDS = 60.0
"""A store logs each kind of failure its callers survived at most once per this many seconds
(:meth:`MemoryStore.survived`); every one is counted."""


class MemoryStore(WritePath):
    """One user's long-term memories.

    Args:
        user_id: Whose memories these are. Any non-empty string; users never see each
            other's memories.
        db_path: A folder for embedded Chroma (default ``~/.headroom-memory``, or
            ``$HEADROOM_MEMORY_DB``), or a Chroma server's URL (``http://127.0.0.1:8000``).
        storage: A storage object instead of ``db_path`` (e.g. ``ChromaStorage(client)``).
        embedder: Defaults to the local all-MiniLM-L6-v2. A store keeps the embedder it was
            built with; opening it with another raises :class:`EmbeddingMismatchError`.
        min_score: The relevance floor of :meth:`search` for a user with one memory; it
            rises with the number of memories (see :func:`relevance_floor`).
        duplicate_threshold: See :data:`DEFAULT_DUPLICATE_THRESHOLD`; ``None`` turns
            consolidation off: texts worded the same are still stored once, but everything
            else is kept beside and nothing is superseded automatically.

    Example::

        >>> store = MemoryStore("alice", db_path="/tmp/memories")
        >>> added = store.add("Prefers Python for backend work", category="preference")
        >>> [(m.text, round(s, 2)) for m, s in store.search("Which language should I use?")]
        [('Prefers Python for backend work', 0.26)]
    """

    def __init__(
        self,
        user_id: str,
        db_path: str | os.PathLike[str] | None = None,
        *,
        storage: Storage | None = None,
        embedder: Embedder | None = None,
        min_score: float = DEFAULT_MIN_SCORE,
        duplicate_threshold: float | None = DEFAULT_DUPLICATE_THRESHOLD,
    ) -> None:
        self.user_id = validate_user_id(user_id)
        if storage is not None and db_path is not None:
            raise InvalidInputError("pass db_path or storage, not both")
        self.embedder: Embedder = (
            check_embedder(embedder) if embedder is not None else LocalEmbedder()
        )
        self.storage = storage if storage is not None else resolve_storage(db_path)
        self.min_score = check_min_score(min_score)
        self.duplicate_threshold = check_duplicate_threshold(duplicate_threshold)
        self._collection: UserCollection | None = None
        self._query_cache: OrderedDict[str, _Query] = OrderedDict()
        self._cache_lock = threading.Lock()
        # consolidation reads, decides, then writes: one writer of the user at a time in this
        # process, whichever store object it goes through (see .concurrency)
        self._write_lock = user_write_lock(self.storage.location, self.user_id)
        self.counters: Counter[str] = Counter()
        """Failures the wrappers survived (inject_failures, store_failures, malformed_blocks,
        ...): each was logged, and the user's chat call went on. Shown in :meth:`stats`."""
        self._pending: PendingWrites | None = None
        self._counted: tuple[int, float] | None = None  # (memories, when counted)
        self._logged: dict[str, tuple[float, int]] = {}  # counter -> (last logged, not since)
        self._log_lock = threading.Lock()

    # -- plumbing ----------------------------------------------------------------------------

    def _embed(self, texts: Sequence[str], *, queries: bool = False) -> Vectors:
        """The embedder's vectors of ``texts``, checked and at unit length; of search
        ``queries`` with its ``embed_queries`` where it has one (see
        :class:`~.embeddings.base.Embedder`). Every vector of a memory or a query comes from
        here: an embedder's rows of another length (norm 5, say) are scaled to 1, as the
        relevance floor and the consolidation thresholds are cosine similarities (before, a
        row of norm 5 scored 5 times its cosine and passed any floor). A row already of unit
        length (to float32 rounding: the local model's) is left as it is, bit for bit.

        A panic in an embedder's Rust code (pyo3's ``PanicException``, which HF ``tokenizers``
        raises) is an :class:`~.errors.EmbeddingError` here: it is a ``BaseException``, which
        the chat call's ``except Exception`` let through, so the user's call failed with it. The
        error's message names the panic's type, not its text (which may quote the user's); the
        panic is its cause.

        An embedder whose vocabulary has no emoji (``emoji_by_name``: the local
        all-MiniLM-L6-v2, which read every emoji as one unknown token, so texts that differed
        only by an emoji had one vector) is given each emoji's name
        (:func:`~.embeddings.symbols.named_symbols`); any other reads the texts as written."""
        if getattr(self.embedder, "emoji_by_name", False) is True:
            texts = [named_symbols(text) for text in texts]
        embed_queries = getattr(self.embedder, "embed_queries", None) if queries else None
        try:
            call = embed_queries or self.embedder.embed
            # in a background job: bounded, a late answer kept for its retry (late_embeddings)
            embedded = embed_texts(self.embedder, call, list(texts), queries)
        except BaseException as exc:
            if not is_rust_panic(exc):
                raise  # an interrupt, an exit or a cancellation: never turned into a failure
            # the panic's type alone: its text may quote the text embedded (Rust's "byte index
            # 3 is not a char boundary ... of `<text>`"), and this message is logged at WARNING
            raise EmbeddingError(
                f"embedder {self.embedder.name!r} failed inside its native code "
                f"({type(exc).__name__})"
            ) from exc
        try:
            vectors = np.asarray(embedded, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"embedder {self.embedder.name!r} returned something other than numbers: {exc}"
            ) from None
        dimension = self.embedder.dimension
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise InvalidInputError(
                f"embedder {self.embedder.name!r} returned an array of shape {vectors.shape} "
                f"for {len(texts)} texts"
            )
        if dimension and vectors.shape[1] != dimension:
            raise InvalidInputError(
                f"embedder {self.embedder.name!r} returned vectors of {vectors.shape[1]} "
                f"numbers; its dimension is {dimension}"
            )
        if not np.isfinite(vectors).all():  # Chroma refuses them: a write would never land
            raise InvalidInputError(
                f"embedder {self.embedder.name!r} returned NaN or infinite numbers"
            )
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        if not norms.all():  # no direction: its cosine with anything is undefined
            raise InvalidInputError(
                f"embedder {self.embedder.name!r} returned a vector of zeros (no direction)"
            )
        off_unit = np.abs(norms - 1.0) > _UNIT_TOLERANCE
        if off_unit.any():
            vectors = vectors.copy()
            vectors[off_unit] = (vectors[off_unit] / norms[off_unit, None]).astype(np.float32)
        return vectors

    def _vectors(self, memories: Sequence[Memory]) -> Vectors:
        """The vectors memories are stored with: each one's text with its keys
        (:func:`~.keys.memory_vectors`)."""
        return memory_vectors(self._embed, [(m.text, m.keys) for m in memories])

    def _query(self, query: str) -> _Query:
        with self._cache_lock:
            cached = self._query_cache.get(query)
            if cached is not None:
                self._query_cache.move_to_end(query)
                return cached
        raw = self._embed([query], queries=True)[0]
        found = _Query(
            adapt_queries(self.embedder.name, raw),
            need_for_memory(self.embedder.name, raw, query),
        )
        with self._cache_lock:
            self._query_cache[query] = found
            while len(self._query_cache) > _QUERY_CACHE_SIZE:
                self._query_cache.popitem(last=False)
        return found

    def _embed_opening(
        self, embed: Callable[[], _Embedded], *, searching: bool = False
    ) -> tuple[_Embedded, UserCollection]:
        """``embed()``, and the user's collection. The first time (when the embedder knows its
        dimension beforehand), the storage is opened and asked for a count on another thread
        meanwhile: importing Chroma and opening it (~0.5-0.8 s) then overlaps loading the model
        (~0.3 s, mostly outside the GIL) instead of following it. For a search
        (``searching``), that thread also reads the mean the search is centred on (a sample
        read from Chroma before the collection is read ahead: ~25 ms for 1,000 vectors)."""
        dimension = self.embedder.dimension
        opened: list[UserCollection] = []
        failed: list[BaseException] = []

        def open_and_count() -> None:
            try:
                collection = self._open(dimension)
                collection.count()  # connects: the import and the opening happen here
                if searching:
                    collection.centroid()  # kept by the collection for the search
                opened.append(collection)
            except BaseException as exc:  # re-raised in the caller's thread
                failed.append(exc)

        opening: threading.Thread | None = None
        if self._collection is None and dimension:
            # with the caller's context: its requests charge the chat call's deadline
            opening = threading.Thread(
                target=contextvars.copy_context().run,
                args=(open_and_count,),
                name="headroom-memory-open",
            )
            try:
                opening.start()
            except RuntimeError:  # no new threads (the interpreter is shutting down)
                opening = None
        if opening is None:
            embedded = embed()
            return embedded, self._open(_dimension_of(embedded))
        try:
            embedded = embed()
        except Exception:
            opening.join()
            raise
        # (an interrupt raised while embedding is not held back until the open is done)
        opening.join()
        if failed:
            raise failed[0]
        return embedded, opened[0]

    def _open(self, dimension: int | None = None) -> UserCollection:
        if self._collection is None:
            if dimension is None:
                dimension = self.embedder.dimension or self._embed(["dimension probe"]).shape[1]
            self._collection = self.storage.open(self.user_id, self.embedder.name, dimension)
        return self._collection

    # -- reading -----------------------------------------------------------------------------

    def search(
        self,
        query: str,
        top_k: int = 5,
        categories: Iterable[Category | str] | None = None,
        *,
        min_score: float | None = None,
        chat_message: bool = False,
        previous_message: str | None = None,
    ) -> list[SearchResult]:
        """The memories most relevant to ``query``, most relevant first.

        Args:
            query: What to look for, usually the user's latest message.
            top_k: At most this many results.
            categories: Only these categories (default: all).
            min_score: Override the store's relevance floor for this call (the floor for one
                memory; it rises with the number of memories, see :func:`relevance_floor`).
                ``-1`` returns the nearest memories whatever their score.
            chat_message: ``query`` is a user's chat message, whose memories will be injected
                (as the wrappers do), not a search: a message that the default model's gate
                reads as needing nothing about the user (small talk, general knowledge, a
                coding question; one of at most 300 characters:
                :mod:`.embeddings.message_gate`) gets no memories (counted in
                ``stats()["events"]["gated_messages"]``), unless ``min_score`` is ``-1`` or
                less (no floor at all); also while the storage is down, which such a message
                does not need (no ``StorageError``, unless it is searched as a follow-up).

            previous_message: With ``chat_message``, the user's message before ``query``. A
                ``query`` of at most :data:`FOLLOW_UP_WORDS` words is then searched joined to
                it when it is a question that needs a memory, or a question for which joining
                brings a memory nearer than the previous message alone does: a follow-up
                ("what can I take for it?" after "the doctor thinks I have strep throat")
                finds what the two say together, and an aside ("ok thanks", "wish me luck") is
                searched alone (see :meth:`_follow_up`).

        Returns:
            ``(memory, score)`` pairs; higher scores are more relevant, and every memory's
            similarity to the query (see :func:`centred_query`) reaches the floor, so an
            unrelated query returns an empty list. A ``list`` (shown as a table in Jupyter; its
            ``min_score`` is the floor that was applied).
        """
        query = clean_text(query, "query")
        top_k = check_top_k(top_k)
        if isinstance(categories, str | Category):
            one = categories.value if isinstance(categories, Category) else categories
            raise InvalidInputError(f"categories must be a list, such as [{one!r}], not one")
        wanted = {Category.parse(c) for c in categories} if categories is not None else None
        base = self.min_score if min_score is None else check_min_score(min_score)
        limit = max(SEARCH_CANDIDATES, top_k * _CATEGORY_OVERFETCH)
        followed = None
        if chat_message and previous_message is not None and base > -1.0:
            followed = self._follow_up(query, previous_message, limit)
        if followed is not None:
            query, asked, collection, nearest = followed
        else:
            embedded: list[_Query] = []

            def embed() -> _Query:
                embedded.append(self._query(query))
                return embedded[0]

            try:
                asked, collection = self._embed_opening(embed, searching=True)
            except StorageError:
                # the storage could not be opened (it is down): a message that needs no
                # memory gets none either way, as when the collection was opened before
                if not (chat_message and embedded and self._gates(embedded[0], base)):
                    raise
                return self._gated(query)
            nearest = None
        if chat_message and self._gates(asked, base):
            return self._gated(query)
        floor: float | None = None
        while True:
            if nearest is None:
                nearest = self._nearest(collection, [asked], limit)[0]
            if floor is None:
                floor = relevance_floor(base, self._memories(collection, len(nearest), limit))
            ranked = self._rank(query, nearest, collection, wanted, floor)
            deeper_can_pass = bool(nearest) and nearest[-1][1] >= floor
            if (
                wanted is None
                or len(ranked) >= top_k
                or len(nearest) < limit
                or limit >= MAX_CATEGORY_CANDIDATES
                or not deeper_can_pass
            ):
                break
            # a rare category: widen the net rather than ask Chroma to filter
            limit = min(limit * 4, MAX_CATEGORY_CANDIDATES)
            nearest = None
        best = ranked[:top_k]
        fresh = {m.id: m for m in collection.get([memory_id for memory_id, _ in best])}
        return SearchResults(
            (
                SearchResult(fresh[memory_id], score)
                for memory_id, score in best
                if memory_id in fresh and (wanted is None or fresh[memory_id].category in wanted)
            ),
            query=query,
            min_score=floor,
        )

    @staticmethod
    def _gates(asked: _Query, base: float) -> bool:
        """Whether a chat message embedded as ``asked`` gets no memories: the gate reads it
        as needing none, and the floor ``base`` is not "no floor at all" (``-1``)."""
        return not asked.could_need_memory and base > -1.0

    def _gated(self, query: str) -> SearchResults:
        """No memories for a chat message the gate holds back (counted)."""
        self.counters["gated_messages"] += 1
        return SearchResults((), query=query, min_score=None)

    def _nearest(
        self, collection: UserCollection, asked: Sequence[_Query], limit: int
    ) -> list[list[tuple[str, float]]]:
        """The ``limit`` memories nearest each query, with their similarity (see
        :func:`centred_query`), most similar first, in one call of the storage (one round
        trip to a Chroma server)."""
        centroid = collection.centroid()
        centred = [centred_query(one.vector, centroid) for one in asked]
        found = collection.nearest(np.stack([one.vector for one in centred]), limit)
        return [
            [(memory_id, one.similarity(cosine)) for memory_id, cosine in row]
            for one, row in zip(centred, found)
        ]

    def _follow_up(
        self, query: str, previous: object, limit: int
    ) -> tuple[str, _Query, UserCollection, list[tuple[str, float]]] | None:
        """``query`` joined to the user's ``previous`` message, when ``query`` reads as a
        follow-up of it: a question (:func:`~.embeddings.message_gate.reads_as_question`: "good
        idea?", not "wish me luck") of at most :data:`FOLLOW_UP_WORDS` words, after a
        conversational message (at most :data:`FOLLOW_UP_EARLIER_CHARS` characters), when
        either the gate, reading ``query`` alone, scores it at :data:`FOLLOW_UP_NEED` or more
        (not "what's 2 to the 10th?"), or the joined text's best memory scores higher than
        ``previous``'s own best, whatever the floor. Then the joined text, its embedding, the
        user's collection and the joined text's ``limit`` nearest memories (the search goes on
        with them); else None (``query`` is searched alone).

        The previous message was searched for its own turn, so its vector is usually cached;
        the joined text costs one more embedding, and ``query``'s own is needed for the gate
        (and for its search when it is searched alone)."""
        if len(query.split()) > FOLLOW_UP_WORDS or not reads_as_question(query):
            return None
        try:
            earlier = clean_text(previous, "previous message")
        except InvalidInputError:  # none, blank or unusable: the message is searched alone
            return None
        if len(earlier) > FOLLOW_UP_EARLIER_CHARS:
            return None
        joined = f"{earlier}\n{query}"
        asked, collection = self._embed_opening(lambda: self._query(joined), searching=True)
        need = self._query(query).need
        if need is not None and need >= FOLLOW_UP_NEED:
            return joined, asked, collection, self._nearest(collection, [asked], limit)[0]
        before = self._query(earlier)
        nearest = self._nearest(collection, [asked, before], limit)

        def best(text: str, found: list[tuple[str, float]]) -> float:
            ranked = self._rank(text, found, collection, None, relevance_floor(-1.0, 0))
            return ranked[0][1] if ranked else -math.inf

        if best(joined, nearest[0]) > best(earlier, nearest[1]):
            return joined, asked, collection, nearest[0]
        return None

    def _memories(self, collection: UserCollection, found: int, limit: int) -> int:
        """How many memories the user has, for the floor: ``found`` when the nearest-neighbour
        query returned fewer than ``limit`` (it returned them all), else a count read at most
        every :data:`_COUNT_SECONDS` (the floor moves little with a few more memories)."""
        if found < limit:
            return found
        counted, now = self._counted, time.monotonic()
        if counted is None or now - counted[1] > _COUNT_SECONDS:
            counted = (collection.count(), now)
            self._counted = counted
        return max(counted[0], found)

    def _rank(
        self,
        query: str,
        nearest: Sequence[tuple[str, float]],
        collection: UserCollection,
        wanted: set[Category] | None,
        floor: float,
    ) -> list[tuple[str, float]]:
        """Score the dense candidates (their similarity plus the lexical bonus, see
        :data:`LEXICAL_WEIGHT`); keep those of the wanted categories whose similarity reaches the
        floor, best first."""
        catalog = collection.catalog([memory_id for memory_id, _ in nearest])
        present = [(memory_id, close) for memory_id, close in nearest if memory_id in catalog]
        sampled = sum(1 for memory_id, _ in nearest[:SEARCH_CANDIDATES] if memory_id in catalog)
        lexical = lexical_scores(
            query,
            [
                index_text(catalog[memory_id].text, catalog[memory_id].keys)
                for memory_id, _ in present
            ],
            statistics_of=sampled,  # the nearest candidates: the same whatever top_k
        )
        ranked = [
            (memory_id, close + LEXICAL_WEIGHT * overlap)
            for (memory_id, close), overlap in zip(present, lexical.tolist())
            if close >= floor and (wanted is None or catalog[memory_id].category in wanted)
        ]
        ranked.sort(key=lambda pair: pair[1], reverse=True)
        return ranked

    def get(self, memory_id: str) -> Memory:
        """The memory with this id. Raises :class:`MemoryNotFoundError` if there is none, and
        :class:`InvalidInputError` for what cannot be an id (None, a number, a blank)."""
        found = self.get_many([check_memory_id(memory_id)])
        if not found:
            raise MemoryNotFoundError(
                f"user {user_tag(self.user_id)} has no memory with id {memory_id!r}"
            )
        return found[0]

    def get_many(self, memory_ids: Sequence[str]) -> list[Memory]:
        """The memories with these ids; ids that do not exist are skipped.

        Raises:
            InvalidInputError: ``memory_ids`` is one id (a ``str``), not a list of them.
        """
        if isinstance(memory_ids, str):
            raise InvalidInputError("memory_ids must be a list of ids, not one: use get(id)")
        ids = [i for i in memory_ids if isinstance(i, str)]
        return self._open().get(ids) if ids else []

    def get_all(self, category: Category | str | None = None) -> list[Memory]:
        """Every memory (of one category, if given), oldest first (a ``list``, shown as a table
        in Jupyter)."""
        wanted = Category.parse(category) if category is not None else None
        memories = [m for m in self._open().get() if wanted is None or m.category == wanted]
        return MemoryList(sorted(memories, key=lambda m: (m.created_at, m.id)))

    def count(self) -> int:
        return self._open().count()

    def stats(self) -> dict[str, Any]:
        """Counts and configuration: ``total_chunks`` (= ``total_memories``), ``by_category``,
        ``user_id``, ``embedding_model``, ``embedding_dimension``, ``storage``, ``min_score``,
        ``duplicate_threshold``, ``events`` (failures survived) and ``background`` (the write
        queue). A ``dict`` (shown as a table in Jupyter).

        It never raises: a figure that cannot be read now (the storage or the job queue file is
        unavailable) is None, and an ``error`` entry, present only then, says which and why
        (``"memories: StorageError: ..."``, ``"job queue: OperationalError: ..."``, joined by
        ``"; "``). ``events`` and the configuration are always given, and ``background`` keeps
        the counts of this process (``processed``, ``retried``, ``failed``) with ``pending``
        and ``running`` None when the queue file cannot be read.
        """
        errors: list[str] = []
        total: int | None = None
        by_category: dict[str, int] | None = None
        try:
            counted = Counter(m.category.value for m in self._open().get())
        except Exception as exc:  # a diagnostic must answer when the storage is down
            errors.append(f"memories: {_failure(exc)}")
            logger.info("stats(): could not read the memories (%s)", _failure(exc))
        else:
            total = sum(counted.values())
            by_category = {c.value: counted.get(c.value, 0) for c in Category}
        background: dict[str, Any] = {}
        if self._pending is not None:
            try:
                background = dict(self._pending.stats())
            except Exception as exc:
                background = {"pending": None, "running": None, "error": _failure(exc)}
            if "error" in background:  # the queue file could not be read (see JobWorker.stats)
                errors.append(f"job queue: {background.pop('error')}")
        stats: dict[str, Any] = {
            "user_id": self.user_id,
            "total_memories": total,
            "total_chunks": total,
            "by_category": by_category,
            "embedding_model": self.embedder.name,
            "embedding_dimension": self.embedder.dimension,
            "storage": self.storage.location,
            "min_score": self.min_score,
            "duplicate_threshold": self.duplicate_threshold,
            "events": dict(self.counters),
            "background": background,
        }
        if errors:
            stats["error"] = "; ".join(errors)
        return MemoryStats(stats)

    # -- writing -----------------------------------------------------------------------------

    def add(
        self,
        text: str,
        category: Category | str = Category.FACT,
        metadata: Mapping[str, Any] | None = None,
        *,
        source: Source | str = Source.MANUAL,
        keys: Sequence[str] | str | None = None,
    ) -> Memory:
        """Remember ``text`` and return the memory now current: the new memory, the existing
        one it duplicates, or the existing one it superseded. :meth:`remember` also says
        which."""
        return self.remember(text, category, metadata, source=source, keys=keys).memory

    def add_many(
        self,
        items: Iterable[NewMemory | str | Mapping[str, Any]],
        *,
        category: Category | str = Category.FACT,
        source: Source | str = Source.MANUAL,
        said_at: datetime | float | str | None = None,
    ) -> list[Memory]:
        """:meth:`remember_many`, returning only the memories (one per item, in order)."""
        done = self.remember_many(items, category=category, source=source, said_at=said_at)
        return [one.memory for one in done]

    def remember(
        self,
        text: str,
        category: Category | str = Category.FACT,
        metadata: Mapping[str, Any] | None = None,
        *,
        source: Source | str = Source.MANUAL,
        keys: Sequence[str] | str | None = None,
    ) -> Remembered:
        """Remember ``text``, consolidated with the user's memories, and say what happened.

        A new memory that says nothing new (the same wording, or a rewording that keeps every
        number, date, name and negation) is a duplicate: nothing is written. One that changes
        a value of an existing memory ("Dentist appointment on Tuesday" -> "... Thursday")
        supersedes it: that memory gets the new text and keeps the old one in ``history``.
        Anything else is stored as a memory of its own. See :mod:`.consolidation`.

        ``keys`` are topic words, and a question the memory answers, indexed with the text
        (``"diet, food allergy, seafood, What can't I eat at a fish restaurant?"``): searches
        worded like them find the memory (see :mod:`.keys`). They follow the text: a memory
        superseded by this one takes its keys. A duplicate writes nothing, except that a
        memory without keys takes those of a restatement that has some.

        Returns:
            The memory now current and the :class:`Outcome`: ``stored``, ``duplicate`` or
            ``superseded``.
        """
        item = NewMemory(text, category, metadata, keys=keys)
        return self.remember_many([item], source=source)[0]

    def remember_many(
        self,
        items: Iterable[NewMemory | str | Mapping[str, Any]],
        *,
        category: Category | str = Category.FACT,
        source: Source | str = Source.MANUAL,
        said_at: datetime | float | str | None = None,
    ) -> list[Remembered]:
        """Remember several memories with one embedding batch and one write.

        Each item is a :class:`NewMemory`, a plain text (of ``category``, default ``fact``) or
        a mapping with ``text`` and optional ``category`` (default ``category``), ``metadata``,
        ``replaces`` and ``keys``. Every item is
        checked before anything is written: one bad item raises and nothing is stored. Items
        are consolidated in order, with the stored memories and with the earlier items of
        the batch (see :meth:`remember`); an item that ``replaces`` a memory supersedes it in
        its place too (the items before it are judged against the memory's old text, those
        after it against its new one), as if no one else wrote meanwhile: every store of the
        user in the process waits for the others, and processes sharing a Chroma server settle
        what they wrote at the same moment (docs/reliability.md, section 5).

        ``said_at`` (a datetime, ISO 8601 text or POSIX timestamp) is when the items were said, for
        memories written later than that (a background extraction retried after the user's
        next turn was stored): they are dated then, and one that would update a memory changed
        since is outdated, a :attr:`~Outcome.DUPLICATE` ("Lives in Boston", said before "I
        moved to Denver", never replaces "Lives in Denver").

        Returns:
            One :class:`Remembered` per item, in order.
        """
        default = Category.parse(category)
        said = check_said_at(said_at)
        if isinstance(items, (str, bytes, Mapping, NewMemory)):  # one item: not a list of them
            raise InvalidInputError(
                f"remember_many and add_many take a list of memories, got one "
                f"{type(items).__name__}: pass [item], or use remember / add"
            )
        if not isinstance(items, Iterable):
            raise InvalidInputError(
                f"remember_many and add_many take a list of memories, got {type(items).__name__}"
            )
        parsed = [self._parse_item(item, default) for item in items]
        drafts = [
            # a microsecond apart: one batch's memories keep their order (get_all: oldest first)
            self._draft(item, Source.parse(source), said and said + timedelta(microseconds=index))
            for index, item in enumerate(parsed)
        ]
        if not drafts:
            return []
        vectors, _ = self._embed_opening(lambda: self._vectors(drafts))
        wanted = [wording_id(self.user_id, d.text) for d in drafts]
        replaces = {index: item.replaces for index, item in enumerate(parsed) if item.replaces}
        return self._remember(
            drafts, vectors, wanted, replaces, imported=False, dated=said is not None
        )

    def put(
        self,
        memory_id: str,
        text: str,
        category: Category | str = Category.FACT,
        metadata: Mapping[str, Any] | None = None,
        *,
        source: Source | str = Source.MANUAL,
        keys: Sequence[str] | str | None = None,
        keep_history: bool = True,
    ) -> Memory:
        """Store ``text`` under an id the caller chose (a key-value store's key): create the
        memory, or replace the one with that id (its old text kept in ``history`` unless
        ``keep_history`` is False, its metadata replaced). No consolidation: a key is kept even
        if another memory says the same. Without history the old text can no longer be read
        (``get``, ``export``); it stays in an embedded folder's files until the memory is
        deleted, which erases every version (rewriting the file on each put would cost a
        ``VACUUM``).

        Raises:
            InvalidInputError: ``memory_id`` is not 1-256 printable characters, or the text,
                category or metadata is invalid.
        """
        memory_id = check_memory_id(memory_id)
        draft = replace(
            self._draft(NewMemory(text, category, metadata, keys=keys), Source.parse(source)),
            id=memory_id,
        )
        vector = self._vectors([draft])
        collection = self._open(vector.shape[1])
        with self._write_lock:
            existing = collection.get([memory_id])
            if existing:
                return self._rewrite(
                    existing[0],
                    draft.text,
                    draft.category,
                    draft.metadata,
                    draft.keys,
                    vector,
                    keep_history=keep_history,
                    instead=draft,  # deleted meanwhile: the key is created afresh
                )
            collection.upsert([draft], vector)
            return draft

    def update(
        self,
        memory_id: str,
        text: str,
        *,
        category: Category | str | None = None,
        metadata: Mapping[str, Any] | None = None,
        keys: Sequence[str] | str | None = None,
    ) -> Memory:
        """Replace a memory's text (and optionally category or metadata), keeping the old
        text in ``history``. Search then finds the new text, never the old one. The keys
        follow the text: the memory keeps its keys only if the text stays the same and no
        ``keys`` are given."""
        check_memory_id(memory_id)
        text = clean_text(text)
        new_category = Category.parse(category) if category is not None else None
        new_metadata = clean_metadata(metadata) if metadata is not None else None
        new_keys = clean_keys(keys)
        vector = memory_vectors(self._embed, [(text, new_keys)])  # before the lock, as a rule
        with self._write_lock:
            old = self.get(memory_id)
            if keys is None and text == old.text and old.keys:  # only category or metadata
                new_keys = old.keys
                vector = memory_vectors(self._embed, [(text, new_keys)])
            return self._rewrite(old, text, new_category, new_metadata, new_keys, vector)

    def _rewrite(
        self,
        old: Memory,
        text: str,
        category: Category | None,
        metadata: Mapping[str, Any] | None,
        keys: tuple[str, ...],
        vector: Vectors,
        *,
        keep_history: bool = True,
        at: datetime | None = None,
        instead: Memory | None = None,
    ) -> Memory:
        """``old`` rewritten (see :func:`.write_path.rewritten`). If another process deleted it
        since it was read (a server's memories), the delete wins: the new version is not
        stored, ``instead`` is stored as a new memory and returned, and without it
        :class:`MemoryNotFoundError` is raised (see :func:`.write_path.write_unless_deleted`)."""
        updated = rewritten(old, text, category, metadata, keys, keep_history=keep_history, at=at)
        if updated is old:
            return old  # nothing changes: replaying a supersede is harmless
        gone = write_unless_deleted(
            self._open(), [updated], vector.reshape(1, -1), {old.id}, lambda _: instead
        )
        if old.id not in gone:
            return updated
        if instead is None:
            raise MemoryNotFoundError(
                f"user {user_tag(self.user_id)} has no memory with id {old.id!r} (it was "
                "deleted meanwhile)"
            )
        return instead

    def supersede(
        self, old_id: str, new_text: str, category: Category | str | None = None
    ) -> Memory:
        """Record that ``new_text`` replaces memory ``old_id`` ("moved to SF" replaces
        "lives in NY"): the same as :meth:`update`, named for intent."""
        return self.update(old_id, new_text, category=category)

    def delete(self, memory_id: str) -> None:
        """Forget one memory, and erase its text (with its earlier versions), its id and its
        vector from an embedded folder's files (docs/reliability.md, section 6). Raises
        :class:`MemoryNotFoundError` if there is none."""
        check_memory_id(memory_id)
        with self._write_lock:
            self.get(memory_id)
            self._open().delete([memory_id])

    def clear(self) -> int:
        """Forget every memory of this user, their text erased from an embedded folder's
        files; return how many there were. Background work already queued still runs (see
        :meth:`forget_user`)."""
        with self._write_lock:
            with self._cache_lock:
                self._query_cache.clear()
            return self.storage.drop(self.user_id)

    def forget_user(self, timeout: float | None = 30.0) -> int:
        """Forget everything kept about this user: their queued background work (turns
        waiting to be stored or extracted, in the job queue of the wrappers), then every
        memory, with the text erased from the files of an embedded folder and of the job queue.
        Returns how many memories there were.

        A store without a wrapper clears the job queue the wrappers use by default for its
        storage (beside an embedded folder's memories, else in ``~/.headroom-memory``): turns
        left there by a wrapper, maybe of a process that has exited. A queue given its own
        ``queue_path`` is cleared through a wrapper using it. While another connection keeps
        the queue's write-ahead log, the jobs' text stays in it until it can be erased: by the
        wrapper's worker as soon as it can, or, with no wrapper here, at the next checkpoint
        (after 2 s of trying, a warning is logged; docs/reliability.md, section 6).

        Args:
            timeout: Seconds to wait for background work of this user that is running now.

        Raises:
            StorageError: that work did not finish in time, or the storage failed. No memory
                was deleted yet then; the user's queued work (held in this process or in the
                queue file) may be, as asked. Call again to finish.
        """
        timeout = _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._pending is None:  # a plain store: turns a wrapper left queued for this user
            from .writer import forget_queued

            forget_queued(self, timeout)
        while True:
            pending = self._pending
            if pending is not None:  # a running job stores under the write lock: wait outside it
                pending.forget(self, None if deadline is None else deadline - time.monotonic())
            with self._write_lock:
                if pending is not None:
                    try:  # what was queued meanwhile; a job that started meanwhile waits for us
                        pending.forget(self, 0)
                    except StorageError:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise
                        logger.debug(
                            "a background job of user %s started while forgetting them; "
                            "waiting for it, then forgetting again",
                            user_tag(self.user_id),
                        )
                        continue  # let it finish (outside the lock), then forget again
                with self._cache_lock:
                    self._query_cache.clear()
                return self.storage.drop(self.user_id, erase=True)

    def attach_writer(self, pending: PendingWrites) -> None:
        """Let :meth:`flush` wait for ``pending``'s background writes (the wrappers do this)."""
        self._pending = pending

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until this user's background work is done (with the wrappers, memories are
        stored and extracted off the caller's path) and in Chroma: an embedded folder stores
        small writes in Chroma just after they return (they are journaled first, see
        :mod:`.storage.deferred`). Other users' work in the same job queue is not waited for.

        Returns:
            True once everything is written; False if ``timeout`` seconds passed first, or if
            the job queue or the storage failed (an unwritable folder, a server down): that is
            logged at WARNING and counted in ``stats()["events"]["flush_failures"]``, and the
            work stays queued.

        Raises:
            InvalidInputError: ``timeout`` is not None or a number of seconds, 0 or more.
        """
        timeout = _check_timeout(timeout)
        start = time.monotonic()
        try:
            pending = self._pending
            done = pending.flush(timeout, user_id=self.user_id) if pending is not None else True
            if done:
                left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
                done = self.storage.settle(left)
        except Exception:
            self.survived(
                "flush_failures", "could not wait for the background writes; they stay queued"
            )
            return False
        return done

    def close(self, timeout: float | None = 5.0) -> bool:
        """Finish background writes (waiting up to ``timeout`` seconds) and stop serving this
        store's background work; what is left stays queued for the next process. Returns True
        if everything was written; False if not, also when the job queue failed (logged at
        WARNING and counted in ``stats()["events"]["flush_failures"]``). Searching and adding
        directly still work afterwards.

        Raises:
            InvalidInputError: ``timeout`` is not None or a number of seconds, 0 or more.
        """
        timeout = _check_timeout(timeout)
        pending, self._pending = self._pending, None
        if pending is None:
            return True
        try:
            return pending.detach(self, timeout)
        except Exception:
            self.survived(
                "flush_failures",
                "could not finish the background writes while closing; they stay queued",
            )
            return False

    def survived(self, counter: str, message: str, *, exc_info: bool = True) -> None:
        """Count (``stats()["events"][counter]``) and log a failure of memory that a call
        survived: the wrappers' searches and stores, the adapters' tools and retriever, a
        flush or close whose work stays queued. The log names the user by a tag, never by id;
        ``exc_info`` adds the traceback of the exception being handled. Each kind of failure
        (``counter``) is logged at most once per :data:`SURVIVED_LOG_SECONDS` for the store;
        the failures in between are counted, and the next log line says how many there were
        (storage that is down fails every chat call: a traceback per call flooded the logs)."""
        now = time.monotonic()
        with self._log_lock:
            self.counters[counter] += 1
            last, unlogged = self._logged.get(counter, (-math.inf, 0))
            if now - last < SURVIVED_LOG_SECONDS:
                self._logged[counter] = (last, unlogged + 1)
                return
            self._logged[counter] = (now, 0)
        since = f"; {unlogged} more since the last such log" if unlogged else ""
        logger.warning("%s (user %s)%s", message, user_tag(self.user_id), since, exc_info=exc_info)

    def retry_failed(self) -> int:
        """Queue again the background jobs that failed for good (bad request, malformed
        answers past the retry limit); return how many."""
        return self._pending.retry_failed() if self._pending is not None else 0

    # -- export / import ---------------------------------------------------------------------

    def export(self, destination: str | os.PathLike[str] | IO[str] | None = None) -> str | int:
        """Write every memory as JSON Lines.

        Returns:
            The text, if ``destination`` is None; else how many memories were written to the
            file path or text stream.
        """
        if not (
            destination is None
            or isinstance(destination, (str, os.PathLike))
            or callable(getattr(destination, "writelines", None))
        ):
            raise InvalidInputError(
                "export writes to None (returns the text), a file path or a text stream, "
                f"got {type(destination).__name__}"
            )
        lines = [json.dumps(m.to_dict(), ensure_ascii=False) + "\n" for m in self.get_all()]
        if destination is None:
            return "".join(lines)
        if isinstance(destination, (str, os.PathLike)):
            Path(destination).write_text("".join(lines), encoding="utf-8")
        else:
            destination.writelines(lines)
        return len(lines)

    def import_(
        self,
        source: str | os.PathLike[str] | IO[str] | Iterable[str],
        *,
        consolidate: bool = True,
    ) -> int:
        """Load memories written by :meth:`export` (a path, stream or lines) into this user,
        consolidated with the memories stored here like new ones (see
        :meth:`import_with_outcomes`); with ``consolidate=False``, each as it is, by its id.

        Ids, times (in UTC; a time still to come is taken as now), sources, metadata and
        history (oldest first) are kept; the user is always this store's, whatever the file
        says. Importing the same file twice changes nothing. Every line is checked first: one
        bad line raises (naming the line) and nothing is written. A memory or history entry
        of only invisible format characters (a lone zero-width space, which earlier versions
        stored) is skipped, with a warning logged that counts them.

        Returns:
            How many memories the file held: each is now stored, or was merged into a stored
            memory, or was already known. :meth:`import_with_outcomes` says which.
        """
        return len(self.import_with_outcomes(source, consolidate=consolidate))

    def import_with_outcomes(
        self,
        source: str | os.PathLike[str] | IO[str] | Iterable[str],
        *,
        consolidate: bool = True,
    ) -> list[Remembered]:
        """:meth:`import_`, saying what became of each memory of the file, in order.

        With ``consolidate=False`` (a backup restored, a user's memories moved or re-embedded,
        items of a key-value store such as LangChain's ``HeadroomStore``, which ``put`` keeps
        apart even when they say the same), each memory is written as it is, under its id: one
        whose id a memory updated as late or later holds here is ``duplicate``; one an older
        memory holds supersedes it (the old text joins its history); any other is ``stored``.
        No two memories of different ids are merged.

        Else each exported memory is consolidated with the stored memories and the file's
        earlier lines, as :meth:`remember_many` does, as of its own ``updated_at`` (two items
        a ``put`` kept apart may merge):

        - ``duplicate``: it says nothing new (nothing is written); also when it would update a
          stored memory that is newer than it (the store already knows better).
        - ``superseded``: it updates an older stored memory, which takes its text (the old text
          and the imported memory's own history join that memory's ``history``).
        - ``stored``: it is new here, and is stored with its id, times and history.

        A memory of this store that holds the id of a line is another version of the same
        memory if the id is the one this library made for it (of the user and the line's
        first text, the oldest in its ``history``), or the two share a text: the line is
        ``duplicate`` (outdated) if that memory was updated as late or later (or, dated later
        than now, replaced the line's text), and else ``superseded`` (the memory takes its
        text): an old backup imported again never makes a text superseded since current
        again. Any other line holding a stored memory's id (ids of another system, "m1") is a
        memory of its own, stored under a fresh id.

        Raises:
            InvalidInputError: A line is not an exported memory (nothing was written).
            StorageError: The storage failed (nothing was written).
        """
        memories = self._read_export(source)
        if not memories:
            return []
        vectors = self._vectors(memories)
        if not consolidate:
            return self._restore(memories, vectors)
        drafts = [replace(m, id=uuid.uuid4().hex) for m in memories]  # placeholders
        return self._remember(drafts, vectors, [m.id for m in memories], {}, imported=True)

    def _read_export(
        self, source: str | os.PathLike[str] | IO[str] | Iterable[str]
    ) -> list[Memory]:
        """Every memory of an export, each line checked (one bad line raises). A memory or
        history entry of only invisible format characters, which earlier versions stored, is
        skipped and logged at WARNING."""
        memories = []
        skipped = _SkippedInvisible()
        with contextlib.ExitStack() as stack:
            lines: Iterable[str] = source  # type: ignore[assignment]
            if not isinstance(source, (str, os.PathLike, Iterable)):
                raise InvalidInputError(
                    "import reads a file path, a text stream or lines of text, got "
                    f"{type(source).__name__}"
                )
            if isinstance(source, (str, os.PathLike)):
                lines = stack.enter_context(open(source, encoding="utf-8"))
            if isinstance(lines, io.TextIOBase):  # a file: read no more than a line's limit
                lines = _bounded_lines(lines)
            elif isinstance(lines, (io.BufferedIOBase, io.RawIOBase)):  # gzip.open(path), ...
                lines = _bounded_byte_lines(lines)
            try:
                for number, line in enumerate(lines, start=1):
                    if isinstance(line, (bytes, bytearray)):
                        line = bytes(line).decode("utf-8")  # not UTF-8: refused below
                    if not isinstance(line, str):
                        raise InvalidInputError(
                            f"line {number} is a {type(line).__name__}, not text: import takes "
                            "the JSON Lines that export() writes (open a file in text mode)"
                        )
                    if number == 1:  # Windows editors and PowerShell 5 begin with a BOM
                        line = line.removeprefix(_BYTE_ORDER_MARK)
                    if len(line) > MAX_IMPORT_LINE_CHARS:
                        raise InvalidInputError(
                            f"line {number} is longer than {MAX_IMPORT_LINE_CHARS} characters: "
                            "not a line written by export()"
                        )
                    if line.strip():
                        memory = self._from_export(line, number, skipped)
                        if memory is not None:
                            memories.append(memory)
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    f"not a UTF-8 text file (an undecodable byte at offset {exc.start}): "
                    "import takes the JSON Lines that export() writes"
                ) from exc
        if skipped.lines or skipped.history:
            lines_said = ", ".join(map(str, skipped.lines[:10])) + (
                ", ..." if len(skipped.lines) > 10 else ""
            )
            logger.warning(
                "import skipped what holds only invisible format characters, such as a lone "
                "zero-width space (nothing to see or search; earlier versions stored it): "
                "%d memories (lines %s) and %d history entries",
                len(skipped.lines),
                lines_said or "none",
                skipped.history,
            )
        return memories

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _parse_item(
        item: NewMemory | str | Mapping[str, Any], category: Category = Category.FACT
    ) -> NewMemory:
        if isinstance(item, str):
            item = NewMemory(item, category)
        elif isinstance(item, Mapping):
            unknown = set(item) - {"text", "category", "metadata", "replaces", "keys"}
            if unknown or "text" not in item:
                raise InvalidInputError(
                    "a memory mapping takes 'text' and optional 'category', 'metadata', "
                    f"'replaces' and 'keys'; got {sorted(item)}"
                )
            item = NewMemory(**{"category": category, **item})
        elif not isinstance(item, NewMemory):
            raise InvalidInputError(f"cannot make a memory from {type(item).__name__}")
        if item.replaces is not None and not isinstance(item.replaces, str):
            raise InvalidInputError(f"replaces must be a memory id string, got {item.replaces!r}")
        return item

    def _draft(self, item: NewMemory, source: Source, said_at: datetime | None = None) -> Memory:
        now = said_at or utc_now()
        return Memory(
            id=uuid.uuid4().hex,
            user_id=self.user_id,
            text=clean_text(item.text),
            category=Category.parse(item.category),
            created_at=now,
            updated_at=now,
            source=source,
            metadata=clean_metadata(item.metadata),
            keys=clean_keys(item.keys),
        )

    def _from_export(self, line: str, number: int, skipped: _SkippedInvisible) -> Memory | None:
        """The memory of an export's line; None for one of invisible text (counted in
        ``skipped``, as are history entries of invisible text, which are left out)."""
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise InvalidInputError("not a JSON object")
            if _invisible_only(data):
                skipped.lines.append(number)
                return None
            now = utc_now()  # a time to come is now: a memory dated in 2100 would outdate
            # every correction said before then (a dated write older than it is a duplicate)
            created = min(_exported_time(data, "created_at", now), now)
            updated = min(_exported_time(data, "updated_at", created), now)
            history = data.get("history")
            if history is not None and not isinstance(history, list):
                raise InvalidInputError(f"history must be a list, got {type(history).__name__}")
            kept = [r for r in history or () if not (isinstance(r, Mapping) and _invisible_only(r))]
            skipped.history += len(history or ()) - len(kept)
            revisions = [_imported_revision(r, updated) for r in kept]
            return Memory(
                id=check_memory_id(data["id"]),
                user_id=self.user_id,
                text=clean_text(data["text"]),
                category=Category.parse(data.get("category", "fact")),
                created_at=min(created, updated),  # never updated before it was made
                updated_at=updated,
                source=Source.parse(data.get("source", "manual")),
                metadata=clean_metadata(data.get("metadata")),
                history=tuple(sorted(revisions, key=lambda r: r.replaced_at)),  # oldest first
                keys=clean_keys(data.get("keys")),
            )
        except RecursionError as exc:  # json.loads on deeply nested brackets
            raise InvalidInputError(f"line {number}: nested too deeply") from exc
        except (InvalidInputError, KeyError, TypeError, ValueError) as exc:
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            if isinstance(exc, KeyError):
                message = f"missing field {message!r}"
            raise InvalidInputError(f"line {number}: {message}") from exc

    def _repr_html_(self) -> str:
        return store_html(self)

    def __repr__(self) -> str:
        return (
            f"MemoryStore(user_id={self.user_id!r}, storage={self.storage.location!r}, "
            f"embedder={self.embedder.name!r})"
        )
