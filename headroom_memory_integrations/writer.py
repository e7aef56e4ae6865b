"""Memory work done off the caller's path, durably: storing memories the model wrote inline,
and extracting memories from a turn with a separate call.

Each piece of work is a row in a SQLite job queue (:mod:`.jobs`) before the chat call returns,
so a crash or a kill loses nothing: the next process that opens the same memories resumes it.
Handlers are idempotent (storing the same memories twice stores them once), so a job cut short
and run again has its effect exactly once.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import itertools
import math
import os
import re
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from .embeddings.base import Embedder
from .embeddings.local import LocalEmbedder
from .engine import SURVIVED_LOG_SECONDS, MemoryStore, NewMemory, has_visible_text
from .errors import (
    EmbeddingError,
    EmbeddingMismatchError,
    HeadroomMemoryError,
    InvalidInputError,
    StorageError,
)
from .flow import READ_YOUR_WRITES_SECONDS
from .grounding import grounded
from .jobs import (
    DEFAULT_BACKOFF,
    HOLDS_THE_LINE_TRIES,
    Backoff,
    Job,
    JobQueue,
    JobWorker,
    PartlyDone,
    PermanentJobError,
    QueueBusy,
    renumbered,
    user_tag,
    wait_until,
)
from .late_embeddings import LateEmbeddings
from .prompts import (
    background_extraction_messages,
    field_value,
    message_text,
    parse_extraction_json,
    replaced_ids,
    short_ids,
)
from .redaction import logger_without_secrets
from .storage.base import Storage
from .storage.closing import when_closed
from .storage.folder import folder_identity, make_private_folder
from .storage.guard import MAX_RETRY_SECONDS, run_for_at_most, when_back
from .types import Memory, Source

log = logger_without_secrets("headroom_memory_integrations")


QUEUE_WAIT_SECONDS = 0.25
"""The longest a chat call waits to put its memory work (an inline block's memories, a turn
to extract from) into the job queue file, usually well under a millisecond. When the file
stays busy longer (another process holds its write lock: one frozen mid-transaction), the
work is handed to a thread that puts it there as soon as it can (:data:`HANDED_OVER`), in
order, and the call goes on at once."""

HANDED_OVER = 1_000
"""Pieces of memory work held in this process, at most, while the job queue file cannot be
written; past it, new work is dropped (counted as ``store_failures`` and logged). Work held
here is lost if the process is killed before the file can be written again; at exit it is
waited for up to :data:`HAND_OVER_AT_EXIT` seconds."""

HAND_OVER_TRY_SECONDS = 1.0
"""The longest one try of the hand-over thread waits for the queue file (then it pauses and
tries again): it never holds the queue for a whole busy timeout, which closing it waits for."""

HAND_OVER_AT_EXIT = 5.0
"""Seconds the exit waits for work held by :data:`HANDED_OVER` to reach the file."""

QUEUED_EXTRACTIONS = 10_000
"""Extraction jobs queued by this process whose extractor it keeps, at most, until each is done
(it runs with the extractor of the wrapper that queued it, even if that wrapper was let go of
meanwhile; one dead-lettered keeps it until ``retry_failed()`` runs it or ``forget()``
deletes it), or until the file no longer holds it (another process ran it: see
:data:`KEPT_FOR_JOBS_CHECKED_EVERY`). Past it, the oldest are let go of; such a job runs with
its user's current extractor, or another of the same destination (see
``MemoryWriter._extractor_for``)."""

QUEUED_EMBEDDERS = 10_000
"""Jobs queued by this process whose store's embedder it keeps, at most, until each is done
here or the file no longer holds it (another process ran it: see
:data:`KEPT_FOR_JOBS_CHECKED_EVERY`). It runs with that embedder, even if its wrapper was let
go of meanwhile; past it, the oldest are let go of, and such a job runs with an embedder of
the same identity, or waits for one: see ``MemoryWriter._store_for``."""

KEPT_FOR_JOBS_CHECKED_EVERY = 60.0
"""Seconds between two checks, on a worker's thread after a job, of which jobs whose
extractor or embedder this process keeps (:data:`QUEUED_EXTRACTIONS`,
:data:`QUEUED_EMBEDDERS`) are still in the file: those another process ran are let go of,
and with them what was kept for them (an application making a client and an embedder per
request kept up to 10,000 of each, and their connections, for jobs done elsewhere)."""

HELD_AFTER_TRIES = 2
"""Tries after which a user's failing store job is not waited for by ``settle`` (nor the
user's later store jobs, which wait behind it) while it waits out its backoff, however soon
its retry is due: it failed again on a retry, so its next try most likely fails too (storage
or an embedder that is down), and a call that waited for that try waited up to its whole
read-your-writes second for nothing, once per retry, for as long as the outage lasted. A job
that failed once is waited for if its retry is due within the wait: a single passing failure
keeps read-your-writes."""

MAX_MALFORMED_ATTEMPTS = 5
"""How many malformed answers (not valid JSON) an extraction gets: the fifth dead-letters the
job (kept in the queue file; ``memory.retry_failed()`` runs it again, with a count of its own).
Transient errors (429, 5xx, timeouts) are not counted, and one between two malformed answers
does not restart the count, so a model that keeps answering badly stops after 5 of them however
its errors interleave. The count is kept in the job's ``last_error`` (the queue file has no
column for it, and older processes share the file): each malformed answer's error is numbered,
"malformed extraction answer (2 of 5): ...", and a transient error after one is raised as
:class:`AfterMalformed`, whose message starts with the number so far. Any other failure (no
extractor in this process yet) starts the count again."""

_MALFORMED_COUNT = re.compile(r"\w+: malformed extraction answer \((\d+) of \d+\)")


Complete = Callable[[list[dict[str, str]], str | None], str]
"""Asks a chat model for an answer: ``complete(messages, model) -> text``. ``messages`` are
``{"role", "content"}`` dicts; ``model`` is the extraction model's name when one was chosen or the
request named one (a framework's model object may ignore it)."""


EXTRACTION_THREADS = 4
"""Background extractions of different users run side by side on up to this many threads per
job queue (each mostly waits for the model's answer); one user's run one at a time, in order.
The threads beyond the first start only while another user's extraction waits."""


EXTRACTION_CALL_TIMEOUT = 120.0
"""Longest wait, in seconds, for one extraction call's answer, whatever the model object: a
LangChain or LlamaIndex model may have no timeout of its own, and a stalled call would hold its
user's extractions (and ``flush()``) for ever. Past it the try is given up and retried with
backoff; the call is left to finish on a thread of its own, its answer unused. The OpenAI
wrappers bound each try sooner (``openai.EXTRACTION_TIMEOUT``)."""

STOP_WAIT_SECONDS = 5.0
"""The longest closing a storage waits for the threads of its job queue's workers to stop
(their jobs are not waited for: a job under way that outlasts it ends on its own, and the
queue file is closed then)."""

_ERASE_PATIENCE = 2.0
"""Seconds a plain store's ``forget_user`` (no writer in this process, so no worker to try again
later) keeps trying to erase the queue's WAL while another connection keeps part of it."""


WAITING_WITH_OTHERS = "beside other memory work waiting for the locked queue file"
"""Why work held behind (or with) work that found the queue file locked is not queued."""


@dataclass(eq=False)
class _Handed:
    """Memory work the caller could not put into the queue file in time: held in memory,
    in order, until the writer's hand-over thread has put it there. While it is held, it is
    its user's unsettled work (``settle`` waits for it, boundedly)."""

    kind: str
    memory: MemoryStore
    payload: dict[str, Any]
    created_at: float
    extractor: BackgroundExtractor | None
    forgotten: bool = field(default=False)
    # whether one try of QUEUE_WAIT_SECONDS found the file locked: from then on it waits for
    # the file; until then, a file that cannot be written at all drops it (as a caller's try)
    tried: bool = field(default=False)
    # whether it was counted as a queue delay and logged: once, when it is first held for a
    # locked file, by its own try or behind earlier work that waits for the file
    delayed: bool = field(default=False)


def _on_event_loop() -> bool:
    """Whether this thread runs an asyncio event loop (file I/O here would freeze it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ExtractionTimeout(TimeoutError):
    """An extraction call gave no answer within :data:`EXTRACTION_CALL_TIMEOUT` (retried)."""


def _answer_within(complete: Complete, messages: list[dict[str, str]], model: str | None) -> str:
    """``complete(messages, model)``, or :class:`ExtractionTimeout` once
    :data:`EXTRACTION_CALL_TIMEOUT` has passed (the call goes on, abandoned, on a daemon
    thread: Python cannot stop it). The call runs outside any context of the caller's, as it
    did on the worker's thread."""
    answers: list[str | None] = []
    caller, failure = run_for_at_most(
        lambda: answers.append(complete(messages, model)),
        EXTRACTION_CALL_TIMEOUT,
        "headroom-memory extraction call",
    )
    if caller.is_alive():
        raise ExtractionTimeout(
            f"the extraction call gave no answer in {EXTRACTION_CALL_TIMEOUT:g} s; "
            "it will be tried again"
        )
    if failure:
        raise failure[0]
    return str(answers[0]) if answers[0] is not None else ""


class ExtractionCutOff(PermanentJobError):
    """The extraction answer was cut off at the model's output limit (``finish_reason``
    "length", or another name of it: :func:`is_cut_off`). Asking again the same way gets the
    same cut answer, and the memories of a cut list may lack an entry's ``replaces`` (a
    corrected fact would come back beside its correction), so nothing of it is stored: the job
    is dead-lettered at once, logged at WARNING with its user's tag and counted in
    ``stats()["background"]["failed"]`` (``retry_failed()`` runs it again)."""

    @classmethod
    def of(cls, model: str, reason: str) -> ExtractionCutOff:
        """The error for an extraction answer of ``model`` that stopped for ``reason``."""
        return cls(
            f"the extraction answer of {model} was cut off at the model's output limit "
            f"(stop reason {reason!r}); nothing of it is stored"
        )


CUT_OFF_REASONS = frozenset({"length", "max_tokens", "max_output_tokens"})
"""The stop reasons (in any case) that say an answer was cut off at the model's output limit:
"length" (the ``finish_reason`` of OpenAI and the servers that copy its API, Ollama's
``done_reason``), "max_tokens" (Anthropic's ``stop_reason``, Bedrock's ``stopReason``,
Gemini's ``finish_reason`` "MAX_TOKENS"), "max_output_tokens" (the reason of an OpenAI
Responses API answer left ``incomplete``)."""


STOP_REASON_KEYS = ("finish_reason", "stop_reason", "stopReason", "done_reason")
"""Where an answer says why it stopped, in the fields a framework passes on from its provider
(LangChain's ``response_metadata``, LlamaIndex's ``raw`` response; neither has a standard one):
OpenAI, Groq, Mistral and Gemini ``finish_reason``, Anthropic ``stop_reason``, Bedrock
Converse ``stopReason``, Ollama ``done_reason``."""


def is_cut_off(reason: object) -> TypeGuard[str]:
    """Whether a model's stop reason (whatever its provider calls it) says the answer was cut
    off at the model's output limit (:data:`CUT_OFF_REASONS`)."""
    return isinstance(reason, str) and reason.lower() in CUT_OFF_REASONS


def stop_reason(*places: object) -> Any:
    """Why an answer stopped, as its provider said it (None when it says nothing), read from
    ``places`` (mappings or objects; None for a place the answer lacks), in the order given:
    the first :data:`STOP_REASON_KEYS` field one of them has, else the reason of an OpenAI
    Responses API answer left incomplete (a place's ``incomplete_details``). Pass it whatever
    a framework hands on from the provider (see :data:`STOP_REASON_KEYS`); check the reason
    with :func:`is_cut_off`."""
    present = [place for place in places if place is not None]
    for place in present:
        for key in STOP_REASON_KEYS:
            if (reason := field_value(place, key)) is not None:
                return reason
    for place in present:
        if (incomplete := field_value(place, "incomplete_details")) is not None:
            return field_value(incomplete, "reason")
    return None


class AfterMalformed(Exception):
    """A transient error of an extraction whose last answer was malformed: retried as that
    error is, with a message that keeps the count of malformed answers
    (:data:`MAX_MALFORMED_ATTEMPTS`)."""

    def __init__(self, malformed: int, error: BaseException) -> None:
        super().__init__(
            f"{_malformed(malformed)} before this; then {type(error).__name__}: {error}"
        )
        self.status_code = getattr(error, "status_code", None)  # as retryable() reads it


def _malformed(count: int) -> str:
    return f"malformed extraction answer ({count} of {MAX_MALFORMED_ATTEMPTS})"


def _malformed_so_far(job: Job) -> int:
    """Malformed answers the job has had (see :data:`MAX_MALFORMED_ATTEMPTS`): 0 on its first
    start, or the first after ``retry_failed()`` (which resets ``attempts``)."""
    found = _MALFORMED_COUNT.match(job.last_error or "") if job.attempts > 1 else None
    return int(found.group(1)) if found else 0


class BackgroundExtractor:
    """Makes the separate extraction call of the background mode, with any chat model.

    Args:
        complete: The call to the model (see :data:`Complete`); the OpenAI wrappers, LangChain
            and LlamaIndex adapters each pass their own.
        model: The extraction model's name, if the caller chose one.
        destination: A fingerprint of where its calls go (endpoint, credentials, model), if
            known: a job left without its own extractor (by an earlier process, say) runs
            only with an extractor of its user or one of the same destination, never through
            another tenant's client (see :meth:`MemoryWriter._extractor_for`). A callable
            gives it each time it is read (a client whose key or URL can change: a job queued
            before a change keeps the fingerprint it was queued with; its user's extractor
            still runs it).
    """

    def __init__(
        self,
        complete: Complete,
        model: str | None = None,
        *,
        usable: Callable[[], bool] | None = None,
        destination: str | Callable[[], str | None] | None = None,
    ) -> None:
        self.complete = complete
        self.model = model
        self._usable = usable
        self._destination = destination

    @property
    def destination(self) -> str | None:
        """Where its calls go now (see the ``destination`` argument), or None if unknown."""
        where = self._destination
        if not callable(where):
            return where
        try:
            found = where()
        except Exception:
            return None
        return found if isinstance(found, str) else None

    @property
    def usable(self) -> bool:
        """Whether it can still make calls (False once the client it calls is closed)."""
        try:
            return self._usable is None or bool(self._usable())
        except Exception:
            return True

    def __call__(self, memory: MemoryStore, job: Job) -> list[NewMemory]:
        injected: Mapping[str, str] = job.payload.get("injected") or {}
        untrusted = bool(job.payload.get("untrusted"))
        known = {m.id: m for m in memory.get_many(list(injected.values()))}
        existing = [(label, known[i]) for label, i in injected.items() if i in known]
        labels = dict(injected)
        if not untrusted:  # (its "replaces" is not followed: nothing to show it for)
            nearby = _nearby(memory, job.payload["exchange"], exclude=known)
            for label, found in zip(short_ids(len(labels) + len(nearby))[len(labels) :], nearby):
                labels[label] = found.id
                existing.append((label, found))
        messages = background_extraction_messages(job.payload["exchange"], existing)
        malformed = _malformed_so_far(job)
        try:
            answer = _answer_within(self.complete, messages, self.model or job.payload.get("model"))
        except Exception as exc:
            if isinstance(exc, ExtractionTimeout):
                memory.counters["extraction_timeouts"] += 1
            if malformed and retryable(exc):  # retried with backoff, the count kept
                raise AfterMalformed(malformed, exc) from exc
            raise
        result = parse_extraction_json(answer or "")
        if result.dropped:
            memory.counters["dropped_entries"] += result.dropped
        if result.malformed:
            memory.counters["malformed_extractions"] += 1
            message = f"{_malformed(malformed + 1)}: {result.problem}"
            if malformed + 1 >= MAX_MALFORMED_ATTEMPTS:
                raise PermanentJobError(message)
            raise ValueError(message)  # retried with backoff
        memories = list(result.memories)
        if untrusted:  # (its "replaces" not followed, its keys not kept: grounding.py)
            said = _user_said(job.payload["exchange"])
            kept = [m for m in memories if grounded(m.text, said)]
            memory.counters["ungrounded_memories"] += len(memories) - len(kept)
            memories = kept
        replaces = replaced_ids(memories, {} if untrusted else labels)
        return [
            NewMemory(m.text, m.category, replaces=r, keys=() if untrusted else m.keys)
            for m, r in zip(memories, replaces)
        ]


def _store_payload(items: Sequence[NewMemory]) -> dict[str, Any]:
    """A store job's payload holding an extraction's memories (as an inline block's are)."""
    memories = []
    for m in items:
        item: dict[str, Any] = {"text": m.text, "category": str(m.category), "replaces": m.replaces}
        if m.keys:
            item["keys"] = m.keys if isinstance(m.keys, str) else list(m.keys)
        if m.metadata:
            item["metadata"] = dict(m.metadata)
        memories.append(item)
    return {"memories": memories, "source": Source.BACKGROUND.value}


def _user_said(exchange: Sequence[Mapping[str, Any]]) -> str:
    """The text of the turn's user messages (of their text parts, where content is a list)."""
    return "\n".join(message_text(m) for m in exchange if field_value(m, "role") == "user")


KNOWN_NEARBY = 5
"""Memories nearest to what the user said in the turn, besides those injected into its
request, that the extraction call is shown as known: it then skips what they already say, and
supersedes one the user corrected ("replaces") though the request did not need it ("I moved
to Denver last month, any hikes nearby?" and "Lives in Boston")."""
NEARBY_FLOOR = 0.15
"""Their relevance floor: under the injection floor (~0.25-0.3), as the model judges them and
one too many costs ~15 tokens of the extraction call, not a wrong memory in a prompt."""
MAX_NEARBY_QUERY = 2_000
"""Characters of the user's messages searched for them."""


def _nearby(
    memory: MemoryStore, exchange: Sequence[Mapping[str, Any]], *, exclude: Mapping[str, Any]
) -> list[Memory]:
    """The :data:`KNOWN_NEARBY` memories nearest to the turn's user messages that are not in
    ``exclude``; none where that search fails while the storage and the embedder work (the
    extraction goes on without them: counted as ``nearby_search_failures``).

    Raises:
        StorageError, EmbeddingError: The embedder failed, or the storage failed and is held
            to be down (a server that does not answer): the job waits for it (retried with
            backoff) before the model is called, so that the model sees the memories the turn
            may correct ("I quit Acme" and "Works at Acme"), and is called once. An answer
            extracted without them would be stored as it is once the storage is back (an
            extraction whose write failed is kept: ``jobs.PartlyDone``), the old fact left
            beside the correction.
    """
    said = _user_said(exchange)
    if not has_visible_text(said):  # blank, or a lone zero-width space: nothing to search with
        return []
    try:
        found = memory.search(
            said[:MAX_NEARBY_QUERY], top_k=KNOWN_NEARBY + len(exclude), min_score=NEARBY_FLOOR
        )
    except HeadroomMemoryError as exc:
        down = isinstance(exc, StorageError) and getattr(memory.storage, "down", False)
        if down or isinstance(exc, EmbeddingError):
            raise
        memory.survived("nearby_search_failures", f"could not search for known memories: {exc}")
        return []
    return [m for m, _ in found if m.id not in exclude][:KNOWN_NEARBY]


_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, ImportError, NotImplementedError)
"""Raised by code that cannot work (an extraction model of the wrong kind, a missing package):
retrying changes nothing, and a worker retrying for ever made ``flush()`` wait for ever."""


