"""with_raw_response, with_streaming_response and parse on a memory client, over real HTTP:
the real openai client (sync and async), a scripted model on 127.0.0.1, real Chroma and the real
embedding model. The block never reaches the caller; the memory work happens once per call."""

from __future__ import annotations

import asyncio
import json
import logging
import warnings

import openai
import pytest
from conftest import RememberingModel, instruction_nonce
from pydantic import BaseModel

from headroom_memory_integrations.openai import with_fast_memory, with_memory
from headroom_memory_integrations.prompts import CONTEXT_OPEN
from headroom_memory_integrations.testing import Reply

pytestmark = pytest.mark.openai_client

ANSWER = "Python suits that service."
KNOWN = "Prefers Python for backend work"
NEW = {"text": "Is building a billing service", "category": "context"}
QUESTION = [{"role": "user", "content": "I am building a billing service. Which language?"}]
MODES = ["sync", "async"]


@pytest.fixture
def memory_model(openai_server) -> RememberingModel:
    """Answers ANSWER and, when instructed, a block remembering NEW; streamed 3 characters at a
    time, so the block's tag is split across chunks."""
    responder = RememberingModel(ANSWER, [NEW])
    responder.chunk_size = 3
    openai_server.responder = responder
    return responder


@pytest.fixture
def clients(openai_server, db_path, model):
    """A sync and an async memory client for alice, over one store that already knows KNOWN."""
    sync = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=model
    )
    sync.memory.add(KNOWN, category="preference")
    yield {
        "sync": sync,
        "async": with_fast_memory(openai_server.async_client(), memory=sync.memory),
    }
    sync.close()


def processed(client) -> int:
    return client.memory.stats()["background"].get("processed", 0)


def assert_memory_was_used(server) -> None:
    """The last chat request carried KNOWN and the inline instruction."""
    [injected] = [m for m in server.requests[-1].body["messages"] if m["role"] == "system"]
    assert CONTEXT_OPEN in injected["content"] and KNOWN in injected["content"]
    assert instruction_nonce(server.requests[-1].body)


def assert_stored_once(client, before: int) -> None:
    assert client.memory.flush(30)
    assert processed(client) - before == 1
    assert sorted(m.text for m in client.memory.get_all()) == sorted([KNOWN, NEW["text"]])


def sse_text(lines: list[str]) -> str:
    """The assistant text carried by server-sent events (lines of an SSE body)."""
    text = ""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


def in_loop(coroutine, *async_clients):
    """Run ``coroutine`` in a new event loop, then close the clients' connections in it."""

    async def main():
        try:
            return await coroutine
        finally:
            for client in async_clients:
                await client.close()

    return asyncio.run(main())


def run(mode: str, sync_scenario, async_scenario, clients):
    if mode == "sync":
        return sync_scenario()
    return in_loop(async_scenario(), clients["async"])


# -- with_raw_response ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_raw_create_gets_memory_and_hides_the_block(
    mode, clients, openai_server, memory_model
) -> None:
    client = clients[mode]
    before = processed(client)
    completions = client.chat.completions

    def sync():
        return completions.with_raw_response.create(model="gpt-4o", messages=QUESTION)

    async def asynchronous():
        return await completions.with_raw_response.create(model="gpt-4o", messages=QUESTION)

    raw = run(mode, sync, asynchronous, clients)
    assert_memory_was_used(openai_server)
    completion = raw.parse()
    assert completion.choices[0].message.content == ANSWER
    assert raw.parse() is completion
    assert raw.status_code == 200 and raw.headers["x-request-id"] == raw.request_id
    assert completion._request_id == raw.request_id
    assert raw.retries_taken == 0 and raw.http_request.method == "POST"
    body = json.loads(raw.text)
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert body["id"] == completion.id and body["usage"]["total_tokens"] > 0
    assert json.loads(raw.content) == body and "<memory-" not in raw.text
    assert "<memory-" in raw.http_response.text  # documented: the httpx response is as received
    assert_stored_once(client, before)


