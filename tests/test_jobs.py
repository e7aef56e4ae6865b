"""The durable job queue and its worker: real SQLite files, real threads, real subprocesses."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

import pytest
from _reliability_support import wait_for

from headroom_memory_integrations.errors import HeadroomMemoryError, InvalidInputError
from headroom_memory_integrations.jobs import (
    HOLDS_THE_LINE_TRIES,
    MAX_PAYLOAD_BYTES,
    MIGRATIONS,
    Backoff,
    Job,
    JobQueue,
    JobWorker,
    PartlyDone,
    PermanentJobError,
    QueueGone,
    shared_worker,
    sqlite_uri,
    wait_until,
    without_secrets,
)

FAST = Backoff(initial=0.01, factor=2.0, maximum=0.05, jitter=0.1)
MakeWorker = Callable[..., JobWorker]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.sqlite3"


@pytest.fixture
def queue(path: Path) -> Iterator[JobQueue]:
    queue = JobQueue(path)
    yield queue
    queue.close()


@pytest.fixture
def make_worker(path: Path) -> Iterator[MakeWorker]:
    """Workers on their own queue objects for ``path``, closed after the test."""
    workers: list[JobWorker] = []

    def make(handler: Callable[[Job], object], **options: Any) -> JobWorker:
        worker = JobWorker(JobQueue(path), handler, backoff=FAST, poll_interval=0.05, **options)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.close(timeout=0)


def test_put_claim_complete_in_fifo_order(queue: JobQueue) -> None:
    ids = [queue.put("store", f"user-{n}", {"n": n}) for n in range(5)]
    assert ids == sorted(ids)
    assert queue.counts() == {"pending": 5, "running": 0, "failed": 0}
    first = queue.claim()
    assert [job.id for job in first] == ids[:1]
    assert (first[0].kind, first[0].user_id, first[0].attempts) == ("store", "user-0", 1)
    rest = queue.claim(limit=10)
    assert [job.payload["n"] for job in rest] == [1, 2, 3, 4]
    assert queue.counts() == {"pending": 0, "running": 5, "failed": 0}
    assert queue.claim() == []  # our own live claims are not taken back before the lease ends
    for job in first + rest:
        queue.complete(job.id)
    assert queue.counts() == {"pending": 0, "running": 0, "failed": 0}


def test_payload_round_trip_keeps_unicode(queue: JobQueue) -> None:
    payload = {"texts": ["Préfère le thé 🍵", "東京に住んでいる"], "nested": {"k": [1, 2.5, None]}}
    queue.put("store", "zoë", payload)
    [job] = queue.claim()
    assert job.payload == payload
    assert job.user_id == "zoë"


@pytest.mark.parametrize(
    ("kind", "user_id", "payload"),
    [
        ("store", "alice", {"bad": object()}),
        ("store", "alice", {"nan": float("nan")}),
        ("store", "alice", {"surrogate": "\ud800"}),
        ("store", "alice", {"big": "x" * MAX_PAYLOAD_BYTES}),
        ("store", "alice", ["not", "a", "dict"]),
        ("", "alice", {}),
        ("store", "  ", {}),
    ],
)
def test_bad_input_is_rejected_and_nothing_written(
    queue: JobQueue, kind: str, user_id: str, payload: object
) -> None:
    with pytest.raises(InvalidInputError):
        queue.put(kind, user_id, payload)  # type: ignore[arg-type]
    assert queue.counts() == {"pending": 0, "running": 0, "failed": 0}
    assert issubclass(InvalidInputError, ValueError)


def test_expired_lease_and_backoff_delay(queue: JobQueue) -> None:
    job_id = queue.put("store", "alice", {})
    queue.claim(lease_seconds=0)
    [again] = queue.claim(lease_seconds=60)  # the lease expired: taken over
    assert (again.id, again.attempts) == (job_id, 2)
    queue.retry_later(job_id, "TimeoutError: slow", delay_seconds=60)
    assert queue.claim() == []
    assert queue.counts()["pending"] == 1


def test_backoff_doubles_and_is_capped() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, maximum=5.0, jitter=0.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 10_000)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert 0.8 <= Backoff(initial=1.0, jitter=0.2).delay(1) <= 1.2


def test_retryable_failures_are_retried_until_success(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    attempts: list[int] = []

    def flaky(job: Job) -> None:
        attempts.append(job.attempts)
        if len(attempts) <= 2:
            raise TimeoutError("the extraction call timed out")

    worker = make_worker(flaky)
    queue.put("extract", "alice", {"turn": "hi"})
    worker.notify()
    assert worker.flush(timeout=30)
    assert attempts == [1, 2, 3]
    assert worker.stats() == {"processed": 1, "retried": 2, "failed": 0, "pending": 0, "running": 0}


def test_a_job_that_keeps_failing_is_logged_at_warning_at_its_fifth_try(
    queue: JobQueue, make_worker: MakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    """Retries are logged at INFO (a passing 429 is no news), so a failure that lasts (a full
    disk, storage down) showed nothing at WARNING while memories waited: its 5th try is."""
    attempts: list[int] = []

    def failing(job: Job) -> None:
        attempts.append(job.attempts)
        if len(attempts) <= 6:
            raise OSError("No space left on device")

    worker = make_worker(failing)
    with caplog.at_level(logging.INFO, logger="headroom_memory_integrations.jobs"):
        queue.put("extract", "alice", {"turn": "hi"})
        worker.notify()
        assert worker.flush(timeout=30)
    # (only this job's: another test's worker left running may log its own retries here)
    retries = [r for r in caplog.records if "failed with OSError; retrying" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.INFO] * 4 + [logging.WARNING, logging.INFO]
    assert "attempt 5" in retries[4].getMessage() and "OSError" in retries[4].getMessage()
    assert "No space" not in caplog.text  # the error's text may quote the user: DEBUG only


def test_a_partly_done_job_is_retried_as_the_job_left_to_do(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    """An extraction whose model answered but whose write failed: the row becomes a store of
    the answer (same id, date and user), which the store worker retries; the costly part runs
    once. A job of a user forgotten before its try ends stays deleted."""
    extractions: list[int] = []
    stored: list[Job] = []
    forget = threading.Event()

    def extract(job: Job) -> None:
        extractions.append(job.id)
        if job.user_id == "bob":
            forget.wait(60)  # bob is forgotten while his extraction runs
        raise PartlyDone("store", {"memories": [job.payload["turn"]]}, TimeoutError("down"))

    extractor = make_worker(extract, kinds=("extract",))
    alice = queue.put("extract", "alice", {"turn": "Lives in Lyon"}, created_at=1_000.0)
    extractor.notify()
    wait_for(lambda: queue.counts() == {"pending": 1, "running": 0, "failed": 0})
    extractor.close(timeout=0)
    assert extractions == [alice]
    claimed: list[Job] = []
    wait_for(lambda: bool(claimed.extend(queue.claim(kinds=("store",)))) or bool(claimed))
    [job] = claimed
    assert (job.id, job.kind, job.user_id, job.payload, job.created_at, job.attempts) == (
        alice,
        "store",
        "alice",
        {"memories": ["Lives in Lyon"]},
        1_000.0,
        2,
    )
    assert job.last_error == "TimeoutError: down"  # the cause's, as it is retried
    queue.retry_later(job.id, "TimeoutError: down", 0)
    storer = make_worker(stored.append, kinds=("store",))
    storer.notify()
    assert storer.flush(timeout=30)
    assert [j.id for j in stored] == [alice] and extractions == [alice]

    extractor = make_worker(extract, kinds=("extract",), lease_seconds=0.01)
    queue.put("extract", "bob", {"turn": "Lives in Oslo"})
    extractor.notify()
    wait_for(lambda: queue.counts()["running"] == 1)
    time.sleep(0.05)
    assert queue.forget_user("bob") == (1, 0)  # its claim expired: deleted while it runs
    forget.set()
    assert extractor.flush(timeout=30)
    assert queue.counts() == {"pending": 0, "running": 0, "failed": 0}  # not brought back


def test_a_partly_done_job_that_cannot_be_retried_is_kept_as_the_job_left(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    def extract(job: Job) -> None:
        raise PartlyDone("store", {"memories": ["x"]}, PermanentJobError("bad data"))

    worker = make_worker(extract, kinds=("extract",))
    queue.put("extract", "alice", {"turn": "hi"})
    worker.notify()
    assert worker.flush(timeout=30)
    [dead] = queue.failed()
    assert (dead.kind, dead.payload, dead.last_error) == (
        "store",
        {"memories": ["x"]},
        "PermanentJobError: bad data",
    )


def test_hurry_makes_the_jobs_waiting_out_a_backoff_due_at_once(
    queue: JobQueue, path: Path
) -> None:
    """A storage that was down answers again: its jobs, backed off for ten minutes, run now."""
    tries: list[float] = []

    def handler(job: Job) -> None:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise TimeoutError("the storage did not answer")

    slow = Backoff(initial=600.0, maximum=600.0, jitter=0.0)
    worker = JobWorker(JobQueue(path), handler, backoff=slow, poll_interval=0.05)
    try:
        queue.put("store", "alice", {})
        worker.notify()
        wait_for(lambda: len(tries) == 1 and queue.counts()["pending"] == 1)
        time.sleep(0.2)
        assert len(tries) == 1  # waiting out its ten minutes
        worker.hurry()
        # within a minute (a shared machine may stall): not the backoff's ten minutes
        assert worker.flush(timeout=60)
        assert len(tries) == 2 and tries[1] - tries[0] < 60
    finally:
        worker.close(timeout=0)


def test_on_released_tells_when_each_job_is_due_again(queue: JobQueue, path: Path) -> None:
    """The writer learns from ``on_released`` which of a user's jobs wait out a backoff, and
    until when, without reading the file on a chat call's path: a retried job with the time
    its retry is due (now, after hurry()), a PartlyDone one as the job left to do, a job done
    or dead-lettered with None."""
    released: dict[str, tuple[str, float | None]] = {}
    worker: JobWorker

    def handler(job: Job) -> None:
        outcome = job.payload["outcome"]
        if outcome == "retried":
            raise TimeoutError("the storage did not answer")
        if outcome == "partly":
            raise PartlyDone("store", {"outcome": "left"}, TimeoutError("down"))
        if outcome == "hurried" and job.attempts == 1:
            worker.hurry()  # the storage answers again while this try fails
            raise TimeoutError("the storage did not answer")
        if outcome == "dead":
            raise PermanentJobError("cannot be done")

    def on_released(job: Job, due: float | None) -> None:
        released.setdefault(job.payload["outcome"], (job.kind, due))  # its first try's

    slow = Backoff(initial=60.0, maximum=60.0, jitter=0.0)
    worker = JobWorker(
        JobQueue(path), handler, backoff=slow, poll_interval=0.05, on_released=on_released
    )
    try:
        for number, outcome in enumerate(("done", "retried", "partly", "dead")):
            kind = "extract" if outcome == "partly" else "store"
            queue.put(kind, f"user-{number}", {"outcome": outcome})
        started = time.time()
        worker.notify()
        wait_for(lambda: len(released) == 4)
        assert released["done"] == ("store", None)
        assert released["dead"] == ("store", None)
        for outcome in ("retried", "left"):  # (a PartlyDone extraction is now a store job)
            kind, due = released[outcome]
            assert kind == "store" and due is not None
            assert started + 59 < due < time.time() + 60.5
        queue.put("store", "user-9", {"outcome": "hurried"})
        worker.notify()
        wait_for(lambda: "hurried" in released)
        kind, due = released["hurried"]
        assert due is not None and due <= time.time()  # made due at once
    finally:
        worker.close(timeout=0)


def test_longest_delay_bounds_the_backoff_after_some_errors(queue: JobQueue, path: Path) -> None:
    tries: list[str] = []

    def handler(job: Job) -> None:
        tries.append(job.payload["error"])
        if len(tries) <= 2:
            raise (TimeoutError if job.payload["error"] == "timeout" else OSError)("down")

    slow = Backoff(initial=600.0, maximum=600.0, jitter=0.0)
    worker = JobWorker(
        JobQueue(path),
        handler,
        backoff=slow,
        poll_interval=0.05,
        longest_delay=lambda exc: 0.05 if isinstance(exc, TimeoutError) else 3_600.0,
    )
    try:
        queue.put("store", "alice", {"error": "timeout"})
        worker.notify()
        # retried twice within 0.05 s each, not ten minutes (a minute: a shared machine may stall)
        assert worker.flush(timeout=60)
        assert tries == ["timeout"] * 3
        tries.clear()
        queue.put("store", "alice", {"error": "disk"})
        worker.notify()
        wait_for(lambda: tries == ["disk"])
        time.sleep(0.3)
        assert tries == ["disk"]  # another error: the backoff's ten minutes
    finally:
        worker.close(timeout=0)


def test_a_job_refused_with_retry_after_waits_as_long_as_the_server_asked(
    queue: JobQueue, path: Path
) -> None:
    """A 429 saying ``retry-after`` (seconds or an HTTP date) or ``retry-after-ms``, from an
    OpenAI client whose own retries are off: the job waits that long, up to the backoff's cap,
    never less than its backoff (before: the backoff's half second, whatever the server said:
    200 queued turns made 1,198 calls in a 20 s outage). An error raised from it counts too."""
    from email.utils import formatdate

    from headroom_memory_integrations.testing import Reply, ScriptedOpenAIServer

    date = int(time.time()) + 45
    asked = {
        "seconds": {"retry-after": "30"},
        "milliseconds": {"retry-after-ms": "12500", "retry-after": "99"},
        "date": {"retry-after": formatdate(date, usegmt=True)},
        "too long": {"retry-after": "3600"},
        "wrapped": {"retry-after": "20"},
        "nonsense": {"retry-after": "soon"},
    }
    expected = {  # seconds after the failed try; the date is a time of its own
        "seconds": 30.0,
        "milliseconds": 12.5,
        "too long": 120.0,  # the backoff's cap
        "wrapped": 20.0,
        "nonsense": 2.0,  # the backoff alone
    }

    def retry_written(user: str) -> float | None:
        """The job's ``not_before`` once its retry is in the file (the worker counts it first)."""
        with closing(sqlite3.connect(path)) as conn:
            row = conn.execute(
                "SELECT not_before FROM jobs WHERE user_id = ? AND status = 'pending' "
                "AND last_error IS NOT NULL",
                (user,),
            ).fetchone()
        return None if row is None else float(row[0])

    with ScriptedOpenAIServer() as server:
        for headers in asked.values():
            server.script(Reply.error(429, "Rate limit reached", headers=headers))
        client = server.client(max_retries=0)

        def handler(job: Job) -> None:
            try:
                client.chat.completions.create(
                    model="mini", messages=[{"role": "user", "content": "I like tea"}]
                )
            except Exception as exc:
                if job.user_id == "wrapped":
                    raise RuntimeError("the extraction failed") from exc
                raise

        backoff = Backoff(initial=2.0, maximum=120.0, jitter=0.0)
        worker = JobWorker(JobQueue(path), handler, backoff=backoff, poll_interval=0.05)
        tried: dict[str, tuple[float, float, float]] = {}  # put, not_before, written
        try:
            for user in asked:  # one at a time: each its scripted reply
                put = time.time()
                queue.put("extract", user, {})
                worker.notify()
                wait_for(lambda u=user: retry_written(u) is not None, timeout=60)
                tried[user] = (put, retry_written(user) or 0.0, time.time())
        finally:
            worker.close(timeout=0)
    # each wait counted from its failed try, which lies between the put and the retry's write:
    # no wall-clock margin that a stalled machine could use up
    for user, seconds in expected.items():
        put, not_before, written = tried[user]
        assert put + seconds - 0.5 <= not_before <= written + seconds + 0.5, user
    put, not_before, written = tried["date"]  # its wait is read at the try, written after it
    assert date - 0.5 <= not_before <= date + (written - put) + 0.5


