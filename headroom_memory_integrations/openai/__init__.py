"""Memory for OpenAI-compatible clients: :func:`with_fast_memory` and :func:`with_memory`.

Both return a client that works exactly like the one they wrap (``OpenAI``, ``AsyncOpenAI``,
``AzureOpenAI``, or any OpenAI-compatible client such as Ollama, vLLM or Groq through
``base_url``), with the user's relevant memories injected before each ``chat.completions.create``
or ``parse`` and each Responses API ``responses.create`` or ``parse`` (also through
``with_raw_response`` and ``with_streaming_response``, which is how LangChain's ``ChatOpenAI``
calls them) and a ``.memory`` attribute for direct access. The APIs they do not cover (the
beta Assistants and Realtime APIs, legacy completions) still work and log a warning once.

- ``with_fast_memory``: the model appends a memory block (with a per-request secret nonce) to its
  answer; the block is cut out of what you receive, streamed or not, and its memories are stored
  off your call's path. No extra model call.
- ``with_memory``: responses are untouched and no instruction is added; each turn is queued
  durably and a worker extracts memories with a separate call.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..embeddings import Embedder, LocalEmbedder, OpenAIEmbedder
from ..engine import DEFAULT_DUPLICATE_THRESHOLD, DEFAULT_MIN_SCORE, MemoryStore
from ..jobs import Backoff, PermanentJobError
from ..storage import Storage
from ..wiring import build_flow, open_memory
from ..writer import BackgroundExtractor, Complete, ExtractionCutOff, is_cut_off, stop_reason
from .client import TWIN_SETTINGS, MemoryClient
from .flow import CompletionsFlow, Injection
from .responses import AsyncMemoryStreamedResponse, MemoryRawResponse, MemoryStreamedResponse
from .streams import AsyncMemoryStream, MemoryStream

__all__ = [
    "AsyncMemoryStream",
    "AsyncMemoryStreamedResponse",
    "MemoryClient",
    "MemoryRawResponse",
    "MemoryStream",
    "MemoryStreamedResponse",
    "with_fast_memory",
    "with_memory",
]


def _is_async(client: Any) -> bool:
    import inspect

    create = inspect.unwrap(client.chat.completions.create)  # openai decorates it
    return inspect.iscoroutinefunction(create)


def sync_twin(client: Any, instead: str) -> Any:
    """A synchronous client for work done in a thread: the client itself if it is synchronous;
    for ``openai.AsyncOpenAI``, an ``openai.OpenAI`` with the same key, URL, headers, query
    parameters, timeout and retries. A custom ``http_client`` (a proxy, mTLS) cannot carry
    over to a synchronous client: pass ``extraction_client=`` (or ``embedder=``) then.
    ``instead`` says what to pass for an async client that has no twin (Azure's, another
    SDK's, or one that authenticates otherwise than by a key: see :func:`_uncopied_auth`)."""
    if not _is_async(client):
        return client
    import openai

    # an Azure client's deployment, API version and key header do not carry over
    if not isinstance(client, openai.AsyncOpenAI) or isinstance(client, openai.AsyncAzureOpenAI):
        raise TypeError(
            f"cannot derive a synchronous client from {type(client).__name__} (only from "
            f"openai.AsyncOpenAI); pass {instead}"
        )
    auth = _uncopied_auth(client)
    if auth is not None:
        raise TypeError(
            f"cannot derive a synchronous client from an AsyncOpenAI that authenticates with "
            f"{auth}: a synchronous copy would send no key or a placeholder; pass {instead}"
        )
    return openai.OpenAI(
        **{name: getattr(client, name) for name in TWIN_SETTINGS},
        default_headers=getattr(client, "_custom_headers", None),
        default_query=getattr(client, "_custom_query", None),  # a gateway's api-version, say
    )


def _uncopied_auth(client: Any) -> str | None:
    """How an ``AsyncOpenAI`` authenticates if not by its ``api_key`` (which a twin copies), in
    words; None if by its key. openai 2.x and 3.x keep an async callable given as ``api_key``
    (which a synchronous client cannot call) and leave ``api_key`` empty; with
    ``workload_identity`` (a token exchange the async client does) or ``provider=`` (a
    platform's sign-in and URL) ``api_key`` is a placeholder or empty."""
    if getattr(client, "_api_key_provider", None) is not None:
        return "an async api_key function"
    if getattr(client, "workload_identity", None) is not None:
        return "workload_identity"
    if getattr(client, "_provider", None) is not None:
        return "provider="
    return None


EXTRACTION_TIMEOUT = 60.0
"""Seconds one try of a background extraction call may take (the client's own default is 10
minutes): a stalled call is given up and retried with backoff, well within the job's lease
(``jobs.DEFAULT_LEASE_SECONDS``), after which another process could take the job over."""


def client_destination(client: Any, model: str | None) -> str | None:
    """A fingerprint of where an openai client's calls go and as whom (its base URL, API key,
    organization and project, headers, query; ``model``): a hash, no secret in it. None if the
    client does not say, or if its credentials are not a plain API key (a key provider,
    Azure AD token or token provider: two tenants' would hash alike). The SDK's own platform
    headers are left out (the same client after an upgrade)."""
    try:
        if not isinstance(getattr(client, "api_key", ""), str) or any(
            getattr(client, name, None) is not None
            for name in ("_api_key_provider", "_azure_ad_token", "_azure_ad_token_provider")
        ):
            return None
        headers = {
            str(name).lower(): value
            for name, value in dict(client.default_headers).items()
            if isinstance(value, str)  # not openai's Omit markers
            and not str(name).lower().startswith(("x-stainless-", "user-agent"))
        }
        query = {
            str(name): value
            for name, value in dict(client.default_query).items()
            if isinstance(value, str)
        }
        who = {
            name: value
            for name in ("api_key", "organization", "project", "websocket_base_url")
            if isinstance(value := getattr(client, name, None), str)
        }
        said = json.dumps([str(client.base_url), who, headers, query, model], sort_keys=True)
    except Exception:
        return None
    return hashlib.sha256(said.encode("utf-8", "replace")).hexdigest()[:32]


def openai_completer(client: Any) -> Complete:
    """Background extraction's call through a synchronous OpenAI-compatible ``client``, each
    try bounded by :data:`EXTRACTION_TIMEOUT`. It asks for ``temperature=0``; a model that
    refuses any temperature but its default (OpenAI's reasoning models: gpt-5, o1, o3, o4-mini
    answer 400) is asked again without one, and is not asked for one again. An answer cut off
    at the model's output limit (``finish_reason`` "length") raises
    :class:`~headroom_memory_integrations.writer.ExtractionCutOff`: the call sets no
    ``max_tokens`` to raise, so asking again would be cut the same way."""
    default_only: set[str] = set()  # models that refused temperature=0

    def complete(messages: list[dict[str, str]], model: str | None) -> str:
        if not model:
            raise PermanentJobError("no extraction model: pass extraction_model=")
        ask = {"model": model, "messages": messages, "timeout": EXTRACTION_TIMEOUT}
        try:
            if model in default_only:
                response = client.chat.completions.create(**ask)
            else:
                response = client.chat.completions.create(**ask, temperature=0)
        except Exception as exc:
            if not _refuses_temperature(exc):
                raise
            default_only.add(model)
            response = client.chat.completions.create(**ask)
        choices = getattr(response, "choices", None)  # None: a gateway's error body, sent as 200
        reason = stop_reason(choices[0]) if choices else None
        if is_cut_off(reason):
            raise ExtractionCutOff.of(model, reason)
        message = getattr(choices[0], "message", None) if choices else None
        return getattr(message, "content", None) or ""  # "": a malformed answer, retried

    return complete


def _refuses_temperature(exc: Exception) -> bool:
    """Whether a request failed because the model takes no ``temperature`` but its default
    (a 400 whose error names the parameter)."""
    if getattr(exc, "status_code", None) != 400:
        return False
    return getattr(exc, "param", None) == "temperature" or "temperature" in str(exc).lower()


def _wrap(
    client: Any,
    user_id: str | None,
    db_path: str | os.PathLike[str] | None,
    *,
    inline: bool,
    top_k: int,
    use_local_embeddings: bool,
    embedding_model: str,
    embedder: Embedder | None,
    storage: Storage | None,
    min_score: float,
    duplicate_threshold: float | None,
    injection: Injection,
    queue_path: str | os.PathLike[str] | None,
    memory: MemoryStore | None,
    untrusted_context: bool,
    extractor: BackgroundExtractor | None = None,
    backoff: Backoff | None = None,
    owned: tuple[Any, ...] = (),
) -> MemoryClient:
    if embedder is None and memory is None:
        if use_local_embeddings:
            embedder = LocalEmbedder(embedding_model)
        else:
            twin = sync_twin(
                client, "embedder=OpenAIEmbedder(<a synchronous client>), or use the local model"
            )
            embedder = OpenAIEmbedder(twin)
            owned += (twin,) if twin is not client else ()
    memory = open_memory(
        memory,
        user_id,
        db_path,
        storage=storage,
        embedder=embedder,
        min_score=min_score,
        duplicate_threshold=duplicate_threshold,
    )
    flow = build_flow(
        memory,
        inline=inline,
        top_k=top_k,
        extractor=extractor,
        queue_path=queue_path,
        backoff=backoff,
        untrusted_context=untrusted_context,
    )
    return MemoryClient(
        client, CompletionsFlow(flow, injection), asynchronous=_is_async(client), owned=owned
    )


def with_fast_memory(
    client: Any,
    user_id: str | None = None,
    db_path: str | os.PathLike[str] | None = None,
    *,
    top_k: int = 5,
    use_local_embeddings: bool = True,
    embedding_model: str = "all-MiniLM-L6-v2",
    embedder: Embedder | None = None,
    storage: Storage | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    duplicate_threshold: float | None = DEFAULT_DUPLICATE_THRESHOLD,
    injection: Injection = "system",
    queue_path: str | os.PathLike[str] | None = None,
    memory: MemoryStore | None = None,
    untrusted_context: bool = False,
) -> MemoryClient:
    """Wrap ``client`` so the model extracts memories inline, in its own answer.

    Args:
        client: ``OpenAI``, ``AsyncOpenAI`` or any OpenAI-compatible client.
        user_id: Whose memories. Required; users never see each other's memories.
        db_path: Embedded Chroma folder (default ``~/.headroom-memory``) or a Chroma server URL.
        top_k: Memories injected at most (fewer when fewer pass the relevance floor).
        use_local_embeddings: The local all-MiniLM-L6-v2 (default) or, if False, OpenAI's
            ``text-embedding-3-small`` through ``client``.
        embedding_model: The local model's name.
        embedder: Any :class:`Embedder`; overrides the two options above.
        storage: A storage object instead of ``db_path``.
        min_score: The relevance floor for injection.
        duplicate_threshold: Similarity from which a new memory that only replaces words of
            an existing one (every number, date, name, negation and tense kept) supersedes it
            as the same statement reworded (``engine.DEFAULT_DUPLICATE_THRESHOLD``); never a
            duplicate.
        injection: ``"system"`` (a system message just before the latest user message) or
            ``"user"`` (prepended to it, for chat templates that refuse a late system message).
        queue_path: The SQLite file of pending writes (default: beside embedded memories, or in
            ``~/.headroom-memory`` for a server).
        memory: An existing :class:`MemoryStore` instead of ``user_id`` and the storage and
            embedding options, e.g. to give a sync and an async client one store:
            ``with_fast_memory(AsyncOpenAI(), memory=sync_client.memory)``.
        untrusted_context: Your prompts carry text the user did not write (retrieved
            documents, web pages): keep only memories grounded in the user's own words. Calls
            whose messages hold tool results are treated so anyway.

    Returns:
        A client used exactly like ``client``, with ``.memory`` (a :class:`MemoryStore`).
        Requests that must return JSON or call a tool (``response_format``, a forced
        ``tool_choice``) get memories injected but no extraction instruction.
    """
    return _wrap(
        client,
        user_id,
        db_path,
        inline=True,
        top_k=top_k,
        use_local_embeddings=use_local_embeddings,
        embedding_model=embedding_model,
        embedder=embedder,
        storage=storage,
        min_score=min_score,
        duplicate_threshold=duplicate_threshold,
        injection=injection,
        queue_path=queue_path,
        memory=memory,
        untrusted_context=untrusted_context,
    )


def with_memory(
    client: Any,
    user_id: str | None = None,
    db_path: str | os.PathLike[str] | None = None,
    *,
    top_k: int = 5,
    extraction_model: str | None = None,
    extraction_client: Any = None,
    use_local_embeddings: bool = True,
    embedding_model: str = "all-MiniLM-L6-v2",
    embedder: Embedder | None = None,
    storage: Storage | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    duplicate_threshold: float | None = DEFAULT_DUPLICATE_THRESHOLD,
    injection: Injection = "system",
    queue_path: str | os.PathLike[str] | None = None,
    retry_backoff: Backoff | None = None,
    memory: MemoryStore | None = None,
    untrusted_context: bool = False,
) -> MemoryClient:
    """Wrap ``client`` so memories are extracted in the background by a separate call.

    Responses come back exactly as the model wrote them. Each turn (the latest user message and
    the answer) is written to a durable queue before the call returns; a worker thread asks the
    extraction model for memories, validates the JSON, and stores them under this ``user_id``.
    Timeouts, 429s, 5xx and malformed answers are retried with backoff; a job that cannot
    succeed (a 400, bad credentials) is kept as failed (``memory.retry_failed()``). Pending work
    is drained at exit (``memory.flush(timeout)`` waits for it), and a process that crashed
    leaves it in the queue for the next one.

    Args:
        extraction_model: The model for extraction calls (default: the model of each request).
        extraction_client: A synchronous client for extraction (default: ``client``, or a
            synchronous twin of an ``AsyncOpenAI``).
        retry_backoff: Delays between retries.

    The other arguments are those of :func:`with_fast_memory`.
    """
    twin = extraction_client or sync_twin(
        client, "extraction_client=<the synchronous client of the same service>"
    )
    closed = getattr(twin, "is_closed", None)  # openai's clients say when they are closed
    usable = (lambda: not closed()) if callable(closed) else None
    extractor = BackgroundExtractor(
        openai_completer(twin),
        extraction_model,
        usable=usable,
        # read when used: after a key rotation or a new base_url (assigned on the memory
        # client, which sets it on the twin) the turns queued since carry where they go now
        destination=lambda: client_destination(twin, extraction_model),
    )
    return _wrap(
        client,
        user_id,
        db_path,
        inline=False,
        top_k=top_k,
        use_local_embeddings=use_local_embeddings,
        embedding_model=embedding_model,
        embedder=embedder,
        storage=storage,
        min_score=min_score,
        duplicate_threshold=duplicate_threshold,
        injection=injection,
        queue_path=queue_path,
        memory=memory,
        untrusted_context=untrusted_context,
        extractor=extractor,
        backoff=retry_backoff,
        owned=(twin,) if twin is not client and extraction_client is None else (),
    )
