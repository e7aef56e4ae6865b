"""When the memory layer itself fails (a folder that cannot be written, a Chroma server that went
down), the README's promise holds for flush, close and stats too: the failure is logged and
counted in ``memory.stats()["events"]``, the call returns (no raw SQLite or Chroma error, no
hang), the wrapped OpenAI client is closed all the same, and ``stats()`` still answers, with the
figures it could not read as None and an ``error`` entry saying why. Real parts: a read-only
bind mount (a chmod'ed folder when not root), a real ``chroma run`` server that is stopped, the
real openai client against the scripted server."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from _reliability_support import is_root, read_only_view, run_python
from conftest import ChromaServer, HashEmbedder, RememberingModel

from headroom_memory_integrations import (
    EmbeddingMismatchError,
    InvalidInputError,
    MemoryStore,
    StorageError,
)
from headroom_memory_integrations.jobs import user_tag
from headroom_memory_integrations.openai import with_fast_memory

REQUEST: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "I prefer tea"}],
}
TEA = [{"text": "Prefers tea", "category": "preference"}]


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot write in: a read-only bind mount as root (root writes
    through a chmod'ed folder), else a folder chmod'ed read-only."""
    source = tmp_path / "source"
    source.mkdir()
    if is_root():
        with read_only_view(source, tmp_path / "view") as view:
            yield view
    else:
        source.chmod(0o555)
        try:
            yield source
        finally:
            source.chmod(0o755)


def assert_unwritable(folder: Path) -> None:
    with pytest.raises(OSError):
        (folder / "probe").mkdir()


def queue_threads(name: str) -> list[threading.Thread]:
    """The live worker threads of job queue files named ``name``."""
    return [
        t
        for t in threading.enumerate()
        if t.name in (f"headroom-memory store {name}", f"headroom-memory extract {name}")
        and t.is_alive()
    ]


# -- an unwritable folder: flush, close and stats answer ----------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_unwritable_folder_never_makes_flush_close_or_stats_raise(
    openai_server, unwritable, caplog, asynchronous
) -> None:
    assert_unwritable(unwritable)
    openai_server.responder = RememberingModel("Noted.", TEA)
    raw = openai_server.async_client() if asynchronous else openai_server.client()
    client = with_fast_memory(
        raw, user_id="alice", db_path=unwritable / "memories", embedder=HashEmbedder()
    )
    memory = client.memory

    def after_the_answer() -> tuple[bool, float, dict[str, Any]]:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="headroom_memory_integrations"):
            flushed = memory.flush(300)
        return flushed, time.monotonic() - started, memory.stats()

    if asynchronous:

        async def scenario() -> tuple[Any, ...]:
            answer = await client.chat.completions.create(**REQUEST)
            flushed, seconds, stats = after_the_answer()
            return answer, flushed, seconds, stats, await client.close()

        answer, flushed, seconds, stats, closed = asyncio.run(scenario())
    else:
        answer = client.chat.completions.create(**REQUEST)
        flushed, seconds, stats = after_the_answer()
        closed = client.close()

    assert answer.choices[0].message.content == "Noted."  # the chat call went on
    assert flushed is False and seconds < 60  # not an exception, nor the 300 s wait for nothing
    assert any(
        "could not wait for the background writes" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )
    assert stats["events"]["flush_failures"] == 1
    assert stats["events"]["store_failures"] == 1  # the memory block could not be queued
    assert stats["total_memories"] is None and stats["total_chunks"] is None
    assert stats["by_category"] is None
    assert stats["error"].startswith("memories: StorageError")
    assert "job queue: OperationalError" in stats["error"]
    assert stats["background"] == {
        "processed": 0,
        "retried": 0,
        "failed": 0,
        "pending": None,
        "running": None,
    }
    assert stats["user_id"] == "alice" and stats["storage"] == str(unwritable / "memories")
    json.dumps(stats)  # still plain data

    assert closed is None  # close() did not raise for memory's sake...
    assert raw.is_closed()  # ...and closed the wrapped client
    # what only the queue file can do fails with the library's error, not a raw sqlite3 one
    with pytest.raises(StorageError, match="job queue"):
        memory.retry_failed()
    with pytest.raises(StorageError, match="job queue"):
        memory.forget_user(timeout=1)
    assert memory.stats()["events"]["flush_failures"] == 2  # close() waited, failed, counted
    started = time.monotonic()
    assert memory.close(timeout=300) is False  # the store too, at once, without raising
    assert time.monotonic() - started < 60


