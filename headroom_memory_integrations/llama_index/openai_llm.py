"""LlamaIndex's own OpenAI LLMs (``OpenAI``, ``OpenAILike``, ..., and ``OpenAIResponses``, on
the Responses API) on memory clients."""

from __future__ import annotations

from typing import Any

from ..embeddings import Embedder
from ..engine import MemoryStore
from ..errors import InvalidInputError
from ..openai import MemoryClient, with_fast_memory
from ..redaction import logger_without_secrets
from ..storage import Storage
from ._wiring import PathLike

log = logger_without_secrets("headroom_memory_integrations")


def _is_responses_llm(llm: Any) -> bool:
    """Whether ``llm`` is LlamaIndex's ``OpenAIResponses`` (it always holds both clients)."""
    try:
        from llama_index.llms.openai import OpenAIResponses
    except ImportError:  # llama-index-llms-openai before the Responses API
        return False
    return isinstance(llm, OpenAIResponses)


def _check_openai_llm(llm: Any) -> None:
    try:
        from llama_index.llms.openai import OpenAI
    except ImportError:
        openai_llm: type | None = None
    else:
        openai_llm = OpenAI
    if not (_is_responses_llm(llm) or (openai_llm is not None and isinstance(llm, openai_llm))):
        raise InvalidInputError(
            "openai_llm_with_memory takes a llama_index.llms.openai.OpenAI or a subclass "
            f"(OpenAILike, ...) or an OpenAIResponses, got {type(llm).__name__}; wrap any other "
            "LLM in MemoryLLM"
        )


def _untrusted_context(client: MemoryClient) -> bool:
    """Whether a memory client was built with ``untrusted_context=True``."""
    flow = getattr(getattr(client, "_flow", None), "flow", None)
    return bool(getattr(flow, "untrusted_context", False))


def openai_llm_with_memory(
    llm: Any,
    user_id: str | None = None,
    db_path: PathLike | None = None,
    *,
    memory: MemoryStore | None = None,
    storage: Storage | None = None,
    embedder: Embedder | None = None,
    top_k: int = 5,
    queue_path: PathLike | None = None,
    untrusted_context: bool = False,
) -> Any:
    """Give a LlamaIndex ``OpenAI`` / ``OpenAILike`` / ``OpenAIResponses`` LLM memory through its
    own clients.

    The LLM's sync and async clients (the ones it was given, or the ones it builds from its
    key and URL) are wrapped with :func:`~headroom_memory_integrations.openai.with_fast_memory`
    sharing one :class:`MemoryStore`, and installed in ``llm``, which is returned. Every call
    the LLM makes (chat, stream, async, tools) then gets memory exactly as with the wrapped
    clients, with no second copy of anything.

    ``reuse_client=False`` would make the LLM build a fresh client for every call from its key
    and URL, skipping the memory clients without a word; it is switched to ``True`` here, with
    a warning in the log. If ``llm`` was built on memory clients already
    (``OpenAILike(..., openai_client=with_fast_memory(...))``), they are kept, checked to share
    one store, and a missing sync or async one is added on the same store.

    Example::

        from llama_index.llms.openai_like import OpenAILike

        llm = openai_llm_with_memory(
            OpenAILike(model="gpt-4o-mini", api_base=URL, api_key=KEY, is_chat_model=True,
                       is_function_calling_model=True),
            user_id="alice",
            db_path="./memories",
        )
        llm.chat([ChatMessage(role="user", content="I prefer Python for backend work")])

    Args:
        llm: A ``llama_index.llms.openai.OpenAI`` or subclass (``OpenAILike``, ...), or an
            ``OpenAIResponses`` (which calls ``responses.create``).
        user_id, db_path, memory, storage, embedder, top_k, queue_path, untrusted_context: As
            for :func:`~headroom_memory_integrations.openai.with_fast_memory`; none of the store
            options when ``llm`` already has memory clients (build those with
            ``untrusted_context=True`` themselves; a client added to them follows them).

    Returns:
        ``llm`` itself; its memories are ``llm._client.memory`` (see :func:`llm_memory`).
    """
    _check_openai_llm(llm)
    if _is_responses_llm(llm):
        clients = [llm._client, llm._aclient]
    else:
        if not llm.reuse_client:
            log.warning(
                "%s(reuse_client=False) builds a new client for every call, which would bypass "
                "memory; it now reuses its memory clients (reuse_client=True)",
                type(llm).__name__,
            )
            llm.reuse_client = True
        clients = [llm._get_client(), llm._get_aclient()]
    stores = {id(c.memory): c.memory for c in clients if isinstance(c, MemoryClient)}
    if len(stores) > 1:
        raise InvalidInputError(
            "the LLM's sync and async memory clients have different stores; build the second "
            "with with_fast_memory(..., memory=first.memory)"
        )
    if stores:
        (existing,) = stores.values()
        options = (user_id, db_path, storage, embedder)
        if any(o is not None for o in options) or memory not in (None, existing):
            raise InvalidInputError("the LLM has memory clients already: pass no store options")
        memory = existing
        kept = [c for c in clients if isinstance(c, MemoryClient)]
        if untrusted_context and not all(_untrusted_context(c) for c in kept):
            raise InvalidInputError(
                "the LLM has memory clients already: build them with "
                "with_fast_memory(..., untrusted_context=True)"
            )
        untrusted_context = any(_untrusted_context(c) for c in kept)
    wrapped = []
    for client in clients:
        if not isinstance(client, MemoryClient):
            client = with_fast_memory(
                client,
                None if memory is not None else user_id,
                None if memory is not None else db_path,
                memory=memory,
                storage=None if memory is not None else storage,
                embedder=None if memory is not None else embedder,
                top_k=top_k,
                queue_path=queue_path,
                untrusted_context=untrusted_context,
            )
            memory = client.memory
        wrapped.append(client)
    llm._client, llm._aclient = wrapped
    return llm


def without_memory(llm: Any) -> Any:
    """``llm`` as background extraction must call it: a copy whose clients are the ones
    :func:`openai_llm_with_memory` wrapped (no memories injected, nothing stored for its
    user), and that does not continue or store a Responses API conversation
    (``track_previous_responses``: an extraction call is no turn of the app's conversation,
    and may be another user's); any other LLM itself."""
    clients = [getattr(llm, name, None) for name in ("_client", "_aclient")]
    wrapped = any(isinstance(client, MemoryClient) for client in clients)
    tracking = getattr(llm, "track_previous_responses", False) is True
    if not wrapped and not tracking:
        return llm
    plain = llm.model_copy()
    if wrapped:
        plain._client, plain._aclient = [
            client._wrapped if isinstance(client, MemoryClient) else client for client in clients
        ]
    if tracking:
        plain.track_previous_responses, plain.store = False, False
        plain._previous_response_id = None
    return plain


def llm_memory(llm: Any) -> MemoryStore:
    """The :class:`MemoryStore` of an LLM set up by :func:`openai_llm_with_memory`."""
    client = getattr(llm, "_client", None)
    if not isinstance(client, MemoryClient):
        raise InvalidInputError(f"{type(llm).__name__} has no memory clients")
    return client.memory
