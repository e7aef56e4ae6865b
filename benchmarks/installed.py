"""The package as ``pip install .`` installs it, for the cold-start measurements.

The benchmark itself runs in the development venv: every extra, the test tools (some 210
distributions) and an editable install of the package. A user's first answer is not measured
there: ``import openai`` and chromadb's import look through the installed distributions
(pydantic's plugin lookup, for one), and the editable install's finder sits in front of every
import. :func:`default_install` makes a venv with the package alone, with its default
dependencies, as a user installs it (the package's bytecode compiled by pip), once per state
of the package's files, and keeps it in the benchmark cache.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from .common import ROOT, log

PREFIX = "default-install-"


def source_key() -> str:
    """A hash of what ``pip install .`` installs: pyproject.toml and the package's files."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    package = ROOT / "headroom_memory_integrations"
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def default_install(cache: Path) -> Path | None:
    """The Python of a venv in ``cache`` where the package is installed from this checkout
    with its default dependencies (no extras, not editable); made on first use (~1 min), and
    again when the package's files change. None, logged, when it cannot be made (no package
    index reachable): the caller then measures in its own venv."""
    venv = cache / f"{PREFIX}{source_key()}"
    python = venv / "bin" / "python"
    if (venv / ".installed").is_file():
        return python
    for stale in cache.glob(f"{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    log(f"making a venv with `pip install .` (default dependencies) in {venv.name}")
    try:
        for command in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", str(ROOT)],
        ):
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log(f"could not make the default install ({detail}); measuring in this venv instead")
        shutil.rmtree(venv, ignore_errors=True)
        return None
    (venv / ".installed").touch()
    return python
