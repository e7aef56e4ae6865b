"""Shared fixtures: real Chroma (embedded in a temp dir, or a real `chroma run` server on
127.0.0.1), the real all-MiniLM-L6-v2 model, and a tiny deterministic embedder for tests
whose outcome does not depend on meaning."""

from __future__ import annotations

import ast
import asyncio
import atexit
import contextlib
import gc
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


# the repository's root, for benchmarks.common, also where a test's subprocess imports this
# file with only tests/ on its path
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ChromaServer, free_port
from headroom_memory_integrations import ChromaStorage, LocalEmbedder, MemoryStore
from headroom_memory_integrations.embeddings import normalize_rows

# A home of the suite's own: what a test leaves in the default places (~/.headroom-memory's
# job queues of server URLs, the default folder) must not build up in the user's home, nor
# be read by a later run (subprocesses inherit it too).
os.environ["HOME"] = tempfile.mkdtemp(prefix="headroom-tests-home-")
atexit.register(shutil.rmtree, os.environ["HOME"], ignore_errors=True)  # after the exit drains


def _allow_the_suites_open_files() -> None:
    """The suite opens a new embedded folder in most tests and keeps each open (a folder is
    shared in a process until its storage is closed: chroma.sqlite3, the job queue, an index
    per user), over 1,024 files in all: Linux's usual soft limit, which `make test` must not
    depend on. Raise it to the hard limit (an application that cycles through folders closes
    their storages, docs/reliability.md section 11)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


_PARSING = threading.RLock()
# How long a parse waits for _PARSING before it goes on without it. A parse holds the lock for
# milliseconds, but a loaded CI machine can stall for a minute (10 s was once too short there,
# and the race came back); two minutes outlasts such a stall, and still ends a hang (see below)
# well inside the 600 s a test may take. Read at each parse: tests/test_harness.py raises it
# for its own test, whose threads wait for each other's slow parses.
PARSE_LOCK_WAIT = 120.0


def _parse_one_thread_at_a_time() -> None:
    """CPython 3.11 keeps the AST builder's recursion depth in state that all threads share
    (python/cpython#106905): two threads in ``ast.parse`` at once make one of them raise
    ``SystemError: AST constructor recursion depth mismatch``. pytest parses a test's source to
    show its failure while the suite's background threads log tracebacks, which 3.11 also
    parses, to underline the failing expression. One such collision turned a CI run's single
    failure into an INTERNALERROR that ended the session without naming the failing test.
    Parsing under one lock keeps the two apart; a parse that waits for it longer than
    PARSE_LOCK_WAIT goes on without it (a garbage collection inside a parse can run code that
    waits for the thread that waits here: a hang would be worse than the race)."""
    parse = ast.parse

    def parse_alone(*args: Any, **kwargs: Any) -> Any:
        if not _PARSING.acquire(timeout=PARSE_LOCK_WAIT):
            return parse(*args, **kwargs)
        try:
            return parse(*args, **kwargs)
        finally:
            _PARSING.release()

    ast.parse = parse_alone  # type: ignore[assignment]


def pytest_configure(config: pytest.Config) -> None:
    _allow_the_suites_open_files()
    _parse_one_thread_at_a_time()


@pytest.fixture(autouse=True)
def _no_http_client_outlives_its_test() -> Iterator[None]:
    """langchain-openai shares one async HTTP client per base URL across all ChatOpenAI
    instances. Its pooled connections belong to the event loop of the test that opened them,
    and when a later test's scripted server got the same port, the pool closed a connection
    the old server had dropped on that closed loop: "RuntimeError: Event loop is closed", a
    test failing by chance. Every test starts without the shared clients."""
    yield
    shared = sys.modules.get("langchain_openai.chat_models._client_utils")
    for name in ("_cached_async_httpx_client", "_cached_sync_httpx_client"):
        cache = getattr(shared, name, None)
        if cache is not None:
            cache.cache_clear()


@pytest.fixture(autouse=True)
def _storages_a_test_opened_are_closed_after_it() -> Iterator[None]:
    """A process shares an embedded folder's storage until it is closed, and most tests open a
    folder of their own and leave it open. Each open storage keeps chromadb's threads (a
    runtime and a connection pool) and its job queue's worker: by the middle of the suite the
    process held over 4,000 idle threads, which slowed the suite several times over and
    starved the timing of later tests' background work (a fresh-clone CI run took 80 minutes
    and failed two such tests). A storage opened while the test ran is closed when it ends,
    after the test's own fixtures (set up after this one, torn down before it) closed theirs.
    Storages of wider-scoped fixtures were opened before this one was set up and are kept."""
    from headroom_memory_integrations.storage import chroma

    before = weakref.WeakSet(chroma._storages)
    yield
    for storage in list(chroma._storages):
        if storage not in before and not storage._closed:
            with contextlib.suppress(Exception):  # (a test may have broken it on purpose)
                storage.close()


class HashEmbedder:
    """Deterministic bag-of-words vectors: equal texts get equal vectors, texts sharing
    words are closer. For tests that must not depend on a model's sense of meaning."""

    def __init__(self, dimension: int = 64, name: str = "test-hash") -> None:
        self.dimension = dimension
        self.name = name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
                rows[row, int.from_bytes(digest[:4], "little") % self.dimension] += 1.0
        rows[:, 0] += 1e-3  # never a zero vector
        return normalize_rows(rows)


