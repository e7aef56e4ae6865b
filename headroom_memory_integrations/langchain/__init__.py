"""LangChain and LangGraph adapters: long-term memory for chains and agents.

Every class here is a thin translation onto the core (:mod:`headroom_memory_integrations.flow`,
the engine and the prompts): the same injection, extraction, escaping and storing as the OpenAI
wrappers. Install with ``pip install 'headroom-memory-integrations[langchain]'``.
"""

from __future__ import annotations

from .._optional import require

require("langchain_core", "langchain", "langgraph", extra="langchain")

from ._extract import chat_model_completer  # noqa: E402
from .chat_model import MemoryChatModel  # noqa: E402
from .middleware import MemoryMiddleware  # noqa: E402

__all__ = ["MemoryChatModel", "MemoryMiddleware", "chat_model_completer"]
