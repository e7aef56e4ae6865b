"""The documentation site: ``mkdocs build --strict`` succeeds (mkdocs-material, the API reference
generated from the docstrings by mkdocstrings), every page is in the navigation, and every example
of the site's own pages runs and prints what the page shows.

- ``python`` blocks run as scripts in new processes (``_docs_support``), against a scripted
  OpenAI-compatible server answered by a model that follows the memory prompts; a page's blocks
  share one folder, in order, so a later script sees what an earlier one stored.
- ``console`` blocks are shell sessions of ``headroom-memory``: each ``$`` line runs (the
  command's ``main``, in the test process) in the page's folder, and its output must be the
  lines the page shows under it, once ids, dates, paths and the last digits of scores are set
  aside. An id the page shows stands for the id that run printed at the same place.

The LangChain and LlamaIndex pages have their own example tests.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
import yaml
from _docs_support import (
    ROOT,
    Example,
    assert_prints,
    docs_server,
    example_env,
    examples_in,
    run_example,
)
from _notebooks_support import normalized
from conftest import ChromaServer

from headroom_memory_integrations import Category, ChromaStorage, Memory, cli
from headroom_memory_integrations.prompts import extraction_instruction, format_memory_context

DOCS = ROOT / "docs"
PAGES_WITH_EXAMPLES = [
    "quickstart.md",
    "concepts.md",
    "guide.md",
    "storage.md",
    "embeddings.md",
    "cli.md",
    "troubleshooting.md",
]
PAGES_WITH_OWN_TESTS = {  # page: the test file that runs its examples
    "langchain.md": "test_docs_langchain.py",
    "llamaindex.md": "test_llama_index_docs.py",
}
DOCUMENTED_SERVER = "http://127.0.0.1:8000"
SHOWN_PROJECT = "/home/you/project"
_HEX_ID = re.compile(r"\b[0-9a-f]{32}\b|\b[0-9a-f]{12}\b")
_FENCE = re.compile(r"^```(\w*)\s*$")
_RAW_SPHINX = re.compile(r":(?:meth|func|class|data|attr|exc|mod|obj|const):|\w::|\.\. code")


class _Loader(yaml.SafeLoader):
    """Reads mkdocs.yml, leaving its ``!!python/name:`` tags (if any) as plain strings."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)


def nav_pages(entries: object) -> list[str]:
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [page for entry in entries for page in nav_pages(entry)]
    if isinstance(entries, dict):
        return [page for value in entries.values() for page in nav_pages(value)]
    return []


def config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)


# -- the site ---------------------------------------------------------------------------------


def test_every_page_is_in_the_navigation() -> None:
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    listed = nav_pages(config()["nav"])
    assert sorted(listed) == pages
    assert len(listed) == len(set(listed))


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stderr
    assert "WARNING" not in build.stderr, build.stderr
    for page in nav_pages(config()["nav"]):
        html = page.removesuffix(".md")
        built = site / ("index.html" if html == "index" else f"{html}/index.html")
        assert built.is_file(), page
    # the API reference is generated from the docstrings
    openai_api = (site / "api" / "openai" / "index.html").read_text(encoding="utf-8")
    assert "Wrap <code>client</code> so the model extracts memories inline" in openai_api
    core_api = (site / "api" / "core" / "index.html").read_text(encoding="utf-8")
    for name in ("MemoryStore.search", "MemoryStore.supersede", "DEFAULT_MIN_SCORE"):
        assert f'id="headroom_memory_integrations.engine.{name}"' in core_api, name
    langchain_api = (site / "api" / "langchain" / "index.html").read_text(encoding="utf-8")
    assert "MemoryMiddleware" in langchain_api and "HeadroomStore" in langchain_api
    # the docstrings' Sphinx markup reads as Markdown (scripts/griffe_sphinx_roles.py): no role,
    # literal block marker or directive shows raw; a role is a link where the site has the object
    for api_page in sorted((site / "api").glob("*/index.html")):
        raw = _RAW_SPHINX.findall(api_page.read_text(encoding="utf-8"))
        assert not raw, f"{api_page.parent.name}: {raw}"
    search = '<a class="autorefs autorefs-internal" title="search ('
    assert f"The relevance floor of {search}" in core_api
    assert '<span class="doc-section-title">Examples:</span>' in core_api  # "Example::"
    # the existing guides are pages of the site, as they are
    assert "Which one to use" in (site / "langchain" / "index.html").read_text(encoding="utf-8")
    assert "threat model" in (site / "security" / "index.html").read_text(encoding="utf-8")


