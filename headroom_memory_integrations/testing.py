"""A scripted, OpenAI-compatible HTTP server for offline tests.

:class:`ScriptedOpenAIServer` listens on ``127.0.0.1`` (a free port) and answers the real
``openai`` client over real HTTP, so code under test runs unchanged: only ``base_url`` differs.
It serves ``POST /v1/chat/completions`` and ``POST /v1/responses`` (each plain and
``stream=True``; a Responses request is answered from the same queue and responder, which see it
as chat messages), ``POST /v1/embeddings`` and ``GET /v1/models``; any other path gets a 404 in
OpenAI's error shape. Azure OpenAI's deployment routes
(``/openai/deployments/<name>/chat/completions`` and ``.../embeddings``) are served the same way,
so ``openai.AzureOpenAI(azure_endpoint=server.azure_endpoint, ...)`` works too. The server
itself uses the standard library only.

Each run of a server has its own path prefix in :attr:`~ScriptedOpenAIServer.base_url`
(``http://127.0.0.1:PORT/run-<id>/v1``). A client left over from an earlier server that had the
same port (a retrying background job, say) sends the earlier prefix and gets a 421, so it never
takes this server's scripted replies. Paths without a prefix (``/v1/...``) are served too.

Each chat request consumes the next :class:`Reply` from a FIFO queue; when the queue is empty
the ``responder`` callable answers instead (by default it says ``"OK"``). Every request is
recorded in :attr:`ScriptedOpenAIServer.requests`, so a test can check what the model was sent::

    from headroom_memory_integrations.testing import Reply, ScriptedOpenAIServer

    with ScriptedOpenAIServer() as server:
        server.script("Hi Ada!", Reply.tool_call("remember", {"fact": "likes tea"}))
        client = server.client()  # an openai.OpenAI pointed at server.base_url
        # ... or openai.OpenAI(base_url=server.base_url, api_key="anything")

        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello, I am Ada"}]
        )
        assert answer.choices[0].message.content == "Hi Ada!"

        sent = server.requests[-1]
        assert sent.path == "/v1/chat/completions"
        assert sent.body["messages"][-1]["content"] == "Hello, I am Ada"

Reply kinds (all are :class:`Reply` values; a plain ``str`` is shorthand for ``Reply.text``):

* ``Reply.text("Hello")`` - assistant text. Streamed in pieces of ``chunk_size`` characters
  (per reply, else the server's default of 4), or ``Reply.text(["Hel", "lo"])`` for exact chunks.
* ``Reply.tool_call("name", {"arg": 1})`` / ``Reply.tool_calls(ToolCall(...), ...)`` - function
  calls with ``finish_reason="tool_calls"``; streamed as tool-call deltas, arguments in pieces.
* ``Reply.refused("I can't help with that.")`` - the model refuses: Chat Completions'
  ``message.refusal`` (``content`` null), streamed as ``refusal`` deltas; the Responses API's
  ``refusal`` content part, streamed as ``response.refusal.delta`` / ``.done`` events.
* ``Reply.error(429, "slow down")`` - an HTTP error with an OpenAI-shaped body, so the client
  raises ``RateLimitError`` (429), ``BadRequestError`` (400), ``InternalServerError`` (5xx), ...
* ``reply.delayed(2.0)`` - wait before answering (to test client timeouts); ``between_chunks``
  also spaces out streamed chunks.
* ``Reply(..., usage=Usage(10, 5))`` - exact token counts; the default is about 4 characters
  per token.

With ``n > 1`` every choice carries the same reply. Embeddings are deterministic unit vectors
(:func:`hash_embedding`) unless an ``embedder`` is given.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import random
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from .scripted_responses import ScriptedResponse, chat_messages

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

__all__ = [
    "DEFAULT_MODELS",
    "MemoryFollowingModel",
    "RecordedRequest",
    "Reply",
    "Responder",
    "ScriptedOpenAIServer",
    "ToolCall",
    "Usage",
    "hash_embedding",
]

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
"""Model ids listed by ``GET /v1/models`` unless the server is given others."""

_AZURE_DEPLOYMENT = re.compile(r"^/openai/deployments/[^/]+(?=/chat/completions$|/embeddings$)")
"""The prefix of Azure OpenAI's deployment routes, served as the ``/v1`` ones."""

_RUN_PREFIX = re.compile(r"^/run-[0-9a-f]{12}(?=/)")
"""The path prefix that tells one run of a server from another on the same port."""

