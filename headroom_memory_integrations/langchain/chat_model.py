"""``MemoryChatModel``: any LangChain chat model, with one user's long-term memory."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.load import dumpd
from langchain_core.load.serializable import to_json_not_implemented
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableConfig,
    RunnableSerializable,
)
from langchain_core.runnables.utils import AnyConfigurableField
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator
from typing_extensions import Self

from ..engine import DEFAULT_DUPLICATE_THRESHOLD, DEFAULT_MIN_SCORE, MemoryStore, validate_user_id
from ..errors import InvalidInputError
from ..flow import MemoryFlow, Turn, aedited, edited, finished_in_thread
from ..wiring import FlowSettings, build_flow, open_memory, reopening_arguments
from ._messages import Call, ChunkEditor, Injection, MessagesFlow, as_chunk, is_harness_call
from ._users import check_call_user

_MODEL_SETTINGS = ("temperature", "max_tokens")
"""Settings the wrapped model reads on every call: set on a copy of a model instance."""

_CLIENT_SETTINGS = ("timeout", "max_retries", "api_key", "base_url")
"""Settings built into a model's client: only for a model built from its name."""


_MEMORY_SETTINGS = frozenset(
    {
        "user_id",
        "db_path",
        "storage",
        "embedder",
        "memory",
        "queue_path",
        "top_k",
        "min_score",
        "duplicate_threshold",
        "injection",
        "untrusted_context",
        "cache",
    }
)
"""The fields the memory and its flow are built from, once, when the model is made."""


