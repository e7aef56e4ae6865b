"""What the LangChain adapters share: background extraction through a chat model, and the
memory fields of their pydantic classes."""

from __future__ import annotations

from typing import Any

from ..wiring import open_memory
from ..writer import Complete, ExtractionCutOff, is_cut_off, stop_reason

MEMORY_OPTIONS = ("user_id", "db_path", "storage", "embedder")
"""The constructor arguments that open a user's store, as for ``MemoryStore``."""

EXTRACTION_RUN = "headroom_memory_extraction"
"""The run name (and ``lc_source``) of a background extraction call."""


def chat_model_completer(model: Any) -> Complete:
    """The :data:`~headroom_memory_integrations.writer.Complete` of background extraction,
    answered by ``model`` (any LangChain chat model; the model name a job carries is ignored:
    the model object decides). Called from the memory worker's thread, outside any run, so the
    extraction call never shows in the caller's callbacks or streams. The call is marked as
    the harness's own (``metadata["lc_source"]``): a
    :class:`~.chat_model.MemoryChatModel` given as ``model`` passes it through untouched, so
    its user's memories never go into another exchange's extraction, and it learns nothing
    from the extraction prompt. An answer whose ``response_metadata`` says it was cut off at
    the model's output limit (:func:`~headroom_memory_integrations.writer.stop_reason`) raises
    :class:`~headroom_memory_integrations.writer.ExtractionCutOff`."""

    def complete(messages: list[dict[str, str]], model_name: str | None) -> str:
        answer = model.invoke(
            messages,
            config={"run_name": EXTRACTION_RUN, "metadata": {"lc_source": EXTRACTION_RUN}},
        )
        metadata = getattr(answer, "response_metadata", None)
        if isinstance(metadata, dict) and is_cut_off(reason := stop_reason(metadata)):
            raise ExtractionCutOff.of(
                str(metadata.get("model_name") or type(model).__name__), reason
            )
        return str(answer.text)

    return complete


def memory_field(data: Any) -> Any:
    """For a ``mode="before"`` validator of a class with a ``memory: MemoryStore`` field: the
    constructor's data with :data:`MEMORY_OPTIONS` (or ``memory=``) turned into that store."""
    if not isinstance(data, dict):
        return data
    options = {name: data.pop(name) for name in MEMORY_OPTIONS if name in data}
    if options or "memory" not in data:
        data["memory"] = open_memory(data.pop("memory", None), **options)
    return data