@pytest.fixture(scope="session")
def model() -> LocalEmbedder:
    """The real local model, loaded once for the session."""
    embedder = LocalEmbedder()
    embedder.warm_up()
    return embedder


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "memories"


@pytest.fixture
def store(db_path: Path, model: LocalEmbedder) -> MemoryStore:
    """Alice's memories in embedded Chroma with the real model."""
    return MemoryStore("alice", db_path=db_path, embedder=model)


@pytest.fixture
def hash_store(db_path: Path) -> MemoryStore:
    return MemoryStore("alice", db_path=db_path, embedder=HashEmbedder())


class GatedEmbedder:
    """The real model, except that embedding ``text`` (storing it) waits for ``gate``."""

    def __init__(self, inner: Any, text: str, gate: threading.Event) -> None:
        self.inner, self.text, self.gate = inner, text, gate
        self.name, self.dimension = inner.name, inner.dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.text in texts:
            assert self.gate.wait(60)
        return self.inner.embed(texts)


def closed_server_url() -> str:
    """A Chroma server URL where nothing listens (the memory storage is down)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    """A real `chroma run` server on 127.0.0.1 for the session."""
    server = ChromaServer(tmp_path_factory.mktemp("chroma-server"))
    yield server
    server.stop()


@pytest.fixture
def server_storages(chroma_server: ChromaServer) -> Iterator[Callable[[], ChromaStorage]]:
    """Opens clients of the session's server (each its own connections); closes them after."""
    opened: list[ChromaStorage] = []

    def open_one() -> ChromaStorage:
        opened.append(ChromaStorage.from_url(chroma_server.url))
        return opened[-1]

    yield open_one
    for storage in opened:
        storage.close()


@pytest.fixture
def server_storage(server_storages: Callable[[], ChromaStorage]) -> ChromaStorage:
    return server_storages()


# -- the scripted OpenAI-compatible model ------------------------------------------------------

import json  # noqa: E402
import re  # noqa: E402

from headroom_memory_integrations.testing import Reply, ScriptedOpenAIServer  # noqa: E402

_NONCE = re.compile(r"<memory-([0-9a-f]{8,32})>")


def instruction_nonce(body: dict) -> str | None:
    """The nonce of the memory instruction in a request's system messages, if any."""
    system = "\n".join(
        m["content"]
        for m in body["messages"]
        if m["role"] == "system" and isinstance(m["content"], str)
    )
    found = _NONCE.search(system)
    return found.group(1) if found else None


def block(nonce: str, memories: list[dict]) -> str:
    return f"<memory-{nonce}>{json.dumps(memories)}</memory-{nonce}>"


