"""The notebooks: committed with the outputs of a real run, executed here top to bottom in a real
Jupyter kernel (nbclient + ipykernel), offline, and their fresh outputs compared with the stored
ones (volatile parts normalized: see ``_notebooks_support``).

After changing a notebook, or code whose output it shows, store a fresh run:
``python tests/_notebooks_support.py [name ...]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from _notebooks_support import (
    NOTEBOOKS,
    all_output_text,
    differences,
    execute,
    notebook_path,
    output_texts,
)

from headroom_memory_integrations import MemoryStore

NAMES = [
    "01-quickstart",
    "02-langchain",
    # LlamaIndex's OpenAI LLM package pins openai<3: this one runs in the openai 2.x venv
    pytest.param("03-llamaindex", marks=pytest.mark.openai2),
    "04-memory-vs-history",
]
SWITCH = 'if os.environ.get("OPENAI_API_KEY", "offline") != "offline":'
ANSWERS = ("From what I remember:", "I will keep that in mind", "I don't know anything")


# run after the last cell: the files the kernel still has open in the notebook's temporary
# folder (tempfile.mkdtemp(prefix="headroom-..."), removed by the last cell)
HELD_FILES = """
import json, os
held = None  # without /proc (macOS): not known
if os.path.isdir("/proc/self/fd"):
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    held = sorted(p for p in held if "/headroom-" in p)
print("HELD " + json.dumps(held))
"""


class Run:
    def __init__(self, notebook: nbformat.NotebookNode, workdir: Path) -> None:
        probe = notebook.cells.pop()  # HELD_FILES's cell
        self.held = json.loads(re.findall(r"HELD (.*)", "".join(output_texts(probe)))[-1])
        self.notebook = notebook
        self.workdir = workdir
        self.text = all_output_text(notebook)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """Each notebook run once in a kernel, in an empty folder (cached for the module)."""
    runs: dict[str, Run] = {}

    def run(name: str) -> Run:
        if name not in runs:
            workdir = tmp_path_factory.mktemp(f"kernel-{name}")
            notebook = execute(notebook_path(name), workdir, then=HELD_FILES)
            runs[name] = Run(notebook, workdir)
        return runs[name]

    return run


def stored(name: str) -> nbformat.NotebookNode:
    return nbformat.read(notebook_path(name), as_version=4)


def code_sources(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebooks_are_these() -> None:
    names = [p if isinstance(p, str) else p.values[0] for p in NAMES]
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == names


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_holds_a_clean_run(name: str) -> None:
    notebook = stored(name)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.cells[0].cell_type == "markdown"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        "run top to bottom, once"
    )
    for cell in code:
        for output in cell.outputs:
            assert output.output_type != "error", cell.source
            assert output.get("name") != "stderr", f"{cell.source[:60]!r} wrote to stderr"
    assert sum(bool(cell.outputs) for cell in code) >= len(code) // 2


@pytest.mark.parametrize("name", NAMES)
def test_the_model_switch_is_one_visible_cell(name: str) -> None:
    """With OPENAI_API_KEY the notebook uses the real API; without it, the offline stand-in."""
    switches = [s for s in code_sources(stored(name)) if SWITCH in s]
    assert len(switches) == 1
    assert "ScriptedOpenAIServer(responder=MemoryFollowingModel())" in switches[0]
    others = "\n".join(s for s in code_sources(stored(name)) if SWITCH not in s)
    assert "ScriptedOpenAIServer(" not in others and "OPENAI_API_KEY" not in others


@pytest.mark.parametrize("name", NAMES)
def test_fresh_run_matches_the_stored_outputs(name: str, fresh: Callable[[str], Run]) -> None:
    found = differences(stored(name), fresh(name).notebook)
    assert not found, (
        f"{name}: the stored outputs are stale (`python tests/_notebooks_support.py {name}` "
        "stores a fresh run):\n\n" + "\n\n".join(found)
    )


@pytest.mark.parametrize("name", ["01-quickstart", "04-memory-vs-history"])
def test_run_all_twice_in_one_kernel(name: str, tmp_path: Path) -> None:
    """The first run left the offline stand-in's address and key in os.environ after closing
    it: the second "Run All" took them for a real key ("Using OpenAI's gpt-4o-mini.") and
    every chat cell failed with a connection error."""
    notebook = execute(notebook_path(name), tmp_path, times=2)
    text = all_output_text(notebook)
    assert text.count("No OPENAI_API_KEY: using the offline stand-in.") == 2
    assert "Using OpenAI's" not in text


@pytest.mark.parametrize("name", NAMES)
def test_fresh_run_cleans_up(name: str, fresh: Callable[[str], Run]) -> None:
    """Also in the kernel: the last cell closed the folder's storage before removing it (a
    kernel that ran a notebook again and again kept ~15 open files and ~4.5 MB per run)."""
    run = fresh(name)
    assert "removed the temporary folder: True" in run.text
    assert list(run.workdir.iterdir()) == []
    assert run.held == [] or (run.held is None and not Path("/proc/self/fd").is_dir())


def printed(run: Run) -> str:
    """What the notebook's cells printed (answers included), without displayed values."""
    return "\n".join(
        text
        for cell in run.notebook.cells
        if cell.cell_type == "code"
        for text in output_texts(cell)
        if text.startswith("[stdout]")
    )