@pytest.mark.parametrize("mode", MODES)
def test_raw_create_streamed_never_shows_the_block(
    mode, clients, openai_server, memory_model
) -> None:
    client = clients[mode]
    before = processed(client)
    completions = client.chat.completions

    def sync():
        raw = completions.with_raw_response.create(model="gpt-4o", messages=QUESTION, stream=True)
        assert raw.parse() is raw.parse() and raw.headers["content-type"].startswith("text/")
        with raw.parse() as stream:
            return [c.choices[0].delta.content for c in stream if c.choices]

    async def asynchronous():
        raw = await completions.with_raw_response.create(
            model="gpt-4o", messages=QUESTION, stream=True
        )
        with pytest.raises(TypeError, match="async for"):  # a property cannot wait for the body
            _ = raw.text
        async with raw.parse() as stream:
            return [c.choices[0].delta.content async for c in stream if c.choices]

    pieces = run(mode, sync, asynchronous, clients)
    assert_memory_was_used(openai_server)
    assert "".join(p or "" for p in pieces) == ANSWER  # not one character of the block
    assert len([p for p in pieces if p]) >= 5  # streamed piece by piece, not gathered
    assert_stored_once(client, before)


def test_raw_streamed_body_is_rendered_from_the_filtered_chunks(
    clients, openai_server, memory_model
) -> None:
    client = clients["sync"]
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=QUESTION, stream=True
    )
    text = raw.text
    assert "memory-" not in text and text.endswith("data: [DONE]\n\n")
    assert sse_text(text.splitlines()) == ANSWER


# -- with_streaming_response ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_streaming_response_whole_completion(mode, clients, openai_server, memory_model) -> None:
    client = clients[mode]
    before = processed(client)
    completions = client.chat.completions

    def sync():
        with completions.with_streaming_response.create(model="gpt-4o", messages=QUESTION) as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == r.request_id
            parsed = r.parse()
            return (
                parsed.choices[0].message.content,
                r.parse() is parsed,
                r.json(),
                r.text(),
                r.read(),
                b"".join(r.iter_bytes(chunk_size=7)),
                "".join(r.iter_text()),
                list(r.iter_lines()),
            )

    async def asynchronous():
        async with completions.with_streaming_response.create(
            model="gpt-4o", messages=QUESTION
        ) as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == r.request_id
            parsed = await r.parse()
            return (
                parsed.choices[0].message.content,
                await r.parse() is parsed,
                await r.json(),
                await r.text(),
                await r.read(),
                b"".join([piece async for piece in r.iter_bytes(chunk_size=7)]),
                "".join([piece async for piece in r.iter_text()]),
                [line async for line in r.iter_lines()],
            )

    content, same, body, text, data, pieces, whole, lines = run(mode, sync, asynchronous, clients)
    assert_memory_was_used(openai_server)
    assert content == ANSWER and same
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert json.loads(text) == body and json.loads(data) == body and pieces == data
    assert whole == text and "\n".join(lines) == text and "memory-" not in text
    assert_stored_once(client, before)


@pytest.mark.parametrize("mode", MODES)
def test_streaming_response_streamed_completion(mode, clients, openai_server, memory_model) -> None:
    client = clients[mode]
    before = processed(client)
    completions = client.chat.completions
    request = {"model": "gpt-4o", "messages": QUESTION, "stream": True}

    def sync():
        with completions.with_streaming_response.create(**request) as r:
            first = list(r.iter_lines())
        with completions.with_streaming_response.create(**request) as r:
            second = [c.choices[0].delta.content or "" for c in r.parse() if c.choices]
        return first, second

    async def asynchronous():
        async with completions.with_streaming_response.create(**request) as r:
            first = [line async for line in r.iter_lines()]
        async with completions.with_streaming_response.create(**request) as r:
            second = [c.choices[0].delta.content or "" async for c in await r.parse() if c.choices]
        return first, second

    lines, pieces = run(mode, sync, asynchronous, clients)
    assert_memory_was_used(openai_server)
    assert sse_text(lines) == ANSWER and lines[-2:] == ["data: [DONE]", ""]
    assert not any("memory-" in line for line in lines)
    assert "".join(pieces) == ANSWER and len([p for p in pieces if p]) >= 5
    assert client.memory.flush(30) and processed(client) - before == 2  # one store per call