_ERROR_KINDS = {  # status -> (error type, error code), as OpenAI reports them
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


class Usage(NamedTuple):
    """Token counts reported for one chat completion (all choices together)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ToolCall:
    """One function call made by the scripted model.

    Attributes:
        name: The function name.
        arguments: The arguments as JSON text, or a mapping that is JSON-encoded.
        id: The call id; by default a fresh ``call_...`` id in every response.
    """

    name: str
    arguments: str | Mapping[str, Any] = "{}"
    id: str | None = None

    @property
    def arguments_json(self) -> str:
        """The arguments as JSON text."""
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass(frozen=True)
class Reply:
    """What the scripted model answers to one chat request.

    Build one with :meth:`text`, :meth:`tool_call`, :meth:`tool_calls` or :meth:`error`, and
    :meth:`delayed`; the constructor gives full control.

    Attributes:
        content: Assistant text (``None`` for none).
        calls: Function calls; they make the default ``finish_reason`` ``"tool_calls"``.
        chunks: Exact streamed content pieces (their concatenation is ``content``).
        chunk_size: Characters per streamed piece; ``None`` uses the server's default.
        finish_reason: Overrides ``"stop"`` / ``"tool_calls"`` (e.g. ``"length"``).
        usage: Exact token counts; ``None`` estimates about 4 characters per token.
        delay: Seconds to wait before answering.
        chunk_delay: Seconds to wait between streamed chunks.
        status: HTTP status; 400 and above makes this an error reply.
        error_body: The ``error`` object of an error reply's body.
        headers: Extra HTTP response headers (e.g. ``{"retry-after-ms": "0"}``).
        refusal: The model's refusal instead of an answer (``content`` is then ``None``);
            streamed in pieces as ``content`` is.
    """

    content: str | None = None
    calls: tuple[ToolCall, ...] = ()
    chunks: tuple[str, ...] | None = None
    chunk_size: int | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    status: int = 200
    error_body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    refusal: str | None = None

    @classmethod
    def text(
        cls,
        content: str | Sequence[str],
        *,
        chunk_size: int | None = None,
        finish_reason: str = "stop",
        usage: Usage | None = None,
    ) -> Reply:
        """Answer with assistant text; a sequence of strings gives the exact streamed chunks."""
        chunks = None if isinstance(content, str) else tuple(content)
        return cls(
            content="".join(chunks) if chunks is not None else str(content),
            chunks=chunks,
            chunk_size=chunk_size,
            finish_reason=finish_reason,
            usage=usage,
        )

    @classmethod
    def refused(cls, refusal: str, *, chunk_size: int | None = None) -> Reply:
        """Refuse to answer, with the model's ``refusal`` text (no content)."""
        return cls(refusal=refusal, chunk_size=chunk_size)

    @classmethod
    def tool_call(
        cls, name: str, arguments: str | Mapping[str, Any] = "{}", *, id: str | None = None
    ) -> Reply:
        """Answer with a single function call (arguments as JSON text or a mapping)."""
        return cls.tool_calls(ToolCall(name, arguments, id))

    @classmethod
    def tool_calls(
        cls, *calls: ToolCall, content: str | None = None, usage: Usage | None = None
    ) -> Reply:
        """Answer with one or more function calls, optionally preceded by some text."""
        return cls(content=content, calls=calls, usage=usage)

    @classmethod
    def error(
        cls,
        status: int,
        message: str | None = None,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Answer with HTTP ``status`` and an OpenAI-shaped ``{"error": {...}}`` body.

        Raises:
            ValueError: ``status`` is below 400.
        """
        if status < 400:
            raise ValueError(f"an error reply needs a status >= 400, not {status}")
        kind = _ERROR_KINDS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None)
        )
        body = {
            "message": message or f"Scripted error (HTTP {status}).",
            "type": type or kind[0],
            "param": param,
            "code": code or kind[1],
        }
        return cls(status=status, error_body=body, headers=dict(headers or {}))

    def delayed(self, seconds: float, *, between_chunks: float = 0.0) -> Reply:
        """This reply, sent after ``seconds`` (and, streamed, ``between_chunks`` apart)."""
        return replace(self, delay=seconds, chunk_delay=between_chunks)


Responder = Callable[[dict[str, Any]], Reply | str]
"""Answers a chat request (its parsed JSON body) when the scripted queue is empty."""


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the server received.

    Attributes:
        method: ``"GET"``, ``"POST"``, ...
        path: The URL path without query string, e.g. ``"/v1/chat/completions"``.
        headers: Request headers, names lower-cased.
        body: The parsed JSON body, or ``None`` (no body, or not a JSON object).
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: dict[str, Any] | None


def hash_embedding(text: str, dimensions: int = 1536) -> list[float]:
    """A deterministic unit vector for ``text``, seeded by its SHA-256.

    The first ``d`` components, renormalised, equal ``hash_embedding(text, d)``, which mirrors
    how OpenAI's ``dimensions`` parameter shortens embeddings.
    """
    rng = random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _rough_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _said(reply: Reply) -> str:
    """The text a reply's model wrote: its content, or its refusal."""
    return reply.content or reply.refusal or ""


def _split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), max(size, 1))]


