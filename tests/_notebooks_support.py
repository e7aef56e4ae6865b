"""Run the notebooks in a real Jupyter kernel and compare their outputs with the stored ones.

Each notebook is executed top to bottom by ``nbclient`` in an ``ipykernel`` kernel started from
this interpreter, offline: no ``OPENAI_*`` variable of the caller reaches the kernel, so every
notebook takes its own offline branch (a :class:`ScriptedOpenAIServer` answered by a
:class:`MemoryFollowingModel`). The kernel's working folder is an empty temporary folder.

The committed notebooks carry the outputs of such a run. :func:`differences` compares a fresh
run with them after :func:`normalized` has replaced what legitimately changes from run to run
(memory ids and nonces, dates and times, temporary paths, ports, memory addresses), keeping the
shape (a date stays a date, a date with its time a date with a time). Counts are compared
exactly; decimals (scores, which another machine may compute differently in the last digit)
with a small tolerance, as are the few counts that vary from run to run (:data:`VARYING`).
Images are compared by kind and count, not by pixels.

To store the outputs of a fresh run in the notebooks (after changing one, or the code it
shows), from the repository root::

    python tests/_notebooks_support.py            # every notebook
    python tests/_notebooks_support.py 01-quickstart
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 180  # seconds for one cell; a whole notebook takes well under a minute
NUMBER_TOLERANCE = 0.011  # scores are shown with 2-3 decimals
# Counts a fresh run does not reproduce exactly, and how far (relative) they may move: what the
# memory flow sends holds a random nonce and the times memories were noted, which tiktoken splits
# into a varying number of tokens (04's total: 23,786 to 23,828 over 16 runs).
VARYING = {re.compile(r"window \+ memory: +[\d,]+ tokens sent"): 0.003}

_ID = re.compile(r"\b(?:[0-9a-f]{32}|[0-9a-f]{12})\b")
_NONCE = re.compile(r"(memory-)[0-9a-f]{8,32}\b")
_DATE = re.compile(r"\d{4}-\d\d-\d\d(?:([T ])\d\d:\d\d(?::\d\d(?:\.\d+)?)?(\+00:00| UTC)?)?")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_PORT = re.compile(r"(127\.0\.0\.1|localhost):\d+")
_TEMPORARY = re.compile(r"<dir>/[^/\s'\"<]+")
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\w])")


def notebook_path(name: str) -> Path:
    return NOTEBOOKS / f"{name}.ipynb"


def kernel_env() -> dict[str, str]:
    """The kernel's environment: the caller's, less OpenAI and memory settings, with this
    checkout first on the import path."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENAI_", "AZURE_OPENAI_", "HEADROOM_MEMORY_"))
    }
    env.update(
        ANONYMIZED_TELEMETRY="False",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PYTHONHASHSEED="0",
        MPLBACKEND="module://matplotlib_inline.backend_inline",
    )
    return env


