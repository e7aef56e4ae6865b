"""Background extraction through a LlamaIndex LLM."""

from __future__ import annotations

import sys
from typing import Any

from llama_index.core.llms import LLM

from ..jobs import PermanentJobError
from ..writer import Complete
from ._messages import from_dicts


def _settings_llm() -> LLM:
    from llama_index.core import Settings

    try:
        return Settings.llm
    except Exception as exc:  # no default LLM installed or configured
        raise PermanentJobError(
            "no LLM for background extraction: pass llm= (or set Settings.llm)"
        ) from exc


def llm_completer(llm: LLM | None) -> Complete:
    """The :data:`~headroom_memory_integrations.writer.Complete` of background extraction,
    answered by ``llm`` (any LlamaIndex LLM; ``None`` means ``Settings.llm`` at the time of
    the call). A :class:`~.llm.MemoryLLM`, or an LLM set up by
    :func:`~.openai_llm.openai_llm_with_memory`, is unwrapped: extraction calls carry no
    memory, and nothing they answer is stored for that LLM's user. The model name a job
    carries is ignored: the LLM object decides. Called from the memory worker's thread, never
    on the caller's path."""

    def complete(messages: list[dict[str, str]], model_name: str | None) -> str:
        model: Any = llm if llm is not None else _settings_llm()
        model = getattr(model, "wrapped_llm", model)  # a MemoryLLM: extract without memory
        if "llama_index.llms.openai" in sys.modules:  # an OpenAI LLM may hold memory clients
            from .openai_llm import without_memory

            model = without_memory(model)
        answer = model.chat(from_dicts(messages))
        return str(answer.message.content or "")

    return complete
