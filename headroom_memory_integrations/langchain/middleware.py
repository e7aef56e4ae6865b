"""``MemoryMiddleware``: long-term memory for ``create_agent`` agents, per user."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage

from ..embeddings import Embedder
from ..engine import MemoryStore, check_top_k
from ..errors import InvalidInputError
from ..flow import KeptTurns
from ..storage import Storage
from ..wiring import build_flow, checked_setting, open_memory
from ._messages import Injection, MessagesFlow
from ._users import USER_ID_KEY as USER_ID_KEY  # where a run names its user
from ._users import run_user
from .chat_model import MemoryChatModel

_WHO = "this MemoryMiddleware"

DEFAULT_MAX_USERS = 256
"""Users whose stores a :class:`MemoryMiddleware` without ``user_id`` keeps open at most."""


class MemoryMiddleware(AgentMiddleware):
    """Long-term memory for a ``create_agent`` agent: every model call of a run gets the user's
    relevant memories, and the model's answers teach it new ones.

    Each model call goes through :class:`~.chat_model.MemoryChatModel` around the agent's own
    model (with its tools bound as usual), so the memory block is cut before any stream mode
    (``values``, ``updates``, ``messages``), callback or checkpoint sees it, and the memories
    are queued for storing off the call's path. The model's own callbacks, tags and metadata
    go with it. An agent's model that is a ``MemoryChatModel`` of the run's user is left as it
    is; one of another user is replaced, for the run, by the model it wraps with the run's
    user's memory: a run never reads or writes another user's memories.

    Setup:
        .. code-block:: python

            from langchain.agents import create_agent
            from headroom_memory_integrations.langchain import MemoryMiddleware

    One user (a personal assistant):
        .. code-block:: python

            agent = create_agent(
                "openai:gpt-4o-mini",
                tools=[get_weather],
                middleware=[MemoryMiddleware(user_id="alice", db_path="./memories")],
            )
            agent.invoke({"messages": [{"role": "user", "content": "I live in Lyon."}]})

    Many users (a service): build it without ``user_id``; each run names its user in its
    context or its config, never in anything the model writes (a run whose context and
    config name different users fails, as does a run naming a user other than the one a
    middleware built with ``user_id`` serves, before the model is called):
        .. code-block:: python

            @dataclass
            class Context:
                user_id: str

            agent = create_agent(
                "openai:gpt-4o-mini",
                tools=[get_weather],
                context_schema=Context,
                middleware=[MemoryMiddleware(db_path="./memories")],
            )
            agent.invoke({"messages": [...]}, context=Context(user_id="alice"))
            # or: agent.invoke({"messages": [...]}, {"configurable": {"user_id": "alice"}})

    Stream and async:
        .. code-block:: python

            for token, meta in agent.stream(inputs, context=ctx, stream_mode="messages"):
                print(token.text, end="")  # never any part of a memory block
            await agent.ainvoke(inputs, context=ctx)

    Order: list it after middleware that replace the agent's model for a call
    (``ModelFallbackMiddleware``, a model router): middleware wrap each other in list order,
    and a model swapped in by one listed after this one is called without memory.

    Args:
        user_id: The one user of every run (with ``db_path``, ``storage``, ``embedder``); or
            ``memory=MemoryStore(...)``. Without either, each run names its user.
        db_path: Embedded Chroma folder or a Chroma server URL (default ``~/.headroom-memory``).
        storage: A :class:`~headroom_memory_integrations.Storage` instead of ``db_path``.
        embedder: The embedder (default: the local all-MiniLM-L6-v2).
        memory: An existing :class:`~headroom_memory_integrations.MemoryStore` (one user).
        top_k: Memories injected at most per model call.
        injection: ``"system"`` or ``"user"`` (see :class:`~.chat_model.MemoryChatModel`).
        queue_path: The durable job queue's file (default: beside embedded memories).
        untrusted_context: The agent's prompts hold text the user did not write besides tool
            results (documents put in the system prompt or the state): keep only memories
            grounded in the user's own words. Calls holding tool results are always checked so.
        max_users: Without ``user_id``: the stores of the most recently served users kept open
            (default :data:`DEFAULT_MAX_USERS`). The least recently served one is let go of
            to make room: what its runs queued is still stored (the queue is durable and
            shared), a store of it from :meth:`memory_for` still works, and its next run opens
            it again, going on with the turns it was in (a run let go of while its tool ran is
            still in the same turn: see docs/guide.md, "A turn is learnt from once").
    """

    def __init__(
        self,
        user_id: str | None = None,
        db_path: str | os.PathLike[str] | None = None,
        *,
        storage: Storage | None = None,
        embedder: Embedder | None = None,
        memory: MemoryStore | None = None,
        top_k: int = 5,
        injection: Injection = "system",
        queue_path: str | os.PathLike[str] | None = None,
        untrusted_context: bool = False,
        max_users: int = DEFAULT_MAX_USERS,
    ) -> None:
        super().__init__()
        if injection not in ("system", "user"):
            raise InvalidInputError(f"injection must be 'system' or 'user', got {injection!r}")
        if isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1:
            raise InvalidInputError(f"max_users must be a positive integer, got {max_users!r}")
        self._max_users = max_users
        self._top_k = check_top_k(top_k)  # the users' flows are built on their first call
        self._injection: Injection = injection
        self._queue_path = queue_path
        self._untrusted_context = checked_setting("untrusted_context", untrusted_context)
        self._db_path = db_path
        self._storage = storage
        self._embedder = embedder
        # the users' flows, least recently served first; the lock guards it and _opening only
        # (a user's store is opened outside it, so other users' calls never wait for that)
        self._flows: OrderedDict[str, MessagesFlow] = OrderedDict()
        self._opening: dict[str, threading.Lock] = {}  # user -> held while their flow is built
        # the turns the flows let go of kept (of as many users as max_users, the latest): a
        # user's flow built anew goes on with them, so a run whose user was let go of while
        # its tool ran (other users served meanwhile) goes on with its turn
        self._let_go_turns: OrderedDict[str, KeptTurns] = OrderedDict()
        self._lock = threading.Lock()
        self._shared: tuple[Storage, Embedder] | None = None  # of the first user's store
        self._shared_lock = threading.Lock()
        self._fixed: MessagesFlow | None = None
        if memory is not None or user_id is not None:
            self._fixed = self._flow_for(
                open_memory(memory, user_id, db_path, storage=storage, embedder=embedder)
            )

    @property
    def memory(self) -> MemoryStore | None:
        """The store of the one user, when built with ``user_id`` or ``memory`` (else None)."""
        return self._fixed.memory if self._fixed is not None else None

    def memory_for(self, user_id: str) -> MemoryStore:
        """A user's store, as the middleware uses it (e.g. to list or delete their memories).

        Raises:
            InvalidInputError: the middleware serves one user and ``user_id`` is another.
        """
        return self._flow_of(user_id).memory

    # -- the hooks ----------------------------------------------------------------------------

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage:
        return handler(self._with_memory(request))

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | AIMessage:
        # opening a user's store the first time touches Chroma: off the event loop
        return await handler(await asyncio.to_thread(self._with_memory, request))

    # -- helpers ------------------------------------------------------------------------------

    def _with_memory(self, request: ModelRequest[Any]) -> ModelRequest[Any]:
        user_id = self._user_of(request)
        model = inner = request.model
        if isinstance(model, MemoryChatModel):
            if model.user_id == user_id:
                return request  # the agent's model has this user's memory already
            inner = model.model  # another user's memory: never used in this user's run
        flow = self._flow_of(user_id)
        wrapped = MemoryChatModel.around(inner, flow, settings_of=model)
        return request.override(model=wrapped)

    def _user_of(self, request: ModelRequest[Any]) -> str:
        """The run's user: the one user this middleware serves, or the user the run names.

        Raises:
            InvalidInputError: the run names two different users (its context and its
                config), or a user other than the one this middleware serves; or, without a
                fixed user, none.
        """
        runtime = getattr(request, "runtime", None)
        fixed = self._fixed.memory.user_id if self._fixed is not None else None
        user = run_user(_run_config(), getattr(runtime, "context", None), fixed, _WHO)
        if user is None:
            raise InvalidInputError(
                "MemoryMiddleware needs the run's user: pass context with a user_id "
                "(create_agent(..., context_schema=...) and invoke(..., context=...)) or "
                "config={'configurable': {'user_id': ...}}, or build it with user_id="
            )
        return user

    def _flow_of(self, user_id: str) -> MessagesFlow:
        if self._fixed is not None:
            if user_id != self._fixed.memory.user_id:
                raise InvalidInputError(
                    f"this MemoryMiddleware serves user {self._fixed.memory.user_id!r} only"
                )
            return self._fixed
        with self._lock:
            flow = self._served(user_id)
            if flow is not None:
                return flow
            opening = self._opening.setdefault(user_id, threading.Lock())
        with opening:  # one thread opens a user; the others of that user wait for it
            with self._lock:
                flow = self._served(user_id)
            if flow is not None:
                return flow
            with self._lock:
                kept_turns = self._let_go_turns.pop(user_id, None)
            try:
                flow = self._flow_for(self._open(user_id), kept_turns)
            except BaseException:
                with self._lock:
                    self._opening.pop(user_id, None)
                    if kept_turns is not None:
                        self._let_go_turns[user_id] = kept_turns
                raise
            with self._lock:
                self._opening.pop(user_id, None)
                self._flows[user_id] = flow
                while len(self._flows) > self._max_users:
                    let_go, evicted = self._flows.popitem(last=False)
                    # kept even while empty: a first step still recalling notes its turn in
                    # them after its user is let go of, and its next step reopens the user
                    self._let_go_turns[let_go] = evicted.flow.kept_turns
                while len(self._let_go_turns) > self._max_users:
                    self._let_go_turns.popitem(last=False)
                # the evicted flow is let go of, not closed: the writer holds stores weakly and
                # runs a user's queued jobs on a store of its own once theirs is gone, while a
                # run (or an application, through memory_for) still holding it keeps it whole:
                # flush and forget_user still reach the shared queue
        return flow

    def _served(self, user_id: str) -> MessagesFlow | None:
        """The user's open flow, marked as the most recently served (hold ``_lock``)."""
        flow = self._flows.get(user_id)
        if flow is not None:
            self._flows.move_to_end(user_id)
        return flow

    def _open(self, user_id: str) -> MemoryStore:
        """A new user's store, on the same storage and embedder as the users before."""
        with self._shared_lock:
            if self._shared is None:
                first = open_memory(
                    None, user_id, self._db_path, storage=self._storage, embedder=self._embedder
                )
                self._shared = (first.storage, first.embedder)
                return first
            storage, embedder = self._shared
        return MemoryStore(user_id, storage=storage, embedder=embedder)

    def _flow_for(self, memory: MemoryStore, kept_turns: KeptTurns | None = None) -> MessagesFlow:
        flow = build_flow(
            memory,
            inline=True,
            top_k=self._top_k,
            queue_path=self._queue_path,
            untrusted_context=self._untrusted_context,
            kept_turns=kept_turns,
        )
        return MessagesFlow(flow, self._injection)


def _run_config() -> Mapping[str, Any]:
    from langgraph.config import get_config

    try:
        return get_config()
    except RuntimeError:
        return {}
