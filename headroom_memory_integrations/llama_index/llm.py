"""Any LlamaIndex LLM with inline memory: the model writes the memory block in its answer."""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    Generator,
    Mapping,
    Sequence,
)
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr
from llama_index.core.callbacks import EventPayload
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
)
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.prompts.base import BasePromptTemplate, PromptTemplate
from llama_index.core.types import TokenAsyncGen, TokenGen

from ..embeddings import Embedder
from ..engine import MemoryStore
from ..errors import InvalidInputError
from ..flow import (
    AnswerStream,
    MemoryFlow,
    Turn,
    aedited,
    edited,
    finished_in_thread,
    insert_before,
    queued_later,
    run_queued,
    user_words,
)
from ..prompts import block_tags, inline_extraction_allowed
from ..storage import Storage
from ..wiring import FlowSettings, build_flow, open_memory
from ._callers import called_for_a_turn
from ._instrumentation import astepped, stepped, viewed
from ._messages import (
    attaches_outside_text,
    calls_tools,
    continues_a_turn,
    conversation_of,
    holds_tool_results,
    latest_user_text,
    system_message,
    text_of,
    user_index,
    user_message_holds_agent_text,
    with_text,
)
from ._wiring import PathLike, Pickled, check_saveable, reopening_location


@dataclass(frozen=True)
class _Prompt:
    """One of LlamaIndex's prompt templates, as it is sent (see MemoryLLM)."""

    queries: frozenset[str] = frozenset()  # the ``query_str`` it was filled with
    retrieved: bool = False  # it was filled with retrieved documents
    refines: bool = False  # it refines an answer written already (``existing_answer``)


_PROMPT: ContextVar[_Prompt | None] = ContextVar("headroom_llama_index_prompt", default=None)
"""While a prompt is sent (see MemoryLLM): what it was filled with; else None."""

_RETRIEVED = ("context_str", "context_msg")
"""LlamaIndex's names for the retrieved text a template is filled with: a chat engine's or a
query engine's documents (``context_str``), and the next ones its refine step adds
(``context_msg``)."""

_REFINED = "existing_answer"
"""LlamaIndex's name for the answer a refine template is filled with: the answer written so far
from the documents before ``context_msg`` (``CompactAndRefine``'s later calls, in a chat engine
and a query engine)."""


@contextmanager
def _prompted(prompt: _Prompt | None = None) -> Generator[None, None, None]:
    """Mark the calls made inside as sending ``prompt`` (the outermost prompt decides:
    ``predict`` of a completion model calls ``complete``)."""
    if _PROMPT.get() is not None:
        yield
        return
    token = _PROMPT.set(prompt or _Prompt())
    try:
        yield
    finally:
        _PROMPT.reset(token)


def _filled(prompt: Any, prompt_args: Mapping[str, Any]) -> _Prompt:
    """What a prompt template is filled with, given with ``prompt_args`` or bound before (a
    response synthesizer's ``partial_format``), in any template a selector may pick: the
    ``query_str`` (LlamaIndex's name for the user's query), whether retrieved documents
    (``context_str``, ``context_msg``), and whether an answer to refine (``existing_answer``)."""
    templates = [prompt, getattr(prompt, "default_template", None)]
    templates += [t for _, t in getattr(prompt, "conditionals", None) or []]
    bound = [getattr(t, "kwargs", None) for t in templates]
    filled = [kw for kw in [*bound, prompt_args] if isinstance(kw, Mapping)]
    queries = [kw.get("query_str") for kw in filled]
    return _Prompt(
        queries=frozenset(q.strip() for q in queries if isinstance(q, str)),
        retrieved=any(kw.get(name) for kw in filled for name in _RETRIEVED),
        refines=any(_REFINED in kw for kw in filled),
    )


def _for_a_turn() -> bool:
    """Whether the chat call being made sends the user's turn, by who made it (see
    ``_callers``: a chat engine, an agent or the application, and not another of LlamaIndex's
    components with a prompt of its own); a prompt sent through ``_prompted`` is judged by
    ``_user_wrote``. Called in the ``MemoryLLM`` method that LlamaIndex's code calls."""
    return _PROMPT.get() is not None or called_for_a_turn()


def _user_wrote(text: str, for_a_turn: bool) -> bool:
    """Whether the latest user message of the call being prepared is the user's own: a call
    made ``for_a_turn`` (see ``_for_a_turn``) but not sending a prompt, or a prompt's whose user
    message is exactly its ``query_str`` (the chat engines' final call: the user's message)."""
    prompt = _PROMPT.get()
    return for_a_turn if prompt is None else text.strip() in prompt.queries