def retryable(exc: BaseException) -> bool:
    """Transient failures are retried: timeouts, connection errors, 408/409/429/5xx, malformed
    answers, storage errors. Bad requests, bad credentials, bad data and programming errors
    (:data:`_PROGRAMMING_ERRORS`) are not: the job is kept as failed (``retry_failed()``)."""
    if isinstance(
        exc, (PermanentJobError, InvalidInputError, EmbeddingMismatchError, *_PROGRAMMING_ERRORS)
    ):
        return False
    status = getattr(exc, "status_code", None)
    return not isinstance(status, int) or status in (408, 409, 429) or status >= 500


def longest_retry_delay(exc: BaseException) -> float:
    """The longest wait before a job that failed with ``exc`` is tried again: a storage or an
    embedding error's is the backend's own longest hold-back
    (:data:`~.storage.guard.MAX_RETRY_SECONDS`), so a job waits at most about that long once
    the storage or the embedding API is back, even when nothing else calls it (a call that
    finds it back makes every waiting job due at once: ``MemoryWriter``)."""
    return MAX_RETRY_SECONDS if isinstance(exc, (StorageError, EmbeddingError)) else math.inf


def queue_path_for(memory: MemoryStore) -> Path:
    """Where a store's job queue lives: beside embedded memories (even before the folder is
    created: it is opened on first use), else in the home folder, named after the server, or
    for a storage on a chromadb client of the application's, after the client's folder or
    server (its ``place``; the application's folder is left alone). A server storage made
    with headers is named after its place too (the server with the headers' digest: each
    token its own file). Storages with no place (an in-memory client) share one file there:
    give each its own ``queue_path``."""
    storage = memory.storage
    folder = getattr(storage, "folder", None)
    if isinstance(folder, Path):
        return folder / "jobs.sqlite3"
    location = storage.location
    if os.path.isdir(location):
        return Path(location) / "jobs.sqlite3"
    # a server's file is named after its location, as before places (the same file for the
    # same server, as before); an application's client's, or a server's when its place says
    # more (the digest of headers), after its place ("chroma client" told them apart from none)
    place, db_path = getattr(storage, "place", None), getattr(storage, "db_path", None)
    name = place if isinstance(place, str) and place != db_path else location
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return Path("~/.headroom-memory").expanduser() / f"jobs-{digest}.sqlite3"