class RememberingModel:
    """A responder that answers like a model following the inline memory instruction:
    ``answer`` then a block with ``memories`` (when the request carried the instruction)."""

    def __init__(self, answer: str = "Noted.", memories: list[dict] | None = None) -> None:
        self.answer = answer
        self.memories = memories or []
        self.chunk_size: int | None = None

    def __call__(self, body: dict) -> Reply:
        nonce = instruction_nonce(body)
        text = self.answer + (f"\n\n{block(nonce, self.memories)}" if nonce else "")
        return Reply.text(text, chunk_size=self.chunk_size)


@pytest.fixture
def openai_server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer() as server:
        yield server


@pytest.fixture
def model_says(openai_server: ScriptedOpenAIServer) -> RememberingModel:
    """Set what the scripted model answers (and remembers) for every following request."""
    model = RememberingModel()
    openai_server.responder = model
    return model


@pytest.fixture
def client(
    openai_server: ScriptedOpenAIServer, db_path: Path, model: LocalEmbedder
) -> Iterator[Any]:
    """Alice's ``with_fast_memory`` client on the scripted server (a module may define its own)."""
    from headroom_memory_integrations.openai import with_fast_memory

    memory_client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model
    )
    yield memory_client
    memory_client.close()  # waits for what the test left to store, closes the connections


@pytest.fixture
def aclient(
    openai_server: ScriptedOpenAIServer, db_path: Path, model: LocalEmbedder
) -> Iterator[Any]:
    """The async twin of :func:`client` (its own store handle, the same folder).

    Its tests drive it with ``asyncio.run``, a loop of their own that has ended by teardown:
    a pooled connection left open in it could only be closed there ("Event loop is closed",
    or a ResourceWarning for an unclosed transport when it is collected). So it keeps no idle
    connection: each is closed by the loop that opened it as its response ends, and teardown
    closes the client (waiting for what the test left to store) in a loop of its own, with
    nothing of an ended loop left to close."""
    import openai

    from headroom_memory_integrations.openai import with_fast_memory

    http = openai.DefaultAsyncHttpxClient.__mro__[1]  # httpx's AsyncClient (httpx2's: openai 3)
    limits = sys.modules[http.__module__.partition(".")[0]].Limits(max_keepalive_connections=0)
    pool = openai.DefaultAsyncHttpxClient(limits=limits)
    async_client = openai_server.async_client(http_client=pool)
    memory_client = with_fast_memory(async_client, user_id="alice", db_path=db_path, embedder=model)
    yield memory_client
    asyncio.run(memory_client.close())


def check_shipped_file(script: str, printed: str) -> None:
    """Run ``scripts/<script> --check`` (a learned file shipped beside the model must be what
    the script learns from the committed data), and expect ``printed`` in what it prints."""
    done = subprocess.run(
        [sys.executable, f"scripts/{script}", "--check"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert printed in done.stdout


SIZE_RATIO = 16
"""How much larger :func:`grows_linearly`'s large run is than its small one."""


def grows_linearly(seconds_for: Callable[[int], float], largest: int, runs: int = 4) -> bool:
    """Whether work of ``largest`` takes less than 0.3 x 256 (77) times as long as work of a
    sixteenth of it: linear work takes about 16 times as long (up to 40 times in these tests,
    as large buffers cost more per byte and some work changes its way past a length),
    quadratic work 256 times. A ratio on the same machine at the same moment, where a time
    limit would depend on its load. ``seconds_for`` gives the seconds of CPU the work took on
    its thread (``time.thread_time``): on a loaded machine a long run is preempted where a
    short one may fit in one time slice, and wall time made linear work look superlinear.
    The small and the large run alternate, ``runs`` times each, and each size's quickest run
    counts: a stall of a shared machine slows some runs, or both sizes alike, and does not
    decide. The garbage collector is off meanwhile: in the suite's process its pauses grow
    with the heap of every earlier test, not with the work measured, and made a linear 100 KB
    run look slow."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        small = large = math.inf
        for _ in range(runs):
            small = min(small, seconds_for(largest // SIZE_RATIO))
            large = min(large, seconds_for(largest))
    finally:
        if collecting:
            gc.enable()
    return large < 0.3 * SIZE_RATIO**2 * small
