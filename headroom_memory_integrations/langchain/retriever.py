"""A user's relevant memories as LangChain documents: :class:`HeadroomRetriever`."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig
from pydantic import ConfigDict, Field, model_validator

from ..engine import MAX_TOP_K, MemoryStore, search_text
from ..errors import EmbeddingError, InvalidInputError, StorageError
from ..flow import in_recall_time
from ..types import Category, Memory
from ._extract import memory_field
from ._users import check_call_user


class HeadroomRetriever(BaseRetriever):
    """A user's memories most relevant to a query, as ``Document`` objects.

    Each document's ``page_content`` is a memory's text, its ``id`` the memory's id, and its
    ``metadata`` holds ``id``, ``category``, ``score`` (higher is more relevant), ``source``,
    ``created_at`` and ``updated_at`` (ISO 8601, UTC). Only memories above the relevance floor
    come back, so an unrelated query (or a blank one, or one of control characters only, such
    as a stray ``"\\x1b"``) returns ``[]``; at most ``k``, most relevant first. A query that
    is not a string (a chain's whole input dict) raises
    :class:`~headroom_memory_integrations.InvalidInputError` rather than find nothing. When
    the storage or the embedder fails (a server or an embedding API down), the failure is logged
    and counted (``memory.stats()["events"]["retrieve_failures"]``) and no document comes back:
    the chain answers without memories rather than fail. It serves one user: a run whose config
    (or context) names another is refused with ``InvalidInputError``, as by the other adapters
    built for one user.

    Setup::

        from headroom_memory_integrations.langchain import HeadroomRetriever

        retriever = HeadroomRetriever(user_id="alice", db_path="./memories", k=3)
        # or HeadroomRetriever(memory=MemoryStore("alice", db_path="./memories"))

    Invoke::

        docs = retriever.invoke("Which language should I use?")
        docs[0].page_content  # 'Prefers Python for backend work'
        docs[0].metadata["category"], round(docs[0].metadata["score"], 2)  # ('preference', 0.26)
        retriever.invoke("Which language should I use?", k=1)  # one document at most

    In a chain::

        chain = {"memories": retriever, "question": RunnablePassthrough()} | prompt | model

    Async: ``await retriever.ainvoke(query)`` runs the same search in a worker thread.

    Args:
        user_id / db_path / storage / embedder: Whose memories, as for ``MemoryStore``.
        memory: An existing store instead.
        k: Documents at most (also per call: ``invoke(query, k=...)``).
        min_score: Overrides the store's relevance floor.
        categories: Only these categories (default all).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    memory: MemoryStore
    k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    min_score: float | None = None
    categories: list[Category] | None = None

    @model_validator(mode="before")
    @classmethod
    def _open_memory(cls, data: Any) -> Any:
        return memory_field(data)

    @property
    def user_id(self) -> str:
        return self.memory.user_id

    def invoke(
        self, input: str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[Document]:
        self._check_run(config)
        return super().invoke(input, config, **kwargs)

    async def ainvoke(
        self, input: str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[Document]:
        self._check_run(config)
        return await super().ainvoke(input, config, **kwargs)

    def _check_run(self, config: RunnableConfig | None) -> None:
        check_call_user(
            config,
            self.memory.user_id,
            "this HeadroomRetriever",
            "build a HeadroomRetriever for each user (or give each run its own)",
        )

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        return self._search(query, k)

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: int | None = None,
    ) -> list[Document]:
        return await asyncio.to_thread(self._search, query, k)

    def _search(self, query: str, k: int | None) -> list[Document]:
        if not isinstance(query, str):
            # a chain's whole input (a dict) reaching the retriever would find nothing, and the
            # model would answer as if the user had no memories: say what went wrong instead
            raise InvalidInputError(
                f"HeadroomRetriever searches with a text query, got {type(query).__name__}; "
                "in a chain, give it the question's text (e.g. itemgetter('question') | "
                "retriever)"
            )
        text = search_text(query)
        if text is None:  # blank, or a lone zero-width space: nothing to look for
            return []
        try:
            found = in_recall_time(
                self.memory,
                lambda: self.memory.search(
                    text,
                    top_k=self.k if k is None else k,
                    categories=self.categories,
                    min_score=self.min_score,
                ),
                "search memories",
            )
        except InvalidInputError:
            raise
        except Exception as exc:  # the storage or the embedder (an embedding API down) failed
            self.memory.survived(
                "retrieve_failures",
                f"could not search memories ({type(exc).__name__}); returning none",
                exc_info=not isinstance(exc, (StorageError, EmbeddingError)),
            )
            return []
        return [memory_document(memory, score) for memory, score in found]


def memory_document(memory: Memory, score: float | None = None) -> Document:
    """A memory as a ``Document`` (see :class:`HeadroomRetriever` for the metadata)."""
    metadata: dict[str, Any] = {
        "id": memory.id,
        "category": memory.category.value,
        "source": memory.source.value,
        "created_at": memory.created_at.isoformat(),
        "updated_at": memory.updated_at.isoformat(),
    }
    if score is not None:
        metadata["score"] = score
    return Document(page_content=memory.text, id=memory.id, metadata=metadata)
