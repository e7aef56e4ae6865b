"""The quick-start notebook: valid nbformat 4, committed without outputs, and runnable top to
bottom as plain Python, offline (embedded Chroma, the local model, the scripted OpenAI server).

Jupyter is not a dependency: the notebook is read as JSON and its code cells are joined into
one script run by ``sys.executable`` in a fresh process, the way a reader runs them in order.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
RUN_TIMEOUT = 240  # seconds; the run takes about ten, most of it loading the model
CELL_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CELL_KEYS = {
    "code": {"cell_type", "execution_count", "id", "metadata", "outputs", "source"},
    "markdown": {"cell_type", "id", "metadata", "source", "attachments"},
    "raw": {"cell_type", "id", "metadata", "source", "attachments"},
}
IPYTHON_ONLY_NAMES = {"get_ipython", "display"}  # valid syntax, but undefined outside IPython


def load_notebook() -> dict[str, Any]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def cell_source(cell: dict[str, Any]) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def code_cells(notebook: dict[str, Any]) -> list[str]:
    return [cell_source(c) for c in notebook["cells"] if c["cell_type"] == "code"]


def lines_starting(stdout: str, label: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(label)]


class Run:
    def __init__(self, completed: subprocess.CompletedProcess[str], cwd: Path) -> None:
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.cwd = cwd

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The notebook's code cells, in order, as one script in a fresh process and empty cwd."""
    cells = code_cells(load_notebook())
    script_dir = tmp_path_factory.mktemp("notebook-script")
    script = script_dir / "quickstart.py"
    script.write_text(
        "\n\n".join(f"# --- code cell {i}\n{source}" for i, source in enumerate(cells, 1)) + "\n",
        encoding="utf-8",
    )
    cwd = tmp_path_factory.mktemp("notebook-cwd")
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    result = Run(completed, cwd)
    assert result.returncode == 0, result.explain()
    return result


# -- the file ---------------------------------------------------------------------------------


def test_notebook_is_valid_nbformat_4() -> None:
    notebook = load_notebook()
    assert set(notebook) == {"cells", "metadata", "nbformat", "nbformat_minor"}
    assert notebook["nbformat"] == 4
    minor = notebook["nbformat_minor"]
    assert isinstance(minor, int) and minor >= 0
    kernelspec = notebook["metadata"]["kernelspec"]
    assert kernelspec["name"] == "python3" and kernelspec["language"] == "python"
    assert isinstance(kernelspec["display_name"], str)
    assert notebook["metadata"]["language_info"]["name"] == "python"

    cells = notebook["cells"]
    assert isinstance(cells, list) and cells
    ids = []
    for index, cell in enumerate(cells):
        where = f"cell {index}"
        assert cell["cell_type"] in CELL_KEYS, where
        assert set(cell) <= CELL_KEYS[cell["cell_type"]], where
        assert isinstance(cell["metadata"], dict), where
        source = cell["source"]
        assert isinstance(source, str) or all(isinstance(s, str) for s in source), where
        assert cell_source(cell).strip(), f"{where} is empty"
        if minor >= 5:  # cell ids arrived in nbformat 4.5
            assert CELL_ID.fullmatch(cell["id"]), where
            ids.append(cell["id"])
    assert len(ids) == len(set(ids)), "cell ids must be unique"
    assert cells[0]["cell_type"] == "markdown", "the notebook opens with an introduction"


def test_notebook_is_committed_without_outputs() -> None:
    notebook = load_notebook()
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [], cell_source(cell)[:80]
        assert cell["execution_count"] is None, cell_source(cell)[:80]


def test_code_cells_are_plain_python() -> None:
    """No ``!pip``, ``%magic``, top-level ``await`` or IPython-only names: every cell compiles
    as ordinary Python, so the notebook also runs as a script."""
    for index, source in enumerate(code_cells(load_notebook()), 1):
        compile(source, f"<code cell {index}>", "exec")  # SyntaxError on !, % or await
        tree = ast.parse(source)
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        ipython_only = names & IPYTHON_ONLY_NAMES
        assert not ipython_only, f"code cell {index} uses {ipython_only}"


