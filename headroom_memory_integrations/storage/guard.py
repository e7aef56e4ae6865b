"""Keeping a sick storage backend from hanging or failing its callers for longer than a bound.

- :class:`Availability` remembers that a backend did not answer and fails calls at once for a
  while (1 s, doubling to :data:`MAX_RETRY_SECONDS` while it stays down), so a chat call pays a
  storage timeout at most once per pause instead of on every request; once it answers again,
  the listeners of :func:`when_back` hear of it (the job queues retry their work at once).
- :func:`run_for_at_most` runs work on a daemon thread and stops waiting after a deadline
  (the extraction call of background memory uses it too).
- :func:`start_with_deadline` builds a client in a helper thread and stops waiting after a
  deadline (chromadb's ``HttpClient`` talks to the server while it is constructed); a client
  it completes later is kept, and one still running past the time it was given is
  :attr:`PendingStart.abandoned`.
- :func:`bound_http_requests` gives an ``HttpClient``'s every later request a timeout, and
  :func:`requests_bounded_while_built` every request of one built in its context, those its
  constructor makes included.
- :func:`forget_broken_system` drops what a failed ``PersistentClient`` left in chromadb's
  process-wide cache, so the next attempt to open the folder starts clean.
- :func:`run_within` runs work on a daemon thread and returns its result, or raises
  :class:`DeadlineExceeded` after a deadline; while that work still runs, later work for the
  same owners (a user's store, its embedder) fails at once (a hung embedder holds at most one
  thread and one call, whichever users share it).
- :func:`memory_deadline` gives the memory work of one chat call one deadline, which every
  storage request made in its context charges against (:func:`time_left`,
  :func:`check_deadline`; a server's requests get at most the time left): a server that
  answers every request, but slowly, cannot hold a call for its many requests' timeouts.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from ..errors import HeadroomMemoryError, StorageError
from ..redaction import logger_without_secrets

logger = logger_without_secrets(__name__)

T = TypeVar("T")

FIRST_RETRY_SECONDS = 1.0
"""After a backend first fails to answer, calls fail at once for this long, then one call tries."""
MAX_RETRY_SECONDS = 16.0
"""The pause doubles while the backend stays down, up to this."""


def is_unreachable(exc: BaseException) -> bool:
    """True for errors that mean "the backend did not answer" (timeouts, refused or broken
    connections), as opposed to the backend answering with an error."""
    try:
        import httpx
    except ImportError:  # pragma: no cover - chromadb depends on httpx
        return isinstance(exc, (ConnectionError, TimeoutError))
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def is_rust_panic(exc: BaseException) -> bool:
    """True for a panic in chromadb's Rust core, which reaches Python as pyo3's
    ``PanicException``: a ``BaseException``, so ``except Exception`` lets it through, but a
    failure of the storage (an embedded folder written by a newer chromadb panics on open),
    not an interrupt."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "headroom_memory_deadline", default=None
)


_CUT: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "headroom_memory_deadline_cut", default=None
)
"""Within a deadline: whether the latest request had its own timeout cut to the time left
(one list per deadline, so a thread started with a copy of the context sets it too)."""


class DeadlineExceeded(StorageError):
    """The memory work of a chat call ran out of its time (:func:`memory_deadline`): the call
    goes on without memories. Not a sign that the backend is down."""


@contextmanager
def memory_deadline(seconds: float | None) -> Iterator[None]:
    """Storage requests made in this context (on this thread, and on threads started with a
    copy of its context) must end within ``seconds`` from now, or within an enclosing
    deadline if that is sooner: each request gets at most the time left, and none starts
    once it is gone (:class:`DeadlineExceeded`). None sets no deadline of its own."""
    if seconds is None:
        yield
        return
    end = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(end if outer is None else min(outer, end))
    cut = _CUT.set([False])
    try:
        yield
    finally:
        _CUT.reset(cut)
        _DEADLINE.reset(token)


def request_starts() -> None:
    """A request is about to be made: what :func:`request_was_cut` says is about it alone."""
    flag = _CUT.get()
    if flag is not None:
        flag[0] = False


def request_was_cut() -> bool:
    """Whether the request made since :func:`request_starts` waited less than its own timeout
    because this context's deadline was nearer (a failure then says nothing of the backend)."""
    flag = _CUT.get()
    return flag is not None and flag[0]


