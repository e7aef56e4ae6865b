"""Run the benchmarks: ``python -m benchmarks [--quick] [--only SECTION[,SECTION]]``.

Prints a table (medians, p95, targets) and writes ``benchmarks/results/<timestamp>.json`` and
``benchmarks/results/latest.json``. See docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys

# Cap BLAS/OpenMP threads before numpy loads, as the package caps its own model threads
# (headroom_memory_integrations.embeddings.local.cpu_threads: 1 thread on 2 cores or fewer,
# else up to 8): on a 2-core machine, more threads oversubscribe and latency spikes. This also
# covers the harness's own numpy work and engine versions that do not cap.
_CORES = os.cpu_count() or 1
_THREADS = "1" if _CORES <= 2 else str(min(_CORES, 8))
if "--no-thread-cap" not in sys.argv:
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, _THREADS)
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import cast  # noqa: E402

from . import (  # noqa: E402
    coldstart,
    consolidation,
    e2e,
    followups,
    injection,
    load,
    locomo,
    memory,
    needle,
    paraphrase,
    paraphrase_fresh,
    paraphrase_keys,
    writes,
)
from .common import (  # noqa: E402
    Context,
    SectionResult,
    SectionSkipped,
    calibrate,
    log,
    machine_info,
    table,
    write_results,
)

SECTIONS: dict[str, ModuleType] = {
    "injection": injection,
    "writes": writes,
    "e2e": e2e,
    "coldstart": coldstart,
    "memory": memory,
    "locomo": locomo,
    "needle": needle,
    "paraphrase": paraphrase,
    "paraphrase-keys": paraphrase_keys,
    "paraphrase-fresh": paraphrase_fresh,
    "consolidation": consolidation,
    "followups": followups,
    "load": load,
}
# runnable alone, and run by the section named
PARTS = {"paraphrase-keys": "paraphrase", "paraphrase-fresh": "paraphrase"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: small, few repeats")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SECTION",
        help=f"run only these sections (repeatable or comma-separated): {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--no-thread-cap",
        action="store_true",
        help="leave BLAS/OpenMP thread counts at their defaults",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--backend",
        choices=["onnx", "onnx-int8", "numpy"],
        help="the default model's form for the sections run in this process (quality: "
        "locomo, needle, paraphrase*, consolidation); default: the library's default",
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for value in args.only for name in value.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    return args


def run_section(name: str, module: ModuleType, ctx: Context) -> SectionResult:
    log(f"== {name} ==")
    started = time.perf_counter()
    try:
        result: SectionResult = module.run(ctx)
    except SectionSkipped as skipped:
        log(f"== {name} skipped: {skipped} ==")
        result = SectionResult(name, details={"skipped": str(skipped)})
    except Exception:
        traceback.print_exc()
        result = SectionResult(name, details={"error": traceback.format_exc()})
    result.seconds = time.perf_counter() - started
    log(f"== {name} done in {result.seconds:.0f} s ==")
    return result


def use_backend(backend: str) -> None:
    """Make ``LocalEmbedder()`` (backend ``"auto"``) use ``backend`` in this process: to
    measure one form of the model beside another on the same engine."""
    from headroom_memory_integrations.embeddings import local

    chosen = cast(local.Backend, backend)
    original = local.resolved_backend
    local.resolved_backend = lambda model, wanted: original(  # type: ignore[assignment]
        model, chosen if wanted == "auto" else wanted
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.backend:
        use_backend(args.backend)
    names = args.only or [name for name in SECTIONS if name not in PARTS]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="headroom-bench-"))
    ctx = Context(quick=args.quick, workdir=workdir)
    started = time.perf_counter()
    machine["calibration_start"] = calibrate()
    try:
        results = [run_section(name, SECTIONS[name], ctx) for name in names]
    finally:
        if args.keep:
            log(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    machine["calibration_end"] = calibrate()
    report = {
        "started_at": stamp,
        "mode": "quick" if args.quick else "full",
        "argv": argv,
        "backend": args.backend or "default",
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine,
        "sections": {result.name: result.to_dict() for result in results},
    }
    path = write_results(report, stamp)
    rows = [row for result in results for row in result.rows]
    print(table(rows, machine))
    failed = [result.name for result in results if "error" in result.details]
    skipped = [result.name for result in results if "skipped" in result.details]
    print(f"\n{report['mode']} run, {report['seconds']:.0f} s; results: {path}")
    if skipped:
        print(f"sections skipped (their data is missing): {', '.join(skipped)}")
    if failed:
        print(f"sections that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
