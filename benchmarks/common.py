"""What every benchmark section shares: timing and statistics, result rows with their targets,
the run context, machine information, the printed table, subprocesses and a Chroma server."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .corpus import QueryPool

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CHILD = ROOT / "benchmarks" / "child.py"
PACKAGES = (
    "headroom-memory-integrations",
    "chromadb",
    "numpy",
    "tokenizers",
    "safetensors",
    "openai",
    "tiktoken",
    "httpx",
)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# -- timing and statistics ---------------------------------------------------------------------

clock = time.perf_counter


def ms_since(start: float) -> float:
    """Milliseconds elapsed since ``start`` (a :data:`clock` reading)."""
    return (clock() - start) * 1000.0


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``call``; return its result and how long it took, in milliseconds."""
    start = clock()
    result = call()
    return result, ms_since(start)


def sample(call: Callable[[], Any], repeat: int, warmup: int = 0) -> list[float]:
    """Milliseconds taken by each of ``repeat`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    gc.collect()
    return [timed(call)[1] for _ in range(repeat)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolating linearly between ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """Summary of a list of samples (same unit as the samples)."""

    n: int
    p50: float
    p95: float
    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        return cls(
            n=len(values),
            p50=percentile(values, 50),
            p95=percentile(values, 95),
            mean=sum(values) / len(values) if values else math.nan,
            min=min(values, default=math.nan),
            max=max(values, default=math.nan),
        )


# -- results and targets -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal for a row: ``text`` is printed, ``check(row)`` decides PASS or MISS."""

    text: str
    check: Callable[[Row], bool]


def at_most(p50: float | None = None, p95: float | None = None, unit: str = "ms") -> Target:
    """The row's median (and/or p95) must not exceed these values."""
    parts = [f"p50 <= {p50:g} {unit}"] if p50 is not None else []
    parts += [f"p95 <= {p95:g} {unit}"] if p95 is not None else []
    return Target(
        ", ".join(parts),
        lambda row: (
            (p50 is None or row.value <= p50)
            and (p95 is None or (row.p95 is not None and row.p95 <= p95))
        ),
    )


def value_at_most(limit: float, unit: str = "") -> Target:
    return Target(f"<= {limit:g}{(' ' + unit) if unit else ''}", lambda row: row.value <= limit)


def value_at_least(limit: float, unit: str = "") -> Target:
    return Target(f">= {limit:g}{(' ' + unit) if unit else ''}", lambda row: row.value >= limit)


@dataclass
class Row:
    """One line of the results table.

    ``value`` is the median for timings (``p95`` set too) or the value of a plain measure.
    """

    section: str
    name: str
    value: float
    unit: str
    p95: float | None = None
    n: int | None = None
    target: Target | None = None
    note: str = ""

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.target.check(self) else "MISS"

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "value": _finite(self.value),
            "p95": _finite(self.p95),
            "unit": self.unit,
            "n": self.n,
            "target": self.target.text if self.target else None,
            "status": self.status or None,
            "note": self.note or None,
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


def latency(
    section: str,
    name: str,
    samples: Sequence[float],
    target: Target | None = None,
    note: str = "",
    unit: str = "ms",
) -> Row:
    """A row of a timing: median, p95 and count of ``samples``."""
    stats = Stats.of(samples)
    return Row(section, name, stats.p50, unit, stats.p95, stats.n, target, note)


class SectionSkipped(Exception):
    """A section cannot run here (its data is missing): the run says so and goes on."""


@dataclass
class SectionResult:
    """What a section reports: table rows and a free-form ``details`` dict for the JSON."""

    name: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "rows": [row.to_dict() for row in self.rows],
            "details": self.details,
        }


# -- the run context ---------------------------------------------------------------------------


@dataclass
class Context:
    """Settings and shared resources of one run.

    Attributes:
        quick: The smoke-test mode: smaller stores, fewer repetitions.
        workdir: A scratch folder for stores, removed at the end of the run.
        cache: Where embeddings of synthetic texts are kept between runs.
        queries: Distinct user questions, each handed out once per run.
    """

    quick: bool
    workdir: Path
    cache: Path = RESULTS / "cache"
    queries: QueryPool = field(default_factory=QueryPool)

    def pick(self, full: Any, quick: Any) -> Any:
        """``quick`` in the quick mode, else ``full``."""
        return quick if self.quick else full

    def scratch(self, name: str) -> Path:
        """A new empty folder in the work dir."""
        path = self.workdir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


# Seconds since the run began, shared with child processes through the environment.
_STARTED = float(os.environ.setdefault("HEADROOM_BENCH_STARTED", str(time.time())))


def log(message: str) -> None:
    """Progress goes to stderr, so the table on stdout stays clean."""
    print(f"[{time.time() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def engine_fingerprint() -> dict[str, Any]:
    """Which engine was measured: the git commit, whether the package has uncommitted changes,
    and a hash of the package's source files as they were during the run."""
    package = ROOT / "headroom_memory_integrations"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "headroom_memory_integrations")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "package_uncommitted_changes": bool(changed) if changed is not None else None,
        "package_source_sha256": digest.hexdigest()[:16],
    }


def machine_info() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        memory_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        memory_kb = 0
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "thread_limits": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "engine": engine_fingerprint(),
    }


