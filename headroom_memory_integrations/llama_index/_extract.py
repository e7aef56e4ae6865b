"""Background extraction through a LlamaIndex LLM."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from llama_index.core.llms import LLM

from .. import writer
from ..jobs import PermanentJobError
from ..prompts import field_value
from ..writer import Complete, ExtractionCutOff, is_cut_off
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
    on the caller's path. An answer its LLM says was cut off at the model's output limit
    (:func:`stop_reason`) raises :class:`~headroom_memory_integrations.writer.ExtractionCutOff`."""

    def complete(messages: list[dict[str, str]], model_name: str | None) -> str:
        model: Any = llm if llm is not None else _settings_llm()
        model = getattr(model, "wrapped_llm", model)  # a MemoryLLM: extract without memory
        if "llama_index.llms.openai" in sys.modules:  # an OpenAI LLM may hold memory clients
            from .openai_llm import without_memory

            model = without_memory(model)
        answer = model.chat(from_dicts(messages))
        if is_cut_off(reason := stop_reason(answer)):
            name = getattr(model, "model", None)  # OpenAI's, Anthropic's, Ollama's LLMs
            raise ExtractionCutOff.of(
                name if isinstance(name, str) else type(model).__name__, reason
            )
        return str(answer.message.content or "")

    return complete


def stop_reason(answer: Any) -> Any:
    """Why a LlamaIndex ``ChatResponse`` stopped, as its provider said it (None when it says
    nothing: :func:`~headroom_memory_integrations.writer.stop_reason`), read from the raw
    response's first choice (OpenAI and the LLMs built on its client), the raw response itself
    (Anthropic, Bedrock Converse, Ollama; an OpenAI Responses API answer left incomplete) and
    ``additional_kwargs``."""
    raw = getattr(answer, "raw", None)
    choices = field_value(raw, "choices") if raw is not None else None
    first = choices[0] if isinstance(choices, Sequence) and choices else None
    return writer.stop_reason(first, raw, getattr(answer, "additional_kwargs", None))