def time_left() -> float | None:
    """Seconds left before this context's deadline (<= 0 once passed), or None if none."""
    end = _DEADLINE.get()
    return None if end is None else end - time.monotonic()


def check_deadline(action: str) -> None:
    """Raise :class:`DeadlineExceeded` if this context's deadline has passed."""
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceeded(f"could not {action}: the chat call's time for memory is up")


def within_deadline(seconds: float) -> tuple[float, bool]:
    """``seconds``, or the time left before this context's deadline if that is less, and
    whether the deadline cut it short."""
    left = time_left()
    if left is not None and left < seconds:
        return max(left, 0.0), True
    return seconds, False


def _charge_deadline(request: Any) -> None:
    """An httpx request hook: a request made in a context with a deadline waits at most the
    time left (for connecting, sending, each read and a pooled connection)."""
    left = time_left()
    if left is None:
        return
    if left <= 0:
        raise DeadlineExceeded("the chat call's time for memory is up")
    timeout = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        key: left if value is None else min(value, left) for key, value in timeout.items()
    } or dict.fromkeys(("connect", "read", "write", "pool"), left)
    flag = _CUT.get()
    if flag is not None:  # a failure of a request cut short is the deadline's, not the backend's
        flag[0] = not timeout or any(value is None or value > left for value in timeout.values())


_listeners: list[weakref.WeakMethod[Callable[[str], None]]] = []
_listeners_lock = threading.Lock()


def when_back(listener: Callable[[str], None]) -> None:
    """Call ``listener(location)`` each time a backend held to be down (see
    :class:`Availability`) answers again, on the thread whose call it answered (maybe a chat
    call's: it must return at once, and never raise). ``listener`` is a bound method, held
    weakly: its object is not kept alive for it."""
    with _listeners_lock:
        _listeners[:] = [ref for ref in _listeners if ref() is not None]
        _listeners.append(weakref.WeakMethod(listener))


def _after_fork_in_child() -> None:
    """A thread of the parent may have held the listeners' lock at the fork."""
    global _listeners_lock
    _listeners_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _announce_back(location: str) -> None:
    with _listeners_lock:
        listeners = [ref() for ref in _listeners]
    for listener in listeners:
        if listener is None:
            continue
        try:
            listener(location)
        except Exception:  # the call that found the backend back goes on
            logger.debug("a listener of %s coming back failed", location, exc_info=True)


class Availability:
    """Whether a backend is worth calling now. Thread-safe.

    Args:
        location: Named in the error raised while calls are held back.
        error: The error raised then (storage's by default).
    """

    def __init__(self, location: str, error: type[HeadroomMemoryError] = StorageError) -> None:
        self.location = location
        self.error = error
        self._lock = threading.Lock()
        self._until = 0.0  # monotonic time before which calls fail at once
        self._pause = 0.0
        self._reason = ""

    @property
    def down(self) -> bool:
        """Whether the backend is held to be down now (its calls fail at once)."""
        until = self._until
        return bool(until) and time.monotonic() < until

    def check(self) -> None:
        """Raise :attr:`error` at once while the backend is held to be down."""
        until = self._until
        if until and time.monotonic() < until:
            raise self.error(
                f"{self.location} is unavailable; not trying again for "
                f"{until - time.monotonic():.1f} s. Last error: {self._reason}"
            )

    def failed(self, reason: str, asked: float | None = None) -> None:
        """The backend did not answer, or could not be opened, or asked to be left alone (a
        rate limit): hold calls back for a while, longer each time, or for the ``asked``
        seconds of its Retry-After; never longer than :data:`MAX_RETRY_SECONDS`."""
        with self._lock:
            doubled = self._pause * 2 or FIRST_RETRY_SECONDS
            self._pause = min(MAX_RETRY_SECONDS, doubled if asked is None else asked)
            self._until = time.monotonic() + self._pause
            self._reason = reason
        logger.warning(
            "%s failed (%s); calls to it fail at once for %.0f s",
            self.location,
            reason,
            self._pause,
        )

    def succeeded(self) -> None:
        """The backend answered: call it freely again. If it was held to be down, tell the
        listeners of :func:`when_back` (once per time it comes back)."""
        if self._until or self._pause:
            with self._lock:
                back = bool(self._pause)
                self._until = self._pause = 0.0
            if back:
                _announce_back(self.location)


