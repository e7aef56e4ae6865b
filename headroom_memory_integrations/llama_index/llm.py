"""Any LlamaIndex LLM with inline memory: the model writes the memory block in its answer."""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from llama_index.core.base.llms.generic_utils import (
    achat_to_completion_decorator,
    astream_chat_to_completion_decorator,
    chat_to_completion_decorator,
    stream_chat_to_completion_decorator,
)
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
from llama_index.core.bridge.pydantic import BaseModel, PrivateAttr
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.prompts.base import BasePromptTemplate, PromptTemplate
from llama_index.core.types import TokenAsyncGen, TokenGen

from ..embeddings import Embedder
from ..engine import MemoryStore
from ..errors import InvalidInputError
from ..flow import AnswerStream, MemoryFlow, Turn, insert_before
from ..prompts import block_tags, inline_extraction_allowed
from ..storage import Storage
from ..wiring import build_flow, open_memory
from ._messages import holds_tool_results, system_message, text_of, user_index, with_text
from ._wiring import PathLike

_PROMPT_QUERIES: ContextVar[frozenset[str] | None] = ContextVar(
    "headroom_llama_index_prompt_queries", default=None
)
"""While a prompt is sent (see MemoryLLM): the ``query_str`` it was filled with; else None."""


@contextmanager
def _prompted(queries: Iterable[str] = ()) -> Generator[None, None, None]:
    """Mark the calls made inside as sending a prompt filled with the user's ``queries`` (the
    outermost prompt decides: ``predict`` of a completion model calls ``complete``)."""
    if _PROMPT_QUERIES.get() is not None:
        yield
        return
    token = _PROMPT_QUERIES.set(frozenset(q.strip() for q in queries))
    try:
        yield
    finally:
        _PROMPT_QUERIES.reset(token)


def _queries(prompt: Any, prompt_args: Mapping[str, Any]) -> list[str]:
    """The ``query_str`` (LlamaIndex's name for the user's query) a prompt template is filled
    with: given with ``prompt_args``, or bound before (a response synthesizer's
    ``partial_format``), in any template a selector may pick."""
    templates = [prompt, getattr(prompt, "default_template", None)]
    templates += [t for _, t in getattr(prompt, "conditionals", None) or []]
    bound = [getattr(t, "kwargs", None) for t in templates]
    found = [kw.get("query_str") for kw in [*bound, prompt_args] if isinstance(kw, Mapping)]
    return [query for query in found if isinstance(query, str)]


def _user_wrote(text: str) -> bool:
    """Whether the latest user message of the call being prepared is the user's own: any
    call but a prompt's, or a prompt's whose user message is exactly its ``query_str`` (the
    chat engines' final call: the user's message)."""
    queries = _PROMPT_QUERIES.get()
    return queries is None or text.strip() in queries


@dataclass
class _Call:
    """One chat call on its way through the flow: its turn and the messages to send."""

    turn: Turn
    messages: list[ChatMessage]