class MemoryWriter:
    """One queue file's jobs, for every user whose memories share it, in this process.

    Use :func:`writer_for` to get the process's writer of a queue file. It is the
    :class:`~.flow.MemoryJobs` of every flow on that file.
    """

    def __init__(self, path: Path, *, backoff: Backoff | None = None) -> None:
        try:
            make_private_folder(path.parent)
        except OSError:  # a read-only folder: the queue opens once it can (JobQueue open_later)
            log.warning("cannot create the folder of job queue %s yet", path, exc_info=True)
        self._folder_identity = folder_identity(path.parent)  # the folder its file is in
        # the stores registered here, held weakly: a store its application let go of (a
        # wrapper of a user no longer served) is not kept alive; its jobs still run, on a store
        # built for each with the settings of the first store registered (the template)
        self._stores: weakref.WeakValueDictionary[str, MemoryStore] = weakref.WeakValueDictionary()
        # every store registered here and not closed since (nor its storage), weakly, with the
        # order it was registered in: _stores holds each user's newest only, and a user may
        # have several open (a wrapper and a LangChain model, a wrapper per request). The
        # workers stop once none is left; a user whose newest store closed or was let go of
        # has their jobs run on their newest other one (see _store_of)
        self._open: weakref.WeakKeyDictionary[MemoryStore, int] = weakref.WeakKeyDictionary()
        self._registered = itertools.count()
        # the deadlines of the stores closing now: the last one waits as long as any of them
        self._closing: list[float | None] = []
        # set once the workers are to stop (no store left open): a store registered from then
        # on is served by a new writer of the file (see register)
        self._retired = False
        self._backoff = backoff
        self._template: dict[str, Any] | None = None  # MemoryStore's arguments but user_id
        # The extractor of each registered store, for as long as the store lives: held by the
        # store, weakly, as the stores are (a dict by user kept the extractor, and with it a
        # model client, of every user a long-running server ever served). An extraction queued
        # here keeps the one it was queued with until it is done (see _queued_with).
        self._extractors: weakref.WeakKeyDictionary[MemoryStore, list[BackgroundExtractor]] = (
            weakref.WeakKeyDictionary()
        )  # several wrappers may share one store: the newest usable one is used
        # extraction job id -> (user, extractor), oldest first, bounded by QUEUED_EXTRACTIONS
        self._queued_with: OrderedDict[int, tuple[str, BackgroundExtractor]] = OrderedDict()
        # job id -> (user, the embedder of the store that queued it), oldest first, bounded by
        # QUEUED_EMBEDDERS: a job whose store was let go of runs with its own (see _store_for)
        self._embedded_with: OrderedDict[int, tuple[str, Any]] = OrderedDict()
        self._kept_checked = time.monotonic()  # (see KEPT_FOR_JOBS_CHECKED_EVERY)
        self._storage: Storage | None = None  # the storage whose memories this queue holds
        # the jobs' embedding calls that ran late, and their answers kept for the jobs' retries:
        # one user's embedder that hangs holds up no other user's jobs (see late_embeddings)
        self._late = LateEmbeddings(on_answer=self._hurry)
        self._lock = threading.Lock()
        # user -> store jobs queued here, not yet run: job ids, or work still held in memory
        self._unsettled: dict[str, set[int | _Handed]] = {}
        # user -> {id: (when it is due again, its tries so far)} of the user's store jobs whose
        # try failed here and that hold the user's later store jobs back (in order) until
        # then: settle does not wait for work that cannot run before its timeout, nor for
        # work behind one that failed again (HELD_AFTER_TRIES; see _held_back)
        self._held_lines: dict[str, dict[int, tuple[float, int]]] = {}
        self.settle_timeouts = 0  # settle() calls that waited their whole timeout in vain
        self._settled = threading.Condition()  # held briefly, never around the queue's I/O
        # work the callers could not put into the file in time, oldest first, and the piece
        # the hand-over thread is putting there now (see _hand_over)
        self._held: deque[_Handed] = deque()
        self._handing: _Handed | None = None
        self._hand_over_thread: threading.Thread | None = None
        # when a piece of held work was last logged, and how many were held since (each is
        # counted in its store's queue_delays; one line per SURVIVED_LOG_SECONDS is logged)
        self._delay_logged_at = -math.inf
        self._delays_unlogged = 0
        # One thread stores the memories the wrappers' calls left (each a quick write, its
        # embedding calls waited for a bounded time: late_embeddings); others
        # run background extractions (each a model call, which may take seconds or be retried
        # for minutes), different users' side by side: a slow model never holds up storing,
        # nor what a user's next call waits for (settle), nor other users' extractions while
        # there are threads to spare. Each user's jobs run in the order they were queued, in
        # every process on the file (JobWorker's in_order): a turn's extraction waits while an
        # earlier one of its user waits out a retry (or runs), and while an earlier store job
        # of theirs does (an extraction's memories left to store: PartlyDone), so a turn is
        # never extracted after the user's next one, which may correct it. A store job waits
        # for earlier store jobs only: never for an extraction, which may wait minutes for the
        # model, or for an extractor only another process has (a process without one never
        # runs extractions), so an inline block's memories are stored at once however the
        # extractions fare. A dead-lettered job holds nothing back.
        self.worker, self.extractions = (
            JobWorker(
                JobQueue(path, open_later=True),
                self._handle,
                kinds=(kind,),
                waits_for=waits_for,
                threads=threads,
                retryable=retryable,
                backoff=backoff or DEFAULT_BACKOFF,
                longest_delay=longest_retry_delay,
                name=f"headroom-memory {kind} {path.name}",
                on_released=self._released,
            )
            for kind, threads, waits_for in (
                ("store", 1, ("store",)),
                ("extract", EXTRACTION_THREADS, ("store", "extract")),
            )
        )
        when_back(self._storage_back)

    def _storage_back(self, location: str) -> None:
        """A backend held to be down answers again: if it is this queue's storage, or the
        embedder of a store registered here (an embedding API), its jobs waiting out a backoff
        are due now (the workers' threads make them so). On the thread whose call found it
        back, maybe a chat call's: no file I/O here."""
        storage = self._storage
        if (storage is not None and storage.location == location) or any(
            getattr(embedder, "location", None) == location for embedder in self._embedders()
        ):
            self._hurry()

    def _hurry(self) -> None:
        """Make the jobs waiting out a backoff due now (what they failed on works again: the
        storage, an embedder, a late embedding call that has answered). No file I/O here."""
        for worker in self._workers:
            worker.hurry()
        with self._settled:  # the jobs that held their users' lines are due now
            self._held_lines.clear()
            self._settled.notify_all()

    def _embedders(self) -> list[Embedder]:
        """The embedders of the stores registered here, and the template's (the jobs of a
        store let go of run with it)."""
        with self._lock:
            template = self._template
            embedders = [memory.embedder for memory in list(self._stores.values())]
        if template is not None:
            embedders.append(template["embedder"])
        return embedders

    def register(
        self, memory: MemoryStore, extractor: BackgroundExtractor | None = None
    ) -> MemoryWriter:
        """Serve ``memory``'s jobs (and, with ``extractor``, its background extraction), and
        resume whatever an earlier process left in the queue (its extractions once an
        extractor is registered: only then does the extraction thread start). Returns the
        writer that serves it: this one, or, if this one's workers were stopping meanwhile
        (the last store on the file closed, or its storage), a new writer of the file.

        Raises:
            InvalidInputError: the queue already serves memories kept elsewhere. Its jobs name
                users, not storages, so the same user id in two storages would get each
                other's memories.
        """
        with self._lock:
            retired = self._retired
            if not retired:
                self._serve(memory, extractor)
        if retired:  # (a new writer, which serves whatever storage its first store is on)
            fresh = writer_for(Path(self.worker.queue.path), backoff=self._backoff)
            return fresh.register(memory, extractor)
        memory.attach_writer(self)
        self.worker.start()
        if extractor is not None:
            self.extractions.start()
        return self

    def _serve(self, memory: MemoryStore, extractor: BackgroundExtractor | None) -> None:
        """With ``_lock`` held: :meth:`register`'s bookkeeping."""
        served = self._storage
        if served is not None and not _same_place(served, memory.storage):
            raise InvalidInputError(
                f"the job queue {self.worker.queue.path} already serves the memories in "
                f"{_where(served)}, not those in {_where(memory.storage)}: give each "
                "storage its own queue_path (the default one is, except for in-memory clients)"
            )
        self._storage = memory.storage
        self._stores[memory.user_id] = memory
        self._open[memory] = next(self._registered)
        if self._template is None:
            self._template = {
                "storage": memory.storage,
                "embedder": memory.embedder,
                "min_score": memory.min_score,
                "duplicate_threshold": memory.duplicate_threshold,
            }
        if extractor is not None:
            known = self._extractors.setdefault(memory, [])
            if extractor in known:
                known.remove(extractor)
            known.append(extractor)

    def store(self, memory: MemoryStore, memories: Sequence[Mapping[str, Any]]) -> None:
        self._put("store", memory, {"memories": list(memories)})

    def extract(
        self,
        memory: MemoryStore,
        exchange: Sequence[Mapping[str, str]],
        injected: Mapping[str, str],
        model: str | None,
        untrusted: bool = False,
    ) -> bool:
        payload = {
            "exchange": list(exchange),
            "injected": dict(injected),
            "model": model,
            "untrusted": untrusted,
        }
        return self._put("extract", memory, payload)

    @property
    def _workers(self) -> tuple[JobWorker, JobWorker]:
        return self.worker, self.extractions

    def flush(
        self, timeout: float | None = None, *, user_id: str | None = None, own: bool = False
    ) -> bool:
        """Wait (up to ``timeout`` seconds) until the jobs queued so far (of ``user_id``, if
        given) are done; with ``own``, only those this process queued (:meth:`detach`, as a
        store closes: another process's jobs in the file are its own to wait for). Returns
        False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._wait_handed_over(deadline, user_id):
            return False
        # the store worker again last: an extraction whose memories could not be stored
        # became a store job (see _run)
        for worker in (self.worker, self.extractions, self.worker):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait = worker.drain_own if own else worker.flush
            if not wait(left, user_id=user_id):
                return False
        return True

    def _wait_handed_over(self, deadline: float | None, user_id: str | None = None) -> bool:
        """Wait until the work held in memory (of ``user_id``, if given) is in the file."""

        def mine(handed: _Handed | None) -> bool:
            return handed is not None and (user_id is None or handed.memory.user_id == user_id)

        def none_held(_: float | None) -> bool:
            return not (mine(self._handing) or any(mine(h) for h in self._held))

        return wait_until(self._settled, none_held, deadline)

    def settle(self, memory: MemoryStore, timeout: float = READ_YOUR_WRITES_SECONDS) -> bool:
        """Wait (up to ``timeout`` seconds) until the memories this process queued for
        ``memory``'s user have been stored, or tried once, unless they wait (in order) behind
        an earlier store job of the user whose try failed here and that is not due again
        before the timeout ends, or that has failed again (:data:`HELD_AFTER_TRIES`): then
        not at all (during a storage outage, each call waited its whole ``timeout`` for them,
        then one call per retry). Known from the failures this process's workers saw, in
        memory: the queue file is not read. Returns False unless all were stored or tried."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while self._unsettled_of(memory.user_id):
                remaining = deadline - time.monotonic()
                if self._held_back(memory.user_id, time.time() + max(remaining, 0.0)):
                    return False
                if remaining <= 0:
                    self.settle_timeouts += 1
                    return False
                self._settled.wait(remaining)
        return True

    def _held_back(self, user_id: str, until: float) -> bool:
        """With ``_settled`` held: whether all of ``user_id``'s unsettled store work waits
        behind a store job of the user that failed and is due again only after ``until``
        (``time.time()``), or failed :data:`HELD_AFTER_TRIES` times, whenever it is due: queued
        after it (work held in memory reaches the file after it). A job that has been due
        since is being tried again: it holds nothing back here."""
        lines = self._held_lines.get(user_id)
        if not lines:
            return False
        now = time.time()
        for job_id in [j for j, (due, _) in lines.items() if due <= now]:
            del lines[job_id]
        if not lines:
            del self._held_lines[user_id]
            return False
        holding = [
            job_id
            for job_id, (due, tries) in lines.items()
            if due > until or tries >= HELD_AFTER_TRIES
        ]
        if not holding:
            return False
        first = min(holding)
        waiting = self._unsettled.get(user_id, ())
        return all(isinstance(w, _Handed) or w > first for w in waiting)

    def _released(self, job: Job, due: float | None) -> None:
        """The worker released ``job``'s try (``JobWorker``'s ``on_released``): a store job
        retried at ``due`` holds its user's later store jobs back until then (noted with its
        tries, for :meth:`_held_back`), unless it has failed too often to hold the line
        (:data:`~.jobs.HOLDS_THE_LINE_TRIES`); one done or dead-lettered holds nothing back."""
        if due is None:  # done or dead-lettered: the answers kept for its retries go
            self._late.done(job.id)
        if job.kind != "store":  # (an extraction holds no store job back)
            return
        with self._settled:
            lines = self._held_lines.get(job.user_id)
            if due is not None and job.attempts < HOLDS_THE_LINE_TRIES:
                self._held_lines.setdefault(job.user_id, {})[job.id] = (due, job.attempts)
            elif lines is not None:
                lines.pop(job.id, None)
                if not lines:
                    del self._held_lines[job.user_id]
            self._settled.notify_all()

    def _unsettled_of(self, user_id: str) -> bool:
        """With ``_settled`` held: whether ``user_id`` has store work to wait for: once the
        workers are closed, only work still held (the jobs in the file wait for the next
        writer of the file)."""
        waiting = self._unsettled.get(user_id)
        if not waiting:
            return False
        return not self.worker.closed or any(isinstance(w, _Handed) for w in waiting)

    def folder_removed(self) -> bool:
        """Whether the folder of this writer's queue file was removed (or replaced by another
        folder at the same path) since the writer was made."""
        made = self._folder_identity
        return made is not None and folder_identity(Path(self.worker.queue.path).parent) != made

    def detach(self, memory: MemoryStore, timeout: float | None) -> bool:
        """``memory`` is closing: drain its user's jobs that this process queued (up to
        ``timeout``; not another process's on the same file); once no store is left open (of
        any user: another store of the same user may be in use), drain every user's, then stop
        the workers (unfinished jobs stay in the file for the next process, and work that
        comes later, from a call under way, is put there too: see :meth:`_put`). A store
        registered while the last one drains keeps the workers running."""
        own_deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._open.pop(memory, None)  # (at once: of two closing together, one is last)
            last = not self._open
            self._closing.append(own_deadline)
        try:
            if not last:
                return self._drain(timeout, memory.user_id)
            # as long as the longest of the stores closing now (a short close of the last
            # store must not cut short another store's longer one)
            with self._lock:
                waits = list(self._closing)
            deadline = None if None in waits else max(w for w in waits if w is not None)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                drained = self._drain(left, None)
            except Exception:  # the file failed (an unwritable folder): the workers stop all
                # the same, and say so (JobWorker.close); what is left stays in the file
                log.debug("job queue %s: could not drain", self.worker.queue.path, exc_info=True)
                drained = False
            with self._lock:
                if self._open:  # a store registered meanwhile: it is served on
                    return drained
                self._retired = True
            return self._stop(deadline) and drained
        finally:  # only now (pending jobs of this user needed its store), even if flush raised
            with self._lock:
                self._closing.remove(own_deadline)
                if self._stores.get(memory.user_id) is memory:
                    del self._stores[memory.user_id]  # their newest other one serves them
                self._extractors.pop(memory, None)

    def _drain(self, timeout: float | None, user_id: str | None) -> bool:
        """Wait up to ``timeout`` seconds for the jobs this process queued (of ``user_id``,
        if given). False on timeout, or if the workers were stopped meanwhile (the last
        store's close, or the storage's: what is left stays in the file)."""
        try:
            return self.flush(timeout, user_id=user_id, own=True)
        except RuntimeError:  # a closed queue
            if not self.worker.closed:
                raise
            return False

    def _stop(self, deadline: float | None) -> bool:
        """Stop the workers without waiting for their jobs (:meth:`detach` drained them), and
        close their connection to the file once their threads end (waited for until
        ``deadline``). The extraction worker first: an extraction may leave the store worker
        a store job (see _run). Returns whether no job queued here was left undone (one
        queued since the drain, by a call under way, stays in the file for the next writer)."""
        drained = True
        for worker in (self.extractions, self.worker):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            drained = worker.close(left, drain=False) and drained
        # the notes of held lines go when the workers that made them stop, not when one of a
        # user's stores closes (another of theirs may be in use); each also goes when its job
        # is due again
        with self._settled:
            self._held_lines.clear()
        # the process lets go of it, and so of its storage (a closed one, maybe): the next
        # store on the file gets a new writer (writer_for), as it would of a stopped one
        with _writers_lock:
            for key, writer in list(_writers.items()):
                if writer is self:
                    del _writers[key]
        return drained

    def _storage_closed(self, storage: Storage) -> None:
        """``storage`` is closing: the stores built on it are not served any more (their
        work could not be stored), and once no store is left open, nor the storage the
        queue serves, the workers stop now (what is left stays in the file for the next
        process). A store the application still holds but will not close (the first client
        of a notebook, kept by the kernel's output history) so no longer keeps the queue file
        open after its folder's storage is closed."""
        with self._lock:
            gone = [memory for memory in list(self._open) if memory.storage is storage]
            for memory in gone:
                del self._open[memory]
                if self._stores.get(memory.user_id) is memory:
                    del self._stores[memory.user_id]
            if self._storage is not storage and not gone:
                return
            if self._open:  # stores on another storage object of the same place serve on
                other = next(iter(self._open)).storage
                if self._storage is storage:
                    self._storage = other
                if self._template is not None and self._template["storage"] is storage:
                    self._template = {**self._template, "storage": other}
                return
            if self._retired:
                return
            self._retired = True
        self._stop(time.monotonic() + STOP_WAIT_SECONDS)

    def _store_of(self, user_id: str) -> MemoryStore | None:
        """With ``_lock`` held: the newest store of ``user_id`` registered here and still
        open (its application holds it, and neither it nor its storage was closed)."""
        memory = self._stores.get(user_id)
        if memory is None:
            theirs = [(n, s) for s, n in list(self._open.items()) if s.user_id == user_id]
            if theirs:
                memory = self._stores[user_id] = max(theirs, key=lambda found: found[0])[1]
        return memory

    def forget(self, memory: MemoryStore, timeout: float | None) -> int:
        """Delete every job of ``memory``'s user from the queue file (waiting up to
        ``timeout`` seconds for one that runs now to end) and erase their text from the file
        and its WAL. Returns how many were deleted.

        Raises:
            StorageError: a job of the user was still running after ``timeout`` seconds.
        """
        queue = self.worker.queue
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._settled:  # work held in memory is forgotten there; one being put, below
            for handed in [h for h in self._held if h.memory.user_id == memory.user_id]:
                handed.forgotten = True
                self._held.remove(handed)
            while self._handing is not None and self._handing.memory.user_id == memory.user_id:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._handing.forgotten = True  # deleted again once it is in the file
                    break
                self._settled.wait(0.2 if remaining is None else min(remaining, 0.2))
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        deleted = _forget_jobs(queue, memory.user_id, left)
        self._late.forget(memory.user_id)
        with self._settled:
            self._unsettled.pop(memory.user_id, None)
            self._held_lines.pop(memory.user_id, None)
            for queued in (self._queued_with, self._embedded_with):
                for job_id, (user_id, _) in list(queued.items()):
                    if user_id == memory.user_id:  # deleted (one running now holds its own)
                        del queued[job_id]
            self._settled.notify_all()
        if not _erase_wal(queue):  # the worker erases it as soon as it can
            self.worker.erase_wal_later()
        log.debug(
            "job queue %s: deleted %d jobs of user %s",
            queue.path,
            deleted,
            user_tag(memory.user_id),
        )
        return deleted

    def retry_failed(self) -> int:
        with _queue_file(self.worker.queue.path, "queue failed jobs again"):
            count = self.worker.queue.retry_failed()
        for worker in self._workers:
            worker.notify()
        return count

    def stats(self) -> dict[str, Any]:
        """The workers' processed/retried/failed counts, and the file's pending/running."""
        stats = self.worker.stats()
        for key, value in self.extractions.stats().items():
            if key in ("processed", "retried", "failed"):
                stats[key] += value
        return stats

    def _put(self, kind: str, memory: MemoryStore, payload: dict[str, Any]) -> bool:
        """Put memory work into the queue file, on the caller's path: waiting at most
        :data:`QUEUE_WAIT_SECONDS` for it (never holding a lock another user's call needs),
        else handing it to the hand-over thread (nothing is lost while the process lives).

        The caller never touches the file on an event loop's thread (the whole loop would wait
        for it): there, and behind work held already, the work is handed over at once. Once
        this writer is closed (``close()`` of the last store on the file, while a call was
        under way), the work goes to the writer made for the file since, if any, else into
        the file for the next one (a later wrapper in this process, or the next process)."""
        with self._lock:
            extractor = _newest_usable(self._extractors.get(memory)) if kind == "extract" else None
        destination = extractor.destination if extractor is not None else None
        if destination is not None:
            payload = {**payload, "destination": destination}
        # which embedder the job's texts may be sent to, if it runs without this store
        payload = {**payload, "embedder": embedder_identity(memory.embedder)}
        try:
            JobQueue.encode(kind, memory.user_id, payload)  # invalid work fails here, not later
        except Exception:
            memory.survived("store_failures", f"could not queue memory work ({kind})")
            return False
        self._offer(_Handed(kind, memory, payload, time.time(), extractor))
        return True

    def _offer(self, handed: _Handed) -> None:
        """:meth:`_put` of work already made (also by a closed writer of the same file).
        Work offered to a closed writer goes to the file's writer made since, if any, else
        it is handed over (the hand-over thread puts it in the file)."""
        if self.worker.closed:
            serving = _serving(self.worker.queue.path, self)
            if serving is not None:
                serving._offer(handed)
                return
        with self._settled:
            if handed.kind == "store":  # unsettled from now on, whether in the file or held
                self._unsettled.setdefault(handed.memory.user_id, set()).add(handed)
            # held work goes first: jobs reach the file in the order they came
            ahead = [*self._held, *([self._handing] if self._handing is not None else [])]
            held = bool(ahead) or self.worker.closed or _on_event_loop()
            behind_locked = False
            if held:
                # behind work that waits for the locked file, it waits for the file too
                behind_locked = self._hold(handed) and any(h.delayed for h in ahead)
        if held:
            if behind_locked:
                self._count_delays([handed], WAITING_WITH_OTHERS)
            return
        if not self._first_try(handed, self.worker.queue, late=False):
            with self._settled:
                self._hold(handed)

    def _first_try(self, handed: _Handed, queue: JobQueue, *, late: bool) -> bool:
        """Put ``handed`` into ``queue``, waiting at most :data:`QUEUE_WAIT_SECONDS`. Returns
        whether it is done with: queued, or dropped because the file cannot be opened or
        written at all (counted and logged). False: it is to be held (the file stayed locked,
        or this writer's queue was closed meanwhile). ``late``: ``queue`` is not the worker's
        (this writer is closed): nothing here runs the job, so nobody waits for it."""
        kind, memory = handed.kind, handed.memory
        try:
            job_id = queue.put(
                kind,
                memory.user_id,
                handed.payload,
                wait=QUEUE_WAIT_SECONDS,
                created_at=handed.created_at,
                on_queued=lambda job_id: self._queued(handed, job_id, late=late),
            )
        except QueueBusy as exc:
            handed.tried = True
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._count_delays([handed], f"within {QUEUE_WAIT_SECONDS:.2f} s ({reason})")
            with self._settled:  # the work held meanwhile waits for the file too
                held = list(self._held)
            self._count_delays(held, WAITING_WITH_OTHERS)
            return False
        except Exception:
            if not late and self.worker.closed:  # closed meanwhile: queued another way
                return False
            # the file cannot be opened or written (a read-only folder): the work is lost,
            # as waiting would not help (counted and logged)
            with self._settled:
                self._unsettle(handed)
            memory.survived("store_failures", f"could not queue memory work ({kind})")
            return True
        if handed.forgotten:  # forget() gave up waiting for it: delete it again
            queue.complete(job_id)
        elif not late:
            self._notify(kind, memory.user_id)
        return True

    def _notify(self, kind: str, user_id: str) -> None:
        try:
            (self.worker if kind == "store" else self.extractions).notify(user_id)
        except Exception:  # a closed worker: the job stays in the file for the next process
            log.debug("job queue %s: worker not notified", self.worker.queue.path, exc_info=True)

    def _queued(self, handed: _Handed, job_id: int, *, late: bool = False) -> None:
        """``handed`` is in the file as job ``job_id`` (called before any thread of this
        process can claim it). ``late``: put there after this writer was closed, for the
        next writer of the file; its user's calls need not wait for it here."""
        with self._settled:
            user_id = handed.memory.user_id
            waiting = self._unsettled.get(user_id)
            if late:
                self._unsettle(handed)
            elif waiting is not None and handed in waiting:
                waiting.discard(handed)
                waiting.add(job_id)
            if handed.extractor is not None and not late:
                self._queued_with[job_id] = (user_id, handed.extractor)
                while len(self._queued_with) > QUEUED_EXTRACTIONS:
                    self._queued_with.popitem(last=False)
            if not late:
                self._embedded_with[job_id] = (user_id, handed.memory.embedder)
                while len(self._embedded_with) > QUEUED_EMBEDDERS:
                    self._embedded_with.popitem(last=False)

    def _count_delays(self, pieces: Sequence[_Handed], reason: str) -> None:
        """``pieces`` are held in memory for a locked queue file: count each in its store's
        ``queue_delays``, once per piece however often it is found waiting. The first is
        logged, then at most one line per :data:`~.engine.SURVIVED_LOG_SECONDS` for the queue,
        which says how many were held since the last (a lock held a while on a busy server
        holds a piece per chat call)."""
        now = time.monotonic()
        with self._settled:
            first_time = [handed for handed in pieces if not handed.delayed]
            for handed in first_time:
                handed.delayed = True
                handed.memory.counters["queue_delays"] += 1
            if not first_time:
                return
            if now - self._delay_logged_at < SURVIVED_LOG_SECONDS:
                self._delays_unlogged += len(first_time)
                return
            since = self._delays_unlogged + len(first_time) - 1
            self._delay_logged_at, self._delays_unlogged = now, 0
        handed = first_time[0]
        log.warning(
            "could not queue memory work (%s) of user %s %s; "
            "it is kept in memory and queued as soon as the queue file can be written%s",
            handed.kind,
            user_tag(handed.memory.user_id),
            reason,
            f" ({since} more pieces held for the file since the last such log)" if since else "",
        )

    def _hold(self, handed: _Handed) -> bool:
        """With ``_settled`` held: keep ``handed`` until the hand-over thread has put it in
        the file (started if need be); past :data:`HANDED_OVER`, drop it (counted). Returns
        whether it is kept."""
        if len(self._held) >= HANDED_OVER:
            self._unsettle(handed)
            handed.memory.survived(
                "store_failures",
                f"could not queue memory work ({handed.kind}): the job queue file cannot be "
                f"written and {HANDED_OVER} pieces of work wait already",
                exc_info=False,
            )
            return False
        self._held.append(handed)
        self._settled.notify_all()
        thread = self._hand_over_thread
        if thread is None or not thread.is_alive():
            thread = threading.Thread(
                target=self._hand_over, name="headroom-memory hand-over", daemon=True
            )
            self._hand_over_thread = thread
            thread.start()
        return True

    def _unsettle(self, handed: _Handed) -> None:
        """With ``_settled`` held: ``handed`` will not be stored; its user need not wait."""
        waiting = self._unsettled.get(handed.memory.user_id)
        if waiting is not None and handed in waiting:
            waiting.discard(handed)
            if not waiting:
                del self._unsettled[handed.memory.user_id]
        self._settled.notify_all()

    def _hand_over(self) -> None:
        """Put the held work into the queue file, oldest first: each piece not tried yet
        as a caller would (:meth:`_first_try`), then waiting for the file as long as it takes
        (each try up to the queue's busy timeout, then a growing pause). Once this writer is
        closed, through the writer made for the file since, else a connection of its own."""
        pause, failing = 0.05, 0
        late: JobQueue | None = None  # the file, opened here once the worker's queue is closed
        try:
            while True:
                with self._settled:
                    if not self._held:
                        if self._hand_over_thread is threading.current_thread():
                            self._hand_over_thread = None
                        self._settled.notify_all()
                        return
                    handed = self._handing = self._held.popleft()
                queue = self.worker.queue
                if self.worker.closed:
                    serving = _serving(queue.path, self)
                    if serving is not None:  # a writer made for the file since takes it
                        with self._settled:
                            self._handing = None
                            self._unsettle(handed)
                        if not handed.forgotten:
                            serving._offer(handed)
                        continue
                    if late is None:
                        late = JobQueue(queue.path, open_later=True)
                    queue = late
                if not handed.tried:
                    done = self._first_try(handed, queue, late=queue is late)
                    with self._settled:
                        self._handing = None
                        if not done and not handed.forgotten:
                            self._held.appendleft(handed)  # first again: the order is kept
                        self._settled.notify_all()
                    continue
                queued = False
                try:
                    job_id = queue.put(
                        handed.kind,
                        handed.memory.user_id,
                        handed.payload,
                        wait=HAND_OVER_TRY_SECONDS,  # the queue is not held for a busy timeout
                        created_at=handed.created_at,
                        on_queued=lambda job_id: self._queued(
                            handed,  # noqa: B023
                            job_id,
                            late=queue is late,  # noqa: B023
                        ),
                    )
                    queued = True
                    if handed.forgotten:  # forget() gave up waiting for it: delete it again
                        queue.complete(job_id)
                except Exception as exc:
                    if queue is late or not self.worker.closed:  # (else: closed meanwhile)
                        failing += 1
                        if failing == 1 or failing % 60 == 0:
                            log.warning(
                                "job queue %s: still cannot queue held memory work (%d tries): %s",
                                queue.path,
                                failing,
                                f"{type(exc).__name__}: {exc}".splitlines()[0],
                            )
                with self._settled:
                    self._handing = None
                    if not queued and not handed.forgotten:
                        self._held.appendleft(handed)  # first again: the order is kept
                    self._settled.notify_all()
                if queued:
                    if failing:
                        log.warning("job queue %s: held memory work queued", queue.path)
                    pause, failing = 0.05, 0
                    if queue is not late:
                        self._notify(handed.kind, handed.memory.user_id)
                elif failing:
                    time.sleep(pause)
                    pause = min(pause * 2, 2.0)
        finally:
            if late is not None:
                late.close()

    def _drop_held(self, why: str) -> None:
        """Give up the work held in memory (counted as ``store_failures`` and logged), the
        piece being put into the file now too: it is not waited for."""
        with self._settled:
            dropped = list(self._held)
            self._held.clear()
            for handed in dropped:
                self._unsettle(handed)
            if self._handing is not None:
                dropped.append(self._handing)
        for handed in dropped:
            handed.memory.survived(
                "store_failures",
                f"memory work ({handed.kind}) that could not be queued is lost: {why}",
                exc_info=False,
            )

    def _handle(self, job: Job) -> None:
        self._follow_renumbered()
        done = False
        try:
            with self._late.running(job.id, job.user_id, embedder_identity):
                self._run(job)
            done = True
            with self._settled:  # (a store job left by PartlyDone still needs it)
                self._embedded_with.pop(job.id, None)
        except PartlyDone:
            done = True  # a store job now: its extractor is not needed any more
            raise
        finally:
            with self._settled:
                # its extractor is not needed any more; one retried or dead-lettered keeps
                # it (retry_failed() runs it again: with its own, not another user's)
                if done:
                    self._queued_with.pop(job.id, None)
                waiting = self._unsettled.get(job.user_id)
                if waiting is not None and job.id in waiting:
                    waiting.discard(job.id)
                    if not waiting:
                        del self._unsettled[job.user_id]
                    self._settled.notify_all()
            self._let_go_of_jobs_run_elsewhere()

    def _let_go_of_jobs_run_elsewhere(self) -> None:
        """At most every :data:`KEPT_FOR_JOBS_CHECKED_EVERY` seconds: let go of the extractors
        and embedders kept for jobs that are no longer in the file (another process ran them:
        this one is never told). On a worker's thread; a file that cannot be read now is
        checked again next time."""
        now = time.monotonic()
        if now - self._kept_checked < KEPT_FOR_JOBS_CHECKED_EVERY:
            return
        self._kept_checked = now
        with self._settled:
            checked = {*self._queued_with, *self._embedded_with}
        try:
            present = self.worker.queue.present(checked)
        except Exception:
            log.debug("job queue %s: could not be read", self.worker.queue.path, exc_info=True)
            return
        self._follow_renumbered()  # (present() may have moved the jobs to a new file)
        with self._settled:
            for kept in (self._queued_with, self._embedded_with):
                for job_id in [j for j in kept if j in checked and j not in present]:
                    del kept[job_id]

    def _follow_renumbered(self) -> None:
        """Keep what was kept for a job under its new id when the queue moved it to a new
        file under another one (its id was taken there: :func:`~.jobs.renumbered`), so it
        runs with its own extractor and embedder, the check above does not let go of them,
        and its user's reads wait for the job under its new id."""
        moved = renumbered(self.worker.queue.path)
        if not moved:
            return
        with self._settled:
            for kept in (self._queued_with, self._embedded_with):
                for old_id in [j for j in kept if j in moved]:
                    kept[moved[old_id]] = kept.pop(old_id)
            for waiting in self._unsettled.values():  # (its user's reads wait for the new one)
                for old_id in [j for j in waiting if isinstance(j, int) and j in moved]:
                    waiting.discard(old_id)
                    waiting.add(moved[old_id])

    def _extractor_for(self, job: Job) -> BackgroundExtractor | None:
        """The extractor the job was queued with in this process, while it can still make
        calls; else (its client was closed, a job of an earlier process, or one let go of
        past QUEUED_EXTRACTIONS) the newest usable one of its user's store, or that another
        job of its user was queued with here (its later jobs wait for it), or of another
        store whose calls go where the job's extractor sent them (the same endpoint and
        credentials: :attr:`BackgroundExtractor.destination`, kept in the job). Never another
        one: the user's conversation would go to another tenant's model. None: the job waits
        (retried later) for an extractor of its user."""
        with self._settled:
            queued = self._queued_with.get(job.id)
        if queued is not None and queued[1].usable:
            return queued[1]
        destination = job.payload.get("destination")
        with self._lock:
            store = self._store_of(job.user_id)
            own = _newest_usable(self._extractors.get(store)) if store is not None else None
        if own is None:  # the user's own, that a later job of theirs was queued with here:
            # that job waits for this one (their order is kept), so this one must run too
            with self._settled:
                theirs = [e for user, e in self._queued_with.values() if user == job.user_id]
            own = _newest_usable(theirs)
        if own is not None or not isinstance(destination, str):
            return own
        with self._lock:
            alike = (
                _newest_usable([e for e in extractors if e.destination == destination])
                for extractors in list(self._extractors.values())
            )
            return next(filter(None, alike), None)

    def _run(self, job: Job) -> None:
        memory = self._store_for(job)
        if job.kind == "store":
            items = [NewMemory(**item) for item in job.payload["memories"]]
            # an extraction's memories, left to store (see below), or an inline block's
            background = job.payload.get("source") == Source.BACKGROUND.value
            source = Source.BACKGROUND if background else Source.INLINE
        elif job.kind == "extract":
            extractor = self._extractor_for(job)
            if extractor is None:  # retried later
                raise RuntimeError("no background extractor for this user in this process yet")
            items, source = extractor(memory, job), Source.BACKGROUND
        else:
            raise PermanentJobError(f"unknown job kind {job.kind!r}")
        try:
            # dated when the turn was queued: a turn whose try failed, run after the user's
            # next one, does not undo what that one corrected
            memory.add_many(items, source=source, said_at=job.created_at)
        except Exception as exc:
            if job.kind != "extract" or not items:
                raise
            # The model's answer (a paid call) is kept: the job becomes a store of these
            # memories, its retries only write them (the same row, dated as the turn, its
            # replaces, keys and grounding as extracted; a user forgotten meanwhile stays so).
            left = _store_payload(items)
            if "embedder" in job.payload:  # the store job left keeps the job's embedder
                left["embedder"] = job.payload["embedder"]
            raise PartlyDone("store", left, exc) from exc

    def _store_for(self, job: Job) -> MemoryStore:
        """The registered store of the job's user if its application still holds it, else
        (work of a user let go of, or left by a previous process) a store built for this job
        on the registered storage, not kept (writes of one user are serialised by the
        storage's per-user lock, whichever store makes them), with the embedder of the store
        that queued it in this process (:data:`QUEUED_EMBEDDERS`), else the one embedder among
        the registered stores' (and the first one registered) whose :func:`embedder_identity`
        is the one the job was queued with. Ambiguity waits: with several embedder objects of
        that identity (tenants' custom embedders of one name, each on its own key, or
        ``OpenAIEmbedder``s whose credentials a hash cannot tell apart) the job is retried
        later, once its user's store or its kept embedder is here; several
        :class:`~.embeddings.LocalEmbedder` objects of one model are the same model and do
        not count. Without one the job waits too. A job queued by an earlier version (no
        embedder named in it) runs with the embedder of the first store registered, as it did
        then."""
        with self._lock:
            memory = self._store_of(job.user_id)
            template = self._template
        if memory is not None:
            return memory
        if template is None:
            raise RuntimeError("no memory store registered yet")  # retried later
        with self._settled:
            queued = self._embedded_with.get(job.id)
        if queued is not None:
            return MemoryStore(job.user_id, **{**template, "embedder": queued[1]})
        wanted = job.payload.get("embedder")
        if wanted is None:
            return MemoryStore(job.user_id, **template)
        alike: list[Any] = []
        for embedder in self._embedders():  # only now: most jobs find their user's store above
            if embedder_identity(embedder) == wanted and not any(embedder is e for e in alike):
                alike.append(embedder)
        if not alike:  # retried later
            raise RuntimeError("no memory store with this user's embedder in this process yet")
        if len(alike) > 1 and not all(isinstance(e, LocalEmbedder) for e in alike):
            # perhaps other tenants' embedders of one name: retried later, when the user's
            # own store (or the embedder kept for the job) is here
            raise RuntimeError("several embedders here could be this user's: the job waits")
        return MemoryStore(job.user_id, **{**template, "embedder": alike[0]})


