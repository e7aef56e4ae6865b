"""The embedding calls of background jobs, waited for a bounded time, their late answers kept.

One thread per queue file stores every user's memories (:mod:`.writer`), and each user may
bring an embedder of their own (an endpoint of theirs). Were a job's embedding call waited
for as long as it takes, one user's endpoint that accepts the request and never answers would
hold up every user's memories on the folder. So a job's call runs on a helper thread, waited
for at most :data:`EMBEDDING_WAIT_SECONDS`; past it, the try is given up
(:class:`EmbeddingLate`, retried as an embedder's failure is) and the call goes on. Its answer,
when it comes, is kept for the job, whose next try uses it instead of calling again: an
embedder slower than the wait still gets every memory stored, one late call at a time.

While a user's late call runs, every embedding call of that user's jobs fails at once (no
second call, no second thread stuck behind the first), whatever embedder object the job has:
embedders may be made per request. Once the late call has answered, its job goes first: the
user's other jobs wait for its next try (at most :data:`HELD_FOR_RETRY_SECONDS`), so a user's
jobs are still stored in the order they were queued. Other users are held back only while a
late call runs in the very embedder object their job has (one several users share): no other
thread is started into an object stuck in a call.
"""

from __future__ import annotations

import contextvars
import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import EmbeddingError
from .redaction import logger_without_secrets
from .storage.guard import run_for_at_most

log = logger_without_secrets("headroom_memory_integrations")

EMBEDDING_WAIT_SECONDS = 30.0
"""The longest a background job waits for one embedding call (three times an
``OpenAIEmbedder``'s own request timeout): past it the job is retried later, the call left to
finish, its answer kept for the retry."""

HELD_FOR_RETRY_SECONDS = 60.0
"""How long a late call's answer holds its user's other jobs back while its own job has not
been tried again (it is due within ``storage.guard.MAX_RETRY_SECONDS``, and tried at once
when the answer comes): the job that waited longest goes first. Past it (its job was run by
another process, say) nothing is held back any longer; the answer is still kept."""

KEPT_JOBS = 1_000
"""Jobs whose late calls' answers are kept, at most, until each job is done (past it, the
oldest job's are let go of: its next try calls the embedder again)."""

Key = tuple[str, bool, tuple[str, ...]]
"""What a call embeds: the embedder's identity, whether the texts are search queries, the
texts."""


class EmbeddingLate(EmbeddingError):
    """A background job's embedding call gave no answer within :data:`EMBEDDING_WAIT_SECONDS`,
    or an earlier late call of the same user is still running: the job is retried (within
    ``storage.guard.MAX_RETRY_SECONDS``) and uses the late call's answer once it has come."""


@dataclass(eq=False)
class _Call:
    """One embedding call of a job, on its helper thread."""

    job_id: int
    key: Key
    embedder: Any  # the object called (held back while the call runs in it)
    ended: bool = False
    answer: Any = None
    failure: BaseException | None = None
    late: bool = False  # its job stopped waiting for it
    answered_at: float | None = None  # (monotonic) when it answered, if late
    forgotten: bool = False  # its user was forgotten while it ran: its answer is not kept


@dataclass(frozen=True)
class _Job:
    """The job whose embedding calls run in this context."""

    calls: LateEmbeddings
    job_id: int
    user_id: str
    identity: Callable[[Any], str]


_running_job: contextvars.ContextVar[_Job | None] = contextvars.ContextVar(
    "headroom_memory_background_job", default=None
)


def embed_texts(
    embedder: Any, call: Callable[[list[str]], Any], texts: list[str], queries: bool
) -> Any:
    """``call(texts)``: the embedder's call, made by ``MemoryStore._embed``. Inside a background
    job (:meth:`LateEmbeddings.running`), bounded and kept as the module says."""
    job = _running_job.get()
    if job is None:
        return call(texts)
    key = (job.identity(embedder), queries, tuple(texts))
    return job.calls.embed(job.job_id, job.user_id, key, embedder, lambda: call(texts))


