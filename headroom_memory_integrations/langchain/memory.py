"""Long-term memory for classic LangChain chains: :class:`HeadroomMemory`.

Needs the ``langchain-classic`` extra (in a clone of the repository, ``pip install
'.[langchain-classic]'``); the rest of
:mod:`headroom_memory_integrations.langchain` imports without it.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections import OrderedDict
from dataclasses import replace
from typing import Any, ClassVar

from .._optional import require

require("langchain_classic", extra="langchain-classic")

from langchain_classic.base_memory import BaseMemory  # noqa: E402
from langchain_core.messages import BaseMessage, SystemMessage  # noqa: E402
from pydantic import ConfigDict, Field, PrivateAttr, model_validator  # noqa: E402

from ..engine import MemoryStore  # noqa: E402
from ..flow import MemoryFlow, Turn  # noqa: E402
from ..prompts import message_text  # noqa: E402
from ..wiring import BUILT_FROM, FlowSettings, build_flow  # noqa: E402
from ..writer import BackgroundExtractor  # noqa: E402
from ._extract import chat_model_completer, memory_field  # noqa: E402
from ._messages import holds_tool_steps, is_user  # noqa: E402

_PENDING_TURNS = 64  # loaded turns waiting for their save_context, per memory object


class HeadroomMemory(FlowSettings, BaseMemory):
    """A user's long-term memories for classic chains (``langchain_classic`` memory API).

    Before each run, :meth:`load_memory_variables` searches the user's memories with the
    run's input and returns the relevant ones under ``memory_key``: the escaped context block
    that every adapter of this package injects (marked as data, not instructions), or ``""``
    when nothing is relevant; with ``return_messages=True``, a list holding one
    ``SystemMessage`` with that block (or an empty list). A short follow-up question is
    searched with the user's previous message: the user message before the latest one when the
    input is a list of messages, or else the input of the last exchange this object saved (so
    keep one object per conversation). After each run,
    :meth:`save_context` queues the exchange durably and returns at once; a background worker
    asks ``llm`` to extract memories and stores them (``memory.flush()`` waits for it).
    Without ``llm`` it still recalls but never learns (a warning says so at construction).

    It raises no deprecation warning of its own; ``langchain_classic`` deprecates its chains
    and memories in favour of agents with a store (see ``HeadroomStore``).

    Setup::

        from langchain_classic.chains import ConversationChain
        from langchain_core.prompts import PromptTemplate
        from headroom_memory_integrations.langchain import HeadroomMemory

        memory = HeadroomMemory(user_id="alice", db_path="./memories", llm=model)
        prompt = PromptTemplate.from_template("{memories}\\n\\nUser: {input}\\nAssistant:")
        chain = ConversationChain(llm=model, memory=memory, prompt=prompt)

    Invoke::

        chain.invoke({"input": "I prefer Python for backend work"})
        memory.memory.flush()  # the background extraction is done
        # ... later, in another process:
        chain.invoke({"input": "Which language should I use?"})  # the prompt carries the memory

    Directly::

        memory.load_memory_variables({"input": "Which language should I use?"})
        # {'memories': '<user-memories>...- m1 (preference, noted 2026-12-01): "Prefers ...'}
        memory.save_context({"input": "..."}, {"response": "..."})  # returns immediately

    Async: ``aload_memory_variables``, ``asave_context`` and ``aclear`` run the same code in a
    worker thread.

    Args:
        user_id / db_path / storage / embedder: Whose memories, as for ``MemoryStore``.
        memory: An existing store instead.
        llm: The LangChain chat model that extracts memories in the background.
        memory_key: The prompt variable the memories fill (default ``"memories"``).
        input_key / output_key: Which input and output hold the exchange (default: the only
            one there is; among several outputs, ``"output"``, as LangChain's memories pick
            it, e.g. an ``AgentExecutor``'s answer beside its ``intermediate_steps``).
        return_messages: Return a list of messages instead of a string.
        top_k: Memories recalled at most.
        untrusted_context: The chain's prompt holds text the user did not write (retrieved
            documents), which the extraction sees in the exchange's answer: keep only memories
            grounded in the user's own words (``stats()["events"]["ungrounded_memories"]``
            counts the others). A run whose outputs show tool steps (an ``AgentExecutor``'s
            non-empty ``intermediate_steps``) or retrieved documents, or whose inputs do (a
            chain's ``input_documents``), is checked so without it; an
            ``AgentExecutor`` without ``return_intermediate_steps=True`` shows none, so pass
            it for such an agent.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    built_from: ClassVar[frozenset[str]] = BUILT_FROM | {"llm"}

    memory: MemoryStore
    llm: Any = Field(default=None, exclude=True, repr=False)  # its repr can show headers, keys
    memory_key: str = "memories"
    input_key: str | None = None
    output_key: str | None = None
    return_messages: bool = False
    top_k: int = Field(default=5, ge=1)
    untrusted_context: bool = Field(default=False, strict=True)  # never guessed from "false"

    _flow: MemoryFlow = PrivateAttr()
    _turns: OrderedDict[str, Turn] = PrivateAttr(default_factory=OrderedDict)
    _turns_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _previous: str | None = PrivateAttr(default=None)  # the last exchange's user text

    def _settings_flow(self) -> MemoryFlow | None:
        return getattr(self, "_flow", None)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        if self.llm is None:
            warnings.warn(
                "HeadroomMemory has no llm: it recalls memories but cannot learn new ones. "
                "Pass llm=<a LangChain chat model> to extract memories in the background.",
                UserWarning,
                stacklevel=2,
            )

    @model_validator(mode="before")
    @classmethod
    def _open_memory(cls, data: Any) -> Any:
        return memory_field(data)

    def model_post_init(self, context: Any) -> None:
        if self.llm is not None:
            extractor = BackgroundExtractor(chat_model_completer(self.llm))
            self._flow = build_flow(
                self.memory,
                inline=False,
                top_k=self.top_k,
                extractor=extractor,
                untrusted_context=self.untrusted_context,
            )
        else:
            # Recall only: the flow is asked for context without the instruction, and never
            # finished, so nothing is queued.
            self._flow = build_flow(
                self.memory,
                inline=True,
                top_k=self.top_k,
                untrusted_context=self.untrusted_context,
            )

    @property
    def memory_variables(self) -> list[str]:
        return [self.memory_key]

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The user's memories relevant to the run's input, under ``memory_key``."""
        text = self._text(inputs, self.input_key, "input")
        turn = self._flow.start(text, instruct=False, previous_text=self._previous_text(inputs))
        if turn.user_text is not None:
            with self._turns_lock:
                self._turns[turn.user_text] = turn
                while len(self._turns) > _PENDING_TURNS:
                    self._turns.popitem(last=False)
        context = turn.prompt or ""
        if self.return_messages:
            messages: list[BaseMessage] = [SystemMessage(context)] if context else []
            return {self.memory_key: messages}
        return {self.memory_key: context}

    def save_context(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Queue the exchange for background extraction and return (without ``llm``: nothing)."""
        user_text = self._text(inputs, self.input_key, "input").strip()
        answer = self._text(outputs, self.output_key, "output")
        untrusted = self.untrusted_context or self._ran_tools(inputs, outputs)
        with self._turns_lock:
            turn = self._turns.pop(user_text, None) or Turn(user_text=user_text or None)
            self._previous = user_text or self._previous
        if untrusted and not turn.untrusted:  # (the turn loaded before the run could not know)
            turn = replace(turn, untrusted=True)
        if self.llm is not None:
            self._flow.finish(turn, answer)

    def clear(self) -> None:
        """Start a new conversation: forget the turn in progress (the one
        :meth:`load_memory_variables` began) and the previous message, as LangChain's
        ``CombinedMemory.clear()`` and a "new chat" button expect. The user's long-term
        memories stay, as LlamaIndex's ``reset()`` keeps them: to forget the user, call
        ``memory.memory.forget_user()`` (every memory, and the user's queued turns)."""
        with self._turns_lock:
            self._turns.clear()
            self._previous = None

    async def aload_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.load_memory_variables, inputs)

    async def asave_context(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        await asyncio.to_thread(self.save_context, inputs, outputs)

    async def aclear(self) -> None:
        await asyncio.to_thread(self.clear)

    def _ran_tools(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> bool:
        """Whether the run's answer was written with text the user did not write in view: its
        outputs hold tool steps (an ``AgentExecutor``'s non-empty ``intermediate_steps``, or
        any output with tool steps, retrieved documents or tool messages:
        :func:`~._messages.holds_tool_steps`), or one of its inputs does (a chat history that
        holds them, or the documents ``load_qa_chain`` and ``StuffDocumentsChain`` take as
        ``input_documents``, beside the question); the memories this object gave the run
        are not looked at. An ``AgentExecutor`` without ``return_intermediate_steps=True``
        returns only its answer, which cannot be told from a chain's: pass
        ``untrusted_context=True``."""
        if outputs.get("intermediate_steps"):
            return True
        if any(holds_tool_steps(value) for value in outputs.values()):
            return True
        return any(holds_tool_steps(v) for k, v in inputs.items() if k != self.memory_key)

    def _previous_text(self, inputs: dict[str, Any]) -> str | None:
        """The user's message before the run's input: in a chat history given as the input,
        the user message before the latest one; otherwise the last exchange saved."""
        value = self._value(inputs, self.input_key, "input")
        if isinstance(value, list):
            earlier = [m for m in value[:-1] if isinstance(m, BaseMessage) and is_user(m)]
            return message_text(earlier[-1]) if earlier else None
        with self._turns_lock:
            return self._previous

    def _text(self, values: dict[str, Any], key: str | None, what: str) -> str:
        value = self._value(values, key, what)
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # a chat history: the latest message
            return message_text(value[-1]) if value else ""
        return message_text(value) or str(value)

    def _value(self, values: dict[str, Any], key: str | None, what: str) -> Any:
        """The input (or output) that holds the exchange: ``key``, or the only one there is."""
        if key is None:
            keys = [k for k in values if k not in (self.memory_key, "stop")]
            if what == "output" and len(keys) > 1 and "output" in keys:
                keys = ["output"]  # an AgentExecutor's answer beside its intermediate_steps
            if len(keys) != 1:
                raise ValueError(
                    f"HeadroomMemory cannot tell which {what} holds the exchange among "
                    f"{sorted(keys)}; pass {what}_key="
                )
            key = keys[0]
        elif key not in values:  # a misspelt key would recall and learn nothing, silently
            raise ValueError(
                f"HeadroomMemory's {what}_key={key!r} is not among the chain's {what}s "
                f"{sorted(values)}"
            )
        return values[key]