def embedder_identity(embedder: Any) -> str:
    """What tells an embedder apart from another tenant's, with no secret in it: the name it
    marks a user's collection with, and where its texts go (its ``destination``, a
    fingerprint of endpoint and credentials, where it has one:
    :attr:`~.embeddings.OpenAIEmbedder.destination`)."""
    name = str(getattr(embedder, "name", type(embedder).__name__))
    try:
        destination = getattr(embedder, "destination", None)
    except Exception:
        destination = None
    return f"{name} at {destination}" if isinstance(destination, str) else name


def _where(storage: Storage) -> str:
    place = getattr(storage, "place", None)
    return place if isinstance(place, str) else storage.location


def _same_place(one: Storage, other: Storage) -> bool:
    """Whether two storage objects hold the same memories: the same object, or the same
    :attr:`~.storage.chroma.ChromaStorage.place` (an embedded folder, a server, the folder or
    server of an application's chromadb client). Storages with no place (an in-memory
    client, another backend) are told apart by object only."""
    if one is other:
        return True
    place = getattr(one, "place", None)
    return place is not None and place == getattr(other, "place", None)


def _newest_usable(extractors: Sequence[BackgroundExtractor] | None) -> BackgroundExtractor | None:
    return next((e for e in reversed(extractors or ()) if e.usable), None)