def test_permanent_failure_is_dead_lettered_then_requeued(
    queue: JobQueue, make_worker: MakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = threading.Event()

    def handler(job: Job) -> None:
        if not healthy.is_set():
            raise PermanentJobError("the model answered with malformed JSON")

    worker = make_worker(handler)
    job_id = queue.put("extract", "alice", {"turn": "my secret diary entry"})
    with caplog.at_level(logging.INFO, logger="headroom_memory_integrations.jobs"):
        worker.notify()
        assert worker.flush(timeout=30)  # dead-lettered counts as finished
    assert queue.counts() == {"pending": 0, "running": 0, "failed": 1}
    [dead] = queue.failed()
    assert dead.id == job_id
    assert dead.last_error == "PermanentJobError: the model answered with malformed JSON"
    assert worker.stats()["failed"] == 1
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert f"job {job_id}" in warning.getMessage()
    # the error's message is the library's own, saying what to fix: it is logged
    assert "PermanentJobError: the model answered with malformed JSON" in warning.getMessage()
    assert not any(word in caplog.text for word in ("alice", "secret", "diary"))  # user text
    time.sleep(0.2)
    assert queue.counts()["failed"] == 1  # never run again on its own

    healthy.set()
    assert queue.retry_failed() == 1
    worker.notify()
    assert worker.flush(timeout=30)
    assert queue.counts() == {"pending": 0, "running": 0, "failed": 0}
    assert worker.stats()["processed"] == 1


def test_present_tells_which_jobs_are_in_the_file_by_looking_up_each(queue: JobQueue) -> None:
    """``present`` (the writer's check of jobs run elsewhere, on a worker's thread with the
    file's lock held) answers which of the ids asked for are still jobs of the file, dead-
    lettered ones too, past SQLite's bound on a statement's parameters, and does work as
    many ids are asked about, not as many jobs wait in the file: it walked every job from
    the oldest id asked for, a backlog of a million after an outage under the lock."""
    first, done, failed = (queue.put("store", "alice", {"n": n}) for n in range(3))
    queue.complete(done)
    queue.fail(failed, "PermanentJobError: no")
    with queue._locked() as conn:  # a backlog, queued behind them
        conn.executemany(
            "INSERT INTO jobs (kind, user_id, payload, created_at, not_before)"
            " VALUES ('store', 'bob', '{}', 0, 0)",
            [()] * 20_000,
        )
    last = queue.put("store", "alice", {"n": 3})
    asked = [first, done, failed, last, last + 1, *range(last + 2, last + 2_000)]
    assert queue.present(asked) == {first, failed, last}
    assert queue.present([]) == set()

    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    with queue._lock:
        assert queue._conn is not None
        queue._conn.set_progress_handler(step, 100)  # counts SQLite's steps, by hundreds
    assert queue.present([first, last]) == {first, last}
    assert steps < 20  # hundreds of steps: a walk of the 20,000 jobs between took hundreds


def test_non_retryable_exceptions_follow_the_predicate(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    def handler(job: Job) -> None:
        raise (ValueError if job.payload["n"] else ConnectionError)("boom")

    worker = make_worker(handler, retryable=lambda exc: not isinstance(exc, ValueError))
    queue.put("store", "alice", {"n": 1})
    queue.put("store", "alice", {"n": 0})
    worker.notify()
    wait_for(lambda: worker.stats()["failed"] == 1 and worker.stats()["retried"] >= 1)
    assert [job.payload for job in queue.failed()] == [{"n": 1}]


def test_handler_errors_do_not_kill_the_worker_and_flush_times_out(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    done: list[int] = []

    def handler(job: Job) -> None:
        if job.payload["n"] == 0:
            raise RuntimeError("a bug in the handler")
        done.append(job.payload["n"])

    worker = make_worker(handler)
    for n in range(3):
        queue.put("store", f"user{n}", {"n": n})
    worker.notify()
    wait_for(lambda: done == [1, 2])  # job 0 holds up no other user's
    started = time.monotonic()
    assert worker.flush(timeout=0.5) is False  # job 0 keeps failing and backing off
    # at least its timeout; at most a while (a shared machine may stall): not for ever
    assert 0.45 <= time.monotonic() - started < 60
    assert worker.stats()["retried"] >= 3
    queue.put("store", "user3", {"n": 3})
    worker.notify()
    wait_for(lambda: done == [1, 2, 3])  # the thread is still alive
    assert worker.close(timeout=0.1) is False
    assert queue.counts()["pending"] == 1  # kept in the file for the next run
    worker.close()  # idempotent


def test_concurrent_producers_every_job_processed_exactly_once(make_worker: MakeWorker) -> None:
    seen: list[int] = []
    worker = make_worker(lambda job: seen.append(job.id))
    put: list[int] = []
    lock = threading.Lock()

    def produce(thread: int) -> None:
        for n in range(50):
            job_id = worker.queue.put("store", f"user-{thread}", {"n": n})
            with lock:
                put.append(job_id)
            worker.notify()

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert worker.flush(timeout=30)
    assert len(seen) == len(set(seen)) == 200
    assert sorted(seen) == sorted(put)
    assert worker.stats()["processed"] == 200


def test_two_workers_on_one_file_never_share_a_job(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    # several users: one user's jobs run one at a time, in order (in_order), in either worker
    ids = [queue.put("store", f"user{n % 10}", {"n": n}) for n in range(200)]
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def recorder(name: str) -> Callable[[Job], None]:
        def handle(job: Job) -> None:
            seen[name].append(job.id)
            time.sleep(0.001)

        return handle

    workers = [make_worker(recorder(name), name=name) for name in seen]
    for worker in workers:
        worker.start()
    assert all(worker.flush(timeout=30) for worker in workers)
    every = seen["a"] + seen["b"]
    assert len(every) == len(set(every)) and sorted(every) == ids
    assert seen["a"] and seen["b"]


def test_workers_take_only_their_kinds(queue: JobQueue, make_worker: MakeWorker) -> None:
    stored: list[str] = []
    store = make_worker(lambda job: stored.append(job.kind), kinds=["store"])
    queue.put("extract", "alice", {})
    queue.put("store", "alice", {})
    store.notify()
    assert store.flush(timeout=30)  # does not wait for the extract job it will never take
    assert stored == ["store"]
    assert queue.counts()["pending"] == 1
    extracted: list[str] = []
    extract = make_worker(lambda job: extracted.append(job.kind), kinds=("extract",))
    assert extract.flush(timeout=30)  # starts the thread: leftovers are resumed
    assert extracted == ["extract"]


def test_one_per_user_claims_leave_a_users_jobs_while_one_of_theirs_runs(
    queue: JobQueue,
) -> None:
    first, second = (queue.put("work", "alice", {"n": n}) for n in range(2))
    bobs = queue.put("work", "bob", {})
    assert [job.id for job in queue.claim(one_per_user=True)] == [first]
    assert [job.id for job in queue.claim(one_per_user=True)] == [bobs]  # not alice's second
    assert queue.claim(one_per_user=True) == []
    queue.complete(first)
    assert [job.id for job in queue.claim(one_per_user=True)] == [second]


def test_one_per_user_claims_take_one_job_of_each_user_at_a_time(queue: JobQueue) -> None:
    alices = [queue.put("work", "alice", {"n": n}) for n in range(3)]
    bobs = queue.put("work", "bob", {})
    assert [job.id for job in queue.claim(limit=4, one_per_user=True)] == [alices[0], bobs]


def test_in_order_claims_take_a_users_jobs_in_the_order_queued_across_processes(
    queue: JobQueue, path: Path
) -> None:
    """A user's later job is not taken while an earlier one runs or waits out its retry,
    whichever process (here: a connection of its own) claims; other users' jobs go on."""
    other = JobQueue(path)  # another process's connection to the same file
    try:
        first, second = (queue.put("extract", "alice", {"n": n}) for n in range(2))
        bobs = queue.put("extract", "bob", {})
        assert [job.id for job in queue.claim(in_order=True)] == [first]
        assert [job.id for job in other.claim(in_order=True)] == [bobs]
        assert other.claim(in_order=True) == []  # alice's second waits for her first
        queue.retry_later(first, "RuntimeError: 503", 60.0)  # due in a minute: still first
        assert other.claim(in_order=True) == []
        assert queue.claim(in_order=True) == []
        # an earlier job of a kind waited for holds a later one back, of another kind not
        store = queue.put("store", "carol", {})
        carols = queue.put("extract", "carol", {})
        assert other.claim(kinds=("extract",), in_order=True, waits_for=("store", "extract")) == []
        assert other.claim(kinds=("extract",), in_order=True) == []  # (None: any kind)
        taken = other.claim(kinds=("extract",), in_order=True, waits_for=("extract",))
        assert [job.id for job in taken] == [carols]
        queue.complete(carols)
        queue.complete(store)
        queue.make_due()
        assert [job.id for job in other.claim(in_order=True)] == [first]
        other.complete(first)
        assert [job.id for job in queue.claim(in_order=True)] == [second]
    finally:
        other.close()


def test_a_dead_lettered_job_does_not_hold_back_its_users_later_jobs(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    """A user's jobs run in the order queued: one waiting out a retry holds the later ones
    back, one dead-lettered does not (flush() is not kept waiting for ever either)."""
    done: list[int] = []
    broken = {0}

    def handler(job: Job) -> None:
        n = job.payload["n"]
        if n in broken:
            raise PermanentJobError("cannot be done")
        if n == 2 and job.attempts < 3:
            raise RuntimeError("overloaded")  # retried twice, while 3 waits
        done.append(n)

    for n in range(4):
        queue.put("store", "alice", {"n": n})
    worker = make_worker(handler)
    assert worker.flush(timeout=30)
    assert done == [1, 2, 3]
    assert [job.payload["n"] for job in queue.failed()] == [0]
    broken.clear()
    assert queue.retry_failed() == 1  # back in line, first
    worker.notify()
    assert worker.flush(timeout=30)
    assert done == [1, 2, 3, 0]


def test_a_job_that_keeps_failing_stops_holding_its_users_later_jobs_back(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    """One turn that always fails (a document too long for the extraction model's time
    limit) was retried for ever and held every later job of its user back: nothing the user
    said after it was ever learnt. After HOLDS_THE_LINE_TRIES tries it is still retried, but
    out of the line."""
    done: list[int] = []
    tries: list[int] = []

    def handler(job: Job) -> None:
        if job.payload["n"] == 0:
            tries.append(job.attempts)
            raise RuntimeError("the extraction timed out")
        done.append(job.payload["n"])

    for n in range(3):
        queue.put("store", "alice", {"n": n})
    make_worker(handler).notify()
    wait_for(lambda: done == [1, 2], timeout=30)
    assert min(tries) == 1 and max(tries) >= HOLDS_THE_LINE_TRIES  # it held the line first
    counts = queue.counts()
    assert counts["failed"] == 0 and counts["pending"] + counts["running"] == 1  # still retried


def test_a_job_outliving_its_lease_is_not_taken_back_by_another_thread_of_its_worker(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    """A handler slower than the lease (a stalled model call): the worker's other threads leave
    the job to it, so it runs once, and the user's next job waits for it to end."""
    running: list[str] = []
    overlaps: list[list[str]] = []
    runs: list[str] = []

    def handle(job: Job) -> None:
        if job.user_id in running:
            overlaps.append([*running, job.user_id])
        running.append(job.user_id)
        runs.append(f"{job.user_id} {job.payload['n']}")
        time.sleep(0.8 if job.user_id == "alice" and job.payload["n"] == 0 else 0.05)
        running.remove(job.user_id)

    worker = make_worker(handle, threads=3, lease_seconds=0.2, name="outlived")
    for n in range(2):
        queue.put("work", "alice", {"n": n})
        worker.notify("alice")
    wait_for(lambda: runs == ["alice 0"])
    time.sleep(0.3)  # alice's lease has expired; bob's job brings in a second thread
    queue.put("work", "bob", {"n": 0})
    worker.notify("bob")
    assert worker.flush(timeout=30)
    assert overlaps == []
    assert sorted(runs) == ["alice 0", "alice 1", "bob 0"]
    assert runs.index("alice 0") < runs.index("alice 1")


def test_threads_run_users_side_by_side_each_in_order_and_the_extra_ones_leave(
    queue: JobQueue, make_worker: MakeWorker
) -> None:
    """With threads=3, three users' jobs run at once and alice's second only after her first.
    A thread is added only when another user's job is due while every thread runs one (not
    for alice's second), and the added ones leave once idle: only the first one stays."""
    release = {user: threading.Event() for user in ("alice", "bob", "carol")}
    started: list[str] = []
    done: list[str] = []

    def handle(job: Job) -> None:
        started.append(f"{job.user_id} {job.payload['n']}")
        assert release[job.user_id].wait(60)
        done.append(f"{job.user_id} {job.payload['n']}")

    worker = make_worker(handle, threads=3, name="side-by-side")

    def threads() -> int:
        return sum(t.name == "side-by-side" and t.is_alive() for t in threading.enumerate())

    for n in range(2):
        queue.put("work", "alice", {"n": n})
        worker.notify("alice")
    wait_for(lambda: started == ["alice 0"])
    time.sleep(0.2)
    assert started == ["alice 0"] and threads() == 1
    for user in ("bob", "carol"):
        queue.put("work", user, {"n": 0})
        worker.notify(user)
    wait_for(lambda: len(started) == 3)
    assert sorted(started) == ["alice 0", "bob 0", "carol 0"] and threads() == 3
    release["bob"].set()
    release["carol"].set()
    time.sleep(0.2)
    assert "alice 1" not in started
    release["alice"].set()
    assert worker.flush(timeout=30)
    assert done.index("alice 0") < done.index("alice 1") and len(done) == 4
    wait_for(lambda: threads() == 1, timeout=30)
    assert worker.close(timeout=30) and threads() == 0


def test_extra_threads_leave_while_the_wal_is_held_and_the_first_one_erases_it_after(
    path: Path, queue: JobQueue, make_worker: MakeWorker
) -> None:
    """Another connection reading the file keeps the WAL (it cannot be truncated under a
    reader): the finished jobs' payloads stay in it meanwhile. The threads added for other
    users' jobs still leave once idle, and the first one erases the WAL once it can."""
    release = threading.Event()

    def handle(job: Job) -> None:
        assert release.wait(60)

    worker = make_worker(handle, threads=3, name="held-wal")

    def threads() -> int:
        return sum(t.name == "held-wal" and t.is_alive() for t in threading.enumerate())

    wal = Path(f"{path}-wal")
    for user in ("alice", "bob", "carol"):
        queue.put("work", user, {"note": f"private note of {user}"})
        worker.notify(user)
    wait_for(lambda: threads() == 3)
    reader = sqlite3.connect(path)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchone()  # a read snapshot: WAL kept
        release.set()
        assert worker.flush(timeout=30)
        wait_for(lambda: threads() == 1, timeout=30)  # the extra ones left, WAL or not
        assert b"private note of" in wal.read_bytes()
    finally:
        reader.close()
    wait_for(lambda: wal.stat().st_size == 0, timeout=30)
    assert threads() == 1 and worker.close(timeout=30)


def test_processes_opening_a_new_file_at_once(path: Path) -> None:
    script = (
        "import sys; from headroom_memory_integrations.jobs import JobQueue; "
        "q = JobQueue(sys.argv[1]); [q.put('store', 'alice', {'n': n}) for n in range(25)]"
    )
    children = [subprocess.Popen([sys.executable, "-c", script, str(path)]) for _ in range(4)]
    assert [child.wait(timeout=15) for child in children] == [0, 0, 0, 0]
    queue = JobQueue(path)
    assert queue.counts()["pending"] == 100
    assert len({job.id for job in queue.claim(limit=200)}) == 100
    queue.close()


CHILD = """
import sys, time
from pathlib import Path
from typing import Any
from headroom_memory_integrations.jobs import JobQueue, JobWorker
path, log, started, mode = sys.argv[1:5]
queue = JobQueue(path)
for n in range(6):
    queue.put("store", "alice", {"n": n})

def handle(job):
    if mode == "block" and job.payload["n"] == 2:
        Path(started).write_text(str(job.id))
        time.sleep(60)
    time.sleep(0.05)
    with open(log, "a") as out:
        out.write(f"{job.payload['n']}\\n")

JobWorker(queue, handle, lease_seconds=3600).notify()
if mode == "block":
    time.sleep(60)
"""


def run_child(path: Path, tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], Path]:
    log, started = tmp_path / "child.log", tmp_path / "started"
    args = [sys.executable, "-c", textwrap.dedent(CHILD), str(path), str(log), str(started), mode]
    return subprocess.Popen(args), log


@pytest.mark.parametrize("threads", [1, 3])
def test_jobs_of_a_killed_process_are_resumed(
    path: Path, tmp_path: Path, make_worker: MakeWorker, threads: int
) -> None:
    child, log = run_child(path, tmp_path, "block")
    try:
        started = tmp_path / "started"  # made, then written: wait for its text
        wait_for(lambda: started.exists() and started.read_text() != "")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert log.read_text().split() == ["0", "1"]
    blocked_id = int((tmp_path / "started").read_text())

    resumed: list[tuple[int, int]] = []
    worker = make_worker(
        lambda job: resumed.append((job.payload["n"], job.attempts)), threads=threads
    )
    assert worker.queue.counts() == {"pending": 3, "running": 1, "failed": 0}
    worker.start()  # the dead owner is noticed at once, though its lease has an hour to run
    assert worker.flush(timeout=30)
    assert resumed == [(2, 2), (3, 1), (4, 1), (5, 1)]
    assert log.read_text().split() == ["0", "1"]  # the killed job never completed there
    assert worker.queue.counts() == {"pending": 0, "running": 0, "failed": 0}
    assert blocked_id > 0


def test_atexit_drains_before_the_process_exits(path: Path, tmp_path: Path) -> None:
    child, log = run_child(path, tmp_path, "exit")
    assert child.wait(timeout=15) == 0
    assert log.read_text().split() == [str(n) for n in range(6)]
    queue = JobQueue(path)
    assert queue.counts() == {"pending": 0, "running": 0, "failed": 0}
    queue.close()


def test_at_exit_workers_of_many_files_drain_side_by_side(tmp_path: Path) -> None:
    """Each worker waits at most its exit_timeout from the start of the exit, not one after
    the other: a process with work stuck in 32 queue files exits in about one timeout. Shown
    by the time each worker's close is given (the first the whole timeout, the later ones what
    is left of it), and by the time the exit takes, with room for a stalled shared machine:
    about 5 s side by side, against 160 s one after the other, or 36 s if each close overran
    its timeout by one second."""
    code = f"""
import atexit, time
from contextlib import closing
from pathlib import Path
from headroom_memory_integrations.jobs import JobQueue, JobWorker
given, running = [], []
close = JobWorker.close
def recorded_close(self, timeout=5.0, **options):
    given.append(timeout)
    return close(self, timeout, **options)
JobWorker.close = recorded_close
atexit.register(lambda: print(given, flush=True))  # runs after the workers' drain
def stuck(job):
    running.append(job.id)
    time.sleep(600)
for n in range(32):
    path = Path({str(tmp_path)!r}) / f"jobs-{{n}}.sqlite3"
    worker = JobWorker(JobQueue(path), stuck, exit_timeout=5.0)
    worker.queue.put("store", "alice", {{"n": n}})
    worker.notify()
waited = time.monotonic() + 60
while len(running) < 32 and time.monotonic() < waited:
    time.sleep(0.05)  # every handler is running
print(time.monotonic(), flush=True)
"""
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    exited = time.monotonic()
    assert run.returncode == 0, run.stderr
    started, given = run.stdout.splitlines()
    assert exited - float(started) >= 5.0  # the jobs were waited for
    assert exited - float(started) < 30.0  # about one timeout: not 32 of them
    timeouts = json.loads(given)
    assert len(timeouts) == 32 and timeouts[0] <= 5.0, timeouts
    assert sum(timeouts) < 7.5, timeouts  # one after the other: 32 x 5 s


def test_at_exit_a_process_waits_only_for_the_jobs_it_queued_that_can_run(path: Path) -> None:
    """The exit's drain waits for this process's jobs that can run before its timeout ends,
    not for another process's job this process cannot run (a turn waiting for an extraction
    client it does not have) nor for its own job waiting out a backoff past the timeout; it
    says in one line how many jobs are left for a later run. Before, every process on the
    file waited the whole exit_timeout, on every run, while such a job was in the file."""
    left_by_another = JobQueue(path)
    left_by_another.put("extract", "tenant-a", {"turn": "left by a killed process"})
    left_by_another.close()
    code = f"""
import logging, time
from headroom_memory_integrations.jobs import Backoff, JobQueue, JobWorker
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
def handle(job):
    if job.user_id != "bob":
        raise RuntimeError("cannot run it in this process")
    time.sleep(0.3)  # bob's job is still running when the exit starts: it is waited for
    print("ran", job.user_id, flush=True)
queue = JobQueue({str(path)!r})
worker = JobWorker(queue, handle, backoff=Backoff(initial=600.0, maximum=600.0), exit_timeout=300.0)
queue.put("store", "carol", {{"n": 1}})  # tried once, then waits out a backoff of 600 s
queue.put("store", "bob", {{"n": 2}})
worker.notify("bob")
print(time.monotonic(), flush=True)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400)
    exited = time.monotonic()
    assert run.returncode == 0, run.stderr
    started, ran = run.stdout.split("\n")[:2]
    assert ran == "ran bob"
    waited = exited - float(started)
    assert waited < 60, waited  # before: the whole exit_timeout (300 s) and more
    lines = [line for line in run.stderr.splitlines() if "later run" in line]
    assert lines == [
        f"WARNING job queue {path}: 2 job(s) left for a later run (1 queued by this process)"
    ], run.stderr
    queue = JobQueue(path)
    assert queue.counts() == {"pending": 2, "running": 0, "failed": 0}
    queue.close()


@pytest.mark.parametrize("in_order", [True, False])
def test_the_exits_drain_skips_a_job_held_behind_one_waiting_out_a_backoff(
    path: Path, in_order: bool
) -> None:
    """The exit's drain (``runnable_only``) does not wait for a job of this process's that
    cannot run before its timeout ends: in order, one behind an earlier job of its user that
    waits out a backoff past then. Out of order, that job can run, and is waited for."""
    ran: list[int] = []

    def handle(job: Job) -> None:
        if job.payload["n"] == 1:
            raise RuntimeError("fails: retried after 60 s")
        ran.append(job.payload["n"])

    worker = JobWorker(
        JobQueue(path), handle, backoff=Backoff(initial=60.0, jitter=0.0), in_order=in_order
    )
    try:
        worker.queue.put("store", "carol", {"n": 1})
        worker.queue.put("store", "carol", {"n": 2})
        assert worker.drain_own(10.0, runnable_only=True)
        assert ran == ([] if in_order else [2])
        assert not worker.drain_own(0.2)  # the first job is left, and (in order) the second
        assert worker.queue.counts()["pending"] == (2 if in_order else 1)
    finally:
        worker.close(timeout=0)


def test_a_wait_ends_when_notified_done_or_at_its_deadline() -> None:
    """The wait that a worker's flush and drain and a writer's hand-over share: it asks again
    when notified, runs ``between`` after each no, is told the time left, and gives up at the
    deadline (not before)."""
    condition, asked, nudged = threading.Condition(), [], []
    state = {"done": False}

    def done(remaining: float | None) -> bool:
        asked.append(remaining)
        return state["done"]

    def finish() -> None:
        time.sleep(0.05)
        with condition:
            state["done"] = True
            condition.notify_all()

    finisher = threading.Thread(target=finish)
    finisher.start()
    assert wait_until(condition, done, None, lambda: nudged.append(1))
    finisher.join()
    assert asked[0] is None and len(nudged) == len(asked) - 1
    state["done"], asked[:] = False, []
    started = time.monotonic()
    assert not wait_until(condition, done, time.monotonic() + 0.3)
    assert 0.3 <= time.monotonic() - started < 30  # (generous: a loaded machine stalls)
    # told the time left, less each time, the last time none
    assert None not in asked and asked[0] <= 0.3 and asked[-1] <= 0
    assert asked == sorted(asked, reverse=True) and len(asked) >= 2


def test_schema_version_and_reopening(path: Path) -> None:
    queue = JobQueue(path)
    job_id = queue.put("store", "alice", {"n": 1})
    queue.close()
    queue.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        queue.counts()
    reopened = JobQueue(path)
    assert [job.id for job in reopened.claim()] == [job_id]
    reopened.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(HeadroomMemoryError, match="newer"):
        JobQueue(path)


def _indexes(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    return {name for (name,) in rows if not name.startswith("sqlite_")}


def test_an_older_version_still_opens_a_file_this_one_opened(path: Path) -> None:
    # a file of a version without the index of each user's jobs, with a job in it
    with closing(sqlite3.connect(path)) as conn:
        for statement in MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO jobs (kind, user_id, payload, created_at, not_before)"
            " VALUES ('store', 'alice', '{}', 0, 0)"
        )
        conn.commit()
    queue = JobQueue(path)
    assert [job.user_id for job in queue.claim(in_order=True)] == ["alice"]
    queue.close()
    # the index is made, and the schema's version is the one an older version knows: it
    # refuses a newer one ("newer job schema"), and its user's background memory with it
    assert "jobs_by_user" in _indexes(path)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    JobQueue(path).close()  # reopened, with the index already there


def test_shared_worker_is_one_per_file_and_key(path: Path) -> None:
    first = shared_worker(path, "store", lambda job: None)
    assert shared_worker(str(path), "store", lambda job: None) is first
    other = shared_worker(path, "extract", lambda job: None)
    assert other is not first
    for worker in (first, other):
        worker.close(timeout=0)
    assert shared_worker(path, "store", lambda job: None) is not first
    shared_worker(path, "store", lambda job: None).close(timeout=0)


def test_a_new_file_locked_while_another_process_switches_it_to_wal_is_waited_for(
    path: Path, monkeypatch
) -> None:
    """SQLite can refuse the switch to WAL at once ("database is locked", without waiting for
    the busy timeout) while another process switches the same new file: seen once in a few
    hundred opens by four processes at once. The queue tries again within its timeout."""
    import sqlite3

    from headroom_memory_integrations import jobs

    refusals = {"left": 3}

    class Racing(sqlite3.Connection):
        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql == "PRAGMA journal_mode=WAL" and refusals["left"]:
                refusals["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr(jobs.sqlite3, "connect", lambda *a, **k: connect(*a, factory=Racing, **k))
    queue = JobQueue(path)
    queue.put("store", "alice", {"n": 1})
    assert refusals["left"] == 0 and queue.counts()["pending"] == 1
    queue.close()
    refusals["left"] = 10**6  # refused for good: the open fails after the timeout
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        JobQueue(path, busy_timeout=0.2)


_FORKED: dict[str, Any] = {}


def _forked_child_uses_the_queue(_: int) -> dict[str, Any]:
    """In a child forked by multiprocessing: the parent's shared worker and its queue."""
    worker: JobWorker = _FORKED["worker"]
    handled: list[str] = []
    outcome = {
        "connection": worker.queue._conn is None,  # the parent's is never used here
        "fresh": shared_worker(_FORKED["path"], "k", handled.append) is not worker,
    }
    worker.queue.put("store", "alice", {"text": "queued by the child"})
    worker.notify("alice")  # the inherited worker starts a thread of its own
    # run by the child's thread or the parent's, whichever claims it first
    wait_for(lambda: worker.queue.counts() == {"pending": 0, "running": 0, "failed": 0}, 20)
    outcome["ran"] = True
    return outcome


def test_a_forked_child_uses_no_sqlite_connection_or_thread_of_its_parent(path: Path) -> None:
    import multiprocessing

    done: list[int] = []
    worker = shared_worker(path, "k", lambda job: done.append(job.id))
    worker.queue.put("store", "alice", {"text": "queued by the parent"})
    worker.notify("alice")
    wait_for(lambda: len(done) == 1, timeout=20)
    _FORKED.update(worker=worker, path=str(path), done=done)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.map_async(_forked_child_uses_the_queue, [0]).get(60)[0]
    # before: the child used the parent's SQLite connection (which SQLite forbids: it can
    # corrupt the file), kept the parent's worker in the registry and waited for its threads
    assert child == {"connection": True, "fresh": True, "ran": True}
    worker.queue.put("store", "alice", {"text": "queued by the parent after the fork"})
    worker.notify("alice")
    wait_for(lambda: len(done) >= 2 and worker.queue.counts()["pending"] == 0, 20)  # goes on


def _fork_and_queue(
    path: Path, busy_timeout: float = 2, after_fork: Callable[[], object] = lambda: None
) -> tuple[int, str, float]:
    """Fork; the child opens the queue file afresh and queues a job. Returns the child's exit
    code, what it said, and how long the fork itself took in the parent (which then calls
    ``after_fork`` before it waits for the child)."""
    read, write = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        code, said = 1, "nothing"
        try:
            child = JobQueue(path, busy_timeout=busy_timeout)
            child.put("store", "child", {"text": "queued by the child"})
            code, said = 0, "queued"
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write, said.encode())
            os._exit(code)
    took = time.monotonic() - started
    after_fork()
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as said:
        return os.waitstatus_to_exitcode(status), said.read(), took


def test_a_child_forked_while_a_thread_writes_the_queue_file_can_write_it(
    path: Path, make_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite keeps its locks' bookkeeping in the process's memory: a child forked while a
    thread of the parent was inside a transaction on the queue file (a claim, a completion,
    a migration) inherited a lock nobody in it releases, and every connection it opened to the
    file found it locked for good (gunicorn --preload, multiprocessing's fork: the child's
    memory work was never queued, and lost at its exit). The fork now waits for the
    transaction to end; the child queues its job and the parent's worker runs it."""
    from headroom_memory_integrations import jobs

    # the fork waits for the transaction's end (0.3 s), not for its longest wait: made long
    # here, so that a stalled machine's late timer is still waited for
    monkeypatch.setattr(jobs, "FORK_WAIT_SECONDS", 120.0)
    done: list[str] = []
    worker = make_worker(lambda job: done.append(job.user_id))
    queue = worker.queue
    inside, leave = threading.Event(), threading.Event()

    def write() -> None:
        with queue._write() as conn:  # as a claim's transaction is, while the fork starts
            conn.execute("DELETE FROM jobs WHERE id < 0")
            inside.set()
            leave.wait(60)

    writer = threading.Thread(target=write)
    writer.start()
    assert inside.wait(60)
    threading.Timer(0.3, leave.set).start()  # the transaction ends 0.3 s into the fork
    code, said, took = _fork_and_queue(path)
    leave.set()
    writer.join(10)
    # before: "OperationalError: database is locked" in the child, after its busy timeout
    assert (code, said) == (0, "queued")
    assert took < 60  # the transaction's end, not the fork's longest wait (120 s)
    worker.notify("child")
    wait_for(lambda: done == ["child"], timeout=20)
    queue.put("store", "parent", {"text": "queued by the parent after the fork"})
    worker.notify("parent")
    wait_for(lambda: done == ["child", "parent"], timeout=20)


def test_a_fork_does_not_wait_for_a_running_job(
    path: Path, make_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A fork waits only for SQLite statements on the queue files, never for a handler (a
    model or a storage call may take minutes): forked while a job runs, the fork takes every
    lock it waits for at once, the child can write the file, and the job ends in the parent."""
    from headroom_memory_integrations import jobs

    monkeypatch.setattr(jobs, "FORK_WAIT_SECONDS", 120.0)  # a fork held by the job: 120 s
    running, release = threading.Event(), threading.Event()
    worker = make_worker(lambda job: (running.set(), release.wait(300)))
    worker.queue.put("store", "alice", {"text": "a slow job"})
    worker.notify("alice")
    assert running.wait(60)
    try:
        with caplog.at_level(logging.WARNING, logger="headroom_memory_integrations"):
            code, said, took = _fork_and_queue(path)
        still_running = not release.is_set()
    finally:
        release.set()
    assert (code, said) == (0, "queued")
    assert still_running and took < 60  # the job runs until released (300 s at most)
    assert "forking while a thread writes it" not in caplog.text
    assert worker.flush(20)


def test_a_fork_does_not_wait_for_another_process_s_lock_on_the_queue_file(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A thread whose put waits for another process's write lock on the queue file holds the
    queue's lock only while a statement runs here, not for the whole wait: a fork meanwhile
    (os.fork, multiprocessing, Popen with preexec_fn) is quick (before, it waited as long as
    the other process held the file, up to the busy timeout), its child can write the file
    once the other process lets go, and the thread's job is queued. The other process lets go
    only once the fork is done, and every wait is long (a fork that waited would wait its
    whole 120 s): no timing on a shared machine decides it."""
    from headroom_memory_integrations import jobs

    monkeypatch.setattr(jobs, "FORK_WAIT_SECONDS", 120.0)
    queue = JobQueue(path, busy_timeout=300)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            'c.execute("BEGIN IMMEDIATE"); print("locked", flush=True)\n'
            'sys.stdin.readline(); c.execute("COMMIT")\n',
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def let_go() -> None:
        assert holder.stdin is not None
        holder.stdin.write("go\n")  # (not a close: the forked child holds the pipe too)
        holder.stdin.flush()

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        putter = threading.Thread(target=queue.put, args=("store", "parent", {"n": 1}))
        putter.start()
        time.sleep(0.3)  # the put waits for the other process
        with caplog.at_level(logging.WARNING, logger="headroom_memory_integrations"):
            code, said, took = _fork_and_queue(path, busy_timeout=120, after_fork=let_go)
        putter.join(120)
    finally:
        if holder.stdin is not None and not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(120)
    # before: the fork waited until the other process let go (here: for its whole wait)
    assert took < 60 and "forking while a thread writes it" not in caplog.text
    assert (code, said) == (0, "queued")
    assert sorted(job.user_id for job in queue.claim(5)) == ["child", "parent"]


def test_a_thread_s_fork_releases_only_the_locks_it_took(path: Path) -> None:
    """Two threads forking at once: the second one's fork, which could not take the locks the
    first one holds, no longer lets them go when it is done, while the first one's fork is
    still going on."""
    from headroom_memory_integrations import jobs

    queue = JobQueue(path)
    first_holds, second_done = threading.Event(), threading.Event()

    def first_fork() -> None:
        jobs._before_fork()
        first_holds.set()
        second_done.wait(60)
        jobs._after_fork_in_parent()

    first = threading.Thread(target=first_fork)
    first.start()
    try:
        assert first_holds.wait(60)
        jobs._before_fork()  # waits FORK_WAIT_SECONDS for the first one's locks, then forks
        jobs._after_fork_in_parent()
        assert queue._lock.locked() and jobs._FORK_GUARD.locked()  # still the first one's
    finally:
        second_done.set()
        first.join(10)
    assert not queue._lock.locked() and not jobs._FORK_GUARD.locked()
    queue.put("store", "alice", {"n": 1})


def test_a_forked_child_holds_none_of_its_parents_memory_work(tmp_path) -> None:
    """The parent's writer, which the child's stores still hold, forgets the parent's held
    work and unsettled jobs in the child: the parent's threads put and run them, and a child
    that waited for them would wait on every call, or queue them a second time."""
    import os
    import pickle

    from headroom_memory_integrations import writer as writers

    held = writers._Handed("store", None, {"memories": []}, 0.0, None)  # type: ignore[arg-type]
    parent = writers.MemoryWriter.__new__(writers.MemoryWriter)
    parent._held, parent._handing = writers.deque([held]), held
    parent._unsettled, parent._queued_with = {"alice": {7}}, writers.OrderedDict({7: ("a", None)})
    writers._every_writer.add(parent)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            state = (
                len(parent._held),
                parent._handing,
                parent._unsettled,
                len(parent._queued_with),
            )
            os.write(write, pickle.dumps(state))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert pickle.loads(os.read(read, 4096)) == (0, None, {}, 0)
    assert len(parent._held) == 1 and parent._unsettled == {"alice": {7}}  # the parent's own


class _GatewayError(Exception):
    """What an OpenAI-compatible gateway's 401 reads as, quoting the key it was sent."""


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        (  # two URLs in one message: each keeps its own host
            "tried http://admin:pw1@gw.example:4000/v1 then https://bob:pw2@backup.example/v1",
            "tried http://***@gw.example:4000/v1 then https://***@backup.example/v1",
        ),
        (  # a password holding "@", ":", "/" or "?"
            "POST http://admin:p@ss:w0/r?d@gw.example:4000/v1 failed",
            "POST http://***@gw.example:4000/v1 failed",
        ),
    ],
)
def test_a_urls_password_is_masked_and_each_url_keeps_its_host(error: str, kept: str) -> None:
    """Each URL of a message is masked on its own, up to its last "@"."""
    assert without_secrets(error) == kept


def test_an_error_echoing_the_key_is_kept_without_it(
    queue: JobQueue, make_worker: MakeWorker, path: Path
) -> None:
    """A provider or gateway that echoes the key it was sent ("Incorrect API key provided:
    sk-...") put the key in the queue file's ``last_error``, on disk, retried or dead-lettered.
    The type, status code and error code stay: they say what went wrong."""
    key, token = "sk-proj-SECRET1234567890abcd", "eyJhbGciOiJIUzI1NiJ9.SECRETtoken"
    echoed = (
        f"Error code: 401 - {{'error': {{'message': 'Incorrect API key provided: {key}. "
        f"Sent Authorization: Bearer {token} to http://admin:SECRETpw@gw.example:4000/v1', "
        "'type': 'invalid_request_error', 'param': None, 'code': 'invalid_api_key'}}"
    )
    tries = []

    def handler(job: Job) -> None:
        tries.append(job.id)
        raise _GatewayError(echoed)

    worker = make_worker(handler, retryable=lambda exc: len(tries) < 2)
    queue.put("extract", "alice", {"turn": "I like tea"})
    worker.notify()
    wait_for(lambda: worker.stats()["retried"] == 1)
    # the count comes before the queue file's write (flush() watches the file): wait for the file
    wait_for(lambda: len(queue.failed()) == 1)
    assert worker.stats()["failed"] == 1
    [dead] = queue.failed()
    assert "SECRET" not in (dead.last_error or "")
    assert dead.last_error is not None and dead.last_error.startswith(
        "_GatewayError: Error code: 401 - "
    )
    assert "'code': 'invalid_api_key'" in dead.last_error and "sk-***" in dead.last_error
    assert "Bearer ***" in dead.last_error and "http://***@gw.example:4000" in dead.last_error
    queue.close()
    for file in (path, Path(f"{path}-wal")):
        assert not file.exists() or b"SECRET" not in file.read_bytes()


def test_a_queue_file_is_its_owners_alone(tmp_path: Path) -> None:
    """Its jobs hold turns and their errors: the file (and SQLite's -wal and -shm beside it)
    was created with the umask's 0644 in a folder of the user's; a file that exists keeps
    its mode."""
    import stat

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    before = os.umask(0o022)
    try:
        queue = JobQueue(shared / "jobs.sqlite3")
        queue.put("store", "alice", {"turn": "Takes medication for migraines"})
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in shared.iterdir()}
        queue.close()
        older = shared / "older.sqlite3"
        sqlite3.connect(older).close()  # an existing queue file, 0644: left as it is
        JobQueue(older).close()
    finally:
        os.umask(before)
    assert modes == {"jobs.sqlite3": 0o600, "jobs.sqlite3-wal": 0o600, "jobs.sqlite3-shm": 0o600}
    assert stat.S_IMODE(older.stat().st_mode) == 0o644


def test_a_queue_file_that_is_not_a_database_is_set_aside_for_a_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue file with a garbage header (a bad sector, a partial copy): SQLite answers "file
    is not a database" to every use, and background memory was off for as long as the process
    ran, the log saying "retrying on use". It is moved aside, with its -wal and -shm, its mode
    kept; an ERROR names both paths; a new queue takes the jobs."""
    import stat

    path = tmp_path / "jobs.sqlite3"
    garbage = b"garbage" * 200
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
        (tmp_path / name).write_bytes(garbage)
        (tmp_path / name).chmod(0o600)
    with caplog.at_level(logging.ERROR, logger="headroom_memory_integrations.jobs"):
        queue = JobQueue(path, open_later=True)
        queue.put("store", "alice", {"texts": ["Has a dog"]})
        [job] = queue.claim()
        queue.close()
    assert job.payload == {"texts": ["Has a dog"]}
    [aside] = tmp_path.glob("jobs.sqlite3.corrupt-*Z")
    assert re.fullmatch(r"jobs\.sqlite3\.corrupt-\d{8}T\d{6}Z", aside.name)
    for suffix in ("", "-wal", "-shm"):  # (the -shm is SQLite's index of the -wal, remade)
        moved = Path(f"{aside}{suffix}")
        assert suffix == "-shm" or moved.read_bytes() == garbage
        assert stat.S_IMODE(moved.stat().st_mode) == 0o600
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert str(path) in error.getMessage() and str(aside) in error.getMessage()


def test_a_queue_file_locked_or_unopenable_is_not_set_aside(tmp_path: Path) -> None:
    """Only a file that is not a database is moved aside: not one another connection keeps
    locked, nor one SQLite cannot open (here a folder in its place)."""
    path = tmp_path / "jobs.sqlite3"
    with closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            JobQueue(path, busy_timeout=0.2)
        holder.execute("ROLLBACK")
    folder = tmp_path / "folder.sqlite3"
    folder.mkdir()
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        JobQueue(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.sqlite3", "jobs.sqlite3"]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]


def _delete_queue_file(path: Path) -> None:
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        name.unlink(missing_ok=True)


@pytest.mark.parametrize("replaced", [False, True], ids=["deleted", "replaced"])
def test_a_queue_file_deleted_while_in_use_moves_its_jobs_to_a_file_at_its_path(
    path: Path, make_worker: MakeWorker, caplog: pytest.LogCaptureFixture, replaced: bool
) -> None:
    """The queue file (with its -wal and -shm) is deleted while a process uses it, or another
    process made a new queue file at the path since (and queued a job there). Before, the
    process went on with the deleted file: every job queued from then on went with it at
    exit, and another process opening the path (here a second JobQueue, as it would) saw
    another queue without them. Now the next use makes a file at the path (or takes the one
    there), moves every job into it with its id (a job claimed before, running, stays
    claimed and is completed there), and one WARNING says so; another process sees them."""
    done: list[int] = []
    worker = make_worker(lambda job: done.append(job.payload["n"]), kinds=("work",))
    caplog.set_level(logging.WARNING, logger="headroom_memory_integrations")
    worker.queue.put("work", "alice", {"n": 0})
    worker.notify("alice")
    assert worker.flush(timeout=30)
    queue = JobQueue(path)  # this process's other connection, say a second worker's
    queue.put("later", "bob", {"n": 1})  # (no worker takes this kind)
    [claimed] = queue.claim(kinds=("later",))  # running when the file goes
    queued = queue.put("later", "bob", {"n": 2})
    _delete_queue_file(path)
    theirs = None
    if replaced:
        other = JobQueue(path)  # another process's new queue file, at the same path
        theirs = other.put("later", "carol", {"n": 9})
        other.close()
    new = queue.put("later", "bob", {"n": 3})  # queued after the delete: kept
    assert path.exists()
    seen = JobQueue(path)  # another process opening the path sees every job
    try:
        jobs = {(j.id, j.payload["n"]) for j in seen.claim(10, kinds=("later",), held=[])}
        assert {(queued, 2), (new, 3)} <= jobs
        assert seen.counts()["running"] >= 1  # bob's claimed job, still claimed
        if replaced:
            assert (theirs, 9) in jobs
        assert len({claimed.id, queued, new, theirs} - {None}) == 3 + replaced
    finally:
        seen.close()
    queue.complete(claimed.id)  # completed in the file now at the path
    with closing(sqlite3.connect(path)) as conn:
        gone = conn.execute("SELECT COUNT(*) FROM jobs WHERE id = ?", (claimed.id,)).fetchone()
    assert gone == (0,)
    for n in range(4, 6):  # the worker's own connection follows too
        worker.queue.put("work", "alice", {"n": n})
        worker.notify("alice")
        assert worker.flush(timeout=30)
    assert done == [0, 4, 5]
    told = [r for r in caplog.records if "deleted or replaced" in r.getMessage()]
    assert len(told) == 1 and told[0].levelno == logging.WARNING  # the other follows quietly
    assert str(path) in told[0].getMessage() and "moved to the file" in told[0].getMessage()
    queue.close()


@pytest.mark.parametrize("replaced", [False, True], ids=["removed", "replaced-by-another"])
def test_a_queue_whose_folder_was_removed_refuses_new_jobs_and_makes_nothing_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, replaced: bool
) -> None:
    """The whole folder is removed (a user wiping their memories): nothing is made again
    where it was, nor in a new folder made at the same path, so what was deleted stays
    deleted; a new job is refused with QueueGone (an OSError: the writer counts and logs it
    as work that could not be queued), once told at WARNING; the jobs left in the removed
    file are still run while the process lasts."""
    import shutil

    folder = tmp_path / "memories"
    folder.mkdir()
    queue = JobQueue(folder / "jobs.sqlite3")
    caplog.set_level(logging.WARNING, logger="headroom_memory_integrations")
    try:
        left = queue.put("work", "alice", {"secret": "my PIN is 4512"})
        shutil.rmtree(folder)
        if replaced:
            folder.mkdir()
        for _ in range(2):
            with pytest.raises(QueueGone, match="was removed while in use"):
                queue.put("work", "alice", {"n": 1})
        assert [job.id for job in queue.claim(5)] == [left]  # still run from the old file
        assert list(folder.iterdir()) == [] if replaced else not folder.exists()
        told = [r for r in caplog.records if "folder was removed" in r.getMessage()]
        assert len(told) == 1 and told[0].levelno == logging.WARNING
    finally:
        queue.close()


@pytest.mark.parametrize(
    "name",
    [
        b"my jobs 100% #1?x%20y",
        pytest.param(  # latin-1 "caf\xe9": a name not in UTF-8, read with surrogate escapes
            b"caf\xe9",
            marks=pytest.mark.skipif(sys.platform == "win32", reason="a name's bytes: POSIX"),
        ),
    ],
    ids=["spaces-and-percent-signs", "not-utf-8"],
)
def test_the_wal_of_a_queue_under_an_unusual_folder_name_is_erased(
    tmp_path: Path, name: bytes
) -> None:
    """erase_wal opens the file through an SQLite URI: a folder named with spaces, ``%``,
    ``#`` and ``?`` is quoted, so the WAL of the file itself is erased and no other file is
    made (a path read with its ``%20`` decoded, or cut at ``?``); a name not in UTF-8 is
    quoted by its bytes (as UTF-8 it raised UnicodeEncodeError at every checkpoint, and the
    WAL kept done jobs' payloads for good)."""
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/" + name))
    folder.mkdir()
    queue = JobQueue(folder / "jobs.sqlite3")
    try:
        queue.complete(queue.put("work", "alice", {"note": "private note"}))
        wal = folder / "jobs.sqlite3-wal"
        assert b"private note" in wal.read_bytes()
        assert queue.erase_wal()
        assert wal.stat().st_size == 0
    finally:
        queue.close()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert [p.name for p in folder.iterdir()] == ["jobs.sqlite3"]  # its -wal goes at close


@pytest.mark.parametrize(
    ("path", "uri"),
    [
        (
            PurePosixPath("/srv/my jobs/100%/a#b?c/jobs.sqlite3"),
            "file:///srv/my%20jobs/100%25/a%23b%3Fc/jobs.sqlite3?mode=rw",
        ),
        (
            PureWindowsPath(r"C:\Users\Ann Lee\100%\jobs.sqlite3"),
            "file:///C:/Users/Ann%20Lee/100%25/jobs.sqlite3?mode=rw",
        ),
        (  # no authority (SQLite refuses one but localhost): the UNC path is the URI's path
            PureWindowsPath(r"\\server\share\my jobs\jobs.sqlite3"),
            "file:////server/share/my%20jobs/jobs.sqlite3?mode=rw",
        ),
    ],
)
def test_the_uri_of_a_queue_file_quotes_its_path(path: PurePath, uri: str) -> None:
    assert sqlite_uri(path) == uri
