"""The scripted OpenAI-compatible server, driven by the real openai client over real HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from openai import OpenAI
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from headroom_memory_integrations.testing import (
    RecordedRequest,
    Reply,
    ScriptedOpenAIServer,
    ToolCall,
    Usage,
    hash_embedding,
)

pytestmark = pytest.mark.openai_client

MODES = ["sync", "async"]
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer() as running:
        yield running


def chat(server: ScriptedOpenAIServer, mode: str, **kwargs: Any) -> ChatCompletion:
    """One non-streaming chat completion through the sync or async openai client."""
    kwargs = {"model": "gpt-test", "messages": USER, **kwargs}
    if mode == "sync":
        with server.client() as client:
            answer: ChatCompletion = client.chat.completions.create(**kwargs)
            return answer

    async def run() -> ChatCompletion:
        async with server.async_client() as client:
            answer: ChatCompletion = await client.chat.completions.create(**kwargs)
            return answer

    return asyncio.run(run())


def stream(server: ScriptedOpenAIServer, mode: str, **kwargs: Any) -> list[ChatCompletionChunk]:
    """Every chunk of one streamed chat completion through the sync or async openai client."""
    kwargs = {"model": "gpt-test", "messages": USER, "stream": True, **kwargs}
    if mode == "sync":
        with server.client() as client, client.chat.completions.create(**kwargs) as chunks:
            return list(chunks)

    async def run() -> list[ChatCompletionChunk]:
        async with server.async_client() as client:
            return [chunk async for chunk in await client.chat.completions.create(**kwargs)]

    return asyncio.run(run())


def embed(server: ScriptedOpenAIServer, mode: str, **kwargs: Any) -> CreateEmbeddingResponse:
    kwargs = {"model": "text-embedding-3-small", **kwargs}
    if mode == "sync":
        with server.client() as client:
            return client.embeddings.create(**kwargs)

    async def run() -> CreateEmbeddingResponse:
        async with server.async_client() as client:
            return await client.embeddings.create(**kwargs)

    return asyncio.run(run())


def content_of(chunks: list[ChatCompletionChunk], index: int = 0) -> str:
    return "".join(
        c.choices[0].delta.content or ""
        for c in chunks
        if c.choices and c.choices[0].index == index
    )


# -- chat completions ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_text_reply_looks_like_openai(server: ScriptedOpenAIServer, mode: str) -> None:
    server.script(Reply.text("Hi, I remember you like tea.", usage=Usage(12, 8)))

    answer = chat(server, mode)

    assert answer.id.startswith("chatcmpl-")
    assert answer.object == "chat.completion"
    assert answer.model == "gpt-test"
    assert abs(answer.created - time.time()) < 60
    [choice] = answer.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hi, I remember you like tea."
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (12, 8)
    assert answer.usage.total_tokens == 20


def test_queue_is_fifo_then_falls_back_to_ok(server: ScriptedOpenAIServer) -> None:
    server.script("first", Reply.text("second"))
    assert server.pending == 2

    answers = [chat(server, "sync").choices[0].message.content for _ in range(3)]

    assert answers == ["first", "second", "OK"]
    assert server.pending == 0


def test_default_usage_is_a_rough_token_count(server: ScriptedOpenAIServer) -> None:
    server.script("x" * 40)
    usage = chat(server, "sync", messages=[{"role": "user", "content": "y" * 80}]).usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (20, 10, 30)


def test_responder_answers_when_queue_is_empty() -> None:
    def shout(body: dict[str, Any]) -> str:
        return str(body["messages"][-1]["content"]).upper()

    with ScriptedOpenAIServer(["scripted"], responder=shout) as server:
        first = chat(server, "sync", messages=[{"role": "user", "content": "one"}])
        second = chat(server, "sync", messages=[{"role": "user", "content": "two"}])
    assert first.choices[0].message.content == "scripted"
    assert second.choices[0].message.content == "TWO"


def test_responder_failure_becomes_a_500(server: ScriptedOpenAIServer) -> None:
    def broken(body: dict[str, Any]) -> Reply:
        raise LookupError("no reply for this")

    server.responder = broken
    with pytest.raises(openai.InternalServerError, match="no reply for this"):
        chat(server, "sync")


def test_requests_are_recorded(server: ScriptedOpenAIServer) -> None:
    messages = [
        {"role": "system", "content": "Known about the user: prefers tea."},
        {"role": "user", "content": "What should I drink?"},
    ]
    chat(server, "sync", messages=messages, temperature=0.2)
    embed(server, "sync", input="tea")

    chat_request, embed_request = server.requests
    assert isinstance(chat_request, RecordedRequest)
    assert (chat_request.method, chat_request.path) == ("POST", "/v1/chat/completions")
    assert chat_request.body is not None
    assert chat_request.body["messages"] == messages
    assert chat_request.body["temperature"] == 0.2
    assert chat_request.headers["authorization"] == "Bearer sk-scripted"
    assert chat_request.headers["content-type"] == "application/json"
    assert embed_request.path == "/v1/embeddings"
    assert embed_request.body is not None and embed_request.body["input"] == "tea"

    server.reset()
    assert server.requests == []


@pytest.mark.parametrize("mode", MODES)
def test_n_choices(server: ScriptedOpenAIServer, mode: str) -> None:
    server.script("same answer")
    answer = chat(server, mode, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert {c.message.content for c in answer.choices} == {"same answer"}

    server.script("streamed")
    chunks = stream(server, mode, n=2)
    assert content_of(chunks, 0) == content_of(chunks, 1) == "streamed"
    finals = [c.choices[0] for c in chunks if c.choices[0].finish_reason]
    assert sorted((f.index, f.finish_reason) for f in finals) == [(0, "stop"), (1, "stop")]


# -- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_stream_reassembles_exactly(server: ScriptedOpenAIServer, mode: str) -> None:
    text = "The quick brown fox — jumps over 🦊 the lazy dog."
    server.script(Reply.text(text, chunk_size=3))

    chunks = stream(server, mode)

    assert content_of(chunks) == text
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert pieces == [text[i : i + 3] for i in range(0, len(text), 3)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {(c.object, c.model) for c in chunks} == {("chat.completion.chunk", "gpt-test")}
    assert all(c.usage is None for c in chunks)


def test_stream_default_chunk_size_and_explicit_chunks() -> None:
    with ScriptedOpenAIServer(["abcdefg", Reply.text(["Hel", "lo, ", "world"])], chunk_size=2) as s:
        default = stream(s, "sync")
        explicit = stream(s, "sync")
    assert [c.choices[0].delta.content for c in default[1:-1]] == ["ab", "cd", "ef", "g"]
    assert [c.choices[0].delta.content for c in explicit[1:-1]] == ["Hel", "lo, ", "world"]


@pytest.mark.parametrize("mode", MODES)
def test_stream_include_usage(server: ScriptedOpenAIServer, mode: str) -> None:
    server.script(Reply.text("counted", usage=Usage(5, 2)))

    chunks = stream(server, mode, stream_options={"include_usage": True})

    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 2)
    assert last.usage.total_tokens == 7
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert content_of(body) == "counted"


def test_stream_chunk_delay_spaces_out_chunks(server: ScriptedOpenAIServer) -> None:
    server.script(Reply.text(["a", "b", "c"]).delayed(0, between_chunks=0.05))
    arrivals: list[float] = []
    with server.client() as client:
        start = time.perf_counter()
        for _chunk in client.chat.completions.create(model="m", messages=USER, stream=True):
            arrivals.append(time.perf_counter() - start)
    assert len(arrivals) == 5  # role, a, b, c, finish
    assert arrivals[-1] - arrivals[0] >= 0.15


# -- tool calls ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_tool_call(server: ScriptedOpenAIServer, mode: str) -> None:
    server.script(Reply.tool_call("save_memory", {"text": "Likes tea", "category": "preference"}))

    answer = chat(server, mode, tools=[{"type": "function", "function": {"name": "save_memory"}}])

    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "save_memory"
    assert json.loads(call.function.arguments) == {"text": "Likes tea", "category": "preference"}


@pytest.mark.parametrize("mode", MODES)
def test_tool_calls_streamed_in_pieces(server: ScriptedOpenAIServer, mode: str) -> None:
    server.script(
        Reply.tool_calls(
            ToolCall("search", {"query": "favourite drink", "limit": 5}, id="call_fixed"),
            ToolCall("save_memory", '{"text": "Works at a fintech startup"}'),
        )
    )

    chunks = stream(server, mode)

    calls: dict[int, dict[str, str]] = {}
    argument_pieces = 0
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            assert delta.function is not None
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
            argument_pieces += bool(delta.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert argument_pieces > 10  # several pieces per call, as OpenAI streams them
    assert calls[0]["id"] == "call_fixed" and calls[1]["id"].startswith("call_")
    assert [calls[0]["name"], calls[1]["name"]] == ["search", "save_memory"]
    assert json.loads(calls[0]["arguments"]) == {"query": "favourite drink", "limit": 5}
    assert json.loads(calls[1]["arguments"]) == {"text": "Works at a fintech startup"}


# -- errors and delays -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_scripted_errors_raise_openai_exceptions(
    server: ScriptedOpenAIServer, mode: str, status: int, error_class: type[openai.APIStatusError]
) -> None:
    server.script(Reply.error(status, "scripted failure", code="boom"), "recovered")

    with pytest.raises(error_class) as caught:
        chat(server, mode)

    assert caught.value.status_code == status
    assert caught.value.code == "boom"
    assert caught.value.body == {
        "message": "scripted failure",
        "type": caught.value.type,
        "param": None,
        "code": "boom",
    }
    assert chat(server, mode).choices[0].message.content == "recovered"


def test_error_defaults_and_streamed_error(server: ScriptedOpenAIServer) -> None:
    server.script(Reply.error(429))
    with pytest.raises(openai.RateLimitError) as caught:
        stream(server, "sync")
    assert (caught.value.type, caught.value.code) == ("requests", "rate_limit_exceeded")
    with pytest.raises(ValueError, match=">= 400"):
        Reply.error(200)


def test_retry_after_header_lets_the_client_retry_fast(server: ScriptedOpenAIServer) -> None:
    server.script(Reply.error(429, headers={"retry-after-ms": "10"}), "after retry")
    with server.client(max_retries=1) as client:
        answer = client.chat.completions.create(model="m", messages=USER)
    assert answer.choices[0].message.content == "after retry"
    assert len(server.requests) == 2


@pytest.mark.parametrize("mode", MODES)
def test_delay_past_client_timeout_raises_timeout(server: ScriptedOpenAIServer, mode: str) -> None:
    server.script(Reply.text("too late").delayed(300))  # cut short when the server closes
    start = time.perf_counter()

    with pytest.raises(openai.APITimeoutError):
        if mode == "sync":
            server.client(timeout=0.2).chat.completions.create(model="m", messages=USER)
        else:

            async def run() -> None:
                async with server.async_client(timeout=0.2) as client:
                    await client.chat.completions.create(model="m", messages=USER)

            asyncio.run(run())

    assert time.perf_counter() - start < 60  # the client's 0.2 s, not the reply's 300 s
    # the client may give up before the server's handler took the delayed reply (a loaded
    # machine): the next request would take it and wait 300 s; wait for the first to take it
    deadline = time.monotonic() + 60
    while server.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.pending == 0
    assert chat(server, mode).choices[0].message.content == "OK"  # still serving


def test_delay_within_timeout_answers_late(server: ScriptedOpenAIServer) -> None:
    server.script(Reply.text("patience").delayed(0.2))
    start = time.perf_counter()
    assert chat(server, "sync").choices[0].message.content == "patience"
    assert time.perf_counter() - start >= 0.2


# -- embeddings and models -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_embeddings_are_deterministic_unit_vectors(server: ScriptedOpenAIServer, mode: str) -> None:
    response = embed(server, mode, input=["tea", "coffee", "tea"])

    assert response.object == "list"
    assert response.model == "text-embedding-3-small"
    assert [e.index for e in response.data] == [0, 1, 2]
    tea, coffee, tea_again = (e.embedding for e in response.data)
    assert len(tea) == 1536
    assert math.isclose(math.fsum(x * x for x in tea), 1.0, rel_tol=1e-5)
    assert tea == tea_again
    assert tea != coffee
    assert embed(server, mode, input="tea").data[0].embedding == tea  # across requests
    # The client asks for base64 (float32) by default; the values match up to float32 rounding.
    assert all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(tea, hash_embedding("tea"), strict=True)
    )
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_embedding_dimensions_and_float_format(server: ScriptedOpenAIServer) -> None:
    response = embed(server, "sync", input="tea", dimensions=64, encoding_format="float")
    assert response.data[0].embedding == hash_embedding("tea", 64)
    tokens = embed(server, "sync", input=[1, 2, 3], dimensions=8).data
    assert len(tokens) == 1 and len(tokens[0].embedding) == 8


def test_embedding_dimension_and_embedder_are_configurable() -> None:
    def counting(text: str, dimensions: int) -> list[float]:
        return [float(len(text))] * dimensions

    with ScriptedOpenAIServer(embedding_dimensions=8) as server:
        assert len(embed(server, "sync", input="tea").data[0].embedding) == 8
    with ScriptedOpenAIServer(embedder=counting, embedding_dimensions=3) as server:
        assert embed(server, "sync", input="abcd").data[0].embedding == [4.0, 4.0, 4.0]


def test_an_embedder_may_answer_with_an_error_reply(server: ScriptedOpenAIServer) -> None:
    server.embedder = lambda text, dimensions: Reply.error(429, headers={"retry-after": "7"})
    with pytest.raises(openai.RateLimitError) as caught:
        embed(server, "sync", input="tea")
    assert caught.value.response.headers["retry-after"] == "7"


def test_models_list_and_retrieve(server: ScriptedOpenAIServer) -> None:
    with server.client() as client:
        models = client.models.list()
        assert [m.id for m in models] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        assert {m.object for m in models} == {"model"}
        assert client.models.retrieve("gpt-4o").id == "gpt-4o"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-such-model")


# -- HTTP behaviour --------------------------------------------------------------------------


def test_unknown_path_is_an_openai_shaped_404(server: ScriptedOpenAIServer) -> None:
    with server.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.post("/nowhere", cast_to=object, body={})
    assert caught.value.code == "unknown_url"

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("GET", "/v1/nope")
        response = connection.getresponse()
        body = response.read()
        assert response.status == 404
        assert response.getheader("Content-Length") == str(len(body))
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error"
        assert "/v1/nope" in error["message"]
        # keep-alive: the same connection serves another request
        connection.request("POST", "/v1/chat/completions", body=b"{not json")
        response = connection.getresponse()
        assert response.status == 400
        assert "parse" in json.loads(response.read())["error"]["message"]
    finally:
        connection.close()


# -- the Responses API ----------------------------------------------------------------------


def responses(server: ScriptedOpenAIServer, mode: str, **kwargs: Any) -> list[Any]:
    """One response (``[response]``) or every event of a streamed one, sync or async."""
    kwargs = {"model": "gpt-test", "input": "Hello there", **kwargs}
    if mode == "sync":
        with server.client() as client:
            answer = client.responses.create(**kwargs)
            return list(answer) if kwargs.get("stream") else [answer]

    async def run() -> list[Any]:
        async with server.async_client() as client:
            answer = await client.responses.create(**kwargs)
            return [e async for e in answer] if kwargs.get("stream") else [answer]

    return asyncio.run(run())


@pytest.mark.parametrize("mode", MODES)
def test_a_response_looks_like_openai(server: ScriptedOpenAIServer, mode: str) -> None:
    server.script(Reply.text("Hi, I remember you like tea.", usage=Usage(12, 8)))
    [answer] = responses(server, mode, instructions="Be kind.")
    assert answer.object == "response" and answer.id.startswith("resp_")
    assert answer.status == "completed" and answer.output_text == "Hi, I remember you like tea."
    [message] = answer.output
    assert (message.type, message.role, message.content[0].type) == (
        "message",
        "assistant",
        "output_text",
    )
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (12, 8)
    assert answer.instructions == "Be kind."
    assert server.requests[-1].path == "/v1/responses"


def test_the_responder_sees_a_response_request_as_chat_messages() -> None:
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> str:
        seen.append(body)
        return "fine"

    with ScriptedOpenAIServer(responder=responder) as server, server.client() as client:
        client.responses.create(
            model="gpt-test",
            instructions="Be kind.",
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
            ],
        )
    assert seen[0]["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"role": "tool", "content": "Sunny"},
    ]


@pytest.mark.parametrize("mode", MODES)
def test_a_streamed_response_has_openai_s_events(server: ScriptedOpenAIServer, mode: str) -> None:
    server.script(Reply.text(["Hel", "lo ", "there"]))
    events = responses(server, mode, stream=True)
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == [
        "Hel",
        "lo ",
        "there",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "Hello there"


@pytest.mark.parametrize("mode", MODES)
def test_function_calls_in_a_response(server: ScriptedOpenAIServer, mode: str) -> None:
    server.script(Reply.tool_call("weather", {"city": "Lisbon"}, id="call_1"))
    [answer] = responses(server, mode)
    [call] = answer.output
    assert (call.type, call.call_id, call.name) == ("function_call", "call_1", "weather")
    assert json.loads(call.arguments) == {"city": "Lisbon"}
    server.script(Reply.tool_call("weather", {"city": "Lisbon"}))
    events = responses(server, mode, stream=True)
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"city": "Lisbon"}
    assert events[-1].response.output[0].name == "weather"


def test_a_cut_response_and_errors(server: ScriptedOpenAIServer) -> None:
    server.script(Reply.text("Half an ans", finish_reason="length"), Reply.error(429, "slow"))
    [answer] = responses(server, "sync")
    assert answer.status == "incomplete"
    assert answer.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.RateLimitError):
        responses(server, "sync")
    with server.client() as client, pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="gpt-test", input=[])
    assert caught.value.param == "input"


def test_openai_s_stream_helper_reads_a_streamed_response(server: ScriptedOpenAIServer) -> None:
    server.script(Reply.text("Helper at work"))
    with server.client() as client, client.responses.stream(model="gpt-test", input="Hi") as s:
        texts = [e.delta for e in s if e.type == "response.output_text.delta"]
        assert s.get_final_response().output_text == "Helper at work" == "".join(texts)


def test_concurrent_requests_from_threads() -> None:
    """Twenty requests are answered at once: each answer waits until all twenty have arrived,
    which a server taking one request at a time never lets happen (no timing: the machines are
    shared)."""
    all_arrived = threading.Barrier(20, timeout=120)

    def echo(body: dict[str, Any]) -> Reply:
        all_arrived.wait()
        return Reply.text(f"echo {body['messages'][-1]['content']}")

    with ScriptedOpenAIServer(responder=echo) as server, server.client(timeout=180) as client:

        def ask(i: int) -> str | None:
            messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": str(i)}]
            answer = client.chat.completions.create(model="m", messages=messages)
            return answer.choices[0].message.content

        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(ask, range(20)))

        assert answers == [f"echo {i}" for i in range(20)]
        assert len(server.requests) == 20
        assert not all_arrived.broken


def test_concurrent_async_streams(server: ScriptedOpenAIServer) -> None:
    server.responder = lambda body: Reply.text(f"stream {body['messages'][-1]['content']}")

    async def run() -> list[str]:
        async with server.async_client() as client:

            async def one(i: int) -> str:
                messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": str(i)}]
                chunks = await client.chat.completions.create(
                    model="m",
                    messages=messages,
                    stream=True,
                )
                return "".join([c.choices[0].delta.content or "" async for c in chunks])

            return list(await asyncio.gather(*(one(i) for i in range(20))))

    assert asyncio.run(run()) == [f"stream {i}" for i in range(20)]


def test_close_is_prompt_frees_the_port_and_cuts_delays() -> None:
    server = ScriptedOpenAIServer([Reply.text("never").delayed(300)]).start()
    port = server.port
    errors: list[Exception] = []

    def call() -> None:
        try:
            server.client(timeout=300).chat.completions.create(model="m", messages=USER)
        except Exception as exc:
            errors.append(exc)

    waiter = threading.Thread(target=call)
    waiter.start()
    while not server.requests:
        time.sleep(0.01)
    start = time.perf_counter()
    server.close()
    waiter.join(timeout=60)
    assert time.perf_counter() - start < 60  # neither the delay's 300 s nor the client's
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], openai.APIConnectionError)

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.base_url
    server.close()  # idempotent


def test_base_url_and_clients_point_at_the_server(server: ScriptedOpenAIServer) -> None:
    assert re.fullmatch(
        rf"http://127\.0\.0\.1:{server.port}/run-[0-9a-f]{{12}}/v1", server.base_url
    )
    with server.client() as client:
        assert str(client.base_url).rstrip("/") == server.base_url
        assert client.max_retries == 0
    server.script("unprefixed")
    with OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="k") as bare:
        answer = bare.chat.completions.create(model="m", messages=USER)
    assert answer.choices[0].message.content == "unprefixed"
    assert server.requests[-1].path == "/v1/chat/completions"


def test_a_client_left_from_an_earlier_server_on_the_port_takes_no_scripted_reply() -> None:
    with ScriptedOpenAIServer() as earlier:
        earlier_url = earlier.base_url
    with ScriptedOpenAIServer(["for this server's own client"]) as server:
        # The OS may or may not give the port again; send the earlier run's path here either way.
        stale_url = earlier_url.replace(f":{urlsplit(earlier_url).port}/", f":{server.port}/")
        stale = OpenAI(base_url=stale_url, api_key="k", max_retries=0)
        with stale, pytest.raises(openai.APIStatusError) as refused:
            stale.chat.completions.create(model="m", messages=USER)
        assert refused.value.status_code == 421
        assert "earlier server" in refused.value.message
        assert server.pending == 1 and server.requests == []
        assert chat(server, "sync").choices[0].message.content == "for this server's own client"


def test_azure_deployment_routes_are_served(server: ScriptedOpenAIServer) -> None:
    server.script("Hi from Azure", Reply.text("streamed", chunk_size=3))
    options: dict[str, Any] = {
        "azure_endpoint": server.azure_endpoint,
        "azure_deployment": "my-gpt",
        "api_version": "2024-10-21",
        "api_key": "azure-key",
        "max_retries": 0,
    }
    with openai.AzureOpenAI(**options) as client:
        answer = client.chat.completions.create(model="my-gpt", messages=USER)
        stream = client.chat.completions.create(model="my-gpt", messages=USER, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        vectors = client.embeddings.create(model="my-embedder", input="x", dimensions=8)
    assert (answer.choices[0].message.content, streamed) == ("Hi from Azure", "streamed")
    assert vectors.data[0].embedding == pytest.approx(hash_embedding("x", 8))
    paths = [request.path for request in server.requests]
    assert paths == [
        "/openai/deployments/my-gpt/chat/completions",
        "/openai/deployments/my-gpt/chat/completions",
        "/openai/deployments/my-gpt/embeddings",
    ]
    assert server.requests[0].headers["api-key"] == "azure-key"
    other = openai.OpenAI(base_url=f"{server.azure_endpoint}/openai/other/x", api_key="k")
    with other, pytest.raises(openai.NotFoundError):  # only the deployment routes are mapped
        other.chat.completions.create(model="m", messages=USER)