@contextmanager
def _queue_file(path: str | os.PathLike[str], doing: str) -> Iterator[None]:
    """The queue file's own failures (unwritable, locked, corrupt) as :class:`StorageError`."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise StorageError(f"could not {doing} in the job queue {path}: {exc}") from exc


def _forget_jobs(queue: JobQueue, user_id: str, timeout: float | None) -> int:
    """Delete every job of ``user_id`` from ``queue``, waiting up to ``timeout`` seconds for
    one that runs now (in any process) to end. Returns how many were deleted.

    Raises:
        StorageError: a job of the user still ran after ``timeout`` seconds, or the file failed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    deleted = 0
    while True:
        with _queue_file(queue.path, "forget the user's jobs"):
            removed, running = queue.forget_user(user_id)
        deleted += removed
        if not running:
            return deleted
        if deadline is not None and time.monotonic() >= deadline:
            raise StorageError(
                f"background work of this user still ran after {timeout} s; try again"
            )
        time.sleep(0.02)


def _erase_wal(queue: JobQueue, patience: float = 0.0) -> bool:
    """Erase ``queue``'s WAL, trying again for up to ``patience`` seconds while another
    connection keeps part of it. Returns whether it was erased."""
    deadline = time.monotonic() + patience
    while True:
        with _queue_file(queue.path, "erase the user's jobs"):
            if queue.erase_wal():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def forget_queued(memory: MemoryStore, timeout: float | None) -> int:
    """Delete the queued turns of ``memory``'s user from the job queue its storage's wrappers
    use (:func:`queue_path_for`), for a store with no writer attached: a plain
    :class:`~.engine.MemoryStore` forgetting a user whose turns a wrapper, maybe in a process
    that has exited, left queued. Through this process's writer of that file if it has one.
    Returns how many were deleted (0 if the file does not exist).

    Raises:
        StorageError: a job of the user still ran after ``timeout`` seconds, or the file failed.
    """
    path = queue_path_for(memory)
    with _writers_lock:
        writer = _writers.get(os.path.realpath(path))
    if writer is not None and not writer.worker.closed:
        return writer.forget(memory, timeout)
    if not path.exists():
        return 0
    with _queue_file(path, "open the user's jobs"):
        queue = JobQueue(path)
    try:
        deleted = _forget_jobs(queue, memory.user_id, timeout)
        if not _erase_wal(queue, _ERASE_PATIENCE):  # no worker here to try again later
            log.warning(
                "job queue %s: another connection kept the WAL for %.0f s; the deleted jobs'"
                " text leaves it at that connection's next checkpoint",
                queue.path,
                _ERASE_PATIENCE,
            )
        return deleted
    finally:
        queue.close()