def _retrieved() -> bool:
    """Whether the call being prepared sends a prompt filled with retrieved documents (a
    ``ContextChatEngine``'s or ``CondensePlusContextChatEngine``'s final call)."""
    prompt = _PROMPT.get()
    return prompt is not None and prompt.retrieved


def _refines() -> bool:
    """Whether the call being prepared sends a prompt that refines an answer already written
    (a later call of the turn whose first call wrote it)."""
    prompt = _PROMPT.get()
    return prompt is not None and prompt.refines


_SAVED = ("user_id", "db_path", "top_k", "untrusted_context")
"""What :meth:`MemoryLLM.to_dict` saves that :meth:`MemoryLLM.from_dict` reads back."""


@dataclass
class _Call:
    """One chat call on its way through the flow: its turn and the messages to send."""

    turn: Turn
    messages: list[ChatMessage]
    answered: tuple[ChatResponse, ChatResponse] | None = None  # (as received, as returned)
    cut: bool = False  # the block was cut (and its memories queued) from the completion


class MemoryLLM(FlowSettings, Pickled, LLM):
    """Wraps any LlamaIndex LLM with the user's long-term memory, extracted inline.

    Before each call, the memories relevant to the latest user message and an instruction
    with a fresh nonce go in a system message just before that message. The model ends its
    answer with a memory block; the block is cut from the response (``message``, ``delta``,
    and ``raw``), from every streamed chunk (each ``delta`` and the cumulative
    ``message.content``), so it never reaches the caller, a stream, or an engine's chat
    history, and its memories are stored off the caller's path. No extra model call. A turn
    is learnt from once: a later call of it (an agent's step after its tool calls, whose
    results follow the user's message; a chat engine's refine call, filled with
    ``existing_answer``) gets the memories its first call got (not what the model wrote in
    that call's block, which it would take for a memory from an earlier conversation), and no
    instruction once an earlier call's answer carried the block (not after a bare tool call):
    ``MemoryFlow.start``'s ``later_step``, as for ``HeadroomMemoryBlock``.

    A function-calling LLM stays one (``metadata`` is the wrapped LLM's, tool calls pass
    through), so ``FunctionAgent`` and ``AgentWorkflow`` work with it: ``MemoryLLM(llm=...)``
    is then a :class:`FunctionCallingMemoryLLM`. Any other LLM does not become one
    (``CodeActAgent`` and LlamaIndex's programs treat it as they treat the LLM). Requests whose
    answer must be machine-readable or is not plain text (a forced tool call, a JSON
    ``response_format``, log probabilities: in the call's arguments or set on the wrapped LLM,
    as its ``additional_kwargs`` or ``logprobs``) get memories but no instruction. Tool
    results (tool messages, the "Observation: ..." messages a ``ReActAgent`` sends as user
    messages, and the output of the code a ``CodeActAgent`` runs, sent so too), ReAct's
    retry prompts and the state an agent sends around the user's message (LlamaIndex's default
    ``state_prompt``: only its ``msg`` part is the user's) are never taken for the user's
    words, and a call that holds any keeps only memories grounded in them. So does a call
    whose messages attach a document, an image or a video (``DocumentBlock``, ``ImageBlock``,
    ``VideoBlock``, ``CitableBlock``), and one that sends a LlamaIndex template filled with
    retrieved documents (``context_str``, ``context_msg``: the final call of
    ``ContextChatEngine`` and ``CondensePlusContextChatEngine``).

    The wrapped LLM's instrumentation events and spans, and its ``callback_manager``'s
    handlers, get what they got before, with the block cut from the answers in them (see
    ``_instrumentation``). A ``callback_manager`` set on it later (LlamaIndex sets
    ``Settings.callback_manager`` on ``Settings.llm``) is set on the wrapped LLM too.

    Prompts are not the user's words. ``complete`` and ``stream_complete`` (and their async
    forms) get the memories relevant to the prompt but no instruction: nothing is learnt from
    them. So do ``predict`` / ``stream`` / ``structured_predict`` /
    ``stream_structured_predict`` (and their async forms), through which LlamaIndex sends
    its own templates (a condense prompt with the whole
    conversation, a query engine's question-answering prompt with the retrieved documents),
    unless the template's user message is exactly its ``{query_str}`` (as in the chat engines'
    final call: the user's message), which is learnt from as in ``chat``. A completion is the
    wrapped LLM's own, with the memories before the prompt: it formats the prompt as it would
    (unless ``formatted``) and emits its own completion events.

    A ``chat`` call (sync, async or streamed) is the user's turn only when a chat engine, an
    agent or the application makes it (see ``_callers``). LlamaIndex's other components that
    call ``chat`` themselves send a prompt of their own in the user message (a program's
    template with a document, ``DocumentContextExtractor``'s document, ``RankGPTRerank``'s
    passages, ``ChatSummaryMemoryBuffer``'s transcript, ``FactExtractionMemoryBlock``'s prompt):
    their calls get memories but no instruction, as a prompt does.

    Setup::

        from llama_index.llms.openai_like import OpenAILike
        from headroom_memory_integrations.llama_index import MemoryLLM

        llm = MemoryLLM(llm=OpenAILike(model="gpt-4o-mini", is_chat_model=True,
                                       is_function_calling_model=True),
                        user_id="alice", db_path="./memories")

    Invoke::

        llm.chat([ChatMessage(role="user", content="I prefer Python for backend work")])
        llm.memory.flush()  # optional: wait until the memories are stored
        # ... in a new process:
        llm.chat([ChatMessage(role="user", content="Which language should I use?")])

    Stream and async::

        for chunk in llm.stream_chat(messages):
            print(chunk.delta, end="")  # never any part of the block
        await llm.achat(messages)
        SimpleChatEngine.from_defaults(llm=llm).chat("...")
        await FunctionAgent(llm=llm, tools=[...]).run("...")

    Serialized (``to_dict``, ``to_json``), it writes its memory settings (``user_id``,
    ``db_path`` as the memories' absolute folder or server URL, ``top_k``,
    ``untrusted_context``) and never the wrapped LLM, which may hold an API key: pass it again
    to ``from_dict`` / ``from_json`` as ``llm=`` (default: ``Settings.llm``). Pickled, it
    holds the same settings, ``queue_path`` and the wrapped LLM (as LlamaIndex pickles it,
    with any API key in it), and comes back on the same memories.

    Args:
        llm: The LLM to wrap.
        user_id: Whose memories (with ``db_path``, or ``storage`` and ``embedder``).
        db_path: Embedded Chroma folder or Chroma server URL.
        memory: An existing :class:`MemoryStore` instead of the three above.
        top_k: Memories injected at most.
        queue_path: The SQLite file of pending writes.
        untrusted_context: The application puts text the user did not write in the
            conversation (web pages, documents in a system prompt of its own): keep only
            memories grounded in the user's own words (a chat engine's retrieved documents are
            recognised without it).
    """

    user_id: str = Field(description="Whose memories.")
    db_path: str | None = Field(
        default=None, description="The memories' absolute folder or Chroma server URL."
    )
    top_k: int = Field(default=5, description="Memories injected at most.")
    untrusted_context: bool = Field(
        default=False,
        strict=True,  # a security setting is True or False, never guessed from "false"
        description="Keep only memories grounded in the user's own words.",
    )

    _llm: LLM = PrivateAttr()
    _flow: MemoryFlow = PrivateAttr()
    _unsaveable: str | None = PrivateAttr(default=None)  # why to_dict cannot save the store
    _queue_path: PathLike | None = PrivateAttr(default=None)

    def _settings_flow(self) -> MemoryFlow | None:
        return getattr(self, "_flow", None)

    def __init__(
        self,
        llm: LLM,
        user_id: str | None = None,
        db_path: PathLike | None = None,
        *,
        memory: MemoryStore | None = None,
        storage: Storage | None = None,
        embedder: Embedder | None = None,
        top_k: int = 5,
        queue_path: PathLike | None = None,
        untrusted_context: bool = False,
    ) -> None:
        if not isinstance(llm, LLM):
            raise InvalidInputError(f"llm must be a LlamaIndex LLM, got {type(llm).__name__}")
        if isinstance(llm, MemoryLLM):
            raise InvalidInputError("this LLM already has memory")
        if isinstance(self, FunctionCallingLLM) and not isinstance(llm, FunctionCallingLLM):
            raise InvalidInputError(f"{type(llm).__name__} is not a function-calling LLM")
        store = open_memory(memory, user_id, db_path, storage=storage, embedder=embedder)
        location, unsaveable = reopening_location(store)
        own: dict[str, Any] = {  # this class's fields (LLM's are typed for static checkers)
            "user_id": store.user_id,
            "db_path": location,
            "top_k": top_k,
            "untrusted_context": untrusted_context,
        }
        super().__init__(
            **own,
            callback_manager=llm.callback_manager,
            system_prompt=llm.system_prompt,
            messages_to_prompt=llm.messages_to_prompt,
            completion_to_prompt=llm.completion_to_prompt,
            output_parser=llm.output_parser,
            pydantic_program_mode=llm.pydantic_program_mode,
            query_wrapper_prompt=llm.query_wrapper_prompt,
        )
        self._llm = llm
        self._flow = build_flow(  # untrusted_context as validated (top_k: the core's check)
            store,
            inline=True,
            top_k=top_k,
            queue_path=queue_path,
            untrusted_context=self.untrusted_context,
        )
        self._unsaveable = unsaveable
        self._queue_path = queue_path

    def __new__(cls, llm: Any = None, *args: Any, **kwargs: Any) -> MemoryLLM:
        # a function-calling LLM stays one, and another does not become one (see the class)
        if cls is MemoryLLM and isinstance(llm, FunctionCallingLLM):
            cls = FunctionCallingMemoryLLM
        return super().__new__(cls)

    @classmethod
    def class_name(cls) -> str:
        return "MemoryLLM"

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The memory settings (``user_id``, ``db_path`` as the memories' absolute folder or
        server URL, ``top_k``, ``untrusted_context``) and LlamaIndex's own LLM fields; never
        the wrapped LLM (it may hold an API key) nor a client.

        Raises:
            InvalidInputError: restored, it would not find its memories (a custom embedder or
                storage object, a store with non-default options: see :meth:`from_dict`).
        """
        check_saveable(self)
        return super().to_dict(**kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> MemoryLLM:
        """Rebuild from :meth:`to_dict`, wrapping ``llm=`` (default: ``Settings.llm``); the
        other ``kwargs`` (``queue_path=``, ``embedder=``, ``memory=``, ...) are added.

        Raises:
            InvalidInputError: no ``llm=`` and no ``Settings.llm``.
        """
        settings: dict[str, Any] = {key: data[key] for key in _SAVED if key in data}
        settings.update(kwargs)
        if kwargs.get("memory") is not None or kwargs.get("storage") is not None:
            settings.pop("db_path", None)
        llm = settings.pop("llm", None)
        if llm is None:
            from llama_index.core import Settings

            try:
                llm = Settings.llm
            except Exception as exc:  # no default LLM installed or configured
                raise InvalidInputError(
                    "MemoryLLM.from_dict needs the LLM to wrap: pass llm= (or set Settings.llm)"
                ) from exc
        owner = MemoryLLM if cls is FunctionCallingMemoryLLM else cls  # it picks (see __new__)
        return owner(llm=llm, **settings)

    def _reopening_arguments(self) -> dict[str, Any]:
        """What a pickle holds (see ``Pickled``): the memory settings, ``queue_path`` and the
        wrapped LLM, pickled as LlamaIndex pickles it (an API key it holds included)."""
        settings = {key: getattr(self, key) for key in _SAVED}
        return {**settings, "llm": self._llm, "queue_path": self._queue_path}

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        wrapped = getattr(self, "_llm", None)
        if name == "callback_manager" and wrapped is not None:
            # LlamaIndex gives its LLM a callback manager (Settings.llm, a query engine's
            # synthesizer): the wrapped LLM is the one that emits the LLM's callbacks
            wrapped.callback_manager = value

    @property
    def wrapped_llm(self) -> LLM:
        """The LLM this one wraps (calls made on it carry no memory)."""
        return self._llm

    @property
    def memory(self) -> MemoryStore:
        """The user's long-term memories (search, add, get_all, clear, flush, stats, ...)."""
        return self._flow.memory

    @property
    def metadata(self) -> LLMMetadata:
        return self._llm.metadata

    # -- the translation: messages in, responses out -------------------------------------------

    def _before(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], for_a_turn: bool
    ) -> _Call:
        """The messages to send, with the memory prompt before the latest user message (one of
        LlamaIndex's prompts, and a call not made ``for_a_turn``, get no instruction: see the
        class)."""
        sent = list(messages)
        index = user_index(sent)
        if index is None:
            return _Call(Turn(), sent)
        asked = text_of(sent[index])
        users_own = _user_wrote(asked, for_a_turn)
        turn = self._flow.start(
            user_words(asked),
            previous_text=latest_user_text(sent[:index]),
            instruct=inline_extraction_allowed(kwargs)
            and inline_extraction_allowed(self._own_options())
            and users_own,
            untrusted=holds_tool_results(sent)
            or attaches_outside_text(sent)
            or user_message_holds_agent_text(sent)
            or _retrieved(),
            later_step=continues_a_turn(sent) or _refines(),
            conversation=conversation_of(sent),
            begins_turn=users_own,
        )
        if turn.prompt:
            sent = insert_before(sent, index, system_message(turn.prompt))
        return _Call(turn, sent)

    def _own_options(self) -> dict[str, Any]:
        """The request options the wrapped LLM adds to every call: LlamaIndex's
        ``additional_kwargs`` (such as a JSON ``response_format``), and ``logprobs`` when its
        switch is on (the OpenAI LLMs send ``top_logprobs`` only then). Checked apart from the
        call's own: which of the two wins differs between LLMs (the OpenAI LLMs send their
        ``additional_kwargs`` over the call's), so either may forbid the instruction."""
        own = getattr(self._llm, "additional_kwargs", None)
        options = dict(own) if isinstance(own, Mapping) else {}
        if getattr(self._llm, "logprobs", None) is True:
            options["logprobs"] = True
        return options

    def _after(self, call: _Call, response: ChatResponse) -> ChatResponse:
        """``response`` without the memory block; its memories are queued."""
        if not call.turn.nonce:
            return response
        visible = response.message.content
        if not call.cut:  # (else cut at its completion's event already: see _Events)
            visible = self._flow.finish(call.turn, visible)
        return response.model_copy(
            update={
                "message": with_text(response.message, visible),
                "delta": (visible or "") if response.delta is not None else None,
                "raw": _scrub(self._flow, call.turn, response.raw),
            }
        )

    def _answer(self, call: _Call, response: ChatResponse) -> ChatResponse:
        """:meth:`_after`, once per response (its event may have asked first: see _Events)."""
        if call.answered is not None and call.answered[0] is response:
            return call.answered[1]
        edited = self._after(call, response)
        call.answered = (response, edited)
        return edited

    def _stream(self, call: _Call) -> _StreamEditor:
        return _StreamEditor(self._flow, call.turn)

    def _viewed(self, events: _Events) -> AbstractContextManager[None]:
        return viewed(events, self._llm.callback_manager)

    # -- chat -----------------------------------------------------------------------------------

    # The wrapped LLM's calls run under an _Events view: the instrumentation events they emit
    # show handlers the answer without its block (see _instrumentation).

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._before(messages, kwargs, _for_a_turn())
        with self._viewed(_Events(self, call)):
            response = self._llm.chat(call.messages, **kwargs)
        return self._answer(call, response)

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._before(messages, kwargs, _for_a_turn())
        events = _Events(self, call)
        with self._viewed(events):
            stream = self._llm.stream_chat(call.messages, **kwargs)
        responses = stepped(iter(stream), lambda: self._viewed(events))
        return edited(responses, self._stream(call), finish_on_error=True)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = await asyncio.to_thread(self._before, messages, kwargs, _for_a_turn())
        # its end event may finish the answer (see _Events): its memory work waits for below
        with self._viewed(_Events(self, call)), queued_later() as later:
            response = await self._llm.achat(call.messages, **kwargs)
        await run_queued(later)
        return await finished_in_thread(self._answer, call, response)

    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        call = await asyncio.to_thread(self._before, messages, kwargs, _for_a_turn())
        events = _Events(self, call)
        with self._viewed(events):
            stream = await self._llm.astream_chat(call.messages, **kwargs)
        responses = astepped(stream, lambda: self._viewed(events))
        return aedited(responses, self._stream(call), finish_on_error=True, end_in_thread=True)

    # -- LlamaIndex's prompts: memories injected, nothing learnt ------------------------------

    # The wrapped LLM's own completion calls, with the memories before the prompt: it formats
    # the prompt as it always does (unless ``formatted``) and emits its completion events.

    def _before_prompt(self, prompt: str, kwargs: dict[str, Any]) -> tuple[_Call, str]:
        """The call for ``prompt``, one of LlamaIndex's prompts (as a user message: see
        :meth:`_before`), and the prompt to send: ``prompt``, after what a chat call would get
        in its system message, if anything."""
        with _prompted():
            call = self._before([ChatMessage(role="user", content=prompt)], kwargs, _for_a_turn())
        return call, prompt if call.turn.prompt is None else f"{call.turn.prompt}\n\n{prompt}"

    def _completed(self, call: _Call, response: CompletionResponse) -> CompletionResponse:
        """``response`` without the memory block, cut once: its end event may have cut it in
        place already (a completion's, or the chat's of an LLM whose ``complete`` calls its
        ``chat``: see _Events)."""
        if not call.turn.nonce or call.cut or call.answered is not None:
            return response
        return _as_completion(response, self._answer(call, _as_chat(response)))

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call, text = self._before_prompt(prompt, kwargs)
        with self._viewed(_Events(self, call)):
            response = self._llm.complete(text, formatted=formatted, **kwargs)
        return self._completed(call, response)

    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        call, text = self._before_prompt(prompt, kwargs)
        events = _Events(self, call)
        with self._viewed(events):
            stream = self._llm.stream_complete(text, formatted=formatted, **kwargs)
        responses = stepped(iter(stream), lambda: self._viewed(events))
        return edited(responses, _CompletionStream(self._stream(call)), finish_on_error=True)

    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        call, text = await asyncio.to_thread(self._before_prompt, prompt, kwargs)
        with self._viewed(_Events(self, call)), queued_later() as later:
            response = await self._llm.acomplete(text, formatted=formatted, **kwargs)
        await run_queued(later)
        return await finished_in_thread(self._completed, call, response)

    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        call, text = await asyncio.to_thread(self._before_prompt, prompt, kwargs)
        events = _Events(self, call)
        with self._viewed(events):
            stream = await self._llm.astream_complete(text, formatted=formatted, **kwargs)
        responses = astepped(stream, lambda: self._viewed(events))
        editor = _CompletionStream(self._stream(call))
        return aedited(responses, editor, finish_on_error=True, end_in_thread=True)

    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with _prompted(_filled(prompt, prompt_args)):
            return super().predict(prompt, **prompt_args)

    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenGen:
        with _prompted(_filled(prompt, prompt_args)):
            return super().stream(prompt, **prompt_args)

    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with _prompted(_filled(prompt, prompt_args)):
            return await super().apredict(prompt, **prompt_args)

    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenAsyncGen:
        with _prompted(_filled(prompt, prompt_args)):
            return await super().astream(prompt, **prompt_args)

    def structured_predict(
        self,
        output_cls: Any,
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        with _prompted(_filled(prompt, prompt_args)):
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)

    def stream_structured_predict(
        self,
        output_cls: Any,
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Generator[Any, None, None]:
        # a generator: the calls are made while it is iterated, so each step is the prompt's
        filled = _filled(prompt, prompt_args)
        stream = super().stream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        return stepped(stream, lambda: _prompted(filled))

    async def astream_structured_predict(
        self,
        output_cls: Any,
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncGenerator[Any, None]:
        filled = _filled(prompt, prompt_args)
        with _prompted(filled):
            stream = await super().astream_structured_predict(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
        return astepped(stream, lambda: _prompted(filled))

    async def astructured_predict(
        self,
        output_cls: Any,
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        with _prompted(_filled(prompt, prompt_args)):
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)


class FunctionCallingMemoryLLM(MemoryLLM, FunctionCallingLLM):
    """The :class:`MemoryLLM` of a function-calling LLM: ``MemoryLLM(llm=...)`` is one when
    the LLM it wraps is a ``FunctionCallingLLM``. Its function calling is the wrapped LLM's
    own, around the chat calls of :class:`MemoryLLM`."""

    def _function_llm(self) -> FunctionCallingLLM:
        assert isinstance(self._llm, FunctionCallingLLM)  # checked in MemoryLLM.__init__
        return self._llm

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return self._function_llm()._prepare_chat_with_tools_compat(
            tools,
            user_msg=user_msg,
            chat_history=chat_history,
            verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls,
            tool_required=tool_required,
            **kwargs,
        )

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[Any],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        return self._function_llm()._validate_chat_with_tools_response(
            response, tools, allow_parallel_tool_calls=allow_parallel_tool_calls, **kwargs
        )

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        return self._function_llm().get_tool_calls_from_response(
            response, error_on_no_tool_call=error_on_no_tool_call, **kwargs
        )


class _StreamEditor:
    """Streamed chat responses with the block cut out, for sync and async streams alike.

    Each response's ``delta`` is what the flow's :class:`AnswerStream` lets through, its
    ``message.content`` the sum of those, and its ``raw`` is dropped where text was held
    back, and has the block cut from its texts once the block has begun. Text held back to
    the end comes in one last response.
    """

    def __init__(self, flow: MemoryFlow, turn: Turn, *, remember: bool = True) -> None:
        self._answer: AnswerStream | None = (
            flow.stream(turn, remember=remember) if turn.nonce else None
        )
        self._flow, self._turn = flow, turn
        self._open_tag = block_tags(turn.nonce)[0] if turn.nonce else None
        self._block_begun = False  # the opening tag has come in the text received
        self._received = ""
        self._visible = ""
        self._last: ChatResponse | None = None
        self._shown: ChatResponse | None = None
        self._closing: ChatResponse | None = None

    def step(self, response: ChatResponse) -> ChatResponse:
        """``response``, the next streamed one, as the caller gets it."""
        self._shown = self._edit(response)
        return self._shown

    def final(self) -> ChatResponse | None:
        """The stream is over: its last response, with the whole visible answer."""
        return self._end() or self._shown

    def _edit(self, response: ChatResponse) -> ChatResponse:
        self._last = response
        if self._answer is None:
            return response
        delta = response.delta
        if delta is None:  # some LLMs send only the cumulative message
            content = response.message.content or ""
            delta = content[len(self._received) :] if content.startswith(self._received) else ""
        self._received += delta
        shown = self._answer.feed(delta)
        self._visible += shown
        if not self._block_begun and self._open_tag:  # only the text just added can begin it
            tail = self._received[-(len(delta) + len(self._open_tag)) :]
            self._block_begun = self._open_tag in tail
        raw = response.raw if shown == delta else None
        if raw is not None and self._block_begun:
            # once the block has begun, a provider's event may carry the whole text so far (the
            # Responses API's text.done, output_item.done and completed events)
            raw = _scrub(self._flow, self._turn, raw)
        return response.model_copy(
            update={
                "delta": shown,
                "message": with_text(response.message, self._visible),
                "raw": raw,
            }
        )

    def _end(self) -> ChatResponse | None:
        """Finish the answer (once); the response with the text held back to the end, if any."""
        if self._answer is None:
            return self._closing
        tool_call = self._last is not None and calls_tools(self._last.message)
        tail, self._answer = self._answer.finish(tool_call=tool_call), None
        if not tail or self._last is None:
            return None
        self._visible += tail
        self._closing = self._last.model_copy(
            update={
                "delta": tail,
                "message": with_text(self._last.message, self._visible),
                "raw": None,
            }
        )
        return self._closing

    # As the core's ItemEditor, for the caller's stream (see flow.edited):

    def edit(self, response: ChatResponse) -> list[ChatResponse]:
        return [self._edit(response)]

    def end(self) -> list[ChatResponse]:
        last = self._end()
        return [] if last is None else [last]

    def abandon(self) -> None:
        """The caller left the stream before its end: :meth:`end` is never called, so the
        answer is not finished (nothing queued, nothing counted)."""


class _CompletionStream:
    """A stream of completions with the block cut out, through a :class:`_StreamEditor` of
    their chat form (as the core's ItemEditor, for the caller's stream: see flow.edited)."""

    def __init__(self, chats: _StreamEditor) -> None:
        self._chats = chats
        self._last: CompletionResponse | None = None

    def edit(self, response: CompletionResponse) -> list[CompletionResponse]:
        self._last, chat = response, _as_chat(response)
        shown = self._chats.edit(chat)
        return [response if one is chat else _as_completion(response, one) for one in shown]

    def end(self) -> list[CompletionResponse]:
        last, tail = self._last, self._chats.end()
        return [_as_completion(last, shown) for shown in tail] if last is not None else []

    def abandon(self) -> None:
        self._chats.abandon()


class _Events:
    """The wrapped LLM's instrumentation events during one call, as handlers may see them:
    each answer as the caller gets it, the memory block cut out (see ``_instrumentation``).

    A whole answer is edited in place at its end (``LLMChatEndEvent``, or the
    ``LLMCompletionEndEvent`` of a completion model, whose ``chat`` then makes its chat answer
    from the edited one): the same object is the result of the wrapped LLM's span, and the
    answer ``MemoryLLM`` gets back; its memories are queued once, there. Streamed answers
    (``...InProgressEvent``) are shown through editors of their own that store nothing, one
    per kind of event (a completion model's ``stream_chat`` emits both for each piece), and
    their end event shows the whole visible answer. The handlers of LlamaIndex's older
    ``CallbackManager`` get the answer first, in their ``on_event_end`` payload: it is edited
    there the same way.
    """

    def __init__(self, llm: MemoryLLM, call: _Call) -> None:
        self._llm = llm
        self._call = call
        self._streams: dict[str, _StreamEditor] = {}
        self._pieces: dict[str, tuple[Any, ChatResponse]] = {}  # kind -> (piece, as shown)
        self._edited: set[str] = set()  # the events edited (the editor is on two dispatchers)

    def _piece(self, kind: str, piece: Any, as_chat: ChatResponse) -> ChatResponse:
        """The streamed ``piece`` as shown; a piece shown already (LLMs whose async stream
        wraps their sync one emit each piece's event twice) is not fed twice."""
        last = self._pieces.get(kind)
        if last is not None and last[0] is piece:
            return last[1]
        if kind not in self._streams:
            self._streams[kind] = _StreamEditor(self._llm._flow, self._call.turn, remember=False)
        shown = self._streams[kind].step(as_chat)
        self._pieces[kind] = (piece, shown)
        return shown

    def show(self, event: BaseEvent) -> None:
        if not self._call.turn.nonce or event.id_ in self._edited:
            return
        self._edited.add(event.id_)
        if isinstance(event, LLMChatInProgressEvent):
            event.response = self._piece("chat", event.response, event.response)
        elif isinstance(event, LLMCompletionInProgressEvent):
            shown = self._piece("completion", event.response, _as_chat(event.response))
            event.response = _as_completion(event.response, shown)
        elif isinstance(event, LLMChatEndEvent) and event.response is not None:
            event.response = self._whole_chat(event.response)
        elif isinstance(event, LLMCompletionEndEvent):
            event.response = self._whole_completion(event.response)

    def show_payload(self, payload: dict[str, Any]) -> None:
        if not self._call.turn.nonce:
            return
        for key in (EventPayload.RESPONSE, EventPayload.COMPLETION):
            answer = payload.get(key)
            if isinstance(answer, ChatResponse):
                payload[key] = self._whole_chat(answer)
            elif isinstance(answer, CompletionResponse):
                payload[key] = self._whole_completion(answer)

    # A whole answer (an end event's, or the payload of a CallbackManager handler's
    # on_event_end) as the caller gets it:

    def _whole_chat(self, response: ChatResponse) -> ChatResponse:
        if "chat" in self._streams:
            return self._streams["chat"].final() or response
        edited = self._llm._answer(self._call, response)
        if edited is not response:
            for name in ("message", "delta", "raw"):
                setattr(response, name, getattr(edited, name))
        return response

    def _whole_completion(self, response: CompletionResponse) -> CompletionResponse:
        if "completion" in self._streams:
            final = self._streams["completion"].final()
            return response if final is None else _as_completion(response, final)
        call, flow = self._call, self._llm._flow
        if call.answered is None and not call.cut:
            call.cut = True
            response.text = flow.finish(call.turn, response.text) or ""
            response.raw = _scrub(flow, call.turn, response.raw)
        return response


def _as_chat(response: CompletionResponse) -> ChatResponse:
    message = ChatMessage(role="assistant", content=response.text)
    return ChatResponse(message=message, delta=response.delta, raw=response.raw)


def _as_completion(response: CompletionResponse, shown: ChatResponse) -> CompletionResponse:
    """``response`` with the text, delta and raw of ``shown`` (its edited chat form)."""
    return response.model_copy(
        update={"text": shown.message.content or "", "delta": shown.delta, "raw": shown.raw}
    )


def _scrub(flow: MemoryFlow, turn: Turn, raw: Any) -> Any:
    """``raw`` (a provider's response: models, dicts, lists, text) with the block cut from
    every text in it; an object of another kind that shows the block is dropped (None)."""
    assert turn.nonce is not None
    open_tag = block_tags(turn.nonce)[0]

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return flow.strip(turn, value) if open_tag in value else value
        if isinstance(value, dict):
            return {key: scrub(item) for key, item in value.items()}
        if type(value) in (list, tuple):
            return type(value)(scrub(item) for item in value)
        if isinstance(value, BaseModel):
            fields = {name: scrub(getattr(value, name)) for name in type(value).model_fields}
            extra = {k: scrub(v) for k, v in (value.model_extra or {}).items()}
            return value.model_copy(update={**fields, **extra})
        if value is None or isinstance(value, (int, float, bool)):
            return value
        return None if open_tag in repr(value) else value

    return scrub(raw)
