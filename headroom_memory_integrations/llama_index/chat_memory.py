"""A drop-in for LlamaIndex's ``ChatMemoryBuffer`` with the user's long-term memory."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
import threading
from collections.abc import Callable
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_serializer
from llama_index.core.llms import LLM
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.memory.types import DEFAULT_CHAT_STORE_KEY, BaseChatStoreMemory
from llama_index.core.storage.chat_store import BaseChatStore, SimpleChatStore
from llama_index.core.utils import get_tokenizer

from ..embeddings import Embedder
from ..engine import MemoryStore
from ..flow import MemoryFlow, Turn, insert_before
from ..redaction import logger_without_secrets
from ..storage import Storage
from ..wiring import FlowSettings
from ._messages import (
    after_outside_text,
    attaches_outside_text,
    continues_a_turn,
    is_final_answer,
    is_observation,
    is_tool_output,
    latest_user_text,
    previous_user_text,
    system_message,
    text_of,
    user_index,
)
from ._wiring import (
    LiveLLM,
    PathLike,
    Pickled,
    background_flow,
    check_llm,
    check_saveable,
    live_llm,
    memory_fields,
    register_llm,
)

log = logger_without_secrets("headroom_memory_integrations")


class HeadroomChatMemoryBuffer(FlowSettings, Pickled, BaseChatStoreMemory):
    """``ChatMemoryBuffer`` plus the user's long-term memory, for any chat engine or agent.

    The recent conversation is kept within ``token_limit`` exactly as ``ChatMemoryBuffer``
    keeps it (its own trimming is used), in ``chat_store`` under ``chat_store_key``. To keep
    the short-term history too, save ``to_dict()`` (below): llama-index-core 0.14's
    ``SimpleChatStore.persist`` fails under pydantic 2.14. On top of it:

    - ``get`` adds a system message with the user's memories relevant to ``input`` (or, without
      ``input``, to the latest user message): the escaped context of the core, placed just
      before that user message (or last, when ``input`` is not in the history yet; never
      first, where a ``ReActAgent`` takes a system message for its own prompt and drops it:
      right after that message when it is the first of the window), and counted in
      ``token_limit``. A ``CodeActAgent`` replaces the first system message it is given with
      its own: give it a ``system_prompt`` so that the memories are not that one. Nothing is
      added when no memory is relevant, or when the window has no room left for them (its
      latest message alone nearly fills the limit).
    - every turn is learnt from: when the answer to a user message is put, the exchange goes to
      a durable queue and ``llm`` extracts memories from it in a background thread. Nothing on
      the caller's path but a queue insert. A turn in which any tool output was put (an
      agent's tool results, even those it puts only when it finishes; a ``return_direct``
      answer; a ReAct transcript with its observations; a ``CodeActAgent``'s code output, sent
      as a user message) or any document, image or video
      (``DocumentBlock``, ``ImageBlock``, ``VideoBlock``, ``CitableBlock``), or whose window
      (what ``get`` returns) still shows one, or an answer written with one in view, is learnt as
      untrusted: only memories grounded in the user's own words are kept, and an answer that
      is a tool's output is not given to the extraction. Once the window has moved past
      them, the user's turns are trusted again.

    Serializing (``to_dict``, an agent's ``Context.to_dict``) writes ``user_id``, ``db_path``
    (the absolute folder or server URL of the memories), the chat store and the limits, never
    a client; ``from_dict`` opens the same memories again, from any working directory, with
    the default embedder and, for extraction, the ``llm`` of the memory it was saved from,
    when that memory (or another copy of it) lives in this process: an agent's ``Context``
    reused for another run is serialized and rebuilt by LlamaIndex in between. It finds it by
    ``extraction_llm_key``, a random key, and only for the same ``user_id`` and ``db_path``.
    Elsewhere, ``Settings.llm`` (pass ``llm=`` to ``from_dict`` for another). Memories that
    could not be opened again so (a custom embedder or storage object) are refused by
    ``to_dict`` with an ``InvalidInputError``, rather than restored without memory. Give
    ``llm`` a plain LLM, not one with memory of its own.

    Setup::

        from llama_index.core.chat_engine import SimpleChatEngine
        from headroom_memory_integrations.llama_index import HeadroomChatMemoryBuffer

        memory = HeadroomChatMemoryBuffer.from_defaults(
            user_id="alice", db_path="./memories", token_limit=3000, llm=llm
        )
        engine = SimpleChatEngine.from_defaults(llm=llm, memory=memory)

    Invoke (days later, in a new process, with a new memory object)::

        engine.chat("I prefer Python for backend work")
        memory.memory.flush()  # optional: wait for the background extraction
        engine.chat("Which language should I use?")  # the model sees "Prefers Python ..."

    Stream and async work the same (``stream_chat``, ``achat``, ``astream_chat``), and so do
    agents: ``await FunctionAgent(llm=llm, tools=[...]).run("...", memory=memory)``.

    Args (of :meth:`from_defaults` and the constructor):
        user_id: Whose memories (with ``db_path``, or ``storage`` and ``embedder``).
        db_path: Embedded Chroma folder or Chroma server URL.
        memory: An existing :class:`MemoryStore` instead of the three above.
        llm: The model for background extraction; in ``from_defaults`` also, as in
            ``ChatMemoryBuffer``, the default ``token_limit`` (75% of its context window).
        token_limit: The short-term history's budget in tokens, memories included.
        chat_store / chat_store_key: Where the short-term history lives.
        top_k: Memories added at most.
        queue_path: The SQLite file of pending extraction jobs.
        untrusted_context: The application puts text the user did not write in the
            conversation (retrieved documents in a ``ContextChatEngine``, web pages): keep only
            memories grounded in the user's own words.
    """

    token_limit: int = Field(gt=0)
    tokenizer_fn: Callable[[str], list] = Field(default_factory=get_tokenizer, exclude=True)
    user_id: str
    db_path: str | None = None
    top_k: int = Field(default=5, gt=0)
    untrusted_context: bool = Field(default=False, strict=True)  # never guessed from "false"
    extraction_llm_key: str | None = Field(
        default=None,
        description="Names the llm= of the memory a copy was restored from, in this process.",
    )

    _flow: MemoryFlow = PrivateAttr()
    _live_llm: LiveLLM | None = PrivateAttr(default=None)  # keeps extraction_llm_key's LLM
    _unsaveable: str | None = PrivateAttr(default=None)  # why to_dict cannot save the store
    _extraction_llm: LLM | None = PrivateAttr(default=None)
    _queue_path: PathLike | None = PrivateAttr(default=None)
    # the turn followed (the fields below): held briefly, never across a chat-store call
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    # a change of the short-term history together with the turn followed in it (put, set,
    # reset): held across the chat-store call, which ``get`` never waits for
    _history_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _turn: Turn | None = PrivateAttr(default=None)  # the latest get's, for learning
    _asked: str | None = PrivateAttr(default=None)  # the latest user message put
    _awaiting: bool = PrivateAttr(default=False)  # it has no answer yet
    # a tool's output, or a document, image or video, was put since the user asked
    _tools: bool = PrivateAttr(default=False)
    _recent: list[ChatMessage] = PrivateAttr(default_factory=list)  # the last messages put

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
        # a copy restored without llm= in this process (an agent's Context between two runs)
        # extracts with the llm= of the memory it was saved from
        live = None if llm is not None else live_llm(self.extraction_llm_key, *self._owner())
        self._flow = background_flow(
            self,
            memory,
            storage=storage,
            embedder=embedder,
            llm=llm if live is None else live.llm,
            queue_path=queue_path,
        )
        if live is None:
            self.extraction_llm_key, live = register_llm(self._extraction_llm, *self._owner())
        self._live_llm = live
        # a turn in progress when the history was saved (an agent's Context saved while it
        # waits for the human) is learnt from when its answer is put
        history = self.get_all()
        with self._lock:
            self._follow(history)

    @classmethod
    def class_name(cls) -> str:
        return "HeadroomChatMemoryBuffer"

    def _owner(self) -> tuple[str, str | None]:
        """Whose memories, and where: a restored copy gets an extraction LLM for these only."""
        return self.user_id, self.db_path

    def _reopening_arguments(self) -> dict[str, Any]:
        """What a pickle holds (see ``Pickled``): the fields (the short-term history's store
        included), ``llm`` and ``queue_path``."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        try:
            pickle.dumps(self.tokenizer_fn)
        except Exception:
            # as LlamaIndex pickles ChatMemoryBuffer (and as to_dict, which never writes it):
            # the copy counts with the default tokenizer
            log.warning("Removing unpickleable attribute tokenizer_fn")
            del fields["tokenizer_fn"]
        return {**fields, "llm": self._extraction_llm, "queue_path": self._queue_path}

    @field_serializer("chat_store")  # the base class's name: this replaces its serializer
    def serialize_courses_in_order(self, chat_store: BaseChatStore) -> dict:
        """The chat store as ``load_chat_store`` reads it back. (llama-index-core 0.14's
        ``SimpleChatStore`` fails to dump messages under pydantic 2.14: its wrap serializer
        calls the handler the old way; its messages are dumped one by one instead.)"""
        try:
            data = chat_store.model_dump()
        except Exception:
            if not isinstance(chat_store, SimpleChatStore):
                raise
            data = {
                "store": {
                    key: [message.model_dump(mode="json") for message in messages]
                    for key, messages in chat_store.store.items()
                }
            }
        data["class_name"] = chat_store.class_name()
        return data

    @field_serializer("db_path")
    def serialize_db_path(self, db_path: str | None) -> str | None:
        """The memories' absolute folder or server URL; refused when a restored memory
        would not find them (a custom embedder or storage: see :func:`check_saveable`)."""
        check_saveable(self)
        return db_path

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        check_saveable(self)
        return super().to_dict(**kwargs)

    @classmethod
    def from_defaults(  # type: ignore[override]
        cls,
        chat_history: list[ChatMessage] | None = None,
        llm: LLM | None = None,
        chat_store: BaseChatStore | None = None,
        chat_store_key: str = DEFAULT_CHAT_STORE_KEY,
        token_limit: int | None = None,
        tokenizer_fn: Callable[[str], list] | None = None,
        *,
        user_id: str | None = None,
        db_path: PathLike | None = None,
        memory: MemoryStore | None = None,
        storage: Storage | None = None,
        embedder: Embedder | None = None,
        top_k: int = 5,
        queue_path: PathLike | None = None,
        untrusted_context: bool = False,
    ) -> HeadroomChatMemoryBuffer:
        """A memory with ``ChatMemoryBuffer.from_defaults``'s defaults (``token_limit`` from
        ``llm``'s context window, else 3000; a new ``SimpleChatStore``) for ``user_id``."""
        check_llm(llm)
        buffer = ChatMemoryBuffer.from_defaults(
            chat_history=chat_history,
            llm=llm,
            chat_store=chat_store,
            chat_store_key=chat_store_key,
            token_limit=token_limit,
            tokenizer_fn=tokenizer_fn,
        )
        return cls(
            token_limit=buffer.token_limit,
            tokenizer_fn=buffer.tokenizer_fn,
            chat_store=buffer.chat_store,
            chat_store_key=buffer.chat_store_key,
            user_id=user_id if user_id is not None or memory is None else memory.user_id,
            db_path=db_path,
            memory=memory,
            storage=storage,
            embedder=embedder,
            llm=llm,
            top_k=top_k,
            queue_path=queue_path,
            untrusted_context=untrusted_context,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> HeadroomChatMemoryBuffer:
        """Rebuild from :meth:`to_dict`; ``kwargs`` (e.g. ``llm=``, ``embedder=``) are added."""
        from llama_index.core.storage.chat_store.loading import load_chat_store

        data = {**data, **kwargs}
        data.pop("class_name", None)
        if kwargs.get("memory") is not None or kwargs.get("storage") is not None:
            data.pop("db_path", None)
        if isinstance(data.get("chat_store"), dict):
            data["chat_store"] = load_chat_store(data["chat_store"])
        return cls(**data)

    def to_string(self) -> str:
        return self.json()

    @classmethod
    def from_string(cls, json_str: str, **kwargs: Any) -> HeadroomChatMemoryBuffer:
        """Rebuild from :meth:`to_string`; ``kwargs`` (e.g. ``llm=``) as for :meth:`from_dict`."""
        return cls.from_dict(json.loads(json_str), **kwargs)

    @property
    def memory(self) -> MemoryStore:
        """The user's long-term memories (search, add, get_all, clear, flush, stats, ...)."""
        return self._flow.memory

    # -- reading -------------------------------------------------------------------------

    def get(
        self, input: str | ChatMessage | None = None, initial_token_count: int = 0, **kwargs: Any
    ) -> list[ChatMessage]:
        """The recent history within ``token_limit``, with the relevant memories. Asked again
        in the same turn (an agent after its tool calls, and once it has put its answer), it
        adds those of the turn's first call, unless one was deleted or changed meanwhile."""
        # ChatMemoryBuffer never reads ``input``: anything but text or a message is ignored
        asked = text_of(input) if isinstance(input, ChatMessage) else input
        if not isinstance(asked, str):
            asked = None
        stored = self.get_all()
        latest = latest_user_text(stored)
        query = asked if asked and asked.strip() else latest
        previous = latest
        if query is None or latest is None or latest.strip() == query.strip():
            previous = previous_user_text(stored)  # the query is the latest stored message
        # asked again in the same turn (an agent after its tool calls, with the user's message
        # as input, and once it has put its answer): a later call of the turn, which gets the
        # memories of the first (a failed recall is counted once per turn; see MemoryFlow.start)
        sent = [*stored, ChatMessage(role=MessageRole.USER, content=asked)] if asked else stored
        turn = self._flow.start(
            query,
            instruct=False,
            previous_text=previous,
            later_step=continues_a_turn(sent),
            conversation=self.chat_store_key,
        )
        prompt = turn.prompt
        used = len(self.tokenizer_fn(prompt)) if prompt else 0
        if initial_token_count + used > self.token_limit:
            prompt, used = None, 0  # no room left for memories
        window = ChatMemoryBuffer(
            token_limit=self.token_limit,
            tokenizer_fn=self.tokenizer_fn,
            chat_store=self.chat_store,
            chat_store_key=self.chat_store_key,
        )
        history = window.get(initial_token_count=initial_token_count + used)
        if prompt and initial_token_count + used + self._tokens(history) > self.token_limit:
            # the window could not make room (its latest message alone nearly fills the limit):
            # leave the memories out rather than go over it
            prompt = None
            history = window.get(initial_token_count=initial_token_count)
        # untrusted while the model sees a tool's output or an attached document, image or
        # video, or an answer written with one in view (the window is the stored history's
        # last messages)
        turn.untrusted = turn.untrusted or any(
            index >= len(stored) - len(history) for index in after_outside_text(stored)
        )
        if turn.user_text:
            with self._lock:
                self._turn = turn
        if not prompt:
            return history
        return self._with_memories(history, system_message(prompt), asked)

    def _tokens(self, messages: list[ChatMessage]) -> int:
        """Tokens of ``messages``, counted as ``ChatMemoryBuffer`` counts them."""
        return len(self.tokenizer_fn(" ".join(str(m.content) for m in messages)))

    @staticmethod
    def _with_memories(
        history: list[ChatMessage], memories: ChatMessage, asked: str | None
    ) -> list[ChatMessage]:
        index = user_index(history)
        pending = asked is not None and (
            index is None or text_of(history[index]).strip() != asked.strip()
        )
        if pending or index is None:  # the question is not stored yet: it will come last
            return [*history, memories]
        if index == 0:
            # never first: a ReActAgent takes a first system message for its system prompt
            # and drops it (it has its own), so the memories come right after the question
            return insert_before(history, 1, memories)
        return insert_before(history, index, memories)

    # -- writing -------------------------------------------------------------------------

    # The short-term history and the turn followed in it change together, under
    # ``_history_lock``: a ``reset`` (or ``set``) from another thread comes wholly before or
    # wholly after a ``put``. Before, a message put while a reset ran was stored in the new
    # history with its turn forgotten (the next conversation's first turn never learnt), and a
    # reset made while a turn's answer was being put forgot that turn (answered, never learnt).
    # ``get`` takes only ``_lock``, so a slow chat store's write does not hold it up.

    def put(self, message: ChatMessage) -> None:
        """Store ``message``; the answer to a user message queues the exchange for learning."""
        with self._history_lock:
            super().put(message)
            with self._lock:
                finished = self._observe([message])
        for turn, answer in finished:  # (a write to the job queue file: outside the lock)
            self._flow.finish(turn, answer)

    def set(self, messages: list[ChatMessage]) -> None:
        """Replace the short-term history. Nothing in it is learnt from, except a last message
        the user wrote: a turn whose answer, when put, is learnt."""
        with self._history_lock:
            super().set(messages)
            with self._lock:
                self._follow(messages)

    def _follow(self, messages: list[ChatMessage]) -> None:
        """Follow the turns from ``messages``, the whole short-term history (``_lock`` held):
        a last message the user wrote is a turn whose answer is still to come (learnt as
        untrusted when that message attaches a document, an image or a video, as when it is
        put)."""
        self._turn, self._recent = None, list(messages[-8:])
        self._awaiting = bool(messages) and user_index(messages) == len(messages) - 1
        self._asked = text_of(messages[-1]).strip() if self._awaiting else None
        self._tools = self._awaiting and attaches_outside_text(messages[-1:])

    def reset(self) -> None:
        """Clear the short-term history. Long-term memories stay (``memory.clear()``), and so
        does the learning of the turns answered before: their extraction goes on."""
        with self._history_lock:
            super().reset()
            with self._lock:
                self._follow([])

    def _observe(self, messages: list[ChatMessage]) -> list[tuple[Turn, str | None]]:
        """Follow the turns put (``_lock`` held): a user message opens one; the answer that
        ends it is returned, its exchange to queue for learning. An agent puts a turn's tool
        calls and results only when it finishes (``finalize``), after ``get``: an exchange
        whose turn put any tool output (or a document, image or video) is learnt as untrusted
        (kept only if grounded in the user's words), and an answer that is a tool's output
        (``return_direct``, a ReAct transcript) is not given as the answer."""
        finished: list[tuple[Turn, str | None]] = []
        for message in messages:
            self._recent = [*self._recent[-7:], message]
            observation = is_observation(self._recent, len(self._recent) - 1)
            attached = attaches_outside_text([message])
            if message.role == MessageRole.USER and not observation:
                self._asked, self._awaiting = text_of(message).strip(), True
                self._tools = attached
                continue
            if not self._awaiting:
                continue
            tool_output = observation or is_tool_output(message)
            self._tools = self._tools or tool_output or attached
            if self._asked and is_final_answer(message):
                turn = self._turn
                if turn is None or turn.user_text != self._asked:
                    turn = Turn(user_text=self._asked)
                if self._tools:
                    turn = dataclasses.replace(turn, untrusted=True)
                finished.append((turn, None if tool_output else text_of(message)))
                self._turn, self._awaiting, self._tools = None, False, False
        return finished

    # -- async: the same work, off the event loop ------------------------------------------

    async def aget(
        self, input: str | ChatMessage | None = None, initial_token_count: int = 0, **kwargs: Any
    ) -> list[ChatMessage]:
        return await asyncio.to_thread(
            self.get, input=input, initial_token_count=initial_token_count, **kwargs
        )

    async def aget_all(self) -> list[ChatMessage]:
        return await asyncio.to_thread(self.get_all)

    async def aput(self, message: ChatMessage) -> None:
        await asyncio.to_thread(self.put, message)

    async def aput_messages(self, messages: list[ChatMessage]) -> None:
        await asyncio.to_thread(self.put_messages, messages)

    async def aset(self, messages: list[ChatMessage]) -> None:
        await asyncio.to_thread(self.set, messages)

    async def areset(self) -> None:
        await asyncio.to_thread(self.reset)
