"""Cold start, each step in a fresh interpreter (``benchmarks/child.py``), repeated:

- ``import headroom_memory_integrations``;
- the first ``search`` in a new process on an existing store of 1k memories (open embedded
  Chroma, load the model, embed the query, search), timed from before the import;
- the first answer of ``with_fast_memory`` (import ``openai`` and the package, wrap a client,
  first ``chat.completions.create`` with retrieval against the same store), timed from before
  the imports; the scripted server runs in the parent process.

The times are taken inside the child from its first line; interpreter start-up (~20-40 ms) is
not included there but is in ``wall_ms`` (spawn to exit), kept in the JSON.
"""

from __future__ import annotations

from typing import Any

from headroom_memory_integrations.testing import ScriptedOpenAIServer

from .common import Context, SectionResult, latency, log, percentile, run_child, value_at_most
from .population import embedded_user
from .scripted import InlineModel

NAME = "coldstart"
SIZE = 1_000


def seconds(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [run[key] / 1000 for run in runs]


def median_steps(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median time (from the child's first line) at which each step was done."""
    keys = [key for key in runs[0] if key.endswith("_ms") and key != "wall_ms"]
    return {key: round(percentile([run[key] for run in runs], 50), 1) for key in keys}


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    folder = ctx.scratch("coldstart")
    embedded_user(folder, "cold-user", SIZE, ctx.cache)
    repeat = ctx.pick(10, 5)

    log(f"coldstart: {repeat} x import")
    imports = [run_child("import") for _ in range(repeat)]
    result.add(
        latency(
            NAME,
            "import headroom_memory_integrations",
            seconds(imports, "import_ms"),
            value_at_most(0.5, "s"),
            unit="s",
        )
    )

    log(f"coldstart: {repeat} x first search")
    searches = [
        run_child("search", db=str(folder), user="cold-user", query=question)
        for question in ctx.queries.take(repeat)
    ]
    result.add(
        latency(NAME, "first search, from before import", seconds(searches, "total_ms"), unit="s")
    )
    result.add(
        latency(
            NAME,
            "first search, after import (open + model + query)",
            seconds(searches, "first_search_ms"),
            unit="s",
        )
    )

    steps = [
        run_child("steps", db=str(folder), user="cold-user", query=question)
        for question in ctx.queries.take(3)
    ]
    result.details["first_search_steps_p50_ms"] = median_steps(steps)

    log(f"coldstart: {repeat} x first wrapped call")
    with ScriptedOpenAIServer(responder=InlineModel()) as server:
        answers = [
            run_child(
                "wrapped", base_url=server.base_url, db=str(folder), user="cold-user", query=q
            )
            for q in ctx.queries.take(repeat)
        ]
    result.add(
        latency(
            NAME,
            "first answer of with_fast_memory (imports -> answer)",
            seconds(answers, "first_answer_ms"),
            value_at_most(1, "s"),
            unit="s",
        )
    )
    result.add(
        latency(
            NAME,
            "first answer, process spawn to exit",
            seconds(answers, "wall_ms"),
            unit="s",
        )
    )
    result.details["first_answer_steps_p50_ms"] = median_steps(answers)
    result.details["runs"] = {"import": imports, "search": searches, "wrapped": answers}
    return result
