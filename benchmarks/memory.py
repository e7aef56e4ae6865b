"""Memory: peak resident set size of a fresh process that imports the package, opens a store of
1k memories in embedded Chroma, loads the local model and searches once; and, for comparison,
of a process that only imports the package.

The peak is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` of a spawned child on Linux also
counts the parent's RSS at fork (``ru_maxrss`` is kept in the JSON for reference)."""

from __future__ import annotations

from .common import Context, Row, SectionResult, Stats, log, run_child
from .population import embedded_user

NAME = "memory"
SIZE = 1_000


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    folder = ctx.scratch("memory")
    embedded_user(folder, "rss-user", SIZE, ctx.cache)
    repeat = ctx.pick(5, 3)
    log(f"memory: {repeat} x (import only, model + search) in fresh processes")
    imports = [run_child("import")["peak_rss_mb"] for _ in range(repeat)]
    searches = [
        run_child("search", db=str(folder), user="rss-user", query=question)["peak_rss_mb"]
        for question in ctx.queries.take(repeat)
    ]
    for name, values in (
        ("peak RSS: import only", imports),
        ("peak RSS: import + open store + load model + search", searches),
    ):
        stats = Stats.of(values)
        result.add(Row(NAME, name, stats.p50, "MB", n=stats.n, note=f"max {stats.max:.0f} MB"))
    return result