class PendingStart:
    """A client being built in a helper thread that outlived its caller's deadline.

    Args:
        thread: The helper thread.
        give_up_after: Seconds after its start past which a build still running is taken
            for hung (:attr:`abandoned`); None never.
    """

    def __init__(self, thread: threading.Thread, give_up_after: float | None = None) -> None:
        self.thread = thread
        self._give_up_at = None if give_up_after is None else time.monotonic() + give_up_after

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    @property
    def abandoned(self) -> bool:
        """Still running past the time it was given: its requests are stuck somewhere no
        timeout reaches, and another build may be started beside it."""
        give_up_at = self._give_up_at
        return give_up_at is not None and time.monotonic() >= give_up_at and self.running


def run_for_at_most(
    work: Callable[[], None], seconds: float, name: str
) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``work()`` on a daemon thread called ``name`` and wait up to ``seconds`` for it.

    Returns the thread (still alive if the deadline passed: Python cannot stop it, so it is
    left to finish on its own) and a list that holds what ``work`` raised, if it raised."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # re-raised by the caller, on its own thread
            failure.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown" (Python 3.12.0 to
        # 3.12.2 while the exit drains the job queue): the work runs here, with no deadline,
        # rather than not at all (the turn would be lost)
        run()
        return thread, failure
    thread.join(seconds)
    return thread, failure


_overdue: dict[int, tuple[Any, threading.Event]] = {}
"""By ``id`` of each owner (held here, so the id is not reused meanwhile), the end of its work
that ran late: an event, not the thread (in Python 3.11, a ``join`` interrupted by Ctrl-C
marks a thread still running as stopped). Entries whose work has ended are pruned."""
_overdue_lock = threading.Lock()


def _late_owner(owners: Sequence[Any]) -> bool:
    """Whether work of any of ``owners`` that ran late is still running (pruning the ended)."""
    with _overdue_lock:
        for key in [key for key, (_, ended) in _overdue.items() if ended.is_set()]:
            del _overdue[key]
        return any(id(owner) in _overdue for owner in owners)


def run_within(work: Callable[[], T], seconds: float, owners: Sequence[Any], what: str) -> T:
    """``work()``'s result, run on a daemon thread (with a copy of this context) and waited for
    at most ``seconds``: for work that can block with no timeout of its own and lets go of the
    interpreter lock meanwhile (an embedder that hangs on a request; not chromadb's embedded
    core waiting on its database, which keeps the lock).

    If it does not end in time, or the wait is interrupted (Ctrl-C), it is left to finish on
    its own (Python cannot stop a thread), and until it has, every later call for any of the
    same ``owners`` (the objects the work may be stuck in: a user's store, its embedder, which
    several users' stores may share) raises at once instead of starting another thread that
    would block behind it.

    Raises:
        DeadlineExceeded: ``work`` did not end within ``seconds``, or earlier work of one of
            ``owners`` that did not is still running.
        BaseException: what ``work`` raised.
    """
    if _late_owner(owners):
        raise DeadlineExceeded(
            f"could not {what}: an earlier call's, which took longer than its deadline, "
            f"is still running"
        )
    result: list[T] = []
    context = contextvars.copy_context()
    ended = threading.Event()  # not the thread's state: see _overdue

    def run() -> None:
        try:
            result.append(context.run(work))
        finally:
            ended.set()

    try:
        _, failure = run_for_at_most(run, seconds, "headroom-memory-" + what.split()[0])
    finally:  # also when the wait is interrupted: the next call must not wait behind it
        if not ended.is_set():
            with _overdue_lock:
                _overdue.update((id(owner), (owner, ended)) for owner in owners)
    if failure:
        raise failure[0]
    if not result:
        raise DeadlineExceeded(f"could not {what} within {seconds:g} s")
    return result[0]


