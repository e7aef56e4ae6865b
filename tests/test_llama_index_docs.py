"""docs/llamaindex.md: every example runs, offline, and recalls what it was told.

Each ``## `` section's Python blocks run in order in one namespace, in a fresh folder (so a
section recalls only what it told itself). ``llm`` is the scripted function-calling LLM; the
OpenAI section talks to the scripted server over HTTP instead (openai 2.x venv only)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from _llama_index_support import FACT, RECALLED, Brain, ScriptedLLM

DOC = Path(__file__).parent.parent / "docs" / "llamaindex.md"
DOC_URL = "http://localhost:8000/v1"


def sections() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for part in re.split(r"^## ", DOC.read_text(), flags=re.MULTILINE)[1:]:
        title = part.splitlines()[0]
        found[title] = re.findall(r"```python\n(.*?)```", part, flags=re.DOTALL)
    return found


def run_section(blocks: list[str], namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in blocks:
            exec(compile(code, str(DOC), "exec"), namespace)
    return out.getvalue()


SECTIONS = sections()
LOCAL = [title for title, blocks in SECTIONS.items() if "OpenAILike" not in "".join(blocks)]


def test_every_section_has_examples() -> None:
    assert len(LOCAL) == 3 and len(SECTIONS) == 4
    assert all(SECTIONS.values())


def test_the_page_says_what_to_install_for_the_llms_it_uses() -> None:
    """Each ``llama_index.llms.*`` module the page uses (the ``llm`` of its examples included)
    comes in a package the page tells how to install: ``.[llama-index]`` brings only the core."""
    text = DOC.read_text()
    installs = " ".join(re.findall(r"`pip install ([^`]+)`", text))
    modules = sorted(set(re.findall(r"llama_index\.llms\.(\w+)", text)))
    assert modules == ["openai", "openai_like"]
    for module in modules:
        package = "llama-index-llms-" + module.replace("_", "-")
        assert package in installs.split(), f"the page never says: pip install {package}"


@pytest.mark.parametrize("title", LOCAL)
def test_section_runs_and_recalls(title, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    printed = run_section(SECTIONS[title], {"llm": ScriptedLLM()})
    lines = printed.strip().splitlines()
    assert lines and all(f"{RECALLED} {FACT}" in line for line in lines), printed
    assert "<memory-" not in printed and "<user-memories>" not in printed


@pytest.mark.openai2
def test_openai_section_runs_and_recalls(tmp_path, monkeypatch, openai_server) -> None:
    brain = Brain()
    openai_server.responder = brain.responder
    monkeypatch.chdir(tmp_path)
    [title] = [t for t in SECTIONS if t not in LOCAL]
    blocks = [code.replace(DOC_URL, openai_server.base_url) for code in SECTIONS[title]]
    printed = run_section(blocks, {})
    lines = printed.strip().splitlines()
    assert len(lines) == 2 and all(f"{RECALLED} {FACT}" in line for line in lines), printed
    assert "<memory-" not in printed
