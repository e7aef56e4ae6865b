"""Background extraction through a LangChain chat model."""

from __future__ import annotations

from typing import Any

from ..writer import Complete


def chat_model_completer(model: Any) -> Complete:
    """The :data:`~headroom_memory_integrations.writer.Complete` of background extraction,
    answered by ``model`` (any LangChain chat model; the model name a job carries is ignored:
    the model object decides). Called from the memory worker's thread, outside any run, so the
    extraction call never shows in the caller's callbacks or streams."""

    def complete(messages: list[dict[str, str]], model_name: str | None) -> str:
        answer = model.invoke(messages, config={"run_name": "headroom_memory_extraction"})
        return str(answer.text)

    return complete