# -- the examples -----------------------------------------------------------------------------


def console_sessions(page: Path) -> list[tuple[int, list[tuple[str, str]]]]:
    """Each ``console`` block of a page: its first line (1-based) and its ``(command, shown
    output)`` pairs."""
    sessions: list[tuple[int, list[tuple[str, str]]]] = []
    kind = None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        fence = _FENCE.match(line)
        if fence and kind is None:
            kind = fence.group(1)
            if kind == "console":
                sessions.append((number, []))
            continue
        if fence:
            kind = None
            continue
        if kind == "console":
            steps = sessions[-1][1]
            if line.startswith("$ "):
                steps.append((line[2:], ""))
            else:
                command, shown = steps[-1]
                steps[-1] = (command, shown + line + "\n")
    return sessions


def assert_same_output(where: str, shown: str, printed: str) -> None:
    shown_text, shown_numbers = normalized(shown)
    printed_text, printed_numbers = normalized(printed)
    assert printed_text.rstrip() == shown_text.rstrip(), f"{where}:\n{printed}"
    assert len(printed_numbers) == len(shown_numbers), f"{where}:\n{printed}"
    for shown_number, number in zip(shown_numbers, printed_numbers):
        assert abs(shown_number - number) <= 0.05, f"{where}: {shown_number} vs {number}"


def run_console(page: Path, steps: list[tuple[str, str]], ids: dict[str, str]) -> None:
    """Run one console session of ``page`` in the current folder, each command as
    ``headroom-memory`` runs it (its ``main``, in this process). ``ids`` maps an id the page
    shows to the id the run printed in its place (filled in as the session goes)."""
    for command, shown in steps:
        argv = shlex.split(command)
        assert argv[0] == "headroom-memory", command
        argv = [ids.get(arg, arg) for arg in argv[1:]]
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = cli.main(argv)
        _release_folder(argv)  # as the command's own process would at exit
        where = f"{page.name}: $ {command}"
        assert status == 0, f"{where}\n{err.getvalue()}"
        printed = out.getvalue().replace(str(Path.cwd().resolve()), SHOWN_PROJECT)
        assert_same_output(where, shown, printed)
        for shown_id, printed_id in zip(_HEX_ID.findall(shown), _HEX_ID.findall(printed)):
            ids[shown_id] = printed_id
            ids[shown_id[:12]] = printed_id[:12]


def _release_folder(argv: list[str]) -> None:
    """Close the embedded storage a command opened in this process, releasing the folder's
    writer lock for the examples that run next in their own processes."""
    db = argv[argv.index("--db") + 1] if "--db" in argv else os.environ.get("HEADROOM_MEMORY_DB")
    folder = Path(db or "~/.headroom-memory").expanduser()
    if not str(db or "").startswith(("http://", "https://")) and folder.is_dir():
        ChromaStorage.at(folder).close()


@pytest.fixture(scope="module")
def chroma_at_documented_address(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ChromaServer]:
    """A real Chroma server; examples that name the documented address get its address."""
    server = ChromaServer(tmp_path_factory.mktemp("docs-chroma"))
    yield server
    server.stop()


def test_every_page_with_examples_has_them_run() -> None:
    """A page with a ``python`` or ``console`` block is run here, or by its own test."""
    with_examples = {
        page.name for page in DOCS.glob("*.md") if examples_in(page) or console_sessions(page)
    }
    assert with_examples == set(PAGES_WITH_EXAMPLES) | set(PAGES_WITH_OWN_TESTS)
    for name, test in PAGES_WITH_OWN_TESTS.items():
        assert f'"{name}"' in (ROOT / "tests" / test).read_text(encoding="utf-8"), test