@pytest.mark.parametrize("name", NAMES)
def test_no_answer_shows_a_memory_block(name: str, fresh: Callable[[str], Run]) -> None:
    out = printed(fresh(name))
    answers = [line for line in out.splitlines() if any(a in line for a in ANSWERS)]
    assert len(answers) >= 3
    assert not re.search(r"<memory-[0-9a-f]+>", "\n".join(answers))


def test_quickstart(fresh: Callable[[str], Run]) -> None:
    run = fresh("01-quickstart")
    out = printed(run)
    # session 2 recalled session 1's preference, in a new client
    assert "From what I remember: " in out and "Prefers Python for backend work;" in out
    assert "(preference, noted " in out and '): "Prefers Python for backend work"' in out
    unrelated = "0 results for &#x27;What is 2+2?&#x27; (relevance floor: similarity ≥ 0.111)"
    assert unrelated in run.text
    assert "refused: unknown category 'hobby'" in out
    assert "history: ['Lives in Berlin']" in out
    assert "search:  ['Moved from Berlin to Lisbon']" in out
    assert "From what I remember: Has a dog named Biscuit." in out  # streamed
    assert run.text.count("[image/png]") == 2


def test_langchain(fresh: Callable[[str], Run]) -> None:
    out = printed(fresh("02-langchain"))
    assert "From what I remember: Is a data engineer; Uses Spark and Airflow at work" in out
    assert "alice: From what I remember: Lives in Lyon." in out
    assert "bob:   From what I remember: Lives in Oslo." in out
    assert "carol: I don't know anything about that yet." in out


@pytest.mark.openai2
def test_llamaindex(fresh: Callable[[str], Run]) -> None:
    out = printed(fresh("03-llamaindex"))
    assert "From what I remember: Prefers Python for backend work;" in out  # chat engine
    assert "From what I remember: Lives in Oslo." in out  # the agent, another session
    run = fresh("03-llamaindex")
    assert "Is learning to sail" in run.text and "background" in run.text


def test_memory_vs_history(fresh: Callable[[str], Run]) -> None:
    run = fresh("04-memory-vs-history")
    out = printed(run)
    sent = dict(re.findall(r"^\s*([\w +]+): ([\d,]+) tokens sent", out, re.M))
    full, window, memory = (
        int(sent[k].replace(",", "")) for k in ("full history", "window", "window + memory")
    )
    assert window < memory < full
    rows = re.findall(r"^(.{44}) +(\w+) +([✓✗]) +([✓✗]) +([✓✗])$", out, re.M)
    had = {word: (full_, window_, memory_) for _, word, full_, window_, memory_ in rows}
    assert set(had) == {"vegetarian", "peanuts", "Biscuit", "Porto", "marathon", "Dana"}
    assert all(marks[0] == "✓" for marks in had.values())  # full history has everything
    for word in ("Biscuit", "Porto", "marathon", "Dana"):
        assert had[word][1:] == ("✗", "✓"), word  # the window lost it, memory brought it back
    assert run.text.count("[image/png]") == 1


def test_the_quickstart_plot_shows_the_similarity_a_search_judges(store: MemoryStore) -> None:
    """The light bars of 01-quickstart's score plot are the similarities the relevance floor
    judges, as a search computes them, also for memories with keys (which a real model writes
    and the offline stand-in does not): the cell's computation, run on keyed memories none of
    whose words the plotted question shares, gives each memory its score (no lexical part)."""
    cell = next(s for s in code_sources(stored("01-quickstart")) if "similarity_of" in s)
    computation = cell[: cell.index("fig, ax")]
    store.add(
        "Prefers Python for backend work",
        category="preference",
        keys=["coding", "Which programming tongue do I like?", "How do I build my API?"],
    )
    store.add("Has a dog named Biscuit", keys=["pets", "What is my pet called?"])
    store.add("Lives in Berlin")
    namespace: dict[str, Any] = {"memory": store}
    exec(computation, namespace)
    assert namespace["question"].startswith("Which language should I use")
    assert len(namespace["scores"]) == 3
    similarities = [float(s) for s in namespace["similarities"]]
    assert similarities == pytest.approx(namespace["scores"], abs=1e-5)