class LateEmbeddings:
    """The late embedding calls of one queue file's jobs, and the answers kept for them.

    Args:
        on_answer: Called (on the late call's thread) when a late call has ended: its job
            and the jobs it held back can be tried again at once.
    """

    def __init__(self, on_answer: Callable[[], None] = lambda: None) -> None:
        self._on_answer = on_answer
        self._lock = threading.Lock()
        # user -> their late calls still running, or answered and waiting for their job
        self._late: dict[str, list[_Call]] = {}
        # job id -> (user, the answers of its late calls by what they embedded), oldest first
        self._kept: OrderedDict[int, tuple[str, dict[Key, Any]]] = OrderedDict()

    @contextmanager
    def running(self, job_id: int, user_id: str, identity: Callable[[Any], str]) -> Iterator[None]:
        """Within it, the embedding calls of the stores (on this thread) are the job's:
        bounded, their late answers kept for it. ``identity(embedder)`` tells embedders
        apart (the writer's ``embedder_identity``). A late call that answered for this job
        holds its user's other jobs back no longer: this is its job's try."""
        with self._lock:
            self._let_go(user_id, lambda call: call.job_id == job_id and call.ended)
        token = _running_job.set(_Job(self, job_id, user_id, identity))
        try:
            yield
        finally:
            _running_job.reset(token)

    def embed(
        self, job_id: int, user_id: str, key: Key, embedder: Any, call: Callable[[], Any]
    ) -> Any:
        """``call()``'s answer: kept from a late call of this job with the same ``key``, else
        made now, on a helper thread, and waited for at most :data:`EMBEDDING_WAIT_SECONDS`.

        Raises:
            EmbeddingLate: the call gave no answer in time (it goes on; its answer is kept),
                or a late call of the user still runs or goes first, or one still runs in
                ``embedder`` (no call is made).
            BaseException: what ``call`` raised in time.
        """
        with self._lock:
            kept = self._kept.get(job_id)
            if kept is not None and key in kept[1]:
                self._kept.move_to_end(job_id)
                answer = kept[1][key]
                return copy.deepcopy(answer)  # (an earlier try may have changed what it got)
            if self._holding(user_id):
                raise EmbeddingLate(
                    "an earlier embedding call for this user's memories took longer than "
                    f"{EMBEDDING_WAIT_SECONDS:g} s and has not been used yet; the job waits for it"
                )
            if self._running_in(embedder):
                raise EmbeddingLate(
                    "an earlier embedding call to this embedder took longer than "
                    f"{EMBEDDING_WAIT_SECONDS:g} s and still runs; the job waits for it"
                )
        made = _Call(job_id, key, embedder)
        context = contextvars.copy_context()

        def run() -> None:
            try:
                answer = context.run(call)
            except BaseException as exc:  # re-raised on the job's thread, if in time
                self._ended(made, user_id, None, exc)
            else:
                self._ended(made, user_id, answer, None)

        run_for_at_most(run, EMBEDDING_WAIT_SECONDS, "headroom-memory-embed")
        with self._lock:
            if not made.ended:
                made.late = True
                self._late.setdefault(user_id, []).append(made)
                raise EmbeddingLate(
                    f"the embedder gave no answer in {EMBEDDING_WAIT_SECONDS:g} s; the job is "
                    "tried again and uses the answer once it has come"
                )
        if made.failure is not None:
            raise made.failure
        return made.answer

    def done(self, job_id: int) -> None:
        """The job is done or dead-lettered: its kept answers go, and so does the hold its
        answered late calls had on its user's other jobs."""
        with self._lock:
            kept = self._kept.pop(job_id, None)
            if kept is not None:
                self._let_go(kept[0], lambda call: call.job_id == job_id and call.ended)

    def forget(self, user_id: str) -> None:
        """The user's jobs were deleted: the answers kept for them go, and so will those of
        their calls still running, as they end (deleted means gone: neither the texts nor
        their vectors are kept). A call still running still holds the user's next jobs back
        until then: its thread is stuck in the embedder."""
        with self._lock:
            for job_id in [j for j, (user, _) in self._kept.items() if user == user_id]:
                del self._kept[job_id]
            self._let_go(user_id, lambda call: call.ended)
            for call in self._late.get(user_id, ()):
                call.forgotten = True

    def _running_in(self, embedder: Any) -> bool:
        """With the lock held: whether a late call still runs in ``embedder`` (that object)."""
        return any(
            call.embedder is embedder and not call.ended
            for calls in self._late.values()
            for call in calls
        )

    def _holding(self, user_id: str) -> bool:
        """With the lock held: whether a late call of the user runs, or answered less than
        :data:`HELD_FOR_RETRY_SECONDS` ago and its job has not been tried since."""
        since = time.monotonic() - HELD_FOR_RETRY_SECONDS
        self._let_go(
            user_id, lambda call: call.answered_at is not None and call.answered_at < since
        )
        return bool(self._late.get(user_id))

    def _let_go(self, user_id: str, which: Callable[[_Call], bool]) -> None:
        """With the lock held: the user's late calls ``which`` selects hold nothing back."""
        calls = [call for call in self._late.get(user_id, ()) if not which(call)]
        if calls:
            self._late[user_id] = calls
        else:
            self._late.pop(user_id, None)

    def _ended(self, call: _Call, user_id: str, answer: Any, failure: BaseException | None) -> None:
        """``call`` ended, in time or late. A late answer is kept for its job (not a forgotten
        user's); the jobs a late call held back are made due."""
        with self._lock:
            call.ended, call.answer, call.failure = True, answer, failure
            if not call.late:
                return
            if failure is not None or call.forgotten:  # nothing kept: a next try calls again
                self._let_go(user_id, lambda one: one is call)
                call.answer = None
            else:
                call.answered_at = time.monotonic()
                answers = self._kept.setdefault(call.job_id, (user_id, {}))[1]
                answers[call.key] = answer
                self._kept.move_to_end(call.job_id)
                while len(self._kept) > KEPT_JOBS:
                    self._kept.popitem(last=False)
        try:
            self._on_answer()
        except Exception:  # an answer is kept: the job's retry (within 16 s) uses it
            log.exception("a late embedding call's end could not hurry the jobs it held back")