def test_client_level_views_have_memory(clients, openai_server, memory_model) -> None:
    client = clients["sync"]
    raw = client.with_raw_response.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert_memory_was_used(openai_server)
    assert raw.parse().choices[0].message.content == ANSWER
    with client.with_streaming_response.chat.completions.create(
        model="gpt-4o", messages=QUESTION
    ) as response:
        assert_memory_was_used(openai_server)
        assert response.parse().choices[0].message.content == ANSWER
    faster = client.with_options(timeout=10)  # a copy keeps its memory on every path
    raw = faster.chat.completions.with_raw_response.create(model="gpt-4o", messages=QUESTION)
    assert_memory_was_used(openai_server)
    assert "memory-" not in raw.text


# -- the memory work happens once ------------------------------------------------------------------


def test_every_accessor_of_one_call_does_the_memory_work_once(clients, openai_server) -> None:
    client = clients["sync"]
    openai_server.responder = lambda body: "No block here."  # a model that ignores the instruction
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=QUESTION)
    raw.parse(), raw.parse(), raw.text, raw.content
    assert raw.parse(to=dict)["choices"][0]["message"]["content"] == "No block here."
    assert client.memory.counters["missing_blocks"] == 1
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=QUESTION
    ) as response:
        response.json(), response.parse(), response.read(), list(response.iter_lines())
    assert client.memory.counters["missing_blocks"] == 2


def test_parse_to_other_types_shows_no_block(clients, memory_model) -> None:
    client = clients["sync"]
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=QUESTION)
    assert json.loads(raw.parse(to=str))["choices"][0]["message"]["content"] == ANSWER
    assert raw.parse(to=dict)["choices"][0]["message"]["content"] == ANSWER
    assert raw.parse(to=openai.types.chat.ChatCompletion).choices[0].message.content == ANSWER
    streamed = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=QUESTION, stream=True
    )
    with pytest.raises(TypeError, match="parse\\(\\)"):
        streamed.parse(to=openai.Stream)


def test_background_mode_extracts_each_raw_call_once(openai_server, db_path, model) -> None:
    extractions = []

    def responder(body):
        if "You maintain long-term memory" in body["messages"][0]["content"]:
            extractions.append(body)
            return '{"memories": []}'
        return Reply.text(ANSWER, chunk_size=3)

    openai_server.responder = responder
    client = with_memory(openai_server.client(), user_id="alice", db_path=db_path, embedder=model)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=QUESTION)
    assert raw.parse().choices[0].message.content == ANSWER and raw.parse() is raw.parse()
    assert "memory-" not in raw.text
    streamed = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=QUESTION, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed.parse()) == ANSWER
    assert client.memory.flush(30)
    assert len(extractions) == 2
    assert all(ANSWER in json.dumps(body) for body in extractions)


# -- structured outputs ----------------------------------------------------------------------------


class Choice(BaseModel):
    language: str