def calibrate() -> dict[str, Any]:
    """Fixed work timed at the start and the end of a run, to show how busy the machine was:
    embedding one fixed sentence with the local model in float32 (as before the default became
    the 8-bit form: runs stay comparable), and a pure-Python loop (medians)."""
    from headroom_memory_integrations import LocalEmbedder

    model = LocalEmbedder(backend="onnx")
    sentence = ["How was the weekend trip to Lisbon with your sister?"]
    embed = sample(lambda: model.embed(sentence), 30, warmup=3)
    loop = sample(lambda: sum(i * i for i in range(100_000)), 10, warmup=1)
    return {
        "embed_one_sentence_p50_ms": round(percentile(embed, 50), 2),
        "python_loop_p50_ms": round(percentile(loop, 50), 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# -- the table ---------------------------------------------------------------------------------


def _number(value: float | None, unit: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if unit in ("ms", "s", "MB", "x"):
        text = f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    elif unit in ("/10", "questions", "pairs", "memories"):
        text = f"{value:.0f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def table(rows: Sequence[Row], machine: dict[str, Any]) -> str:
    header = ("section", "measure", "p50 / value", "p95", "n", "target", "status")
    lines = [
        [
            row.section,
            row.name,
            _number(row.value, row.unit),
            _number(row.p95, row.unit) if row.p95 is not None else "",
            str(row.n) if row.n is not None else "",
            row.target.text if row.target else "",
            row.status,
        ]
        for row in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    about = (
        f"{machine['cpu_model']}, {machine['logical_cores']} cores, "
        f"{machine['memory_gb']} GB, Python {machine['python']}, threads "
        f"{machine['thread_limits'].get('OPENBLAS_NUM_THREADS') or 'default'}\n{packages}"
    )
    for moment in ("start", "end"):
        if f"calibration_{moment}" in machine:
            c = machine[f"calibration_{moment}"]
            about += (
                f"\nat {moment}: load average {c['load_average']}, one query embedded (float32) in "
                f"{c['embed_one_sentence_p50_ms']} ms, Python loop {c['python_loop_p50_ms']} ms"
            )
    rule = "-" * len(render(header))
    body = [render(header), rule, *(render(line) for line in lines)]
    return "\n".join([about, rule, *body])


def write_results(report: dict[str, Any], stamp: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=str) + "\n"
    path = RESULTS / f"{stamp}.json"
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    return path


# -- subprocesses ------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    return {**os.environ, "ANONYMIZED_TELEMETRY": "False", "PYTHONDONTWRITEBYTECODE": "1"}


def run_python(
    arguments: list[str], show_log: bool = False, python: Path | None = None
) -> dict[str, Any]:
    """Run this Python (or ``python``) with ``arguments`` in the repository root; return the
    JSON object it prints last, plus ``wall_ms`` (spawn to exit). ``show_log`` passes its
    stderr through."""
    start = clock()
    done = subprocess.run(
        [str(python or sys.executable), *arguments],
        stdout=subprocess.PIPE,
        stderr=None if show_log else subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=ROOT,
        timeout=3600,
    )
    wall = ms_since(start)
    if done.returncode != 0:
        raise RuntimeError(f"{arguments[:2]} failed ({done.returncode}):\n{done.stderr or ''}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_ms"] = wall
    return result


def run_child(mode: str, python: Path | None = None, **arguments: Any) -> dict[str, Any]:
    """One measurement of ``benchmarks/child.py`` in a fresh interpreter (of ``python``, default
    this one)."""
    return run_python([str(CHILD), mode, json.dumps(arguments)], python=python)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChromaServer:
    """A real ``chroma run`` server on 127.0.0.1 with its data in ``path``, answering once
    built: on ``port``, or a free one. Its output goes to a file beside the data (``<name>.log``:
    a pipe nobody reads would stop it once full). On Linux it is stopped when the process that
    started it dies, even killed by a signal, so a killed test run or benchmark leaves no server
    behind (build it on a thread that lives as long as the server: the signal follows the
    thread that started it)."""

    def __init__(self, path: Path, port: int | None = None, wait: float = 60.0) -> None:
        self.path = path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = path.parent / f"{path.name}.log"
        chroma = shutil.which("chroma", path=str(Path(sys.executable).parent)) or "chroma"
        address = ["--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [chroma, "run", "--path", str(path), *address],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=child_env(),
                preexec_fn=_stopped_with_parent(os.getpid()),
            )
        deadline = clock() + wait
        while True:
            if self.process.poll() is not None:
                log = self.log.read_text(errors="replace")
                raise RuntimeError(f"chroma run exited with {self.process.returncode}: {log}")
            try:
                urllib.request.urlopen(f"{self.url}/api/v2/heartbeat", timeout=1).read()
                return
            except OSError:
                if clock() > deadline:
                    self.stop()
                    raise RuntimeError(f"chroma run did not answer within {wait:g} s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _stopped_with_parent(parent: int) -> Callable[[], None] | None:
    """For ``Popen(preexec_fn=...)``: on Linux, the child is sent SIGTERM when ``parent`` dies
    (``prctl(PR_SET_PDEATHSIG)``), and exits at once if it already has. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def stop_with_parent() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the line above
            os._exit(1)

    return stop_with_parent


@contextmanager
def chroma_server(path: Path) -> Iterator[str]:
    """A :class:`ChromaServer` for a ``with`` block; yields its URL."""
    server = ChromaServer(path)
    try:
        yield server.url
    finally:
        server.stop()