def _prompt_text(messages: list[Any]) -> str:
    parts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            ]
    return "\n".join(parts)


_NONCE = re.compile(r"<memory-([0-9a-f]{8,32})>")
_INJECTED = re.compile(r'^- m\d+ \(([^)]*)\): ("(?:[^"\\]|\\.)*")$', re.MULTILINE)
_SENTENCES = re.compile(r"[^.!?;\n]+[.!?;]?")
_IRREGULAR = {"have": "has", "do": "does", "go": "goes", "am": "is", "was": "was"}
_PRONOUNS = {
    "my": "their",
    "me": "them",
    "myself": "themselves",
    "mine": "theirs",
    "i": "they",
    "our": "their",
    "us": "them",
}
_PREFERENCE_WORDS = ("prefer", "like", "love", "enjoy", "hate", "dislike", "favorite", "favourite")
_CONTEXT_WORDS = ("working on", "migrating", "planning", "learning", "building", "preparing")


def _third_person(verb: str) -> str:
    lower = verb.lower()
    if lower in _IRREGULAR:
        return _IRREGULAR[lower]
    if lower.endswith(("s", "sh", "ch", "x", "o", "z")):
        return lower + "es"
    if lower.endswith("y") and lower[-2:-1] not in ("a", "e", "i", "o", "u"):
        return lower[:-1] + "ies"
    return lower + "s"


def _about_the_user(sentence: str) -> str | None:
    """A first-person statement in the third person, or None if it is not one."""
    words = sentence.strip().rstrip(".!;").split()
    if len(words) < 2 or sentence.strip().endswith("?"):
        return None
    head = words[0].lower()
    rest = [_PRONOUNS.get(w.lower(), w) for w in words[2:]]
    if head in ("i'm", "i’m") or (head == "i" and words[1].lower() == "am"):
        tail = words[1:] if head != "i" else words[2:]
        text = "Is " + " ".join(_PRONOUNS.get(w.lower(), w) for w in tail)
    elif head == "i":
        text = _third_person(words[1]).capitalize() + (" " + " ".join(rest) if rest else "")
    elif head == "my" and len(words) >= 3:
        text = "User's " + " ".join(_PRONOUNS.get(w.lower(), w) for w in words[1:])
    elif head == "we":
        verb = _third_person(words[1])
        text = "User's team " + verb + (" " + " ".join(rest) if rest else "")
    else:
        return None
    return text if len(text.split()) >= 2 else None


def _category(text: str) -> str:
    lower = text.lower()
    if any(word in lower for word in _PREFERENCE_WORDS):
        return "preference"
    if any(word in lower for word in _CONTEXT_WORDS):
        return "context"
    return "fact"


class MemoryFollowingModel:
    """A responder that behaves like a chat model following this package's memory prompts, so
    demos, docs and notebooks show the whole loop offline (``responder=MemoryFollowingModel()``).

    - It answers from the memories injected into the request ("From what I remember: Prefers
      Python for backend work."), or acknowledges what the user told it.
    - When the request carries the inline instruction, it ends its answer with a valid memory
      block holding the latest user message's first-person statements in the third person
      ("I prefer Python for backend work" becomes "Prefers Python for backend work", "We use
      PostgreSQL" becomes "User's team uses PostgreSQL").
    - It answers background extraction calls with ``{"memories": [...]}`` of the same statements.

    It is a few string rules, not a model: it understands nothing else.
    """

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size

    def __call__(self, body: dict[str, Any]) -> Reply:
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        system = "\n".join(
            _prompt_text([m]) for m in messages if m.get("role") in ("system", "developer")
        )
        users = [_prompt_text([m]) for m in messages if m.get("role") == "user"]
        if system.startswith("You maintain long-term memory") and users:
            said = re.findall(r"^- user: (.*)$", users[-1], re.MULTILINE)
            texts = [json.loads(line) for line in said]
            return Reply.text(json.dumps({"memories": self._memories(" ".join(texts))}))
        latest = users[-1] if users else ""
        statements = self._memories(latest)
        remembered = [json.loads(text) for _, text in _INJECTED.findall(system + "\n" + latest)]
        if remembered:
            answer = "From what I remember: " + "; ".join(remembered) + "."
        elif statements:
            answer = "Thanks, I will keep that in mind."
        else:
            answer = "I don't know anything about that yet."
        nonce = _NONCE.search(system) or _NONCE.search(latest)
        if nonce:
            tag = nonce.group(1)
            answer += f"\n\n<memory-{tag}>{json.dumps(statements)}</memory-{tag}>"
        return Reply.text(answer, chunk_size=self.chunk_size)

    @staticmethod
    def _memories(text: str) -> list[dict[str, str]]:
        found = []
        for sentence in _SENTENCES.findall(text):
            statement = _about_the_user(sentence)
            if statement:
                found.append({"text": statement, "category": _category(statement)})
        return found