def execute(
    path: Path, workdir: Path, *, times: int = 1, then: str | None = None
) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` in a fresh kernel with ``workdir`` as its working folder
    (``times`` times over, as "Run All" again in the same kernel; then the code ``then`` in a
    cell of its own, last); return it with the new outputs. A cell that raises fails the run
    (``CellExecutionError``)."""
    notebook = nbformat.read(path, as_version=4)
    notebook.cells = [copy.deepcopy(cell) for _ in range(times) for cell in notebook.cells]
    if then is not None:
        notebook.cells.append(nbformat.v4.new_code_cell(then))
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        record_timing=False,  # no timestamps in the stored notebooks
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=kernel_env())
    return notebook


# -- comparing outputs --------------------------------------------------------------------------


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def output_texts(cell: Mapping[str, Any]) -> list[str]:
    """A code cell's outputs as text: streams, text and HTML results, errors, and a line per
    image (its kind only)."""
    texts: list[str] = []
    stream = None  # consecutive pieces of one stream are one text (the kernel splits it by time)
    for output in cell.get("outputs", []):
        kind = output["output_type"]
        if kind == "stream" and output["name"] == stream:
            texts[-1] += _text(output["text"])
            continue
        stream = output["name"] if kind == "stream" else None
        if kind == "stream":
            texts.append(f"[{output['name']}]\n{_text(output['text'])}")
        elif kind in ("execute_result", "display_data"):
            data = output["data"]
            for mime in sorted(data):
                if mime.startswith("image/"):
                    texts.append(f"[{mime}]")
                elif mime in ("text/plain", "text/html", "text/markdown"):
                    texts.append(f"[{mime}]\n{_text(data[mime])}")
        elif kind == "error":
            texts.append(f"[error] {output['ename']}: {output['evalue']}")
    return texts


def normalized(text: str) -> tuple[str, list[float]]:
    """``text`` with volatile parts replaced, and its numbers taken out (compared apart)."""
    text, numbers = _normalized(text)
    return text, [number for number, _ in numbers]


def _normalized(text: str) -> tuple[str, list[tuple[float, float]]]:
    """:func:`normalized`, each number with the relative tolerance it is compared with."""
    for folder in {tempfile.gettempdir(), "/tmp", str(ROOT)}:
        text = text.replace(folder, "<dir>")
    text = _TEMPORARY.sub("<dir>/<tmp>", text)
    text = _NONCE.sub(r"\1<nonce>", text)
    text = _ID.sub("<id>", text)
    text = _DATE.sub(_date, text)
    text = _ADDRESS.sub("0x<address>", text)
    text = _PORT.sub(r"\1:<port>", text)
    varying = [(m.span(), tolerance) for p, tolerance in VARYING.items() for m in p.finditer(text)]
    numbers = []
    for match in _NUMBER.finditer(text):
        tolerance = NUMBER_TOLERANCE if "." in match.group() else 0.0
        for (start, end), allowed in varying:
            if start <= match.start() < end:
                tolerance = allowed
        numbers.append((float(match.group().replace(",", "")), tolerance))
    return _NUMBER.sub("<n>", text), numbers


def _date(match: re.Match[str]) -> str:
    """``<date>``, or ``<date> <time>`` with the separator and zone of the original."""
    separator, zone = match.group(1), match.group(2) or ""
    return "<date>" if separator is None else f"<date>{separator}<time>{zone}"


def _numbers_differ(stored: list[tuple[float, float]], fresh: list[tuple[float, float]]) -> bool:
    return len(stored) != len(fresh) or any(
        abs(a - b) > tolerance * max(1.0, abs(a)) for (a, tolerance), (b, _) in zip(stored, fresh)
    )


def differences(stored: nbformat.NotebookNode, fresh: nbformat.NotebookNode) -> list[str]:
    """How the fresh run's outputs differ from the stored ones, cell by cell (empty if they
    match once normalized)."""
    found: list[str] = []
    pairs = zip(_code_cells(stored.cells), _code_cells(fresh.cells))
    for number, (old, new) in enumerate(pairs, start=1):
        where = f"code cell {number} ({_text(old['source']).splitlines()[0][:60]!r})"
        if old.get("execution_count") != new.get("execution_count"):
            found.append(
                f"{where}: execution count {old.get('execution_count')} is stored, the "
                f"fresh run gave {new.get('execution_count')}"
            )
        old_text, old_numbers = _normalized("\n".join(output_texts(old)))
        new_text, new_numbers = _normalized("\n".join(output_texts(new)))
        if old_text != new_text:
            diff = difflib.unified_diff(
                old_text.splitlines(), new_text.splitlines(), "stored", "fresh", lineterm=""
            )
            found.append(f"{where}:\n" + "\n".join(diff))
        elif _numbers_differ(old_numbers, new_numbers):
            pairs = [(a, b) for (a, _), (b, _) in zip(old_numbers, new_numbers) if a != b]
            found.append(f"{where}: numbers (stored, fresh) {pairs}")
    return found


def _code_cells(cells: Iterable[Any]) -> list[Any]:
    return [cell for cell in cells if cell["cell_type"] == "code"]


def all_output_text(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(text for cell in _code_cells(notebook.cells) for text in output_texts(cell))


# -- storing a fresh run --------------------------------------------------------------------------


def store_fresh_outputs(names: Iterable[str]) -> None:
    """Execute each named notebook and write it back with its new outputs."""
    for name in names:
        path = notebook_path(name)
        with tempfile.TemporaryDirectory(prefix="notebook-run-") as workdir:
            notebook = execute(path, Path(workdir))
        nbformat.validate(notebook)
        nbformat.write(notebook, path)
        print(f"stored the outputs of {path.relative_to(ROOT)}")


if __name__ == "__main__":
    store_fresh_outputs(sys.argv[1:] or sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")))
