"""Helpers for the LangGraph store, memory tools, retriever and classic memory tests: a real
ChatOpenAI over HTTP to the scripted server, and ways to read what a run did."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Coroutine
from typing import Any, TypeVar

from langchain_core.messages import ToolMessage
from langchain_openai import ChatOpenAI

from headroom_memory_integrations.testing import ScriptedOpenAIServer

T = TypeVar("T")

EXTRACTION_SYSTEM_START = "You maintain long-term memory about a user."


def chat_model(server: ScriptedOpenAIServer, **options: Any) -> ChatOpenAI:
    """A real ChatOpenAI talking HTTP to the scripted server."""
    defaults: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "base_url": server.base_url,
        "api_key": "sk-scripted",
        "max_retries": 0,
        "timeout": 30,
    }
    return ChatOpenAI(**{**defaults, **options})


def run_async(main: Coroutine[Any, Any, T], *models: ChatOpenAI) -> T:
    """``asyncio.run(main)``, closing the models' async HTTP connections before the loop ends
    (left open, they would be reported as unclosed sockets in a later test)."""

    async def closing() -> T:
        try:
            return await main
        finally:
            for model in models:
                await model.root_async_client.close()

    return asyncio.run(closing())


def is_extraction(body: dict | None) -> bool:
    """Whether a chat request is a background extraction call."""
    messages = (body or {}).get("messages") or []
    return bool(messages) and str(messages[0].get("content", "")).startswith(
        EXTRACTION_SYSTEM_START
    )


def tool_messages(result: dict) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)]


def request_text(body: dict | None) -> str:
    """Every message content of a chat request, joined (to look for injected text)."""
    parts = []
    for message in (body or {}).get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if isinstance(p, dict)]
    return "\n".join(parts)


def run_python(code: str) -> str:
    """Run ``code`` in a new Python process (this interpreter, this checkout); its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
