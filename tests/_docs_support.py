"""Run the Python examples of a documentation page and check that they print what it shows.

A page's examples are its fenced ``python`` blocks, each a complete program as a user would
write it. The first fenced ``text`` block after an example (before the next example) is what
the page says it prints; an example without one must still run without error. Each example runs
in a fresh Python process, in its own empty folder (so ``db_path="./memories"`` lands there),
with this checkout importable and the environment the caller gives (``OPENAI_BASE_URL`` of a
:class:`~headroom_memory_integrations.testing.ScriptedOpenAIServer` started in the test process,
a dummy ``OPENAI_API_KEY``).

The scripted server answers with :class:`DocsModel`: a model that follows this package's memory
prompts (:class:`~headroom_memory_integrations.testing.MemoryFollowingModel`) and, when tools are
offered, calls them the way a sensible model would. Used by the LangChain docs test and reusable
for the LlamaIndex one::

    examples = examples_in(ROOT / "docs" / "langchain.md")
    with docs_server() as server:
        run = run_example(examples[0], tmp_path, example_env(server, tmp_path))
        assert_prints(examples[0], run.stdout)
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headroom_memory_integrations.testing import (
    MemoryFollowingModel,
    Reply,
    ScriptedOpenAIServer,
    ToolCall,
)

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


# -- the examples of a page -----------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One ``python`` block of a page.

    Attributes:
        page: The page's path.
        heading: The nearest heading above the block.
        line: The block's first line in the page (1-based, the fence line).
        code: The program.
        prints: What the page shows it printing (the next ``text`` block), or None.
    """

    page: Path
    heading: str
    line: int
    code: str
    prints: str | None

    @property
    def name(self) -> str:
        """A short id for test reports: the heading's words and the line."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{slug or 'top'}-line{self.line}"


def examples_in(page: Path) -> list[Example]:
    """The ``python`` blocks of a Markdown page, in order, each with the ``text`` block after it."""
    examples: list[Example] = []
    heading = ""
    fence: str | None = None
    kind = ""
    start = 0
    body: list[str] = []
    waiting: dict[str, Any] | None = None  # the last example, until its output block or the next
    lines = page.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if fence is not None:
            if line.strip() == fence:
                text = "\n".join(body) + "\n"
                if kind == "python":
                    if waiting is not None:
                        examples.append(Example(**waiting, prints=None))
                    waiting = {"page": page, "heading": heading, "line": start, "code": text}
                elif kind == "text" and waiting is not None:
                    examples.append(Example(**waiting, prints=text))
                    waiting = None
                fence = None
            else:
                body.append(line)
            continue
        opened = _FENCE.match(line)
        if opened:
            fence, kind, start, body = opened.group(1), opened.group(2).lower(), number, []
            continue
        titled = _HEADING.match(line)
        if titled:
            heading = titled.group(2)
    if fence is not None:
        raise AssertionError(f"{page}:{start}: a code block is never closed")
    if waiting is not None:
        examples.append(Example(**waiting, prints=None))
    return examples


# -- running one ----------------------------------------------------------------------------------


def example_env(server: ScriptedOpenAIServer, folder: Path, **more: str) -> dict[str, str]:
    """The environment of an example: the scripted server as OpenAI, a dummy key, memories kept
    in ``folder`` by default, and this checkout first on the import path. No other OpenAI or
    memory settings of the test process leak in."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENAI_", "AZURE_OPENAI_", "HEADROOM_MEMORY_"))
    }
    env.update(
        OPENAI_BASE_URL=server.base_url,
        OPENAI_API_KEY="sk-docs-example",
        HEADROOM_MEMORY_DB=str(folder / ".headroom-memory"),
        ANONYMIZED_TELEMETRY="False",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    env.update(more)
    return env


def run_example(
    example: Example, folder: Path, env: Mapping[str, str], timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run ``example`` as a script in ``folder`` (a new process): the finished process, with
    its standard output and error output.

    Raises:
        AssertionError: the program failed (its error output is in the message).
    """
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "example.py"
    script.write_text(example.code, encoding="utf-8")
    run = subprocess.run(
        [sys.executable, script.name],
        cwd=folder,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, (
        f"{example.page.name}:{example.line} ({example.heading}) failed:\n{run.stderr}"
    )
    return run


def _normalized(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def assert_prints(example: Example, stdout: str) -> None:
    """What the example printed is what its page shows (trailing spaces and blank lines aside)."""
    if example.prints is None:
        return
    shown, printed = _normalized(example.prints), _normalized(stdout)
    if shown != printed:
        diff = "\n".join(
            difflib.unified_diff(shown, printed, "the page shows", "it printed", lineterm="")
        )
        raise AssertionError(f"{example.page.name}:{example.line} ({example.heading}):\n{diff}")


# -- the model behind the scripted server ---------------------------------------------------------

_NONCE = re.compile(r"<memory-([0-9a-f]{8,32})>")
_INJECTED = re.compile(r'^- m\d+ \([^)]*\): ("(?:[^"\\]|\\.)*")$', re.MULTILINE)
_LISTED = re.compile(r'^- id=\S+ \([^)]*\): ("(?:[^"\\]|\\.)*")$', re.MULTILINE)
_CONTEXT = re.compile(r"<user-memories>.*?</user-memories>", re.DOTALL)
_INSTRUCTION_END = "Do not mention this block."
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"")
_NAME = re.compile(r"(?<![.!?]\s)(?<!^)\b([A-Z][a-z]+(?:\s[A-Z][a-z]+)*)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")
_LABEL = re.compile(r"^\s*(?:user|human)\s*:\s*", re.IGNORECASE | re.MULTILINE)
_FILLER = frozenset(
    "a an the and or of to in on at for with by is are do does did what which where who how "
    "get set my me i you your user users about from this that it tool".split()
)
_QUERY_PARAMS = ("query", "topic", "question", "text")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _stem(word: str) -> str:
    for suffix in ("ences", "ence", "ings", "ing", "ies", "es", "s", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _stems(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _FILLER}


class DocsModel:
    """A responder that behaves like a chat model following this package's prompts, with tools.

    - Without tools (or with ``tool_choice="none"``): :class:`MemoryFollowingModel` (answers
      from the injected memories or acknowledges what the user said; writes a valid memory
      block of the user's first-person statements when the request asks for one; answers
      background extraction calls).
    - Tools offered, the user just spoke: a model following the memory tools' descriptions
      calls ``manage_memory(action="create", ...)`` for each first-person statement, or
      ``search_memory(query=...)`` for a question; otherwise it calls the tool whose name
      shares a word with the user's message, with arguments fitting its schema (quoted text, a
      name from the message or from the injected memories, numbers; the message itself for a
      ``query``/``topic`` parameter). A required argument it cannot fill makes it ask for it.
    - After a tool result: it answers from the result (memories found by ``search_memory`` as
      "From what I remember: ...").

    Every text answer to a request carrying the memory instruction ends with a valid block.
    """

    def __init__(self) -> None:
        self.follower = MemoryFollowingModel()

    def __call__(self, body: dict[str, Any]) -> Reply:
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        tools = [t["function"] for t in body.get("tools") or [] if t.get("type") == "function"]
        last = messages[-1] if messages else {}
        if last.get("role") == "tool":
            return self._answer(messages, self._after_tool(_text(last.get("content"))))
        if tools and last.get("role") == "user" and body.get("tool_choice") != "none":
            said = self._own_words(_text(last.get("content")))
            decided = self._use_tools(tools, said, self._injected(messages))
            if isinstance(decided, Reply):
                return decided
            if decided is not None:
                return self._answer(messages, decided)
        return self.follower(self._unlabelled(body))

    @staticmethod
    def _unlabelled(body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with "User:" / "Human:" labels (of a classic prompt template) dropped from
        the latest user message, so the follower reads the user's own sentences."""
        messages = list(body.get("messages") or [])
        for index in range(len(messages) - 1, -1, -1):
            message = messages[index]
            if isinstance(message, dict) and message.get("role") == "user":
                if isinstance(message.get("content"), str):
                    messages[index] = {**message, "content": _LABEL.sub("", message["content"])}
                break
        return {**body, "messages": messages}

    # -- tools --------------------------------------------------------------------------------

    def _use_tools(
        self, tools: list[dict[str, Any]], said: str, known: list[str]
    ) -> Reply | str | None:
        """A tool call, a question to ask instead (str), or None (answer without tools)."""
        names = {tool["name"]: tool for tool in tools}
        statements = MemoryFollowingModel._memories(said)
        if "manage_memory" in names and statements:
            return Reply.tool_calls(
                *[
                    _call("manage_memory", {"action": "create", **_memory_args(s)})
                    for s in statements
                ]
            )
        if "search_memory" in names and said.rstrip().endswith("?"):
            return Reply.tool_call("search_memory", {"query": said})
        words = _stems(said)
        for tool in tools:
            if _stems(tool["name"].replace("_", " ")) & words:
                return self._call_fitting(tool, said, known)
        return None

    def _call_fitting(self, tool: dict[str, Any], said: str, known: list[str]) -> Reply | str:
        schema = tool.get("parameters") or {}
        required = set(schema.get("required") or [])
        quoted = [a or b for a, b in _QUOTED.findall(said)]
        names = [n for text in [said, *known] for n in _NAME.findall(text)]
        numbers = [float(n) for n in _NUMBER.findall(said)]
        arguments: dict[str, Any] = {}
        for name, spec in (schema.get("properties") or {}).items():
            kind = spec.get("type") or next(
                (o.get("type") for o in spec.get("anyOf") or [] if o.get("type") != "null"), None
            )
            if kind == "integer" and numbers:
                arguments[name] = int(numbers.pop(0))
            elif kind == "number" and numbers:
                arguments[name] = numbers.pop(0)
            elif kind == "string" and spec.get("enum"):
                arguments[name] = spec["enum"][0]
            elif kind == "string" and (quoted or names):
                arguments[name] = (quoted or names).pop(0)
            elif kind == "string" and name in _QUERY_PARAMS:
                arguments[name] = said
            elif name in required:
                return f"Which {name.replace('_', ' ')} do you mean?"
        return Reply.tool_call(tool["name"], arguments)

    @staticmethod
    def _after_tool(result: str) -> str:
        if result.startswith("Memories of the current user"):
            found = [json.loads(text) for text in _LISTED.findall(result)]
            return "From what I remember: " + "; ".join(found) + "."
        if result.startswith("No memory of this user"):
            return "I don't know anything about that yet."
        if result.startswith("Saved as memory"):
            return "Noted, I will remember that."
        return result

    # -- reading the request ------------------------------------------------------------------

    @staticmethod
    def _own_words(text: str) -> str:
        """The user's message without a memory prompt put in front of it (``injection="user"``)."""
        marker = text.rfind(_INSTRUCTION_END)
        if marker >= 0:
            text = text[marker + len(_INSTRUCTION_END) :]
        return _LABEL.sub("", _CONTEXT.sub("", text)).strip()

    @staticmethod
    def _injected(messages: list[dict[str, Any]]) -> list[str]:
        text = "\n".join(_text(m.get("content")) for m in messages)
        return [json.loads(found) for found in _INJECTED.findall(text)]

    def _answer(self, messages: list[dict[str, Any]], text: str) -> Reply:
        """``text``, with the memory block the request asks for (the user's own statements)."""
        instructions = "\n".join(
            _text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")
        )
        users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
        nonce = _NONCE.search(instructions) or (users and _NONCE.search(users[-1]))
        if nonce:
            said = self._own_words(users[-1]) if users else ""
            statements = MemoryFollowingModel._memories(said)
            tag = nonce.group(1)
            text += f"\n\n<memory-{tag}>{json.dumps(statements)}</memory-{tag}>"
        return Reply.text(text)


def _memory_args(statement: dict[str, str]) -> dict[str, str]:
    return {"content": statement["text"], "category": statement["category"]}


def _call(name: str, arguments: dict[str, Any]) -> ToolCall:
    return ToolCall(name, arguments)


@contextmanager
def docs_server() -> Iterator[ScriptedOpenAIServer]:
    """A scripted OpenAI-compatible server answered by :class:`DocsModel`."""
    with ScriptedOpenAIServer(responder=DocsModel()) as server:
        yield server