@pytest.mark.parametrize("name", PAGES_WITH_EXAMPLES)
def test_the_page_examples_print_what_it_shows(
    name: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = DOCS / name
    blocks: list[tuple[int, Example | list[tuple[str, str]]]] = [
        *((example.line, example) for example in examples_in(page)),
        *console_sessions(page),
    ]
    assert blocks, f"{name} has no example"
    ids: dict[str, str] = {}
    uses_server = DOCUMENTED_SERVER in page.read_text(encoding="utf-8")
    url = request.getfixturevalue("chroma_at_documented_address").url if uses_server else ""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HEADROOM_MEMORY_USER", raising=False)
    with docs_server() as server:
        env = example_env(server, tmp_path)
        for _, block in sorted(blocks, key=lambda pair: pair[0]):  # in the page's order
            if isinstance(block, list):
                run_console(page, block, ids)
                continue
            code = block.code.replace(DOCUMENTED_SERVER, url) if url else block.code
            run = run_example(
                Example(block.page, block.heading, block.line, code, block.prints), tmp_path, env
            )
            assert_prints(block, run.stdout.replace(url, DOCUMENTED_SERVER) if url else run.stdout)


# -- the README's command lines -----------------------------------------------------------------

README = ROOT / "README.md"


def readme_command_lines() -> list[str]:
    """The ``headroom-memory`` commands of the README's ``bash`` blocks, in order, without their
    comments; ``a && b`` is two commands."""
    found: list[str] = []
    kind = None
    for line in README.read_text(encoding="utf-8").splitlines():
        fence = _FENCE.match(line)
        if fence:
            kind = fence.group(1) if kind is None else None
            continue
        if kind == "bash" and line.startswith("headroom-memory "):
            command = line.partition("  #")[0]
            found.extend(part.strip() for part in command.split("&&"))
    return found


def test_the_readme_command_lines_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command the README shows succeeds, in its order, on a fresh folder of memories:
    ``add`` prints one of the outcomes the README lists, ``search`` a table, and the
    12-character id the README deletes stands for the id of the memory it added."""
    commands = readme_command_lines()
    assert [command.split()[1] for command in commands] == [
        *("add", "search", "list", "delete", "stats", "export", "import", "clear"),
    ]
    shown_ids = [arg for c in commands for arg in shlex.split(c) if _HEX_ID.fullmatch(arg)]
    assert shown_ids, "the README deletes a memory by its id"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HEADROOM_MEMORY_USER", raising=False)
    monkeypatch.setenv("HEADROOM_MEMORY_DB", str(tmp_path / "memories"))
    ids: dict[str, str] = {}
    for command in commands:
        argv = [ids.get(arg, arg) for arg in shlex.split(command)[1:]]
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = cli.main(argv)
        _release_folder(argv)
        printed = out.getvalue()
        assert status == 0, f"README: $ {command}\n{err.getvalue()}"
        if argv[0] == "add":
            assert printed.startswith(("stored ", "duplicate of ", "superseded ")), printed
            added = _HEX_ID.findall(printed)[0]
            ids.update((shown, added[: len(shown)]) for shown in shown_ids)
        elif argv[0] == "search":
            assert printed.startswith("score  id"), printed  # a table
            assert "Prefers Python for backend work" in printed, printed
        elif argv[0] == "delete":
            assert printed == f"deleted {argv[-1]}\n", printed
    assert (tmp_path / "alice.jsonl").is_file()


# -- the prompt the guide shows -------------------------------------------------------------------


def test_the_guide_shows_the_system_message_the_wrappers_send() -> None:
    """The sample of docs/guide.md ("The inline wrapper, step by step") is the system message
    the flow builds (memories, then the instruction), line by line; a line the guide cuts short
    with "..." begins the real one."""
    lines = (DOCS / "guide.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("   <user-memories>")
    end = lines.index("   ```", start)
    shown = [line.removeprefix("   ") for line in lines[start:end]]

    def noted(day: str, text: str, category: Category) -> Memory:
        when = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
        return Memory("0" * 32, "alice", text, category, when, when)

    memories = [
        ("m1", noted("2026-11-03", "Prefers Python for backend work", Category.PREFERENCE)),
        ("m2", noted("2026-11-28", "Moved from New York to San Francisco", Category.FACT)),
    ]
    sent = "\n\n".join(
        [
            format_memory_context(memories, today=date(2026, 12, 1)),
            extraction_instruction("3f9a1c2b7e", allow_replace=True),
        ]
    ).splitlines()
    assert len(shown) == len(sent), "\n".join(sent)
    for guide_line, real_line in zip(shown, sent):
        if guide_line.endswith(" ..."):
            assert real_line.startswith(guide_line.removesuffix("...")), real_line
        else:
            assert guide_line == real_line