def start_with_deadline(
    make: Callable[[], Any],
    adopt: Callable[[Any], None],
    seconds: float,
    what: str,
    give_up_after: float | None = None,
) -> PendingStart | None:
    """Run ``make()`` in a daemon thread and wait up to ``seconds`` for it (a build still
    running ``give_up_after`` seconds from now is :attr:`PendingStart.abandoned`).

    ``adopt(client)`` is called with the result in the helper thread, even if it comes after
    the deadline (the backend answered late: the client is good). Returns None when ``make``
    finished in time; re-raises its error, wrapped in :class:`StorageError`.

    Returns:
        None if done; a :class:`PendingStart` if the deadline passed (callers keep it and do
        not start another while it runs, unless it is abandoned).

    Raises:
        StorageError: ``make`` failed within the deadline.
    """
    started = time.monotonic()
    thread, failure = run_for_at_most(lambda: adopt(make()), seconds, "headroom-memory-connect")
    if thread.is_alive():
        if give_up_after is not None:
            give_up_after -= time.monotonic() - started
        return PendingStart(thread, give_up_after)
    if failure:
        exc = failure[0]
        raise StorageError(f"could not {what}: {type(exc).__name__}: {exc}") from exc
    return None


def bound_http_requests(client: Any, seconds: float) -> bool:
    """Give every later request of a chromadb ``HttpClient`` a timeout of ``seconds`` (it has
    none by default), cut to the time left when made under a :func:`memory_deadline`.
    Returns False if this chromadb keeps its HTTP session elsewhere."""
    session = getattr(getattr(client, "_server", None), "_session", None)
    if not _bound_session(session, seconds):
        logger.warning("cannot bound this chromadb client's request time; calls may hang")
        return False
    return True


def _bound_session(session: Any, seconds: float) -> bool:
    """Give an httpx session's every later request a timeout of ``seconds``, cut to the time
    left under a :func:`memory_deadline`. False if ``session`` is not one."""
    if session is None or not hasattr(session, "timeout"):
        return False
    import httpx

    session.timeout = httpx.Timeout(seconds)
    hooks = session.event_hooks
    if _charge_deadline not in hooks["request"]:
        session.event_hooks = {**hooks, "request": [*hooks["request"], _charge_deadline]}
    return True


_BUILD_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "headroom_memory_build_timeout", default=None
)
_hook_lock = threading.Lock()


@contextmanager
def requests_bounded_while_built(seconds: float) -> Iterator[None]:
    """A chromadb ``HttpClient`` made in this context has a timeout of ``seconds`` on every
    request, from the first: its constructor asks the server for the user, the tenant and the
    database before it returns, on an HTTP session made with none (a connection lost without
    a reset held the build forever). Clients made elsewhere are left as chromadb makes them."""
    _hook_server_sessions()
    token = _BUILD_TIMEOUT.set(seconds)
    try:
        yield
    finally:
        _BUILD_TIMEOUT.reset(token)


def _hook_server_sessions() -> None:
    """Have chromadb's server API (``FastAPI``, made for each ``HttpClient`` and for the admin
    client its constructor makes) bound its session as soon as it is made, when made in a
    :func:`requests_bounded_while_built` context. Done once; does nothing with a chromadb that
    has no such class (its clients are bounded once built, by :func:`bound_http_requests`)."""
    try:
        from chromadb.api.fastapi import FastAPI
    except ImportError:  # pragma: no cover - another chromadb layout
        return
    with _hook_lock:
        make = FastAPI.__init__
        if getattr(make, "_headroom_bounded", False):
            return

        @functools.wraps(make)
        def make_bounded(self: Any, *args: Any, **kwargs: Any) -> None:
            make(self, *args, **kwargs)
            seconds = _BUILD_TIMEOUT.get()
            if seconds is not None:
                _bound_session(getattr(self, "_session", None), seconds)

        make_bounded._headroom_bounded = True  # type: ignore[attr-defined]
        FastAPI.__init__ = make_bounded  # type: ignore[method-assign]


def forget_broken_system(folder: str) -> None:
    """After ``PersistentClient(folder)`` failed: remove the half-started system chromadb cached
    for the folder (it would fail every later open in this process with ``'RustBindingsAPI'
    object has no attribute 'bindings'``). Systems in use by a client are left alone."""
    try:
        from chromadb.api.shared_system_client import SharedSystemClient
    except ImportError:  # pragma: no cover
        return
    systems = getattr(SharedSystemClient, "_identifier_to_system", None)
    counts = getattr(SharedSystemClient, "_identifier_to_refcount", None)
    if not isinstance(systems, dict) or not isinstance(counts, dict):  # pragma: no cover
        return
    with SharedSystemClient._refcount_lock:
        if counts.get(folder, 0) > 0:
            return
        system = systems.pop(folder, None)
    if system is not None:
        try:
            system.stop()
        except Exception:
            logger.debug("stopping a half-started chromadb system failed", exc_info=True)