@pytest.mark.parametrize("mode", MODES)
def test_structured_outputs_get_memories_but_no_instruction(mode, clients, openai_server) -> None:
    client = clients[mode]
    openai_server.responder = lambda body: '{"language": "Python"}'
    completions = client.chat.completions
    request = {"model": "gpt-4o", "messages": QUESTION, "response_format": Choice}

    def sync():
        direct = completions.parse(**request)
        raw = completions.with_raw_response.parse(**request)
        with completions.with_streaming_response.parse(**request) as streamed:
            return direct, raw.parse(), streamed.parse()

    async def asynchronous():
        direct = await completions.parse(**request)
        raw = await completions.with_raw_response.parse(**request)
        async with completions.with_streaming_response.parse(**request) as streamed:
            return direct, raw.parse(), await streamed.parse()

    for parsed in run(mode, sync, asynchronous, clients):
        assert parsed.choices[0].message.parsed == Choice(language="Python")
    for request_sent in openai_server.requests:
        system = [m for m in request_sent.body["messages"] if m["role"] == "system"]
        assert KNOWN in system[0]["content"]  # memories injected
        assert instruction_nonce(request_sent.body) is None  # no block asked for
    assert client.memory.counters["missing_blocks"] == 0


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_api_errors_reach_the_caller_unchanged(mode, clients, openai_server) -> None:
    client = clients[mode]
    completions = client.chat.completions
    openai_server.script(
        Reply.error(429, "slow down"),
        Reply.error(400, "bad request", param="messages"),
        Reply.error(500, "boom"),
        Reply.error(401, "who are you"),
    )

    def sync():
        caught = []
        for call in (
            lambda: completions.with_raw_response.create(model="gpt-4o", messages=QUESTION),
            lambda: completions.with_raw_response.create(
                model="gpt-4o", messages=QUESTION, stream=True
            ),
            lambda: completions.with_streaming_response.create(
                model="gpt-4o", messages=QUESTION
            ).__enter__(),
            lambda: completions.with_raw_response.parse(model="gpt-4o", messages=QUESTION),
        ):
            with pytest.raises(openai.APIStatusError) as error:
                call()
            caught.append(error.value)
        return caught

    async def asynchronous():
        caught = []
        for call in (
            lambda: completions.with_raw_response.create(model="gpt-4o", messages=QUESTION),
            lambda: completions.with_raw_response.create(
                model="gpt-4o", messages=QUESTION, stream=True
            ),
            lambda: completions.with_streaming_response.create(
                model="gpt-4o", messages=QUESTION
            ).__aenter__(),
            lambda: completions.with_raw_response.parse(model="gpt-4o", messages=QUESTION),
        ):
            with pytest.raises(openai.APIStatusError) as error:
                await call()
            caught.append(error.value)
        return caught

    errors = run(mode, sync, asynchronous, clients)
    assert [type(e) for e in errors] == [
        openai.RateLimitError,
        openai.BadRequestError,
        openai.InternalServerError,
        openai.AuthenticationError,
    ]
    assert [e.status_code for e in errors] == [429, 400, 500, 401]
    assert errors[1].body["param"] == "messages" and "slow down" in errors[0].message


# -- what is not wrapped -------------------------------------------------------------------------


def unwrapped_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "headroom_memory_integrations.openai" and "not wrapped" in r.getMessage()
    ]


def test_unwrapped_apis_work_and_warn_once_per_client(clients, openai_server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="headroom_memory_integrations.openai")
    client = clients["sync"]
    for _ in range(2):  # the legacy Completions API: the scripted server has none (404)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4o", prompt="I like tea")
        with pytest.raises(openai.NotFoundError):
            client.with_raw_response.completions.create(model="gpt-4o", prompt="hi")
        with pytest.raises(openai.NotFoundError):
            client.with_options(timeout=5).completions.with_raw_response.create(
                model="gpt-4o", prompt="hi"
            )
    [warning] = unwrapped_warnings(caplog)
    assert "client.completions.create(...) is not wrapped" in warning
    assert "alice" not in warning
    with warnings.catch_warnings(), pytest.raises(openai.NotFoundError):
        warnings.simplefilter("ignore", DeprecationWarning)  # openai 3.x: Assistants deprecated
        client.beta.threads.create()  # the Assistants API: no memory either
    assert "client.beta.threads.create(...)" in unwrapped_warnings(caplog)[1]
    assert len(unwrapped_warnings(caplog)) == 2

    legacy = clients["async"].completions.create(model="gpt-4o", prompt="hi")
    with pytest.raises(openai.NotFoundError):  # another memory client warns for itself
        in_loop(legacy, clients["async"])
    assert len(unwrapped_warnings(caplog)) == 3
    assert "alice" not in repr(client.completions) and "not wrapped" in repr(client.completions)