_writers: dict[str, MemoryWriter] = {}
_writers_lock = threading.Lock()
_every_writer: weakref.WeakSet[MemoryWriter] = weakref.WeakSet()  # also those closed since


def _serving(path: str, closed: MemoryWriter) -> MemoryWriter | None:
    """The open writer of the queue file at ``path`` made after ``closed`` was closed. Read
    without ``_writers_lock``, held while a writer is made (which opens its file): this is
    on a chat call's path (one dictionary read is atomic)."""
    writer = _writers.get(path)
    if writer is None or writer is closed or writer.worker.closed:
        return None
    return writer


def writer_for(path: Path, *, backoff: Backoff | None = None) -> MemoryWriter:
    """The process's one :class:`MemoryWriter` for the queue file at ``path``. A writer whose
    folder was removed since (or replaced by another at the same path) is closed, and a new
    one opens the file in the folder there now: the old one's file is gone with its folder."""
    key = os.path.realpath(path)
    stale: MemoryWriter | None = None
    with _writers_lock:
        writer = _writers.get(key)
        if writer is not None and not writer.worker.closed and writer.folder_removed():
            stale, writer = writer, None
        if writer is None or writer.worker.closed or writer._retired:
            writer = _writers[key] = MemoryWriter(Path(key), backoff=backoff)
            _every_writer.add(writer)
            global _exit_hook
            if not _exit_hook:  # after the job workers' own: runs before them, at exit
                atexit.register(_hand_over_at_exit)
                _exit_hook = True
    if stale is not None:
        log.warning("the folder of job queue %s was removed: opening the queue afresh", key)
        for worker in stale._workers:
            worker.close(0)  # its jobs were in the removed file
    return writer


