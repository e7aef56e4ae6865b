"""README.md: every Python example runs as a user would run it and prints what the README shows.

Each ``python`` block runs as a script in a new process, in its own empty folder, with
``OPENAI_BASE_URL`` pointing at a scripted server that follows the memory prompts (see
tests/_docs_support.py), real embedded Chroma and the real all-MiniLM-L6-v2 model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _docs_support import (
    ROOT,
    Example,
    assert_prints,
    docs_server,
    example_env,
    examples_in,
    run_example,
)

README = ROOT / "README.md"
EXAMPLES = examples_in(README)


def test_the_readme_says_how_to_install_and_where_memories_live() -> None:
    text = README.read_text(encoding="utf-8")
    for extra in ("langchain", "langchain-classic", "llama-index"):
        assert f"pip install '.[{extra}]'" in text
    assert "OPENAI_API_KEY" in text and "~/.headroom-memory" in text and "db_path" in text
    assert [e.heading for e in EXAMPLES if e.prints] == [
        "Add memory to an OpenAI-compatible client",
        "LangChain and LangGraph",
        "The memory API",
    ]


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_the_example_runs_and_prints_what_the_readme_shows(
    example: Example, tmp_path: Path
) -> None:
    with docs_server() as server:
        run = run_example(example, tmp_path, example_env(server, tmp_path))
    assert_prints(example, run.stdout)
    assert run.stderr == "", run.stderr