def test_closing_the_stores_of_an_unwritable_folder_stops_its_queue(
    openai_server, unwritable, tmp_path
) -> None:
    """Two users share the folder's job queue: closing each store detaches it even though the
    queue cannot drain, so closing the last one stops the queue's worker thread."""
    queue = unwritable / "memories" / f"jobs-{tmp_path.name}.sqlite3"
    clients = [
        with_fast_memory(
            openai_server.client(),
            user_id=user,
            db_path=unwritable / "memories",
            embedder=HashEmbedder(),
            queue_path=queue,
        )
        for user in ("alice", "bob")
    ]
    assert queue_threads(queue.name)
    assert [client.memory.close(0) for client in clients] == [False, False]
    deadline = time.monotonic() + 60
    while queue_threads(queue.name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not queue_threads(queue.name)
    assert clients[0].memory.stats()["events"]["flush_failures"] == 1  # not the last: flushed
    for client in clients:
        client.close()


def test_the_exit_drain_of_an_unwritable_folder_only_warns(unwritable) -> None:
    """At interpreter exit the queue's drain fails at once: one warning, no traceback of an
    exception in an atexit callback."""
    run = run_python(
        f"""
        from conftest import HashEmbedder, RememberingModel
        from headroom_memory_integrations.openai import with_fast_memory
        from headroom_memory_integrations.testing import ScriptedOpenAIServer

        server = ScriptedOpenAIServer(responder=RememberingModel("Noted.", {TEA!r})).start()
        client = with_fast_memory(
            server.client(), user_id="alice", db_path={str(unwritable / "memories")!r},
            embedder=HashEmbedder(),
        )
        answer = client.chat.completions.create(**{REQUEST!r})
        print(answer.choices[0].message.content)
        server.close()
        """,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "Noted."
    assert "Exception ignored" not in run.stderr, run.stderr
    assert "could not drain (OperationalError" in run.stderr, run.stderr


# -- a Chroma server that went down: stats still answers ----------------------------------------


def test_stats_answers_while_the_chroma_server_is_down(openai_server, tmp_path) -> None:
    server = ChromaServer(tmp_path / "chroma")
    openai_server.responder = RememberingModel("Noted.", TEA)
    client = with_fast_memory(
        openai_server.client(),
        user_id="alice",
        db_path=server.url,
        embedder=HashEmbedder(),
        queue_path=tmp_path / "jobs.sqlite3",
    )
    try:
        client.chat.completions.create(**REQUEST)
        assert client.memory.flush(30)
        before = client.memory.stats()
        assert before["total_memories"] == 1 and "error" not in before
    finally:
        server.stop()

    answer = client.chat.completions.create(**REQUEST)
    assert answer.choices[0].message.content == "Noted."  # the call goes on without memory
    stats = client.memory.stats()
    assert stats["total_memories"] is None and stats["total_chunks"] is None
    assert stats["by_category"] is None
    assert stats["error"].startswith("memories: StorageError")
    assert "job queue" not in stats["error"]  # the queue file is fine: its figures are given
    assert stats["background"]["processed"] == 1 and stats["background"]["running"] in (0, 1)
    assert stats["background"]["pending"] + stats["background"]["running"] == 1  # the new turn
    assert stats["events"]["inject_failures"] == 1
    settings = ("user_id", "embedding_model", "embedding_dimension", "storage", "min_score")
    assert [stats[key] for key in settings] == [before[key] for key in settings]
    json.dumps(stats)
    table = stats._repr_html_()
    assert ">error<" in table and ">by_category<" in table and ">none<" in table

    alone = MemoryStore("bob", db_path=server.url, embedder=HashEmbedder())
    assert alone.stats()["background"] == {} and "error" in alone.stats()
    from headroom_memory_integrations.cli import main

    assert main(["stats", "--user", "alice", "--db", server.url]) == 1  # not every figure read

    assert client.memory.close(0) is False  # the new turn stays queued in the file
    client.close()
    client.memory.storage.close()
    alone.storage.close()


def test_a_message_that_needs_no_memory_counts_no_outage(openai_server, tmp_path, model) -> None:
    """The gate reads a general question as needing no memory: with the Chroma server down it
    is answered as with the server up (no memories, no storage request), and no failure is
    counted, whether its store had opened the collection before the outage (the question's
    embedding cached or not) or opens it during the outage. Before, a store opening it during
    the outage counted the question in ``inject_failures`` (the opening failed before the gate
    was read), while one opened before did not. A message that needs a memory counts it, the
    collection opened or not."""

    def ask(client: Any, text: str) -> str:
        messages = [{"role": "user", "content": text}]
        answer = client.chat.completions.create(model="gpt-4o", messages=messages)
        return answer.choices[0].message.content

    def events(client: Any) -> tuple[int, int]:
        counted = client.memory.stats()["events"]
        return counted.get("inject_failures", 0), counted.get("gated_messages", 0)

    server = ChromaServer(tmp_path / "chroma")
    openai_server.responder = lambda body: "Noted."
    opened = [
        with_fast_memory(
            openai_server.client(),
            user_id=user,
            db_path=server.url,
            embedder=model,
            queue_path=tmp_path / "jobs.sqlite3",
        )
        for user in ("alice", "bob", "carol")
    ]
    before, during, needing = opened
    try:
        assert ask(before, "What is the capital of France?") == "Noted."  # opens the collection
    finally:
        server.stop()
    try:
        for client, text in (
            (before, "What is the capital of France?"),  # its embedding cached
            (before, "Tell me a joke about cats."),
            (during, "What is the capital of France?"),  # the collection not opened yet
        ):
            assert ask(client, text) == "Noted."
        assert events(before) == (0, 3) and events(during) == (0, 1)
        assert ask(before, "Which language should I use for my new backend service?") == "Noted."
        assert events(before) == (1, 3)  # it could have had memories: the outage is counted
        assert ask(needing, "Which language should I use for my new backend service?") == "Noted."
        assert events(needing) == (1, 0)  # and so when the collection could not be opened
    finally:
        for client in opened:
            client.close()
            client.memory.storage.close()


# -- bad input -----------------------------------------------------------------------------------


def test_a_chroma_outage_on_the_chat_path_is_one_warning_line_without_a_traceback(
    openai_server, tmp_path, caplog
) -> None:
    """The Chroma server stops: the chat call answers without memories and logs one WARNING
    line saying what failed (the storage error's message) and that it answered without them,
    with no traceback (at DEBUG only), as an embedder's error is logged; the token the
    storage sends and the API key are in no record. Before: the line said only "could not
    search memories", followed by the StorageError's traceback through httpx and chromadb."""
    from headroom_memory_integrations import ChromaStorage

    token = "chroma-token-5f4e3d2c1b0a"
    server = ChromaServer(tmp_path / "chroma")
    storage = ChromaStorage.connect("127.0.0.1", server.port, headers={"x-chroma-token": token})
    client = with_fast_memory(
        openai_server.client(api_key="sk-proj-0123456789abcdef"),
        user_id="alice",
        storage=storage,
        embedder=HashEmbedder(),
        queue_path=tmp_path / "jobs.sqlite3",
    )
    try:
        client.chat.completions.create(**REQUEST)  # connected while the server is up
    finally:
        server.stop()
    try:
        with caplog.at_level(logging.DEBUG, logger="headroom_memory_integrations"):
            answer = client.chat.completions.create(**REQUEST)
        assert answer.choices[0].message.content
        assert client.memory.counters["inject_failures"] == 1
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        said = [r.getMessage() for r in warned if "could not search memories" in r.getMessage()]
        assert len(said) == 1 and "answering without them" in said[0], said
        assert "ConnectError" in said[0], said  # what failed
        assert not [r for r in warned if r.exc_info]  # one line each, no traceback
        assert [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
        assert token not in caplog.text and "sk-proj-0123456789abcdef" not in caplog.text
    finally:
        client.close()


@pytest.mark.parametrize("timeout", ["soon", -1, math.nan, True, [5]])
def test_flush_and_close_refuse_a_bad_timeout(hash_store, timeout) -> None:
    with pytest.raises(InvalidInputError, match="timeout must be None or a number"):
        hash_store.flush(timeout)
    with pytest.raises(InvalidInputError, match="timeout must be None or a number"):
        hash_store.close(timeout)
    assert hash_store.flush(0) is True and hash_store.flush(None) is True


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, seconds: float = 60) -> None:
    """Wait until a captured record's message holds ``text``; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.02)


def test_a_queue_that_keeps_failing_is_logged_once_then_quietly(unwritable, caplog) -> None:
    """The worker retries an unusable queue file every poll: the first failure is logged with
    its traceback, then one line per 60 tries (it logged a traceback every second)."""
    from headroom_memory_integrations.jobs import JobQueue, JobWorker

    assert_unwritable(unwritable)
    queue = JobQueue(unwritable / "jobs.sqlite3", open_later=True)
    worker = JobWorker(queue, lambda job: None, poll_interval=0.005, name="failing-queue")
    with caplog.at_level(logging.WARNING, logger="headroom_memory_integrations.jobs"):
        worker.start()
        wait_for_log(caplog, "still failing")
        worker.close(timeout=0)
    failures = [r for r in caplog.records if "claim or update failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    quiet = [r for r in caplog.records if "still failing" in r.getMessage()]
    assert all(r.exc_info is None and "(60 tries)" in quiet[0].getMessage() for r in quiet)


def test_a_queue_locked_by_another_connection_is_logged_in_one_line(tmp_path, caplog) -> None:
    """Another connection holding the queue's write lock past the busy timeout is a passing
    state: a line, not a traceback (a busy host's CI log had one per test), and the worker goes
    on once the lock is let go of."""
    import sqlite3

    from headroom_memory_integrations.jobs import JobQueue, JobWorker

    path = tmp_path / "jobs.sqlite3"
    queue = JobQueue(path, busy_timeout=0.05)
    queue.put("store", "alice", {"n": 1})
    done: list[int] = []
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as a process stuck in a write holds it
    worker = JobWorker(queue, lambda job: done.append(job.payload["n"]), poll_interval=0.01)
    with caplog.at_level(logging.WARNING, logger="headroom_memory_integrations.jobs"):
        worker.start()
        wait_for_log(caplog, "locked past the busy")
        holder.execute("ROLLBACK")
        holder.close()
        assert worker.flush(30) and done == [1]
        wait_for_log(caplog, "working again")
        worker.close(timeout=5)
    failures = [r for r in caplog.records if r.name == "headroom_memory_integrations.jobs"]
    assert failures and all(r.exc_info is None for r in failures)
    assert "database is locked" in failures[0].getMessage()


def test_a_store_of_another_embedder_is_logged_without_the_user_id(
    openai_server, db_path, caplog
) -> None:
    """An app that switched embedders gets a warning on every chat call, with the traceback of
    the mismatch: its message named the user by id (an e-mail address here), which logs must
    never show (docs/security.md). The warning, traceback included, names a tag."""
    user = "alice.secret@example.com"
    MemoryStore(user, db_path=db_path, embedder=HashEmbedder(name="model-a")).add(
        "Likes green tea", category="preference"
    )
    client = with_fast_memory(
        openai_server.client(), user_id=user, db_path=db_path, embedder=HashEmbedder(name="model-b")
    )
    with caplog.at_level(logging.WARNING):
        answer = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "What do I like to drink?"}]
        )
        with pytest.raises(EmbeddingMismatchError) as refused:  # the caller's call says why
            client.memory.get("no-such-id")
    client.close()
    assert answer.choices[0].message.content
    assert "EmbeddingMismatchError" in caplog.text and "model-a" in caplog.text
    assert user not in caplog.text and user_tag(user) in caplog.text
    assert "model-a" in str(refused.value)


def test_a_failure_of_every_call_is_counted_each_time_and_logged_once_a_minute(
    openai_server, db_path, caplog, monkeypatch
) -> None:
    """Memory that is down fails every chat call: each is counted, but a traceback per call
    flooded the logs at the request rate. The first is logged with its traceback; the next
    log line, a minute later, says how many were not logged."""
    from headroom_memory_integrations import EmbeddingError, engine

    class Down(HashEmbedder):
        def embed(self, texts):
            raise EmbeddingError("the embedding service is down")

    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=Down()
    )
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            assert client.chat.completions.create(**REQUEST).choices[0].message.content
    logged = [r for r in caplog.records if "answering without them" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert client.memory.stats()["events"]["inject_failures"] == 20

    caplog.clear()
    monkeypatch.setattr(engine, "SURVIVED_LOG_SECONDS", 0.0)  # the minute has passed
    with caplog.at_level(logging.WARNING):
        client.chat.completions.create(**REQUEST)
    assert "; 19 more since the last such log" in caplog.text
    assert client.memory.stats()["events"]["inject_failures"] == 21
    client.close()


KEY = "sk-gw-9f8e7d6c5b4a39281706abcdef"


class _EchoingGateway(BaseHTTPRequestHandler):
    """An OpenAI-compatible gateway that refuses embeddings with a 401 quoting the key it was
    sent, as OpenAI's "Incorrect API key provided: sk-..." does, and answers chat calls."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        status, body = (
            200,
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": "gpt-4o",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "Hi!"},
                    }
                ],
            },
        )
        if self.path.endswith("/embeddings"):
            sent = self.headers.get("authorization", "").split()[-1]
            status, body = (
                401,
                {
                    "error": {
                        "message": f"Incorrect API key provided: {sent}",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
            )
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_an_api_key_an_error_echoes_is_in_no_log_record(db_path, caplog) -> None:
    """A gateway that echoes the key in its 401 had it masked in the queue file but written in
    clear to the log: the failed search's WARNING carried the traceback, whose last line is
    the error's message. Every record the package logs, at any level, is without it; the
    WARNING still says what failed, with the traceback (the key masked)."""
    import openai

    from headroom_memory_integrations import OpenAIEmbedder

    gateway = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingGateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    formatted: list[str] = []

    class Formatted(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            formatted.append(self.format(record))

    handler = Formatted()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        api = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway.server_port}/v1", api_key=KEY, max_retries=0
        )
        embedder = OpenAIEmbedder(api, dimensions=8)
        client = with_fast_memory(api, user_id="alice", db_path=db_path, embedder=embedder)
        with caplog.at_level(logging.DEBUG, logger="headroom_memory_integrations"):
            answer = client.chat.completions.create(**REQUEST)
            client.close()
    finally:
        logging.getLogger().removeHandler(handler)
        gateway.shutdown()
        gateway.server_close()
    assert answer.choices[0].message.content == "Hi!"
    [warning] = [r for r in caplog.records if "could not search memories" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "AuthenticationError" in (warning.exc_text or "") and "sk-***" in warning.exc_text
    assert formatted and not [text for text in formatted if KEY in text]
    assert KEY not in caplog.text
    assert not [r for r in caplog.records if KEY in logging.Formatter().format(r)]


def test_a_record_without_a_secret_keeps_its_exception_and_a_bad_one_does_not_raise() -> None:
    """Secrets are looked for in what the exceptions say, not in the traceback's source lines:
    a line such as ``headers={"Authorization": f"Bearer {token}"}`` made the filter drop the
    exception object (which Sentry or structlog read) of a record holding no secret. And the
    filter never raises into the log call: a message whose str() raises is the handler's to
    report, as without it."""
    from headroom_memory_integrations.redaction import logger_without_secrets

    logger = logger_without_secrets("headroom_memory_integrations.test_redaction")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    def post(token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}  # noqa: F841 (the traceback's line)
        raise ConnectionError("the embeddings server went away")

    handler = Keep()
    logger.addHandler(handler)
    raises, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        try:
            post("t0k3n-value")
        except ConnectionError:
            logger.warning("could not search memories", exc_info=True)
        logger.warning("storage failed: %s", Unprintable())  # returns, as without the filter
    finally:
        logging.raiseExceptions = raises
        logger.removeHandler(handler)
    assert seen[0].exc_info is not None and seen[0].exc_info[0] is ConnectionError


@pytest.mark.parametrize(
    "url",
    [
        "http://admin:S3cr3t@db.example:8000",
        "http:/admin:S3cr3t@db.example:8000",
        "http:admin:S3cr3t@db.example:8000",
        "HTTPS:\\\\admin:S3cr3t@db.example:8000",
        "http//admin:S3cr3t@db.example:8000",
        "ftp://admin:p@ss/w0rd@db.example:8000",
    ],
)
def test_the_log_filter_hides_a_password_wherever_error_messages_do(url: str) -> None:
    """The log filter masked a URL's user-info after "://" alone, while the errors about a
    URL (redaction.without_credentials) also mask a server URL typed wrong: a log line
    quoting "http:/admin:S3cr3t@host" kept the password."""
    from headroom_memory_integrations.redaction import logger_without_secrets, without_credentials

    logger = logger_without_secrets("headroom_memory_integrations.test_redaction")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("could not open %s: refused", url)
        logger.warning("tried %r, then (%s)", url, url.upper())
    finally:
        logger.removeHandler(handler)
    shown = without_credentials(url)
    assert "***@" in shown and "S3cr3t" not in shown and "w0rd" not in shown
    assert seen[0].getMessage() == f"could not open {shown}: refused"
    said = seen[1].getMessage()
    assert "S3CR3T" not in said.upper() and "W0RD" not in said.upper() and repr(shown) in said


@pytest.mark.parametrize(
    "text",
    [
        "to:alice@example.com",
        "sent to:alice@example.com and cc:carol@example.com",
        "mailto:bob@example.com",
        r"could not open C:\Users\bob@corp\memory",
        "the http: header named user@example.com",
        "xhttp:/a@b",
    ],
)
def test_the_log_filter_leaves_text_that_is_no_url_as_it_is(text: str) -> None:
    """Reading any "word:" as the scheme of a URL typed wrong masked ordinary text: an e-mail
    address after "to:" or "mailto:", a Windows path with an "@" in it. In free text only an
    http or https URL is read typed wrong (see test_the_log_filter_hides_a_password_...)."""
    from headroom_memory_integrations.redaction import without_secrets

    assert without_secrets(text) == text
    assert without_secrets(f"{text} via http:/admin:S3cr3t@db:8000") == (
        f"{text} via http:/***@db:8000"
    )


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("./backups:2024/mem@v2", "./backups:2024/mem@v2"),
        ("notes/to:alice@example.com", "notes/to:alice@example.com"),
        ("ftp:/admin:S3cr3t@db:8000", "ftp:/***@db:8000"),
        (" admin:S3cr3t@db:8000", " admin:***@db:8000"),
        ("http://admin:S3cr3t@db:8000", "http://***@db:8000"),
    ],
)
def test_a_refused_db_path_is_masked_as_a_whole_url(given: str, shown: str) -> None:
    """without_credentials reads a whole URL: its scheme typed wrong at its start alone, so a
    folder's name with a "word:" inside it ("./backups:2024/mem@v2") is shown as it is."""
    from headroom_memory_integrations.redaction import without_credentials

    assert without_credentials(given) == shown


def test_every_logger_of_the_package_takes_secrets_out() -> None:
    """The package's modules log through redaction.logger_without_secrets: a module that took
    logging.getLogger instead would log an echoed key in clear."""
    import importlib
    import pkgutil

    import headroom_memory_integrations
    from headroom_memory_integrations import redaction

    loggers = {}
    for module_info in pkgutil.walk_packages(
        headroom_memory_integrations.__path__, "headroom_memory_integrations."
    ):
        try:
            module = importlib.import_module(module_info.name)
        except ImportError:  # an optional framework that is not installed
            continue
        for name, value in vars(module).items():
            if isinstance(value, logging.Logger):
                loggers[f"{module_info.name}.{name}"] = value
    assert len(loggers) >= 16
    assert [name for name, log in loggers.items() if redaction._FILTER not in log.filters] == []
