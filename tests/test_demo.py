"""`make demo` (examples/quickstart.py) shows the main job offline, as the README says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def test_the_demo_remembers_across_processes_offline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    run = subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    first, later = out.split("=== Conversation 2")
    assert "[preference] Prefers Python for backend work" in first
    assert "[fact] User's team runs everything on PostgreSQL" in first
    language, database, arithmetic = later.split("  alice: ")[1:4]
    bob = later.split("  bob: ")[1]
    assert "injected" in language and "Prefers Python for backend work" in language
    assert "User's team runs everything on PostgreSQL" in database
    assert "injected: nothing" in arithmetic
    assert "From what I remember" not in bob  # Bob never sees Alice's memories
    assert str(tmp_path) not in out and "/home" not in out and "/root" not in out
    assert (tmp_path / ".headroom-memory-demo").is_dir()
