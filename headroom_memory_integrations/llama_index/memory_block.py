"""A memory block for LlamaIndex's ``Memory`` that holds the user's long-term memory."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_serializer
from llama_index.core.llms import LLM
from llama_index.core.memory.memory import BaseMemoryBlock

from ..embeddings import Embedder
from ..engine import MemoryStore
from ..flow import MemoryFlow
from ..storage import Storage
from ..wiring import FlowSettings
from ._messages import continues_a_turn, latest_user_text, previous_user_text
from ._wiring import PathLike, Pickled, background_flow, check_saveable, memory_fields


class HeadroomMemoryBlock(FlowSettings, Pickled, BaseMemoryBlock[str]):
    """The user's long-term memory as a block of ``llama_index.core.memory.Memory``.

    ``Memory`` hands its blocks messages only when they are flushed out of its short-term
    queue (with the defaults, after about 21,000 tokens of conversation), so a block that
    learnt in ``aput`` would learn nothing in most conversations. What ``Memory`` does call on
    every turn is the blocks' ``aget``, with the whole active history plus the new input. So
    this block learns there: on each ``aget`` whose latest user message begins a turn (per
    ``session_id``), it queues that message for background extraction by ``llm``, and
    returns the memories relevant to it (the core's escaped context) for ``Memory`` to put in
    its system message (the first one; a new one first when there is none, which a
    ``ReActAgent`` or ``CodeActAgent`` without a ``system_prompt`` takes for its own prompt and
    drops or replaces: give the agent a ``system_prompt``, or give ``Memory``
    ``insert_method=InsertMethod.USER``). Each user message is learnt from once, as soon as it
    is asked, so the last turn of a session is not lost; the assistant's answers are not
    needed, since only what users say about themselves is remembered. Asked again in the
    same turn (an agent asks after each tool call, with the user's message followed by its
    tool calls and their results, or sent again after them), the block returns the memories
    it returned the first time, so the prompt stays the same within a turn and what was just
    learnt from the message is not shown back as if from an earlier conversation; when one of
    those memories was deleted or changed meanwhile (a tool that forgets), it recalls anew.
    A user message after an answer begins a new turn, even in the same words as the one
    before ("yes" twice): it is recalled for and learnt from anew (see ``MemoryFlow.start``).
    Messages ``Memory`` flushes later are ignored (they were learnt from already), and so is
    history that was never the latest message of an ``aget`` (``chat_history=``, ``set``).

    Setup::

        from llama_index.core.memory import Memory
        from headroom_memory_integrations.llama_index import HeadroomMemoryBlock

        block = HeadroomMemoryBlock(user_id="alice", db_path="./memories", llm=llm)
        memory = Memory.from_defaults(session_id="alice-chat", memory_blocks=[block])

    Invoke (any engine or agent that takes a ``memory``)::

        agent = FunctionAgent(llm=llm, tools=[...])
        await agent.run("I prefer Python for backend work", memory=memory)
        # ... later, with a new Memory and a new block:
        await agent.run("Which language should I use?", memory=memory)  # sees the preference

    Args:
        user_id: Whose memories (with ``db_path``, or ``storage`` and ``embedder``).
        db_path: Embedded Chroma folder or Chroma server URL.
        memory: An existing :class:`MemoryStore` instead of the three above.
        llm: The model for background extraction (default: ``Settings.llm``).
        top_k: Memories returned at most.
        queue_path: The SQLite file of pending extraction jobs.
        untrusted_context: The application puts text the user did not write in the
            conversation (retrieved documents, web pages): keep only memories grounded in the
            user's own words.
        name / priority: As for every block (priority 0: never truncated).

    Serialized (``block.model_dump()``), the block writes ``user_id`` and ``db_path`` as the
    absolute folder or server URL of the memories (``HeadroomMemoryBlock(**saved, llm=llm)``
    opens them again); it refuses to serialize memories that could not be opened again from
    those (a custom embedder or storage object). ``Memory.to_dict()`` writes only the fields
    every block has (``name``, ``description``, ``priority``, ``accept_short_term_memory``),
    for this block as for LlamaIndex's own. Pickled, the block holds what ``model_dump``
    writes, its ``llm`` and ``queue_path``, and is refused in the same cases.
    """

    name: str = Field(default="user_memories", description="The name of the memory block.")
    description: str | None = Field(
        default="What the user told in earlier conversations (long-term memory)."
    )
    user_id: str
    db_path: str | None = None
    top_k: int = Field(default=5, gt=0)
    untrusted_context: bool = Field(default=False, strict=True)  # never guessed from "false"

    _flow: MemoryFlow = PrivateAttr()
    _unsaveable: str | None = PrivateAttr(default=None)  # why it cannot be serialized
    _extraction_llm: LLM | None = PrivateAttr(default=None)
    _queue_path: PathLike | None = PrivateAttr(default=None)

    def _settings_flow(self) -> MemoryFlow | None:
        return getattr(self, "_flow", None)

    def __init__(
        self,
        *,
        memory: MemoryStore | None = None,
        storage: Storage | None = None,
        embedder: Embedder | None = None,
        llm: LLM | None = None,
        queue_path: PathLike | None = None,
        **data: Any,
    ) -> None:
        super().__init__(**memory_fields(type(self), memory, data))
        self._flow = background_flow(
            self, memory, storage=storage, embedder=embedder, llm=llm, queue_path=queue_path
        )

    def _reopening_arguments(self) -> dict[str, Any]:
        """What a pickle holds (see ``Pickled``): the fields, ``llm`` and ``queue_path``."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return {**fields, "llm": self._extraction_llm, "queue_path": self._queue_path}

    @field_serializer("db_path")
    def serialize_db_path(self, db_path: str | None) -> str | None:
        """The memories' absolute folder or server URL; refused when a restored block would
        not find them (a custom embedder or storage)."""
        check_saveable(self)
        return db_path

    @property
    def memory(self) -> MemoryStore:
        """The user's long-term memories (search, add, get_all, clear, flush, stats, ...)."""
        return self._flow.memory

    async def _aget(self, messages: list[ChatMessage] | None = None, **block_kwargs: Any) -> str:
        """The memories relevant to the latest user message ("" for none); learns from it."""
        messages = messages or []
        asked = latest_user_text(messages)
        if not asked or not asked.strip():
            return ""
        return await asyncio.to_thread(
            self._recall,
            asked,
            block_kwargs.get("session_id"),
            previous_user_text(messages),
            continues_a_turn(messages),
        )

    def _recall(
        self, asked: str, session: str | None, previous: str | None, later_step: bool
    ) -> str:
        # asked again in the same turn (an agent after its tool calls): the flow gives the same
        # memories, not the ones learnt since from this very message (see MemoryFlow.start)
        turn = self._flow.start(
            asked,
            instruct=False,
            previous_text=previous,
            later_step=later_step,
            conversation=session,
        )
        if turn.user_text is None:
            return ""
        if not turn.later_call:
            self._flow.finish(turn, None)  # the user's message, extracted in the background
        return turn.prompt or ""

    async def _aput(self, messages: list[ChatMessage]) -> None:
        """Flushed messages: already learnt from when they were asked (see the class)."""
