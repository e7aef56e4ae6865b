"""The store and flow behind each LlamaIndex memory class, from the arguments users pass."""

from __future__ import annotations

import os

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


def background_flow(
    memory: MemoryStore | None,
    user_id: str | None,
    db_path: PathLike | None,
    *,
    storage: Storage | None,
    embedder: Embedder | None,
    llm: LLM | None,
    top_k: int,
    queue_path: PathLike | None,
) -> MemoryFlow:
    """A flow that injects the user's memories and learns in the background through ``llm``."""
    store = open_memory(memory, user_id, db_path, storage=storage, embedder=embedder)
    extractor = BackgroundExtractor(llm_completer(llm))
    return build_flow(store, inline=False, top_k=top_k, extractor=extractor, queue_path=queue_path)


def reopenable_location(memory: MemoryStore) -> str | None:
    """``memory``'s folder or server URL, when opening it by ``db_path`` finds it again."""
    location = memory.storage.location
    if os.path.isdir(location) or location.startswith(("http://", "https://")):
        return location
    return None
