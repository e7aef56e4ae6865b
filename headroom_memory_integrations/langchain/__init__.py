"""LangChain and LangGraph adapters: long-term memory for chains and agents.

Every class here is a thin translation onto the core (:mod:`headroom_memory_integrations.flow`,
the engine and the prompts): the same injection, extraction, escaping and storing as the OpenAI
wrappers. Install with ``pip install '.[langchain]'``;
:class:`HeadroomMemory` (the classic chains' memory) also needs
``pip install '.[langchain-classic]'`` and is imported on first use.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from .._optional import require

require("langchain_core", "langchain", "langgraph", extra="langchain")

from ._extract import chat_model_completer  # noqa: E402
from .chat_model import MemoryChatModel  # noqa: E402
from .middleware import MemoryMiddleware  # noqa: E402
from .retriever import HeadroomRetriever  # noqa: E402
from .store import HeadroomStore, namespace_user  # noqa: E402
from .tools import (  # noqa: E402
    MemoryScope,
    create_manage_memory_tool,
    create_search_memory_tool,
    memory_tools,
)

if TYPE_CHECKING:
    from .memory import HeadroomMemory

__all__ = [
    "HeadroomRetriever",
    "HeadroomStore",
    "MemoryChatModel",
    "MemoryMiddleware",
    "MemoryScope",
    "chat_model_completer",
    "create_manage_memory_tool",
    "create_search_memory_tool",
    "memory_tools",
    "namespace_user",
]


# HeadroomMemory is exported only where langchain-classic is installed, so that
# ``from headroom_memory_integrations.langchain import *`` works without it; importing the name
# itself there still raises MissingDependencyError naming the install.
def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (one an app's tests put in ``sys.modules`` as a stub,
    without a spec, counts: ``find_spec`` raises ValueError for it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return module in sys.modules


if _installed("langchain_classic"):
    __all__ += ["HeadroomMemory"]


def __getattr__(name: str) -> Any:
    if name == "HeadroomMemory":  # needs langchain-classic: imported on first use
        from .memory import HeadroomMemory

        return HeadroomMemory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