class MemoryLLM(FunctionCallingLLM):
    """Wraps any LlamaIndex LLM with the user's long-term memory, extracted inline.

    Before each call, the memories relevant to the latest user message and an instruction
    with a fresh nonce go in a system message just before that message. The model ends its
    answer with a memory block; the block is cut from the response (``message``, ``delta``,
    and ``raw``), from every streamed chunk (each ``delta`` and the cumulative
    ``message.content``), so it never reaches the caller, a stream, or an engine's chat
    history, and its memories are stored off the caller's path. No extra model call.

    A function-calling LLM stays one (``metadata`` is the wrapped LLM's, tool calls pass
    through), so ``FunctionAgent`` and ``AgentWorkflow`` work with it. Requests that force a
    tool call get memories but no instruction. Tool results (tool messages, and the
    "Observation: ..." messages a ``ReActAgent`` sends as user messages) are never taken for
    the user's words, and a call that holds any keeps only memories grounded in them.

    Prompts are not the user's words. ``complete`` and ``stream_complete`` (and their async
    forms) get the memories relevant to the prompt but no instruction: nothing is learnt from
    them. So do ``predict`` / ``stream`` / ``structured_predict`` (and their async forms),
    through which LlamaIndex sends its own templates (a condense prompt with the whole
    conversation, a query engine's question-answering prompt with the retrieved documents),
    unless the template's user message is exactly its ``{query_str}`` (as in the chat engines'
    final call: the user's message), which is learnt from as in ``chat``.

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

    Args:
        llm: The LLM to wrap.
        user_id: Whose memories (with ``db_path``, or ``storage`` and ``embedder``).
        db_path: Embedded Chroma folder or Chroma server URL.
        memory: An existing :class:`MemoryStore` instead of the three above.
        top_k: Memories injected at most.
        queue_path: The SQLite file of pending writes.
        untrusted_context: The application puts text the user did not write in the
            conversation (retrieved documents in a ``ContextChatEngine``, web pages): keep only
            memories grounded in the user's own words.
    """

    _llm: LLM = PrivateAttr()
    _flow: MemoryFlow = PrivateAttr()

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
        super().__init__(
            callback_manager=llm.callback_manager,
            system_prompt=llm.system_prompt,
            messages_to_prompt=llm.messages_to_prompt,
            completion_to_prompt=llm.completion_to_prompt,
            output_parser=llm.output_parser,
            pydantic_program_mode=llm.pydantic_program_mode,
            query_wrapper_prompt=llm.query_wrapper_prompt,
        )
        store = open_memory(memory, user_id, db_path, storage=storage, embedder=embedder)
        self._llm = llm
        self._flow = build_flow(
            store,
            inline=True,
            top_k=top_k,
            queue_path=queue_path,
            untrusted_context=untrusted_context,
        )

    @classmethod
    def class_name(cls) -> str:
        return "MemoryLLM"

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

    def _before(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> _Call:
        """The messages to send, with the memory prompt before the latest user message (one of
        LlamaIndex's prompts gets no instruction: see the class)."""
        sent = list(messages)
        index = user_index(sent)
        if index is None:
            return _Call(Turn(), sent)
        asked = text_of(sent[index])
        turn = self._flow.start(
            asked,
            instruct=inline_extraction_allowed(kwargs) and _user_wrote(asked),
            untrusted=holds_tool_results(sent),
        )
        if turn.prompt:
            sent = insert_before(sent, index, system_message(turn.prompt))
        return _Call(turn, sent)

    def _after(self, call: _Call, response: ChatResponse) -> ChatResponse:
        """``response`` without the memory block; its memories are queued."""
        if not call.turn.nonce:
            return response
        visible = self._flow.finish(call.turn, response.message.content)
        return response.model_copy(
            update={
                "message": with_text(response.message, visible),
                "delta": (visible or "") if response.delta is not None else None,
                "raw": _scrub(self._flow, call.turn, response.raw),
            }
        )

    def _stream(self, call: _Call) -> _StreamEditor:
        return _StreamEditor(self._flow, call.turn)

    # -- chat -----------------------------------------------------------------------------------

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._before(messages, kwargs)
        return self._after(call, self._llm.chat(call.messages, **kwargs))

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._before(messages, kwargs)
        return self._stream(call).edit(self._llm.stream_chat(call.messages, **kwargs))

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = await asyncio.to_thread(self._before, messages, kwargs)
        return self._after(call, await self._llm.achat(call.messages, **kwargs))

    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        call = await asyncio.to_thread(self._before, messages, kwargs)
        stream = await self._llm.astream_chat(call.messages, **kwargs)
        return self._stream(call).aedit(stream)

    # -- LlamaIndex's prompts: memories injected, nothing learnt ------------------------------

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        with _prompted():
            return chat_to_completion_decorator(self.chat)(prompt, **kwargs)

    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        with _prompted():
            return stream_chat_to_completion_decorator(self.stream_chat)(prompt, **kwargs)

    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        with _prompted():
            return await achat_to_completion_decorator(self.achat)(prompt, **kwargs)

    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        with _prompted():
            return await astream_chat_to_completion_decorator(self.astream_chat)(prompt, **kwargs)

    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with _prompted(_queries(prompt, prompt_args)):
            return super().predict(prompt, **prompt_args)

    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenGen:
        with _prompted(_queries(prompt, prompt_args)):
            return super().stream(prompt, **prompt_args)

    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        with _prompted(_queries(prompt, prompt_args)):
            return await super().apredict(prompt, **prompt_args)

    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenAsyncGen:
        with _prompted(_queries(prompt, prompt_args)):
            return await super().astream(prompt, **prompt_args)

    def structured_predict(
        self,
        output_cls: Any,
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        with _prompted(_queries(prompt, prompt_args)):
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)

    async def astructured_predict(
        self,
        output_cls: Any,
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        with _prompted(_queries(prompt, prompt_args)):
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)

    # -- function calling: the wrapped LLM's own, around the chat calls above -------------------

    def _function_llm(self) -> FunctionCallingLLM:
        if not isinstance(self._llm, FunctionCallingLLM):
            raise TypeError(f"{type(self._llm).__name__} is not a function-calling LLM")
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
    back. Text held back to the end comes in one last response.
    """

    def __init__(self, flow: MemoryFlow, turn: Turn) -> None:
        self._answer: AnswerStream | None = flow.stream(turn) if turn.nonce else None
        self._received = ""
        self._visible = ""
        self._last: ChatResponse | None = None

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
        return response.model_copy(
            update={
                "delta": shown,
                "message": with_text(response.message, self._visible),
                "raw": response.raw if shown == delta else None,
            }
        )

    def _end(self) -> ChatResponse | None:
        if self._answer is None:
            return None
        tail, self._answer = self._answer.finish(), None
        if not tail or self._last is None:
            return None
        self._visible += tail
        return self._last.model_copy(
            update={
                "delta": tail,
                "message": with_text(self._last.message, self._visible),
                "raw": None,
            }
        )

    def edit(self, responses: Iterable[ChatResponse]) -> Generator[ChatResponse, None, None]:
        try:
            for response in responses:
                yield self._edit(response)
            last = self._end()
            if last is not None:
                yield last
        finally:
            self._end()

    async def aedit(
        self, responses: AsyncIterator[ChatResponse]
    ) -> AsyncGenerator[ChatResponse, None]:
        try:
            async for response in responses:
                yield self._edit(response)
            last = self._end()
            if last is not None:
                yield last
        finally:
            self._end()


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