def test_real_client_is_shown_but_not_executed() -> None:
    notebook = load_notebook()
    markdown = "\n".join(cell_source(c) for c in notebook["cells"] if c["cell_type"] == "markdown")
    assert "with_fast_memory(OpenAI()" in markdown
    assert not any("OpenAI()" in source for source in code_cells(notebook))


# -- running it -------------------------------------------------------------------------------


def test_runs_cleanly_and_leaves_nothing_behind(run: Run) -> None:
    assert "Traceback" not in run.stderr, run.explain()
    left = [p.name for p in run.cwd.iterdir()]
    assert left == [], f"the notebook must write only to its temp folder, not {left}"
    work = lines_starting(run.stdout, "working in ")
    assert len(work) == 1, run.explain()
    folder = Path(work[0].removeprefix("working in "))
    assert f"removed {folder}: True" in run.stdout
    assert not folder.exists()


def test_memory_store_section(run: Run) -> None:
    out = run.stdout
    alice, bob = out.split("alice: What language")[1].split("bob: What language")
    assert re.search(r"\d\.\d\d \[preference\] Prefers Python for backend work", alice)
    assert "Rust" not in alice  # users never see each other's memories
    assert re.search(r"\d\.\d\d \[preference\] Prefers Rust", bob)
    assert "Python" not in bob.split("What is 2+2?")[0]
    assert "What is 2+2? -> []" in out  # the relevance floor
    assert "preferences only: [('Prefers Python for backend work', 'preference')]" in out
    assert "refused: unknown category 'hobby'" in out
    assert "now:     Moved from New York to San Francisco" in out
    assert "history: ['Lives in New York']" in out
    assert "Which city do I live in? -> ['Moved from New York to San Francisco']" in out
    assert "'total_memories': 4" in out


def test_fast_memory_section(run: Run) -> None:
    out = run.stdout
    # the model's raw reply carried a memory block ...
    assert re.search(r"^<memory-[0-9a-f]{8,32}>\[.*\]</memory-[0-9a-f]{8,32}>$", out, re.M)
    # ... that was stored, and never reached the printed answers
    for text in ("Prefers Python for backend work", "Is building a new payments service"):
        assert f"] {text} (source: inline)" in out
    answers = lines_starting(out, "answer:")
    assert len(answers) == 3, run.explain()
    assert not [a for a in answers if "<memory-" in a or "</" in a]
    # conversation 2: the memory was injected, and the model's answer used it
    received = out.split("the model received this system message:")[1].split("answer:")[0]
    assert "<user-memories>" in received and "</user-memories>" in received
    assert re.search(
        r'- m\d+ \(preference, noted [0-9-]+\): "Prefers Python for backend work"', received
    )
    assert "Prefers Python for backend work" in answers[1]


def test_streaming_section(run: Run) -> None:
    (chunks,) = lines_starting(run.stdout, "chunks:")
    (streamed,) = lines_starting(run.stdout, "streamed:")
    assert chunks.count("|") >= 2, "the answer arrives in several chunks"
    for line in (chunks, streamed):
        assert "<" not in line, line  # not even a piece of the memory block's tag
    assert "Prefers Python for backend work" in streamed
    assert "Deploys services on Kubernetes" in lines_starting(run.stdout, "carol's memories:")[0]


def test_rolling_window_section(run: Run) -> None:
    out = run.stdout
    found = re.search(r"conversation: (\d+) messages, (\d+) tokens", out)
    kept = re.search(r"window: +(\d+) messages, (\d+) tokens", out)
    sent = re.search(r"sent: +(\d+) messages", out)
    assert found and kept and sent, run.explain()
    assert int(kept[2]) <= 1000 < int(found[2])
    assert int(kept[1]) < int(found[1])
    assert int(sent[1]) == int(kept[1]) + 1  # the window plus the memory system message
    assert "Is building a new payments service" in lines_starting(out, "answer:")[-1]