_exit_hook = False


def _stop_serving(storage: Storage) -> None:
    """A storage is closing: every writer stops serving the stores built on it (see
    :meth:`MemoryWriter._storage_closed`)."""
    with _writers_lock:
        writers = list(_writers.values())
    for writer in writers:
        writer._storage_closed(storage)


when_closed(_stop_serving)


def _hand_over_at_exit() -> None:
    """At exit, wait (up to :data:`HAND_OVER_AT_EXIT` s in all) for the work held in memory
    to reach the queue files, before their workers drain and close; say what is lost."""
    deadline = time.monotonic() + HAND_OVER_AT_EXIT
    with _writers_lock:
        writers = list(_every_writer)
    for writer in writers:
        if not writer._wait_handed_over(deadline):
            writer._drop_held("the process exited before the queue file could be written")


def _after_fork_in_child() -> None:
    """A forked child gets writers of its own (the parent's threads are not in it), and the
    parent's writers that its stores still hold forget the parent's work: its held pieces
    (the parent queues them), its unsettled jobs (the parent's worker runs them) and its locks
    (maybe held by a parent's thread at the fork)."""
    global _writers_lock
    _writers.clear()
    _writers_lock = threading.Lock()
    for writer in list(_every_writer):
        writer._lock = threading.Lock()
        writer._settled = threading.Condition()
        writer._unsettled = {}
        writer._closing = []  # (the parent's closes under way)
        writer._held_lines = {}
        writer._queued_with = OrderedDict()
        writer._embedded_with = OrderedDict()
        writer._late = LateEmbeddings(on_answer=writer._hurry)
        writer._held = deque()
        writer._handing = None
        writer._hand_over_thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