class MemoryChatModel(FlowSettings, BaseChatModel):
    """A LangChain chat model with one user's long-term memory.

    It wraps any chat model (``ChatOpenAI``, ``ChatAnthropic``, ``ChatOllama``, a fake, ...).
    Before each call, the user's relevant memories go in a system message just before the
    latest ``HumanMessage``, with an instruction to end the answer with a memory block (a fresh
    nonce every call). The block is cut from the answer, streamed or not, before anything sees
    it (the caller, callbacks, tracers, LangGraph streams, the message history), and its
    memories are stored off the call's path. No extra model call: the same inline extraction as
    ``with_fast_memory``, through the same core.

    Setup:
        .. code-block:: bash

            pip install '.[langchain]' langchain-openai

    Instantiate:
        .. code-block:: python

            from langchain_openai import ChatOpenAI
            from headroom_memory_integrations.langchain import MemoryChatModel

            chat = MemoryChatModel(
                model=ChatOpenAI(model="gpt-4o-mini"),
                user_id="alice",
                db_path="./memories",  # or storage=..., embedder=..., or memory=MemoryStore(...)
            )
            # or from a name, the standard settings handed to the model it builds:
            chat = MemoryChatModel(
                model="openai:gpt-4o-mini", temperature=0, timeout=30, user_id="alice"
            )

    Invoke:
        .. code-block:: python

            chat.invoke("I'm vegetarian and I live in Lyon.")
            # AIMessage(content="Noted! ...")  -- no memory block in it
            chat.memory.flush()  # only to wait for the store in a script; apps need not
            chat.invoke("Suggest a dinner place nearby.").content
            # 'In Lyon, try ... (vegetarian-friendly)'

    Stream:
        .. code-block:: python

            for chunk in chat.stream("What should I cook tonight?"):
                print(chunk.text, end="")  # the block never shows, not even in part

    Async:
        .. code-block:: python

            await chat.ainvoke("...")
            async for chunk in chat.astream("..."):
                ...

    Tools, structured output, chains, agents:
        .. code-block:: python

            chat.bind_tools([get_weather]).invoke("Weather where I live?")
            chat.with_structured_output(Recipe).invoke("A recipe for me")  # no block asked
            (prompt | chat | StrOutputParser()).invoke({...})
            create_agent(chat, tools=[get_weather]).invoke({"messages": [...]})

    Save and load (LangChain's own serialization):
        .. code-block:: python

            from langchain_core.load import dumps, loads

            saved = dumps(chat)  # the wrapped model, user_id, db_path, top_k, ...; no API key
            chat = loads(
                saved,
                allowed_objects=[MemoryChatModel, ChatOpenAI],  # the classes in the dump
                valid_namespaces=["headroom_memory_integrations"],
                secrets_from_env=True,  # or secrets_map={"OPENAI_API_KEY": ...}
            )  # the same user's memories, in this process or another

        A dump names a user and where their memories are: load only dumps you trust (as
        LangChain says of every dump). A store passed as ``memory=`` or ``storage=`` is saved as
        its folder or server URL (never a server's headers); a store that no ``db_path`` can
        reopen (a Chroma client built by hand, an embedder other than the default), or a
        wrapped model that LangChain cannot serialize, makes ``dumpd`` raise
        :class:`~headroom_memory_integrations.errors.InvalidInputError` saying what to do.

    For agents serving many users, see :class:`~.middleware.MemoryMiddleware`.

    The wrapped model is called through its own ``_generate`` / ``_stream`` (and async twins)
    inside this model's run, so a call is traced once, as this model, with the caller's
    messages and the visible answer. This model takes the wrapped model's ``callbacks``,
    ``tags``, ``metadata`` and ``verbose`` (those you do not set on it yourself), so its
    handlers and tracing tags see every call, once, without the memory block. Its cache is
    never used. A call the agent harness makes for its own work (its run's metadata has an
    ``lc_source``: ``SummarizationMiddleware``'s summary, a tool selection, a background
    extraction) goes to the wrapped model untouched: no memories, no block, nothing learned.

    Args:
        model: The chat model to wrap, or a name for ``init_chat_model`` (``"openai:gpt-4o"``).
        user_id: Whose memories (with ``db_path``, ``storage``, ``embedder``); or pass
            ``memory=MemoryStore(...)``.
        db_path: Embedded Chroma folder or a Chroma server URL (default ``~/.headroom-memory``).
        top_k: Memories injected at most (fewer pass the relevance floor for most questions).
        min_score, duplicate_threshold: The settings of the store opened here (see
            :class:`~headroom_memory_integrations.MemoryStore`); a store passed as ``memory=``
            has its own.
        injection: ``"system"`` (default) or ``"user"`` to prepend the memories to the latest
            user message, for providers that refuse a system message after the first.
        temperature, max_tokens: Set on (a copy of) the wrapped model, or handed to the model
            built from a name.
        timeout, max_retries, api_key, base_url: Handed to the model built from a name (a
            model instance has them built into its client already: configure it directly).
        stop: Default stop sequences of every call.
        model_options: More keyword arguments for the model built from a name.
        streaming: Stream the wrapped model's answer even on ``invoke`` (for callbacks).
        untrusted_context: The prompts hold text the user did not write (retrieved documents,
            as in a RAG chain), which could tell the model what to remember: keep only
            memories grounded in the user's own words, the latest human message
            (``stats()["events"]["ungrounded_memories"]`` counts the others): keep the
            documents out of it, in a system message. Calls whose messages hold tool results
            are always checked so.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    # the wrapped model is built (or copied) from its settings too: a later change would reach
    # no call (use .bind(temperature=...) for a call's own)
    built_from: ClassVar[frozenset[str]] = _MEMORY_SETTINGS.union(
        _MODEL_SETTINGS, _CLIENT_SETTINGS, ["model_options"]
    )

    model: BaseChatModel
    """The wrapped chat model."""
    user_id: str | None = None
    db_path: str | os.PathLike[str] | None = Field(default=None, exclude=True, repr=False)
    storage: Any = Field(default=None, exclude=True, repr=False)
    embedder: Any = Field(default=None, exclude=True, repr=False)
    memory: MemoryStore | None = Field(default=None, exclude=True, repr=False)
    """The user's :class:`~headroom_memory_integrations.MemoryStore` (search, get_all, ...)."""
    queue_path: str | os.PathLike[str] | None = Field(default=None, exclude=True, repr=False)
    top_k: int = 5
    min_score: float = Field(default=DEFAULT_MIN_SCORE, exclude=True, repr=False)
    duplicate_threshold: float | None = Field(
        default=DEFAULT_DUPLICATE_THRESHOLD, exclude=True, repr=False
    )
    injection: Injection = "system"
    temperature: float | None = None
    max_tokens: int | None = None
    timeout: float | None = Field(default=None, exclude=True)
    max_retries: int | None = Field(default=None, exclude=True)
    stop: list[str] | None = None
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    base_url: str | None = Field(default=None, exclude=True, repr=False)
    model_options: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    streaming: bool = False
    untrusted_context: bool = Field(default=False, strict=True)  # never guessed from "false"
    """Every call's messages may hold text the user did not write (retrieved documents in a RAG
    prompt): keep only memories grounded in the user's own words. Calls holding tool results
    are always checked so."""
    cache: Any = Field(default=False, exclude=True, repr=False)
    """Always False: a cached answer would skip memory, and could carry one user's memories
    to another user asking the same question."""

    _memory_flow: MessagesFlow = PrivateAttr()
    _opened_here: bool = PrivateAttr(default=False)
    """The store was opened from ``db_path`` (or the default location), not given."""

    # -- construction -----------------------------------------------------------------------

    def _settings_flow(self) -> MemoryFlow | None:
        messages_flow = getattr(self, "_memory_flow", None)
        return None if messages_flow is None else messages_flow.flow

    @model_validator(mode="before")
    @classmethod
    def _configure_model(cls, data: Any) -> Any:
        """Build the wrapped model from a name, or apply the model settings to a copy."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if data.get("user_id") is not None:  # before pydantic would turn b"alice" into "alice"
            validate_user_id(data["user_id"])
        model = data.get("model")
        if isinstance(model, str):
            from langchain.chat_models import init_chat_model

            settings = {
                name: data[name]
                for name in (*_MODEL_SETTINGS, *_CLIENT_SETTINGS)
                if data.get(name) is not None
            }
            if isinstance(settings.get("api_key"), SecretStr):
                settings["api_key"] = settings["api_key"].get_secret_value()
            data["model"] = init_chat_model(model, **settings, **(data.get("model_options") or {}))
        elif isinstance(model, BaseChatModel):
            client = [name for name in (*_CLIENT_SETTINGS, "model_options") if data.get(name)]
            if client:
                raise InvalidInputError(
                    f"{', '.join(client)}: set on {type(model).__name__} itself (a model "
                    "instance has them built into its client); MemoryChatModel hands them only "
                    "to a model it builds from a name, e.g. model='openai:gpt-4o-mini'"
                )
            updates = {
                _field_of(model, name): data[name]
                for name in _MODEL_SETTINGS
                if data.get(name) is not None
            }
            if updates:
                data["model"] = model.model_copy(update=updates)
        return data

    @model_validator(mode="after")
    def _open_memory(self) -> Self:
        if self.cache is not False:
            raise InvalidInputError(
                "MemoryChatModel answers are never cached: a cached answer skips memory and "
                "could show one user's memories to another"
            )
        if isinstance(self.model, MemoryChatModel):
            raise InvalidInputError("the model already has memory: wrap the model it wraps")
        if "output_version" not in self.model_fields_set:
            self.output_version = self.model.output_version
        for name, value in _run_settings(self.model).items():
            if name == "metadata":  # always set here (package versions): keys set here win
                self.metadata = _merged_metadata(value, self.metadata)
            elif name not in self.model_fields_set:
                setattr(self, name, value)
        store_settings = {"min_score", "duplicate_threshold"} & self.model_fields_set
        if self.memory is not None and store_settings:
            raise InvalidInputError(
                f"{', '.join(sorted(store_settings))}: set on the MemoryStore passed as memory="
            )
        self._opened_here = self.memory is None and self.storage is None
        self.memory = open_memory(
            self.memory,
            self.user_id,
            self.db_path,
            storage=self.storage,
            embedder=self.embedder,
            min_score=self.min_score,
            duplicate_threshold=self.duplicate_threshold,
        )
        self.user_id = self.memory.user_id
        self.min_score = self.memory.min_score
        self.duplicate_threshold = self.memory.duplicate_threshold
        flow = build_flow(
            self.memory,
            inline=True,
            top_k=self.top_k,
            queue_path=self.queue_path,
            untrusted_context=self.untrusted_context,
        )
        self._memory_flow = MessagesFlow(flow, self.injection)
        return self

    @classmethod
    def around(
        cls,
        model: BaseChatModel,
        flow: MessagesFlow,
        *,
        settings_of: BaseChatModel | None = None,
    ) -> MemoryChatModel:
        """``model`` with the memory of an existing flow (no new store, no new queue): what
        :class:`~.middleware.MemoryMiddleware` uses around each agent's model call. The
        wrapper carries the callbacks, tags, metadata and verbosity of ``settings_of``
        (default: ``model``)."""
        wrapper = cls.model_construct(
            model=model,
            memory=flow.memory,
            user_id=flow.memory.user_id,
            top_k=flow.flow.top_k,
            injection=flow.injection,
            untrusted_context=flow.flow.untrusted_context,
            output_version=model.output_version,
            profile=model.profile,
            **_run_settings(settings_of if settings_of is not None else model),
        )
        wrapper._memory_flow = flow
        return wrapper

    # -- saving and loading (LangChain's dumpd / load) ------------------------------------------

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """The public module (``headroom_memory_integrations.langchain``), which ``load``
        imports the class from: saved models stay loadable when the package's files move."""
        return ["headroom_memory_integrations", "langchain"]

    @property
    def lc_attributes(self) -> dict[str, Any]:
        """What ``dumpd`` carries besides the fields (the wrapped model, ``user_id``, ``top_k``,
        ``injection``, ...): where the user's memories are, and the store's settings.

        ``db_path`` is carried as it was given (a relative folder is found from the loading
        process's working directory); without one, nothing: the loading process finds its
        default store (``$HEADROOM_MEMORY_DB`` or ``~/.headroom-memory``), as this one did. A
        store given as ``memory=`` or ``storage=`` is carried as its folder or server URL.

        Raises:
            InvalidInputError: This model cannot be saved: the wrapped model is not
                serializable, or the store cannot be opened again from arguments (see
                :func:`~headroom_memory_integrations.wiring.reopening_arguments`).
        """
        if not self.model.is_lc_serializable():
            raise InvalidInputError(
                f"the wrapped {type(self.model).__name__} is not serializable by LangChain "
                "(its is_lc_serializable() is False), so neither is this MemoryChatModel: "
                "wrap a serializable chat model (ChatOpenAI, ChatAnthropic, ...) to save it"
            )
        assert self.memory is not None
        arguments = reopening_arguments(self.memory)
        if self._opened_here:
            del arguments["db_path"]
            if self.db_path is not None:
                arguments["db_path"] = os.fspath(self.db_path)
        if self.queue_path is not None:
            arguments["queue_path"] = os.fspath(self.queue_path)
        return arguments

    @cached_property
    def _serialized(self) -> dict[str, Any]:
        """What callbacks and tracers are told of this model on every call: its dump, or
        LangChain's "not implemented" stub when it cannot be saved (a call never fails for it)."""
        try:
            return dict(dumpd(self))
        except Exception:  # InvalidInputError says why; the call goes on either way
            return dict(to_json_not_implemented(self))

    # -- what LangChain asks of a chat model ----------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "headroom-memory"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            **self.model._identifying_params,
            "wrapped": self.model._llm_type,
            "top_k": self.top_k,
            "injection": self.injection,
        }

    @property
    def model_name(self) -> str:
        """The wrapped model's name (what agents and tracing look for), else its type."""
        for attribute in ("model_name", "model", "model_id"):
            name = getattr(self.model, attribute, None)
            if isinstance(name, str) and name:
                return name
        return self.model._llm_type

    def _resolve_model_profile(self) -> Any:
        return self.model.profile

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self.model._get_ls_params(stop=self._stop(stop), **kwargs)

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        return self.model.get_num_tokens_from_messages(messages, tools=tools)

    def get_token_ids(self, text: str) -> list[int]:
        return self.model.get_token_ids(text)

    def __repr_args__(self) -> Any:  # never the wrapped model's fields: clients, keys
        return [
            ("model", _Named(type(self.model).__name__, self.model_name)),
            ("user_id", self.user_id),
            ("top_k", self.top_k),
            ("injection", self.injection),
        ]

    def configurable_fields(
        self, **kwargs: AnyConfigurableField
    ) -> RunnableSerializable[LanguageModelInput, AIMessage]:
        """Not supported: LangChain would build a new ``MemoryChatModel`` from this one's fields
        on every configured call, which fails (a store given, and its folder too) or, for a
        new ``user_id``, would open a new store per call.

        Raises:
            InvalidInputError: always, saying what to do instead.
        """
        raise InvalidInputError(
            f"MemoryChatModel fields cannot be configured per call ({', '.join(kwargs)}): for "
            "a user per run, use MemoryMiddleware in an agent, or one MemoryChatModel per "
            "user; choose between models with configurable_alternatives"
        )

    # -- tools and structured output ------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """This model with tools: the wrapped model converts them (its own format and
        ``tool_choice`` values), and its call arguments are bound to this model, so every
        call still gets memory."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        bound = self.model.bind_tools(tools, **kwargs)
        if not isinstance(bound, RunnableBinding) or not isinstance(bound.bound, BaseChatModel):
            raise NotImplementedError(
                f"{type(self.model).__name__}.bind_tools returned {type(bound).__name__}, not "
                "a binding of call arguments; MemoryChatModel cannot carry its tools"
            )
        return self.bind(**bound.kwargs)

    def with_structured_output(
        self, schema: Any = None, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[LanguageModelInput, Any]:
        """The wrapped model's own structured output (every ``method`` it offers), run through
        this model: memories are injected, but no memory block is asked for, since the answer
        must stay machine-readable."""
        # The wrapped model's method builds its runnable from ``self.bind`` / ``self.bind_tools``;
        # a throwaway copy whose two methods bind to this model builds the same runnable here.
        recipe = self.model.model_copy()
        object.__setattr__(recipe, "bind", self.bind)
        object.__setattr__(recipe, "bind_tools", self.bind_tools)
        return recipe.with_structured_output(schema, include_raw=include_raw, **kwargs)

    # -- whose run ------------------------------------------------------------------------------
    # A run that names another user (``config["configurable"]["user_id"]``, or a LangGraph
    # context's ``user_id``) is refused, as MemoryMiddleware and the memory tools built for one
    # user refuse it: serving it would put this user's memories in the other's prompt and store
    # the other's facts as this user's. Checked where a run's config is given (the four entry
    # points) and, for calls inside a chain or graph, where LangChain keeps the step's config.

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        self._check_run(config)
        return super().invoke(input, config, stop=stop, **kwargs)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        self._check_run(config)
        return await super().ainvoke(input, config, stop=stop, **kwargs)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        self._check_run(config)
        return super().stream(input, config, stop=stop, **kwargs)

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        self._check_run(config)
        return super().astream(input, config, stop=stop, **kwargs)

    def _check_run(self, config: RunnableConfig | None) -> None:
        """Refuse ``config`` (with the config of the chain or graph step this call runs in) if
        it names a user other than this model's."""
        check_call_user(
            config,
            self.user_id,
            "this MemoryChatModel",
            "build a MemoryChatModel for each user, or wrap the model with MemoryMiddleware, "
            "which serves the user each run names",
        )

    # -- the calls ------------------------------------------------------------------------------

    def _request(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What the wrapped model will ask for: its own request parameters (``logprobs``,
        ``model_kwargs``' ``response_format``, ... where it exposes them, as LangChain's OpenAI
        models do in ``_default_params``) overridden by this call's, for the flow to judge
        whether the answer may carry a block."""
        try:
            defaults = getattr(self.model, "_default_params", None)
        except Exception:  # a model's property that cannot answer: judge by the call alone
            defaults = None
        return {**defaults, **kwargs} if isinstance(defaults, Mapping) else kwargs

    def _start(
        self,
        messages: list[BaseMessage],
        kwargs: dict[str, Any],
        run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
    ) -> Call:
        """The call to make: with memory, or, for a call the agent harness makes for its own
        work (a summary, a tool selection or emulation: see
        :func:`~._messages.is_harness_call`), the caller's messages alone: nothing injected,
        no block asked for, nothing learned."""
        if run_manager is not None and is_harness_call(run_manager.metadata):
            return Call(Turn(), list(messages))
        self._check_run(None)  # the step's config, in a chain or graph
        return self._memory_flow.before(messages, self._request(kwargs))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self._model_streams_only(kwargs, asynchronous=False):
            chunks = self._stream(messages, stop, run_manager, **kwargs)
            return generate_from_stream(_reported(chunks, run_manager))
        flow = self._memory_flow
        call = self._start(messages, kwargs, run_manager)
        self._acquire()
        result = self.model._generate(call.messages, stop=self._stop(stop), **kwargs)
        return flow.after(call, result)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self._model_streams_only(kwargs, asynchronous=True):
            chunks = self._astream(messages, stop, run_manager, **kwargs)
            return await agenerate_from_stream(_areported(chunks, run_manager))
        flow = self._memory_flow
        call = await asyncio.to_thread(self._start, messages, kwargs, run_manager)
        await self._aacquire()
        result = await self.model._agenerate(call.messages, stop=self._stop(stop), **kwargs)
        return await finished_in_thread(flow.after, call, result)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # run_manager is this model's run: the base class reports the chunks yielded here (the
        # filtered ones); the wrapped model gets none, so it reports nothing raw.
        flow = self._memory_flow
        call = self._start(messages, kwargs, run_manager)
        self._acquire()
        stop = self._stop(stop)
        if not self._model_streams(kwargs, asynchronous=False):
            kwargs.pop("stream", None)  # asked of this model: the wrapped one answers whole
            result = flow.after(call, self.model._generate(call.messages, stop=stop, **kwargs))
            yield as_chunk(result.generations[0])
            return
        chunks = self.model._stream(call.messages, stop=stop, **kwargs)
        yield from edited(chunks, _Chunks(flow.editor(call)), finish_on_error=True)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        flow = self._memory_flow
        call = await asyncio.to_thread(self._start, messages, kwargs, run_manager)
        await self._aacquire()
        stop = self._stop(stop)
        if not self._model_streams(kwargs, asynchronous=True):
            kwargs.pop("stream", None)
            result = await self.model._agenerate(call.messages, stop=stop, **kwargs)
            result = await finished_in_thread(flow.after, call, result)
            yield as_chunk(result.generations[0])
            return
        chunks = self.model._astream(call.messages, stop=stop, **kwargs)
        shown = aedited(
            chunks, _Chunks(flow.editor(call)), finish_on_error=True, end_in_thread=True
        )
        try:
            async for chunk in shown:
                yield chunk
        finally:
            await shown.aclose()  # left early: abandoned and the model's stream closed, now

    # -- helpers --------------------------------------------------------------------------------

    def _stop(self, stop: list[str] | None) -> list[str] | None:
        chosen = stop if stop is not None else self.stop
        return list(chosen) if chosen else None

    def _model_streams(self, kwargs: Mapping[str, Any], *, asynchronous: bool) -> bool:
        """Whether the wrapped model streams this call (else one chunk from ``_generate``).

        Not a call asking for several answers (``n`` above 1): LangChain's chunks do not say
        which answer they are of (it drops the choice's index), so the answers come
        interleaved and the block could not be cut from each; the whole answers are asked for,
        the block cut from every one, and the first one streamed as one chunk."""
        choices = self._request(dict(kwargs)).get("n", getattr(self.model, "n", None))
        if isinstance(choices, int) and choices > 1:
            return False
        model = self.model
        streams = type(model)._stream is not BaseChatModel._stream
        if asynchronous:
            streams = streams or type(model)._astream is not BaseChatModel._astream
        if not streams:
            return False
        disabled = getattr(model, "_streaming_disabled", None)
        if callable(disabled):
            return not disabled(**kwargs)
        return model.disable_streaming is not True

    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None], /) -> dict[str, Any]:
        """The wrapped model's own (its token usage and model name, for ``generate``)."""
        return self.model._combine_llm_outputs(llm_outputs)

    def _model_streams_only(self, kwargs: Mapping[str, Any], *, asynchronous: bool) -> bool:
        """Whether the wrapped model answers this call only by streaming: ``streaming=True``
        set on it, or ``stream=True`` in the call. LangChain sends its own such calls to the
        model's ``_stream`` (``ChatOpenAI._generate`` would get a stream back); so does
        ``invoke`` here."""
        should_stream = getattr(self.model, "_should_stream", None)
        if not callable(should_stream):
            return False
        return bool(should_stream(async_api=asynchronous, **kwargs))

    def _acquire(self) -> None:
        if self.model.rate_limiter is not None:
            self.model.rate_limiter.acquire(blocking=True)

    async def _aacquire(self) -> None:
        if self.model.rate_limiter is not None:
            await self.model.rate_limiter.aacquire(blocking=True)


class _Chunks:
    """A :class:`~._messages.ChunkEditor` as the core's :class:`~..flow.ItemEditor`: a stream
    the caller leaves before its end is abandoned (the editor's ``end`` is never called, so
    nothing more is queued or counted), as the OpenAI wrappers' streams are."""

    def __init__(self, editor: ChunkEditor) -> None:
        self._editor = editor

    def edit(self, chunk: ChatGenerationChunk) -> list[ChatGenerationChunk]:
        shown = self._editor.edit(chunk)
        return [] if shown is None else [shown]

    def end(self) -> list[ChatGenerationChunk]:
        last = self._editor.end()
        return [] if last is None else [last]

    def abandon(self) -> None:
        pass


_RUN_SETTINGS = ("callbacks", "tags", "metadata", "verbose")
"""What a chat model adds to its runs (handlers, tracing tags and metadata): the wrapper's runs
are the wrapped model's calls, so it carries them."""


def _reported(
    chunks: Iterator[ChatGenerationChunk], run_manager: CallbackManagerForLLMRun | None
) -> Iterator[ChatGenerationChunk]:
    """``chunks``, each told to the run's token handlers first (as LangChain tells them when it
    streams a call itself)."""
    for chunk in chunks:
        if run_manager is not None:
            run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk


async def _areported(
    chunks: AsyncIterator[ChatGenerationChunk], run_manager: AsyncCallbackManagerForLLMRun | None
) -> AsyncIterator[ChatGenerationChunk]:
    async for chunk in chunks:
        if run_manager is not None:
            await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk


def _run_settings(model: BaseChatModel) -> dict[str, Any]:
    """The wrapped model's run settings that it set (a default is not worth copying), the
    lists and dicts copied."""
    settings = {
        name: getattr(model, name) for name in _RUN_SETTINGS if name in model.model_fields_set
    }
    for name, value in settings.items():
        if isinstance(value, (list, dict)):
            settings[name] = value.copy()
    return settings


def _merged_metadata(
    wrapped: Mapping[str, Any] | None, own: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The wrapped model's metadata with this model's on top (``lc_versions`` merged)."""
    wrapped, own = wrapped or {}, own or {}
    merged = {**wrapped, **own}
    versions = [m.get("lc_versions") for m in (wrapped, own)]
    if all(isinstance(v, Mapping) for v in versions):
        merged["lc_versions"] = {**versions[0], **versions[1]}  # type: ignore[dict-item]
    return merged


class _Named:
    """Shows as ``ChatOpenAI(model='gpt-4o-mini')`` in a repr, whatever the model holds."""

    def __init__(self, kind: str, name: str) -> None:
        self._text = f"{kind}(model={name!r})"

    def __repr__(self) -> str:
        return self._text


def _field_of(model: BaseChatModel, setting: str) -> str:
    """The name of ``model``'s field for a standard setting (by name or alias)."""
    for name, info in type(model).model_fields.items():
        if setting in (name, info.alias, info.validation_alias):
            return name
    raise InvalidInputError(
        f"{type(model).__name__} has no {setting!r} setting; configure the model itself"
    )
