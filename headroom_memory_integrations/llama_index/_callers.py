"""Who made a :class:`~.llm.MemoryLLM` chat call: the user's turn, or one of LlamaIndex's prompts.

LlamaIndex's chat engines and agents send the user's message as the latest user message. Its
other components that call ``chat`` / ``achat`` directly put their own prompt there, filled
with text the user did not write: a program's template with a document
(``LLMTextCompletionProgram``, which a query engine's ``structured_answer_filtering`` uses), an
extractor's document (``DocumentContextExtractor``), a reranker's passages (``RankGPTRerank``),
a memory's transcript (``ChatSummaryMemoryBuffer``'s summary, ``FactExtractionMemoryBlock``).

The caller is found on the Python call stack: the nearest frame outside the LLM layer (an
LLM's own methods, LlamaIndex's LLM helpers and callbacks, its instrumentation, asyncio and
LlamaIndex's async helpers). A method of a chat engine or an agent (its class, or one it
inherits from, is LlamaIndex's ``chat_engine`` or ``agent`` code) sends the user's turn, and
so does code that is not LlamaIndex's (the application called the LLM itself). Any other
LlamaIndex code, or a method of any other LlamaIndex component (an application's own
postprocessor, extractor, program, tool or memory, subclassing LlamaIndex's), sends a prompt.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

from llama_index.core.base.llms.base import BaseLLM

_LLM_LAYER = (
    "headroom_memory_integrations.llama_index.llm",
    "headroom_memory_integrations.llama_index._instrumentation",
    "llama_index.core.llms.",
    "llama_index.core.base.llms.",
    "llama_index.core.callbacks.",
    "llama_index.core.instrumentation",
    "llama_index_instrumentation",
    "llama_index.core.async_utils",
    "asyncio.",
    "contextlib",
    "functools",
    "wrapt",
)
"""Modules whose frames pass a call on (an LLM calling its own ``chat``, a decorator, an event
loop running the coroutine) rather than make it."""

_TURNS = ("llama_index.core.chat_engine.", "llama_index.core.agent.")
"""LlamaIndex's code that sends the user's message: its chat engines and agents."""

_LLAMA_INDEX = ("llama_index.",)

_DEPTH = 256  # frames looked at, at most (past them: the application's call)


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return module.startswith(prefixes) or f"{module}." in prefixes


def _owner(frame: FrameType) -> Any:
    """The object whose method ``frame`` runs, or None."""
    code = frame.f_code
    if code.co_argcount and code.co_varnames[0] in ("self", "_self"):
        return frame.f_locals.get(code.co_varnames[0])
    return None


def _made_by(frame: FrameType) -> bool | None:
    """True: ``frame`` sends the user's turn; False: a prompt; None: it passes the call on."""
    module = frame.f_globals.get("__name__") or ""
    if _in(module, _LLM_LAYER):
        return None
    owner = _owner(frame)
    if isinstance(owner, BaseLLM):
        return None
    if owner is not None:
        defined_in = [getattr(cls, "__module__", None) or "" for cls in type(owner).__mro__]
        if any(_in(name, _TURNS) for name in defined_in):
            return True
        if any(_in(name, _LLAMA_INDEX) for name in defined_in):
            return False
    if _in(module, _TURNS):
        return True
    return not _in(module, _LLAMA_INDEX)


def called_for_a_turn() -> bool:
    """Whether the chat call being made (by the caller of the ``MemoryLLM`` method that asks)
    sends the user's turn: made by a chat engine, an agent or the application; False when
    another LlamaIndex component made it, with a prompt of its own."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_DEPTH):
        if frame is None:
            break
        made = _made_by(frame)
        if made is not None:
            return made
        frame = frame.f_back
    return True
