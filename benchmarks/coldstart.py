"""Cold start, each step in a fresh interpreter (``benchmarks/child.py``), repeated:

- ``import headroom_memory_integrations``;
- the first ``search`` in a new process on an existing store of 1k memories (open embedded
  Chroma, load the model, embed the query, search), timed from before the import;
- the first answer of ``with_fast_memory`` (import ``openai`` and the package, wrap a client,
  first ``chat.completions.create`` with retrieval against the same store), timed from before
  the imports; the scripted server runs in the parent process.

The children run in a venv where the package is installed as a user installs it (``pip
install .``, default dependencies; :mod:`.installed`), made once per state of the package; the
first answer is also measured, in turn with it, in the benchmark's own venv (every extra and the
test tools, the package installed editable), which is slower. Where the default install cannot
be made (no package index), everything runs in the benchmark's venv, as the JSON says.

The times are taken inside the child from its first line; interpreter start-up (~20-40 ms) is
not included there but is in ``wall_ms`` (spawn to exit), kept in the JSON.

The package's bytecode is compiled first, as ``pip install`` compiles it (the dependencies'
is, in the venv): the children run with ``PYTHONDONTWRITEBYTECODE=1``, so without it every
child compiled the package's modules from source, which no installed user does (~50-80 ms).
``HEADROOM_BENCH_BYTECODE=0`` skips that step (remove the package's ``__pycache__`` folders
too, to measure the source-only start).
"""

from __future__ import annotations

import compileall
import os
from pathlib import Path
from typing import Any

import headroom_memory_integrations
from headroom_memory_integrations.testing import ScriptedOpenAIServer

from .common import (
    ROOT,
    Context,
    SectionResult,
    latency,
    log,
    percentile,
    run_child,
    value_at_most,
)
from .installed import default_install
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


def compile_as_installed() -> bool:
    """Compile the package's modules to bytecode, as pip does when it installs the wheel;
    whether it was done (see the module's docstring)."""
    if os.environ.get("HEADROOM_BENCH_BYTECODE", "1") == "0":
        return False
    package = os.path.dirname(headroom_memory_integrations.__file__)
    return bool(compileall.compile_dir(package, quiet=1))


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    result.details["package_bytecode_compiled"] = compile_as_installed()
    installed = default_install(ctx.cache)
    where = "default install" if installed else "benchmark venv"
    result.details["measured_in"] = (
        f"{installed} (pip install ., default dependencies)"
        if installed
        else "the benchmark's venv (the default install could not be made)"
    )
    folder = ctx.scratch("coldstart")
    embedded_user(folder, "cold-user", SIZE, ctx.cache)
    repeat = ctx.pick(10, 5)

    log(f"coldstart: {repeat} x import, in the {where}")
    imports = [run_child("import", python=installed) for _ in range(repeat)]
    checkout = ROOT / "headroom_memory_integrations"
    if installed and any(Path(run["package"]).is_relative_to(checkout) for run in imports):
        raise RuntimeError(f"{installed} imported the package from the checkout")
    result.add(
        latency(
            NAME,
            "import headroom_memory_integrations",
            seconds(imports, "import_ms"),
            value_at_most(0.5, "s"),
            unit="s",
            note=where,
        )
    )

    log(f"coldstart: {repeat} x first search")
    searches = [
        run_child("search", python=installed, db=str(folder), user="cold-user", query=question)
        for question in ctx.queries.take(repeat)
    ]
    result.add(
        latency(
            NAME,
            "first search, from before import",
            seconds(searches, "total_ms"),
            unit="s",
            note=where,
        )
    )
    result.add(
        latency(
            NAME,
            "first search, after import (open + model + query)",
            seconds(searches, "first_search_ms"),
            unit="s",
            note=where,
        )
    )

    steps = [
        run_child("steps", python=installed, db=str(folder), user="cold-user", query=question)
        for question in ctx.queries.take(3)
    ]
    result.details["first_search_steps_p50_ms"] = median_steps(steps)

    log(f"coldstart: {repeat} x first wrapped call, in turn in the {where} and this venv")
    answers: list[dict[str, Any]] = []
    answers_here: list[dict[str, Any]] = []
    with ScriptedOpenAIServer(responder=InlineModel()) as server:

        def answer(python: Path | None, question: str) -> dict[str, Any]:
            url, db = server.base_url, str(folder)
            return run_child(
                "wrapped", python=python, base_url=url, db=db, user="cold-user", query=question
            )

        for question in ctx.queries.take(repeat):
            answers.append(answer(installed, question))
            if installed:
                answers_here.append(answer(None, question))
    result.add(
        latency(
            NAME,
            "first answer of with_fast_memory (imports -> answer)",
            seconds(answers, "first_answer_ms"),
            value_at_most(1, "s"),
            unit="s",
            note=where,
        )
    )
    result.add(
        latency(
            NAME,
            "first answer, process spawn to exit",
            seconds(answers, "wall_ms"),
            unit="s",
            note=where,
        )
    )
    if answers_here:
        result.add(
            latency(
                NAME,
                "first answer, in the benchmark venv (every extra, editable)",
                seconds(answers_here, "first_answer_ms"),
                unit="s",
            )
        )
        result.details["first_answer_steps_here_p50_ms"] = median_steps(answers_here)
    result.details["first_answer_steps_p50_ms"] = median_steps(answers)
    result.details["runs"] = {
        "import": imports,
        "search": searches,
        "wrapped": answers,
        "wrapped_here": answers_here,
    }
    return result
