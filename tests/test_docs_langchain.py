"""docs/langchain.md: every example runs as a user would run it, and prints what the page shows.

Each ``python`` block of the page runs as a script in a new Python process, in its own empty
folder, with ``OPENAI_BASE_URL`` pointing at a :class:`ScriptedOpenAIServer` started here and
answered by :class:`DocsModel` (a model that follows the memory prompts and uses tools sensibly).
Memories live in real embedded Chroma with the real all-MiniLM-L6-v2 model. What a script prints
must equal the ``text`` block the page shows under it, so the page cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from subprocess import CompletedProcess

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
from langchain_core.load import dumps, loads
from langchain_openai import ChatOpenAI

import headroom_memory_integrations.langchain as adapters
from headroom_memory_integrations import LocalEmbedder
from headroom_memory_integrations.langchain import MemoryChatModel
from headroom_memory_integrations.testing import MemoryFollowingModel, ScriptedOpenAIServer

PAGE = ROOT / "docs" / "langchain.md"
EXAMPLES = examples_in(PAGE)

EXPECTED_STDERR = {
    # langchain-classic's own deprecation of the chain the HeadroomMemory example uses
    "HeadroomMemory": re.compile(
        r"^.*LangChainDeprecationWarning: The class `ConversationChain` was deprecated.*\n.*\n",
        re.MULTILINE,
    ),
}

FOLLOWER_OUTPUT = re.compile(
    r"^With `MemoryFollowingModel` it prints.*?:\n\n```text\n(.*?)^```", re.MULTILINE | re.DOTALL
)


def _with_follower_output(examples: list[Example]) -> list[Example]:
    """The examples under which the page also shows what they print against the package's own
    offline model (``MemoryFollowingModel``, which calls no tools), that output as ``prints``."""
    lines = PAGE.read_text(encoding="utf-8").splitlines(keepends=True)
    found = []
    for example, after in zip(examples, [*examples[1:], None]):
        section = "".join(lines[example.line - 1 : after.line - 1 if after else None])
        shown = FOLLOWER_OUTPUT.search(section)
        if shown:
            found.append(replace(example, prints=shown.group(1)))
    return found


FOLLOWED = _with_follower_output(EXAMPLES)

WORKERS = min(2, os.cpu_count() or 1)  # each example is a Python process importing LangChain


def test_the_page_shows_every_adapter_with_what_it_prints() -> None:
    headings = [example.heading for example in EXAMPLES]
    assert headings == [
        "MemoryChatModel",
        "Saving and loading",
        "MemoryMiddleware",
        "ChatOpenAI on memory clients",
        "HeadroomStore",
        "Memory tools",
        "HeadroomRetriever",
        "HeadroomMemory",
    ]
    for example, used in zip(
        EXAMPLES,
        [
            "MemoryChatModel(",
            "loads(",
            "MemoryMiddleware(",
            "with_fast_memory(AsyncOpenAI()",
            "HeadroomStore(",
            "memory_tools(",
            "HeadroomRetriever(",
            "HeadroomMemory(",
        ],
    ):
        assert used in example.code, example.heading
        assert example.prints, f"{example.heading}: the page shows no output for its example"
    page = PAGE.read_text(encoding="utf-8")
    assert "pip install '.[langchain]'" in page
    assert "pip install '.[langchain-classic]'" in page
    for name in adapters.__all__:
        assert re.search(rf"`[^`]*\b{name}\b[^`]*`", page), f"{PAGE.name} never names {name}"


def test_the_page_links_resolve() -> None:
    page = PAGE.read_text(encoding="utf-8")
    anchors = {_slug(heading) for heading in re.findall(r"^#+ (.+)$", page, re.MULTILINE)}
    for target in re.findall(r"\]\(([^)]+)\)", page):
        path, _, anchor = target.partition("#")
        if not path:
            assert anchor in anchors, f"no heading for the link {target}"
            continue
        linked = PAGE.parent / path
        assert linked.is_file(), f"{target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, f"{target}: no such heading"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _selected(session: pytest.Session) -> list[Example]:
    """The examples whose tests this session runs (all of them, unless deselected)."""
    chosen = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is sys.modules[__name__] and callspec and "example" in callspec.params:
            chosen.append(callspec.params["example"])
    return chosen


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[CompletedProcess[str]]]]:
    """Starts every selected example at once (``WORKERS`` at a time) against one server."""
    with docs_server() as server, ThreadPoolExecutor(WORKERS) as pool:

        def run(example: Example) -> CompletedProcess[str]:
            folder: Path = tmp_path_factory.mktemp(example.name)
            return run_example(example, folder, example_env(server, folder))

        yield {example.name: pool.submit(run, example) for example in _selected(request.session)}


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_the_example_prints_what_the_page_shows(
    example: Example, runs: dict[str, Future[CompletedProcess[str]]]
) -> None:
    run = runs[example.name].result()
    assert_prints(example, run.stdout)
    expected = EXPECTED_STDERR.get(example.heading)
    stderr = expected.sub("", run.stderr) if expected else run.stderr
    assert stderr == "", f"{example.heading} wrote to stderr:\n{run.stderr}"


def test_the_page_shows_where_memory_following_model_prints_otherwise() -> None:
    """The outputs shown come from the tests' ``DocsModel``, which calls tools; a user without
    an API key has ``MemoryFollowingModel``, which never does: the page says what it prints
    under each example whose output it changes."""
    assert [example.heading for example in FOLLOWED] == [
        "MemoryMiddleware",
        "HeadroomStore",
        "Memory tools",
        "HeadroomMemory",
    ]
    page = PAGE.read_text(encoding="utf-8")
    assert "`ScriptedOpenAIServer(responder=MemoryFollowingModel())`" in page


@pytest.mark.parametrize("followed", FOLLOWED, ids=[example.name for example in FOLLOWED])
def test_with_memory_following_model_the_example_prints_what_the_page_says(
    followed: Example, tmp_path: Path
) -> None:
    with ScriptedOpenAIServer(responder=MemoryFollowingModel()) as server:
        run = run_example(followed, tmp_path, example_env(server, tmp_path))
    assert_prints(followed, run.stdout)


@pytest.mark.filterwarnings("ignore:The function `loads:DeprecationWarning")
def test_the_page_says_a_relative_db_path_is_found_from_where_the_dump_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: LocalEmbedder
) -> None:
    """ "Saving and loading" saves a model built with ``db_path="./memories"``: the dump carries
    the folder as given, so a process loading it in another working directory opens a new,
    empty folder there. The page says so, and how to load it from anywhere."""
    (tmp_path / "saved").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "saved")
    key = "sk-docs-example"
    chat = MemoryChatModel(
        model=ChatOpenAI(model="gpt-4o-mini", api_key=key),
        user_id="alice",
        db_path="./memories",
        embedder=model,
    )
    chat.memory.add("Prefers Python for backend work", category="preference")
    saved = dumps(chat)
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = loads(
        saved,
        allowed_objects=[MemoryChatModel, ChatOpenAI],
        valid_namespaces=["headroom_memory_integrations"],
        secrets_map={"OPENAI_API_KEY": key},
    )
    assert loaded.memory.get_all() == []
    assert (
        Path(loaded.memory.storage.location).resolve()
        == (tmp_path / "elsewhere" / "memories").resolve()
    )
    page = PAGE.read_text(encoding="utf-8")
    section = page[page.index("### Saving and loading") : page.index("## MemoryMiddleware")]
    assert "working directory of the process that loads the dump" in section
    assert "absolute `db_path`" in section
