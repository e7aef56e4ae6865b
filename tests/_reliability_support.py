"""Helpers of the reliability tests: a fast embedder with no meaning, raw-byte searches of every
file under a folder, small filesystems (tmpfs) and read-only bind mounts for the disk tests."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


class RandomEmbedder:
    """A unit vector drawn from a seed hashed from the text: equal texts get equal vectors,
    different texts unrelated ones (cosine ~0). For tests about storage, not meaning."""

    def __init__(self, dimension: int = 16, name: str = "test-random") -> None:
        self.dimension = dimension
        self.name = name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            rows[row] = np.random.default_rng(seed).standard_normal(self.dimension)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def files_containing(folder: Path, needles: Iterable[str]) -> dict[str, list[str]]:
    """For each needle found, the files under ``folder`` whose raw bytes contain it (as UTF-8,
    and as UTF-16 in case a file stores text that way)."""
    found: dict[str, list[str]] = {}
    patterns = {n: (n.encode("utf-8"), n.encode("utf-16-le")) for n in needles}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for needle, encodings in patterns.items():
            if any(pattern in data for pattern in encodings):
                found.setdefault(needle, []).append(str(path.relative_to(folder)))
    return found


def files_holding_vector(folder: Path, vector: np.ndarray, atol: float = 1e-6) -> list[str]:
    """The files under ``folder`` whose raw bytes hold ``vector`` as float32 numbers in a row,
    at any byte offset, each to within ``atol`` (Chroma stores it normalised again, which may
    change its last bits)."""
    target = np.asarray(vector, dtype=np.float32)
    found: list[str] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for shift in range(4):
            count = (len(data) - shift) // 4
            if count < len(target):
                continue
            floats = np.frombuffer(data, np.float32, count, shift)
            with np.errstate(invalid="ignore"):  # (bytes that read as NaN)
                gaps = np.abs(floats[: count - len(target) + 1] - target[0])
                starts = np.flatnonzero(gaps <= atol)
                if any(np.allclose(floats[i : i + len(target)], target, atol=atol) for i in starts):
                    found.append(str(path.relative_to(folder)))
                    break
    return found


def freed_text_handed_back(sizes: Iterable[int] = (4096, 65536), rounds: int = 10) -> int:
    """With the C library's allocator: how many of ``rounds`` cycles per block size (write a
    text into a new block, free it, allocate the same size again) found the text in the new
    block. glibc hands the freed block straight back, so without clearing nearly all do."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    text = b"Keeps the spare key under the blue flowerpot. " * 2000
    seen = 0
    for size in sizes:
        for _ in range(rounds):
            freed = libc.malloc(size)
            ctypes.memmove(freed, text, min(len(text), size))
            libc.free(freed)
            given = libc.malloc(size)
            seen += b"spare key" in ctypes.string_at(given, size)
            libc.free(given)
    return seen


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextmanager
def small_filesystem(where: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of ``megabytes`` mounted at ``where`` (needs root), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextmanager
def read_only_view(source: Path, where: Path) -> Iterator[Path]:
    """``source`` mounted read-only at ``where`` (needs root). Yields ``where``; call
    :func:`make_writable` to remount it read-write."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(where)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def make_writable(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,bind,rw", str(where)], check=True)


def fill_disk(folder: Path, leave_bytes: int) -> Path:
    """Write a filler file so that about ``leave_bytes`` stay free on ``folder``'s disk."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    filler = folder / "filler.bin"
    size = max(0, free - leave_bytes)
    with open(filler, "wb") as out:
        chunk = b"\0" * 2**20
        while size > 0:
            out.write(chunk[: min(size, len(chunk))])
            size -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return filler


def run_python(
    code: str, *, timeout: float = 240, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the tests folder importable (and ``env`` added
    to the environment)."""
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def read_ahead(store: Any) -> Any:
    """The store's collection handle once its user is read ahead (the state in which small
    writes are deferred): searches until the read-ahead has finished (60 s at most)."""
    collection = store._open()
    deadline = time.monotonic() + 60
    while collection._index is None:
        assert time.monotonic() < deadline, "the read-ahead never finished"
        store.search("anything", min_score=-1)
        time.sleep(0.01)
    return collection


def wrapped_for(wrap: Any, server: Any, users: Sequence[str], **options: Any) -> tuple[Any, ...]:
    """One client of the scripted ``server`` wrapped by ``wrap`` (``with_memory``, ...) for
    each of ``users``, with the same ``options``."""
    return tuple(wrap(server.client(), user_id=user, **options) for user in users)


def embeds_now(embedder: Any) -> bool:
    """Whether ``embedder`` embeds now (an endpoint's: not down, nor held to be down)."""
    from headroom_memory_integrations import EmbeddingError

    try:
        embedder.embed(["are you back?"])
    except EmbeddingError:
        return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _listen(proxy: Any, target_port: int) -> None:
    """Start ``proxy`` (a :class:`SlowProxy` or :class:`BlackHoleProxy`): listen on a free port
    of 127.0.0.1 (its ``url``, its ``_socket``) and, for each connection, connect to
    ``target_port`` and hand both sockets to its ``_connected``."""
    proxy._socket = listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(100)
    proxy.url = f"http://127.0.0.1:{listening.getsockname()[1]}"

    def accept() -> None:
        while True:
            try:
                client, _ = listening.accept()
                server = socket.create_connection(("127.0.0.1", target_port))
            except OSError:
                return
            proxy._connected(client, server)

    threading.Thread(target=accept, daemon=True).start()


class SlowProxy:
    """A TCP proxy on 127.0.0.1 to ``target_port`` that holds back each response ``delay``
    seconds: a server that answers every request, but slowly. Counts the requests."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.delay, self.requests = delay, 0
        _listen(self, target_port)

    def close(self) -> None:
        self._socket.close()

    def _connected(self, client: socket.socket, server: socket.socket) -> None:
        state = {"pending": False}
        for source, sink, up in ((client, server, True), (server, client, False)):
            threading.Thread(target=self._pipe, args=(source, sink, state, up), daemon=True).start()

    def _pipe(self, source: Any, sink: Any, state: dict[str, bool], up: bool) -> None:
        try:
            while data := source.recv(65536):
                if up:
                    if not state["pending"]:
                        self.requests += 1
                    state["pending"] = True
                elif state["pending"]:
                    time.sleep(self.delay)
                    state["pending"] = False
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


def _close_both(*sockets: socket.socket) -> None:
    for each in sockets:
        each.close()


class BlackHoleProxy:
    """A TCP proxy on 127.0.0.1 to ``target_port`` that, while :attr:`hole` is set, passes
    heartbeats on but never answers any other request, holding its connection open (a server
    whose connection is lost without a reset: a crashed host, a partition). Once :attr:`hole`
    is cleared, new requests pass; those held stay unanswered."""

    def __init__(self, target_port: int) -> None:
        self.hole, self.held = True, 0
        self._closed = threading.Event()
        _listen(self, target_port)

    def close(self) -> None:
        self._closed.set()
        self._socket.close()

    def _connected(self, client: socket.socket, server: socket.socket) -> None:
        ends = threading.Barrier(2, action=functools.partial(_close_both, client, server))
        for source, sink, up in ((client, server, True), (server, client, False)):
            threading.Thread(target=self._pipe, args=(source, sink, up, ends), daemon=True).start()

    def _pipe(self, source: Any, sink: Any, up: bool, ends: threading.Barrier) -> None:
        try:
            while data := source.recv(65536):
                if up and self.hole and b"/heartbeat" not in data:
                    self.held += 1
                    self._closed.wait()  # never answered, the connection left open
                    with suppress(OSError):
                        source.shutdown(socket.SHUT_RDWR)  # ends the other direction too
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            with suppress(threading.BrokenBarrierError):
                ends.wait()  # both directions done: the two sockets are closed