@pytest.mark.parametrize("mode", MODES)
def test_the_client_views_beta_warns_as_client_beta_does(
    mode, clients, openai_server, memory_model, caplog
) -> None:
    """``client.with_raw_response.beta`` (and ``with_streaming_response.beta``) has no ``chat``
    on openai 2.x and 3.x, as on a plain client: beta.chat.completions' raw response is
    ``client.beta.chat.completions.with_raw_response``, which has memory. What it has (the
    Assistants API, the beta Responses API) reaches the model without memory, as through
    ``client.beta``: after a warning naming the path, never silently."""
    caplog.set_level(logging.WARNING, logger="headroom_memory_integrations.openai")
    client = clients[mode]
    for view in ("with_raw_response", "with_streaming_response"):
        beta = getattr(client, view).beta
        assert not hasattr(getattr(client._wrapped, view).beta, "chat")
        with pytest.raises(AttributeError, match="has no attribute 'chat'"):
            beta.chat  # noqa: B018 (openai's own error, as on a plain client)
        assert repr(beta) == f"<{view}.beta of a memory client: not wrapped with memory>"

    def beta_call():  # the beta Responses API: unwrapped
        return client.with_raw_response.beta.responses.create(model="gpt-4o", input="Hi")

    def chat_call():  # beta.chat.completions' raw response: with memory
        return client.beta.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=QUESTION
        )

    def sync_calls():
        beta_raw = beta_call()
        return beta_raw, openai_server.requests[-1].body, chat_call()

    async def async_calls():
        beta_raw = await beta_call()
        return beta_raw, openai_server.requests[-1].body, await chat_call()

    beta_raw, beta_body, chat_raw = run(mode, sync_calls, async_calls, clients)
    assert beta_raw.http_response.status_code == 200
    assert KNOWN not in json.dumps(beta_body)  # no memory, as the warning says
    [warning] = unwrapped_warnings(caplog)
    assert "client.with_raw_response.beta.responses.create(...) is not wrapped" in warning
    assert_memory_was_used(openai_server)
    assert chat_raw.parse().choices[0].message.content == ANSWER


@pytest.mark.parametrize("mode", MODES)
def test_chats_own_raw_and_streaming_views_have_memory(
    mode, clients, openai_server, memory_model
) -> None:
    """openai reaches raw responses three ways; ``client.chat.with_raw_response.completions``
    (and ``with_streaming_response``) went to the plain client: no memory, no warning."""
    client = clients[mode]
    before = processed(client)
    raw = client.chat.with_raw_response.completions.create(model="gpt-4o", messages=QUESTION)
    if mode == "async":
        raw = in_loop(raw)
    assert_memory_was_used(openai_server)
    assert raw.parse().choices[0].message.content == ANSWER
    assert "<memory-" not in raw.text
    assert_stored_once(client, before)

    if mode == "sync":
        with client.chat.with_streaming_response.completions.create(
            model="gpt-4o", messages=QUESTION
        ) as streamed:
            assert streamed.parse().choices[0].message.content == ANSWER
        assert_memory_was_used(openai_server)


def test_the_live_api_and_a_responses_websocket_warn_that_they_have_no_memory(
    clients, caplog
) -> None:
    """``client.live`` (openai 3.x) and ``client.responses.connect`` (a WebSocket session)
    reach the model without memory: they are the client's own, after a warning."""
    caplog.set_level(logging.WARNING, logger="headroom_memory_integrations.openai")
    client = clients["sync"]
    connect = client.responses.connect
    assert connect.__wrapped__ == client._wrapped.responses.connect
    with pytest.raises(Exception):  # noqa: B017 (the scripted server has no WebSocket)
        connect(model="gpt-4o").__enter__()
    assert "client.responses.connect(...) is not wrapped" in unwrapped_warnings(caplog)[-1]
    if hasattr(client._wrapped, "live"):
        assert "not wrapped" in repr(client.live)


def test_the_whole_client_used_as_completions_fails_clearly(clients) -> None:
    client = clients["sync"]
    for attempt in (
        lambda: client.create,
        lambda: client.with_raw_response.create,
        lambda: client.with_streaming_response.create,
    ):
        with pytest.raises(AttributeError, match=r"client=client\.chat\.completions"):
            attempt()
    assert not hasattr(client, "parse")
