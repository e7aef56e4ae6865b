"""LlamaIndex adapters: long-term, per-user memory for chat engines, agents and LLMs.

Every class here is a thin translation onto the core (:mod:`headroom_memory_integrations.flow`,
the engine and the prompts): the same injection, escaping, extraction and storing as the OpenAI
wrappers. Install with ``pip install '.[llama-index]'``.

- :class:`HeadroomChatMemoryBuffer`: a drop-in for ``ChatMemoryBuffer`` (any engine or agent's
  ``memory=``); learns in the background through an LLM.
- :class:`HeadroomMemoryBlock`: a block for ``llama_index.core.memory.Memory``.
- :class:`MemoryLLM`: wraps any LLM; the model writes its memories inline, in its answer.
- :func:`openai_llm_with_memory`: LlamaIndex's ``OpenAI`` / ``OpenAILike`` on memory clients.
"""

from __future__ import annotations

from .._optional import require

require("llama_index.core", extra="llama-index")

from ._extract import llm_completer  # noqa: E402
from .chat_memory import HeadroomChatMemoryBuffer  # noqa: E402
from .llm import MemoryLLM  # noqa: E402
from .memory_block import HeadroomMemoryBlock  # noqa: E402
from .openai_llm import llm_memory, openai_llm_with_memory  # noqa: E402

__all__ = [
    "HeadroomChatMemoryBuffer",
    "HeadroomMemoryBlock",
    "MemoryLLM",
    "llm_completer",
    "llm_memory",
    "openai_llm_with_memory",
]
