"""The store and flow behind each LlamaIndex memory class, from the arguments users pass."""

from __future__ import annotations

import os
from typing import Any

from llama_index.core.llms import LLM

from ..embeddings import Embedder
from ..engine import MemoryStore
from ..flow import MemoryFlow
from ..storage import Storage
from ..wiring import build_flow, open_memory
from ..writer import BackgroundExtractor
from ._extract import llm_completer

PathLike = str | os.PathLike[str]


def path_text(path: PathLike | None) -> str | None:
    """A folder or server URL as text (what a memory class serializes), or None."""
    return None if path is None else os.fspath(path)


def memory_fields(memory: MemoryStore | None, data: dict[str, Any]) -> dict[str, Any]:
    """The pydantic fields of a memory class that learns in the background: ``user_id`` taken
    from ``memory`` when given, ``db_path`` as text."""
    if memory is not None:
        data.setdefault("user_id", memory.user_id)
    data["db_path"] = path_text(data.get("db_path"))
    return data


def background_flow(
    owner: Any,
    memory: MemoryStore | None,
    *,
    storage: Storage | None,
    embedder: Embedder | None,
    llm: LLM | None,
    queue_path: PathLike | None,
) -> MemoryFlow:
    """The flow of ``owner`` (a memory class with ``user_id``, ``db_path`` and ``top_k``
    fields): it injects the user's memories and learns in the background through ``llm``.
    An owner built without ``db_path`` gets the location of its memories, so that what it
    serializes opens the same memories again."""
    store = open_memory(memory, owner.user_id, owner.db_path, storage=storage, embedder=embedder)
    extractor = BackgroundExtractor(llm_completer(llm))
    flow = build_flow(
        store, inline=False, top_k=owner.top_k, extractor=extractor, queue_path=queue_path
    )
    if owner.db_path is None:
        owner.db_path = reopenable_location(store)
    return flow


def reopenable_location(memory: MemoryStore) -> str | None:
    """``memory``'s folder or server URL, when opening it by ``db_path`` finds it again."""
    location = memory.storage.location
    if os.path.isdir(location) or location.startswith(("http://", "https://")):
        return location
    return None
