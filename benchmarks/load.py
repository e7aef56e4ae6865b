"""Load: wrapped chat calls, sync and async, for several users at once, sustained for minutes.

Against the scripted OpenAI-compatible server on 127.0.0.1, ``with_fast_memory`` clients (one
sync and one async per user, sharing the user's store) are driven closed-loop: each worker sends
its next call as soon as the last one returned, so the rate is the highest this machine holds at
that concurrency. Every call searches the user's memories (embedded Chroma, the real local
model); one call in :data:`WRITE_EVERY` tells the model something new, which answers with a
memory block, so that memory is stored in the background. A call that returned is an
acknowledged write: at the end, after ``flush()``, every acknowledged memory must be stored
(near-duplicate merging is off for this: the facts differ only in numbers, see :func:`drive`).

Reported per window of time: calls per second and latency p50/p95/p99; over the run: errors
(exceptions from calls, and failures the wrappers survived: 0 expected), resident memory at the
start and the end, and how many acknowledged memories are missing (0 expected).
``python -m benchmarks --only load`` runs 5 minutes (``--quick``: 30 s); tests/
test_reliability_load.py runs the short form in CI.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headroom_memory_integrations import LocalEmbedder, MemoryStore
from headroom_memory_integrations.embeddings import Embedder
from headroom_memory_integrations.openai import with_fast_memory
from headroom_memory_integrations.testing import Reply, ScriptedOpenAIServer

from .common import Context, Row, SectionResult, log, percentile, value_at_most
from .scripted import ANSWER, MODEL, instruction_nonce

NAME = "load"
WRITE_EVERY = 5
"""One call in this many tells the model a new fact (and is remembered)."""
_FACT = re.compile(r"My locker number at site (\w+) is (\d+)\.")


class LoadModel:
    """Answers like a model following the inline instruction: a short answer, and a memory
    block holding the fact the user just told it (none for a plain question)."""

    def __call__(self, body: dict[str, Any]) -> Reply:
        nonce = instruction_nonce(body)
        if not nonce:
            return Reply.text(ANSWER)
        user = next(m["content"] for m in reversed(body["messages"]) if m.get("role") == "user")
        found = _FACT.search(user if isinstance(user, str) else "")
        memories = (
            [{"text": fact_memory(found.group(1), found.group(2)), "category": "fact"}]
            if found
            else []
        )
        return Reply.text(f"{ANSWER}\n\n<memory-{nonce}>{json.dumps(memories)}</memory-{nonce}>")


def fact_memory(site: str, number: str) -> str:
    return f"Has locker number {number} at site {site}"


def rss_mb() -> float:
    """This process's resident memory now (``VmRSS``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Tally:
    """What the workers record, shared between threads."""

    started: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: list[tuple[float, float]] = field(default_factory=list)  # (end offset s, latency ms)
    errors: list[str] = field(default_factory=list)
    acknowledged: dict[str, list[str]] = field(default_factory=dict)  # user -> memory texts
    counter: int = 0

    def next_number(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter

    def record(self, begun: float, user: str, memory: str | None) -> None:
        ended = time.perf_counter()
        with self.lock:
            self.calls.append((ended - self.started, (ended - begun) * 1000.0))
            if memory is not None:
                self.acknowledged.setdefault(user, []).append(memory)

    def failed(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{type(exc).__name__}: {exc}")


def _question(tally: Tally, worker: str) -> tuple[str, str | None]:
    """The next user message, and the memory it should leave (None for a plain question)."""
    number = tally.next_number()
    if number % WRITE_EVERY == 0:
        site = f"{worker}x{number}"
        return f"My locker number at site {site} is {number}.", fact_memory(site, str(number))
    topics = ("my lockers", "the weekend", "which site I work at", "dinner plans", "my code")
    return f"What do you remember about {topics[number % len(topics)]}? ({number})", None


def drive(
    folder: Path,
    *,
    seconds: float,
    users: int = 4,
    sync_workers: int = 2,
    async_workers: int = 4,
    prefill: int = 200,
    window: float = 10.0,
    embedder: Embedder | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run the load for ``seconds`` and return the report (see the module docstring).

    Args:
        folder: An empty folder for the embedded memories.
        users: Users served at once; each has one sync and one async wrapped client.
        sync_workers: Threads calling the sync clients (users taken in turn).
        async_workers: Concurrent asyncio tasks calling the async clients.
        prefill: Memories each user holds before the run.
        window: Seconds per row of the report over time.
    """
    embedder = embedder or LocalEmbedder()
    names = [f"load-user-{n}" for n in range(users)]
    # Near-duplicate merging is off (identical texts are still stored once): the facts differ
    # only in numbers, which the model embeds 0.95+ alike ("... locker 115 at site a1x115" and
    # "... 110 at site a1x110": 0.957), and this run checks that storing loses nothing.
    stores = [
        MemoryStore(name, db_path=folder, embedder=embedder, duplicate_threshold=None)
        for name in names
    ]
    for name, store in zip(names, stores):
        store.add_many(
            [f"Filler memory {i} of {name}: likes topic {i * 7919}" for i in range(prefill)]
        )
    with ScriptedOpenAIServer(responder=LoadModel()) as server:
        sync_clients = [with_fast_memory(server.client(), memory=s) for s in stores]
        async_clients = [with_fast_memory(server.async_client(), memory=s) for s in stores]
        for client in sync_clients:  # warm up: model, read-ahead, connections
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}]
            )
        rss_start = rss_mb()
        tally = Tally(started=time.perf_counter())
        deadline = tally.started + seconds
        stop = threading.Event()

        def sync_worker(number: int) -> None:
            turn = number
            while not stop.is_set() and time.perf_counter() < deadline:
                user = turn % users
                turn += sync_workers
                text, memory = _question(tally, f"s{number}")
                begun = time.perf_counter()
                try:
                    sync_clients[user].chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": text}]
                    )
                except Exception as exc:
                    tally.failed(exc)
                    continue
                tally.record(begun, names[user], memory)

        async def async_worker(number: int) -> None:
            turn = number
            while time.perf_counter() < deadline:
                user = turn % users
                turn += async_workers
                text, memory = _question(tally, f"a{number}")
                begun = time.perf_counter()
                try:
                    await async_clients[user].chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": text}]
                    )
                except Exception as exc:
                    tally.failed(exc)
                    continue
                tally.record(begun, names[user], memory)

        async def async_side() -> None:
            await asyncio.gather(*(async_worker(n) for n in range(async_workers)))

        def reporter() -> None:
            while not stop.wait(window):
                server.reset()  # it records every request: not the memory layer's memory
                with tally.lock:
                    done = len(tally.calls)
                progress(f"load: {done} calls, {len(tally.errors)} errors, {rss_mb():.0f} MB")

        threads = [threading.Thread(target=sync_worker, args=(n,)) for n in range(sync_workers)]
        threads.append(threading.Thread(target=lambda: asyncio.run(async_side())))
        watcher = threading.Thread(target=reporter, daemon=True)
        for thread in [*threads, watcher]:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        elapsed = time.perf_counter() - tally.started
        flushed = all(store.flush(120) for store in stores)
        rss_end = rss_mb()
        missing = {}
        for name, store in zip(names, stores):
            stored = {m.text for m in store.get_all()}
            lost = [text for text in tally.acknowledged.get(name, []) if text not in stored]
            if lost:
                missing[name] = lost
        sample = [
            (store, texts[-1])
            for store, texts in ((s, tally.acknowledged.get(n, [])) for s, n in zip(stores, names))
            if texts
        ]
        found_by_search = sum(
            any(r.memory.text == text for r in store.search(text, top_k=3))
            for store, text in sample
        )
        counters: dict[str, int] = {}
        for store in stores:
            for key, value in store.counters.items():
                counters[key] = counters.get(key, 0) + value
    return {
        "seconds": round(elapsed, 1),
        "users": users,
        "sync_workers": sync_workers,
        "async_workers": async_workers,
        "prefill_per_user": prefill,
        "calls": len(tally.calls),
        "calls_per_second": round(len(tally.calls) / elapsed, 1),
        "latency_ms": _summary([ms for _, ms in tally.calls]),
        "over_time": _windows(tally.calls, window, elapsed),
        "errors": len(tally.errors),
        "error_examples": tally.errors[:5],
        "wrapper_failures": {k: v for k, v in counters.items() if k.endswith("failures")},
        "counters": counters,
        "acknowledged_writes": sum(len(v) for v in tally.acknowledged.values()),
        "flushed": flushed,
        "missing_after_flush": sum(len(v) for v in missing.values()),
        "missing_examples": [t for v in missing.values() for t in v][:5],
        "latest_write_found_by_search": f"{found_by_search}/{len(sample)}",
        "rss_mb_start": round(rss_start, 1),
        "rss_mb_end": round(rss_end, 1),
    }


def _summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(latencies, 50), 1),
        "p95": round(percentile(latencies, 95), 1),
        "p99": round(percentile(latencies, 99), 1),
    }


def _windows(calls: list[tuple[float, float]], window: float, elapsed: float) -> list[dict]:
    rows: list[dict] = []
    start = 0.0
    while start < elapsed - 1e-9:
        end = min(start + window, elapsed)
        if end - start < window / 2 and rows:  # a short tail joins the window before it
            break
        inside = [ms for at, ms in calls if start <= at < end]
        if inside:
            rows.append(
                {
                    "from_s": round(start),
                    "to_s": round(end),
                    "calls_per_second": round(len(inside) / (end - start), 1),
                    **_summary(inside),
                }
            )
        start = end
    return rows


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    seconds = ctx.pick(300, 30)
    log(f"load: {seconds} s, 4 users, 2 sync threads + 4 async tasks, 1 call in 5 writes")
    report = drive(ctx.scratch("load"), seconds=seconds, window=ctx.pick(30, 10), progress=log)
    result.details.update(report)
    latencies = report["latency_ms"]
    result.add(
        Row(
            NAME,
            "calls per second, sustained",
            report["calls_per_second"],
            "calls/s",
            n=report["calls"],
        )
    )
    result.add(
        Row(
            NAME,
            "wrapped call latency",
            latencies["p50"],
            "ms",
            latencies["p95"],
            report["calls"],
            note=f"p99 {latencies['p99']} ms",
        )
    )
    result.add(
        Row(
            NAME,
            "errors",
            report["errors"] + sum(report["wrapper_failures"].values()),
            "",
            target=value_at_most(0),
        )
    )
    result.add(
        Row(
            NAME,
            "acknowledged memories missing after flush",
            report["missing_after_flush"],
            "",
            n=report["acknowledged_writes"],
            target=value_at_most(0),
        )
    )
    result.add(
        Row(
            NAME,
            "RSS growth over the run",
            report["rss_mb_end"] - report["rss_mb_start"],
            "MB",
            note=f"{report['rss_mb_start']} -> {report['rss_mb_end']} MB",
        )
    )
    return result