@dataclass
class _Response:
    status: int = 200
    payload: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    events: Iterator[dict[str, Any]] | None = None  # set for a server-sent-events stream
    named_events: bool = False  # each event named by its type, no closing [DONE] (Responses)


def _error(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> _Response:
    reply = Reply.error(status, message, code=code, param=param)
    return _Response(status, {"error": reply.error_body})


class ScriptedOpenAIServer:
    """An OpenAI-compatible HTTP server on ``127.0.0.1`` that answers from a script.

    Use it as a context manager, or call :meth:`start` and :meth:`close`. It is thread-safe and
    serves concurrent requests (one thread per connection, HTTP/1.1 keep-alive).

    Args:
        replies: Replies queued up front (see :meth:`script`).
        responder: Answers chat requests once the queue is empty; default: ``"OK"``.
        chunk_size: Default characters per streamed piece.
        embedding_dimensions: Length of embeddings when the request gives no ``dimensions``.
        embedder: ``(text, dimensions) -> vector``; default :func:`hash_embedding`. Token-array
            inputs are passed as their JSON text. An error :class:`Reply` it returns instead
            (``Reply.error(429, headers={"retry-after": "60"})``) is the request's answer.
        models: Model ids listed by ``GET /v1/models``.
    """

    def __init__(
        self,
        replies: Iterable[Reply | str] = (),
        *,
        responder: Responder | None = None,
        chunk_size: int = 4,
        embedding_dimensions: int = 1536,
        embedder: Callable[[str, int], Sequence[float] | Reply] = hash_embedding,
        models: Sequence[str] = DEFAULT_MODELS,
    ) -> None:
        self.responder: Responder = responder or (lambda _body: "OK")
        self.chunk_size = chunk_size
        self.embedding_dimensions = embedding_dimensions
        self.embedder = embedder
        self.models = tuple(models)
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._run_prefix = ""
        self.script(*replies)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ScriptedOpenAIServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread (no-op if running)."""
        if self._httpd is None:
            self._closing = threading.Event()
            self._run_prefix = f"/run-{uuid.uuid4().hex[:12]}"
            self._httpd = _HTTPServer(self)
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.01},
                name=f"ScriptedOpenAIServer:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, drop open connections (cutting short any delays) and free the port."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.server_close()
        httpd.drop_connections()
        self._closing.set()
        thread.join(timeout=5)

    def __enter__(self) -> ScriptedOpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The TCP port the server listens on.

        Raises:
            RuntimeError: The server is not running.
        """
        if self._httpd is None:
            raise RuntimeError("ScriptedOpenAIServer is not running; call start() first")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/run-<id>/v1``, the ``base_url`` for an openai client.

        The ``run-<id>`` prefix is new each time the server starts (see the module's docs).
        """
        return f"{self.azure_endpoint}/v1"

    @property
    def azure_endpoint(self) -> str:
        """``http://127.0.0.1:PORT/run-<id>``: the ``azure_endpoint`` of ``openai.AzureOpenAI``."""
        return f"http://127.0.0.1:{self.port}{self._run_prefix}"

    def client(self, **options: Any) -> OpenAI:
        """An ``openai.OpenAI`` for this server.

        Defaults (each overridable through ``options``): a dummy API key, ``max_retries=0`` so
        scripted errors surface at once, and ``timeout=30`` seconds.
        """
        from openai import OpenAI

        return OpenAI(**self._client_options(options))

    def async_client(self, **options: Any) -> AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` for this server, with the same defaults as :meth:`client`."""
        from openai import AsyncOpenAI

        return AsyncOpenAI(**self._client_options(options))

    def _client_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        defaults = {
            "base_url": self.base_url,
            "api_key": "sk-scripted",
            "max_retries": 0,
            "timeout": 30.0,
        }
        return {**defaults, **options}

    # -- scripting and inspection --------------------------------------------------------------

    def script(self, *replies: Reply | str) -> None:
        """Queue replies; each chat request consumes the oldest one."""
        with self._lock:
            self._queue.extend(Reply.text(r) if isinstance(r, str) else r for r in replies)

    @property
    def pending(self) -> int:
        """How many scripted replies have not been consumed yet."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        """Forget recorded requests and drop unconsumed replies."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()

    # -- request handling (runs in the connection's thread) -----------------------------------

    def _handle(self, method: str, path: str, raw: bytes, headers: Mapping[str, str]) -> _Response:
        run = _RUN_PREFIX.match(path)
        if run and run.group() != self._run_prefix:
            return _error(
                421,
                f"{path} was meant for an earlier server on this port, not this one.",
                code="misdirected_request",
            )
        path = path[run.end() :] if run else path
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        body = parsed if isinstance(parsed, dict) else None
        with self._lock:
            self._requests.append(RecordedRequest(method, path, dict(headers), body))
        if raw and body is None:
            return _error(400, "We could not parse the JSON body of your request.")
        path = _AZURE_DEPLOYMENT.sub("/v1", path)
        if method == "GET" and path == "/v1/models":
            return _Response(
                payload={"object": "list", "data": [self._model(m) for m in self.models]}
            )
        if method == "GET" and path.startswith("/v1/models/") and path[11:] in self.models:
            return _Response(payload=self._model(path[11:]))
        serve = {
            "/v1/chat/completions": self._chat,
            "/v1/responses": self._responses,
            "/v1/embeddings": self._embeddings,
        }
        if method != "POST" or path not in serve:
            return _error(404, f"Unknown request URL: {method} {path}.", code="unknown_url")
        if body is None:
            return _error(400, "The request body must be a JSON object.")
        return serve[path](body)

    @staticmethod
    def _model(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "scripted"}

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            queued = self._queue.popleft() if self._queue else None
        reply = queued if queued is not None else self.responder(body)
        return Reply.text(reply) if isinstance(reply, str) else reply

    def _answer(self, body: dict[str, Any]) -> Reply | _Response:
        """The next reply to a chat-shaped body, after its delay; an error reply as sent."""
        reply = self._next_reply(body)
        if reply.delay > 0:
            self._closing.wait(reply.delay)
        if reply.status >= 400:
            return _Response(reply.status, {"error": dict(reply.error_body or {})}, reply.headers)
        return reply

    def _pieces(self, reply: Reply) -> list[str]:
        """The streamed pieces of a reply's text (or of its refusal)."""
        if reply.chunks is not None:
            return list(reply.chunks)
        said = reply.refusal if reply.refusal is not None else reply.content
        return _split(said or "", reply.chunk_size or self.chunk_size)

    def _responses(self, body: dict[str, Any]) -> _Response:
        messages = chat_messages(body)
        if not messages:
            return _error(400, "'input' must be a string or a non-empty array.", param="input")
        reply = self._answer({**body, "messages": messages})  # responders read chat messages
        if isinstance(reply, _Response):
            return reply
        prompt, completion = reply.usage or (
            _rough_tokens(_prompt_text(messages)),
            _rough_tokens(_said(reply) + "".join(c.arguments_json for c in reply.calls)),
        )
        scripted = ScriptedResponse(reply, body, (prompt, completion), self.chunk_size)
        if not body.get("stream"):
            return _Response(payload=scripted.final, headers=reply.headers)

        def pause() -> None:
            if reply.chunk_delay > 0:
                self._closing.wait(reply.chunk_delay)

        events = scripted.events(self._pieces(reply), pause)
        return _Response(headers=reply.headers, events=events, named_events=True)

    def _chat(self, body: dict[str, Any]) -> _Response:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty array.", param="messages")
        reply = self._answer(body)
        if isinstance(reply, _Response):
            return reply
        n = int(body.get("n") or 1)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": str(body.get("model") or "gpt-4o-mini"),
            "system_fingerprint": "fp_scripted",
        }
        calls = [
            [
                {
                    "id": call.id or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in reply.calls
            ]
            for _ in range(n)
        ]
        finish = reply.finish_reason or ("tool_calls" if reply.calls else "stop")
        if reply.usage is not None:
            prompt, completion = reply.usage
        else:
            prompt = _rough_tokens(_prompt_text(messages))
            completion = n * _rough_tokens(
                _said(reply) + "".join(c.arguments_json for c in reply.calls)
            )
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if body.get("stream"):
            options = body.get("stream_options") or {}
            events = self._chunks(
                reply, base, calls, finish, usage if options.get("include_usage") else None
            )
            return _Response(headers=reply.headers, events=events)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": reply.content, "refusal": reply.refusal}
                | ({"tool_calls": calls[i]} if calls[i] else {}),
                "logprobs": None,
                "finish_reason": finish,
            }
            for i in range(n)
        ]
        payload = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
        return _Response(payload=payload, headers=reply.headers)

    def _chunks(
        self,
        reply: Reply,
        base: dict[str, Any],
        calls: list[list[dict[str, Any]]],
        finish: str,
        usage: dict[str, int] | None,
    ) -> Iterator[dict[str, Any]]:
        size = reply.chunk_size or self.chunk_size
        pieces = self._pieces(reply)

        def deltas(choice_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
            out: list[dict[str, Any]]
            if reply.refusal is not None:  # the refusal's pieces, no content
                out = [{"role": "assistant", "content": None, "refusal": ""}]
                return out + [{"refusal": piece} for piece in pieces]
            empty = None if reply.content is None and choice_calls else ""
            out = [{"role": "assistant", "content": empty, "refusal": None}]
            out += [{"content": piece} for piece in pieces]
            for index, call in enumerate(choice_calls):  # id and name first, then the arguments
                function = call["function"]
                head = {**call, "index": index, "function": {**function, "arguments": ""}}
                out.append({"tool_calls": [head]})
                out += [
                    {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                    for piece in _split(function["arguments"], size)
                ]
            return out

        extra = {} if usage is None else {"usage": None}
        per_choice = [[*deltas(choice_calls), {}] for choice_calls in calls]
        for step, row in enumerate(zip(*per_choice, strict=True)):  # interleave choices like OpenAI
            for index, delta in enumerate(row):
                if step and reply.chunk_delay > 0:
                    self._closing.wait(reply.chunk_delay)
                reason = None if delta else finish  # the closing chunk has an empty delta
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
                yield {**base, "object": "chat.completion.chunk", "choices": [choice], **extra}
        if usage is not None:
            yield {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}

    def _embeddings(self, body: dict[str, Any]) -> _Response:
        raw = body.get("input")
        tokens_only = isinstance(raw, list) and bool(raw) and all(isinstance(t, int) for t in raw)
        items = [raw] if isinstance(raw, str) or tokens_only else raw
        if not isinstance(items, list) or not items:
            return _error(400, "'input' must be a string or a non-empty array.", param="input")
        dimensions = body.get("dimensions", self.embedding_dimensions)
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            return _error(400, "'dimensions' must be a positive integer.", param="dimensions")
        texts = [item if isinstance(item, str) else json.dumps(item) for item in items]
        data: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            answer = self.embedder(text, dimensions)
            if isinstance(answer, Reply):  # an error reply (a 429, with its headers)
                return _Response(
                    answer.status, {"error": dict(answer.error_body or {})}, answer.headers
                )
            vector: Any = [float(x) for x in answer]
            if body.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(_rough_tokens(text) for text in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        model = str(body.get("model") or "text-embedding-3-small")
        return _Response(payload={"object": "list", "data": data, "model": model, "usage": usage})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog of 5 drops bursts of connections

    def __init__(self, owner: ScriptedOpenAIServer) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn(), a reverse DNS lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:  # registered before its thread starts, so close() sees it
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a hung-up client is no news
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # TCP_NODELAY: no ~40 ms delayed-ACK stall per request
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            response = self.server.owner._handle(
                self.command, urlsplit(self.path).path, raw, headers
            )
        except Exception as exc:  # a responder or embedder raised: report it to the client
            response = _error(500, f"Scripted server error: {exc!r}")
        try:
            self._write(response)
        except OSError:  # the client hung up (e.g. it timed out)
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _write(self, response: _Response) -> None:
        self.send_response(response.status)
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.events is None:
            data = json.dumps(response.payload).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in response.events:
            name = f"event: {event['type']}\n" if response.named_events else ""
            self._write_chunk(f"{name}data: {json.dumps(event)}\n\n".encode())
        if not response.named_events:
            self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
