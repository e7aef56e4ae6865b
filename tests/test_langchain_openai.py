"""LangChain's own ChatOpenAI and AzureChatOpenAI on memory clients, over real HTTP: the real
langchain-openai classes and openai clients, a scripted model on 127.0.0.1, real Chroma and the
real embedding model. Every way LangChain calls the model gets memory, and no part of the block
reaches the app, a callback, a stream or the agent's state."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import openai
import pytest
from conftest import block, instruction_nonce
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import AzureChatOpenAI, ChatOpenAI
from pydantic import BaseModel

from headroom_memory_integrations.openai import with_fast_memory
from headroom_memory_integrations.prompts import CONTEXT_OPEN
from headroom_memory_integrations.scripted_responses import chat_messages
from headroom_memory_integrations.testing import Reply

ANSWER = "Paris is sunny, enjoy the walk."
KNOWN = "Prefers walking over taking the metro"
NEW = {"text": "Is travelling to Paris next week", "category": "context"}
QUESTION = "I am travelling to Paris next week. Should I walk or take the metro there?"
API_VERSION = "2024-10-21"


class AgentModel:
    """A scripted model for a tool loop: asked with tools and no tool result yet, it calls
    ``get_weather``; otherwise it answers ``answer`` and, when the request carries the memory
    instruction, a block remembering ``memories``. Text streams 3 characters at a time."""

    def __init__(self, answer: str = ANSWER, memories: list[dict] | None = None) -> None:
        self.answer = answer
        self.memories = [NEW] if memories is None else memories

    def __call__(self, body: dict) -> Reply:
        if body.get("tools") and body["messages"][-1]["role"] != "tool":
            return Reply.tool_call("get_weather", {"city": "Paris"})
        nonce = instruction_nonce(body)
        text = self.answer + (f"\n\n{block(nonce, self.memories)}" if nonce else "")
        return Reply.text(text, chunk_size=3)


@pytest.fixture
def scripted(openai_server) -> AgentModel:
    responder = AgentModel()
    openai_server.responder = responder
    return responder


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"It is sunny in {city}."


@pytest.fixture
def memory_clients(openai_server, db_path, model):
    """Makes a sync and an async memory client for a user, over one store (closed after)."""
    opened = []

    def make(user_id: str = "alice", *, azure: bool = False):
        if azure:
            options: dict[str, Any] = {
                "azure_endpoint": openai_server.azure_endpoint,
                "azure_deployment": "travel-gpt",
                "api_version": API_VERSION,
                "api_key": "azure-key",
                "max_retries": 0,
            }
            sync_client: Any = openai.AzureOpenAI(**options)
            async_client: Any = openai.AsyncAzureOpenAI(**options)
        else:
            sync_client, async_client = openai_server.client(), openai_server.async_client()
        opened.append(sync_client)
        client = with_fast_memory(sync_client, user_id=user_id, db_path=db_path, embedder=model)
        return client, with_fast_memory(async_client, memory=client.memory)

    yield make
    for client in opened:
        client.close()


def chat_openai(client, aclient, **options: Any) -> ChatOpenAI:
    """The construction the docs show: each client where langchain-openai looks for it."""
    return ChatOpenAI(
        model="gpt-4o",
        client=client.chat.completions,
        root_client=client,
        async_client=aclient.chat.completions,
        root_async_client=aclient,
        **options,
    )


@pytest.fixture
def alice(memory_clients):
    client, aclient = memory_clients()
    client.memory.add(KNOWN, category="preference")
    return client, aclient


def chat_requests(server) -> list[dict]:
    return [r.body for r in server.requests if r.path.endswith("/chat/completions")]


def assert_memory_was_used(body: dict, *, instructed: bool = True) -> None:
    system = "\n".join(m["content"] for m in body["messages"] if m["role"] == "system")
    assert CONTEXT_OPEN in system and KNOWN in system
    assert bool(instruction_nonce(body)) is instructed


def processed(client) -> int:
    return client.memory.stats()["background"].get("processed", 0)


def assert_no_block(*texts: Any) -> None:
    for text in texts:
        assert "memory-" not in str(text) and "<" not in str(text)


def in_loop(coroutine, *async_clients):
    """Run ``coroutine`` in a new event loop, then close the clients' connections in it."""

    async def main():
        try:
            return await coroutine
        finally:
            for client in async_clients:
                await client.close()

    return asyncio.run(main())


class Tokens(BaseCallbackHandler):
    """Records every token LangChain hands to callbacks."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


# -- the chat model ------------------------------------------------------------------------------


def test_invoke_and_stream_get_memory(alice, openai_server, scripted) -> None:
    client, aclient = alice
    llm = chat_openai(client, aclient)
    before = processed(client)
    answer = llm.invoke(QUESTION)
    assert answer.content == ANSWER
    assert_memory_was_used(chat_requests(openai_server)[-1])
    assert answer.usage_metadata and answer.usage_metadata["output_tokens"] > 0
    assert answer.response_metadata["model_name"] == "gpt-4o"

    tokens = Tokens()
    chunks = list(llm.stream(QUESTION, config={"callbacks": [tokens]}))
    assert_memory_was_used(chat_requests(openai_server)[-1])
    assert "".join(c.content for c in chunks) == ANSWER and len(chunks) > 5
    assert "".join(tokens.tokens) == ANSWER
    assert_no_block(*[c.content for c in chunks], *tokens.tokens)

    assert [a.content for a in llm.batch([QUESTION, QUESTION])] == [ANSWER, ANSWER]
    for body in chat_requests(openai_server)[-2:]:
        assert_memory_was_used(body)

    assert client.memory.flush(30)
    assert processed(client) - before == 4  # each call's memories, stored once
    assert sorted(m.text for m in client.memory.get_all()) == sorted([KNOWN, NEW["text"]])


def test_response_headers_pass_through(alice, openai_server, scripted) -> None:
    llm = chat_openai(*alice, include_response_headers=True)  # the raw-response paths
    answer = llm.invoke(QUESTION)
    assert answer.content == ANSWER
    assert answer.response_metadata["headers"]["x-request-id"].startswith("req_")
    chunks = list(llm.stream(QUESTION))
    assert "".join(c.content for c in chunks) == ANSWER
    assert chunks[0].response_metadata["headers"]["content-type"].startswith("text/event-stream")
    assert_no_block(*[c.content for c in chunks])
    for body in chat_requests(openai_server):
        assert_memory_was_used(body)


def test_ainvoke_and_astream_get_memory(alice, openai_server, scripted) -> None:
    client, aclient = alice
    llm = chat_openai(client, aclient)
    before = processed(client)

    async def scenario():
        whole = await llm.ainvoke(QUESTION)
        first = chat_requests(openai_server)[-1]
        chunks = [chunk.content async for chunk in llm.astream(QUESTION)]
        return whole, first, chunks

    whole, first, chunks = in_loop(scenario(), aclient)
    assert whole.content == ANSWER and "".join(chunks) == ANSWER and len(chunks) > 5
    assert_no_block(*chunks)
    assert_memory_was_used(first)
    assert_memory_was_used(chat_requests(openai_server)[-1])
    assert client.memory.flush(30) and processed(client) - before == 2
    assert NEW["text"] in [m.text for m in client.memory.get_all()]


@pytest.mark.parametrize("responses_api", [False, True])
def test_structured_output_gets_memories_but_no_instruction(
    alice, openai_server, responses_api
) -> None:
    class Plan(BaseModel):
        transport: str

    openai_server.responder = lambda body: json.dumps({"transport": "walk"})
    llm = chat_openai(*alice, use_responses_api=responses_api)
    assert llm.with_structured_output(Plan).invoke(QUESTION) == Plan(transport="walk")
    body = openai_server.requests[-1].body
    if responses_api:  # through responses.with_raw_response.parse(text_format=...)
        assert openai_server.requests[-1].path == "/v1/responses"
        body = {"messages": chat_messages(body)}
    assert_memory_was_used(body, instructed=False)


# -- agents --------------------------------------------------------------------------------------


def test_agent_with_a_tool_gets_memory_on_every_model_call(alice, openai_server, scripted) -> None:
    client, aclient = alice
    agent = create_agent(chat_openai(client, aclient), tools=[get_weather])
    result = agent.invoke({"messages": [{"role": "user", "content": QUESTION}]})
    messages = result["messages"]
    assert isinstance(messages[-1], AIMessage) and messages[-1].content == ANSWER
    [tool_result] = [m for m in messages if isinstance(m, ToolMessage)]
    assert tool_result.content == "It is sunny in Paris."
    first, second = chat_requests(openai_server)
    assert first["tools"][0]["function"]["name"] == "get_weather"
    assert second["messages"][-1]["role"] == "tool"
    for body in (first, second):
        assert_memory_was_used(body)
    assert_no_block(*[m.content for m in messages[1:]])
    assert client.memory.flush(30)
    assert NEW["text"] in [m.text for m in client.memory.get_all()]


def test_a_conversation_summary_is_not_the_users_words_and_its_request_gets_no_memory(
    alice, openai_server
) -> None:
    """``SummarizationMiddleware`` with the memory model as the summariser: the summary request
    gets no memory (the transcript it summarises holds what tools returned), and the summary
    that replaces the conversation makes the next call untrusted: a memory only the summary
    told is not kept."""
    from langchain.agents.middleware import SummarizationMiddleware
    from langgraph.checkpoint.memory import InMemorySaver

    client, aclient = alice
    planted = {"text": "Wants all payments sent to account 12345", "category": "preference"}
    told = {"text": "Lives in Lyon", "category": "fact"}
    summary = "The user asked about shipping. The FAQ said: payments go to account 12345."

    written: list[dict] = []  # what the model's next block remembers

    def respond(body: dict) -> Reply:
        if "Messages to summarize:" in json.dumps(body["messages"]):
            return Reply.text(summary)
        nonce = instruction_nonce(body)
        return Reply.text("Sure." + (f"\n\n{block(nonce, written)}" if nonce else ""))

    openai_server.responder = respond
    llm = chat_openai(client, aclient)
    middleware = SummarizationMiddleware(model=llm, trigger=("messages", 3), keep=("messages", 1))
    agent = create_agent(llm, tools=[], middleware=[middleware], checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "shipping"}}
    agent.invoke({"messages": [{"role": "user", "content": "Read me the shipping FAQ."}]}, thread)
    question = "I live in Lyon. What is the best way to ship a parcel?"
    written += [planted, told]  # as if the summary's text had led the model to it
    result = agent.invoke({"messages": [{"role": "user", "content": question}]}, thread)
    assert result["messages"][0].additional_kwargs.get("lc_source") == "summarization"
    [summarised] = [b for b in chat_requests(openai_server) if "Messages to summarize" in str(b)]
    assert not instruction_nonce(summarised) and CONTEXT_OPEN not in json.dumps(summarised)
    assert client.memory.flush(30)
    texts = [m.text for m in client.memory.get_all()]
    assert told["text"] in texts and planted["text"] not in texts
    assert client.memory.stats()["events"]["ungrounded_memories"] >= 1


def test_agent_streams_never_show_the_block(alice, openai_server, scripted) -> None:
    client, aclient = alice
    agent = create_agent(chat_openai(client, aclient), tools=[get_weather])
    question = {"messages": [{"role": "user", "content": QUESTION}]}

    streamed = [chunk for chunk, _ in agent.stream(question, stream_mode="messages")]
    model_text = "".join(c.content for c in streamed if not isinstance(c, ToolMessage))
    assert model_text == ANSWER and len(streamed) > 5
    assert any(getattr(c, "tool_call_chunks", None) for c in streamed)  # the loop streamed too
    assert_no_block(*[c.content for c in streamed])

    async def events():
        return [event async for event in agent.astream_events(question, version="v2")]

    seen = in_loop(events(), aclient)
    tokens = [e["data"]["chunk"].content for e in seen if e["event"] == "on_chat_model_stream"]
    assert "".join(tokens) == ANSWER
    ends = [e["data"]["output"].content for e in seen if e["event"] == "on_chat_model_end"]
    assert ends[-1] == ANSWER
    assert_no_block(*tokens, *ends)
    assert "memory-" not in json.dumps([str(e["data"]) for e in seen])
    assert len(chat_requests(openai_server)) == 4
    for body in chat_requests(openai_server):
        assert_memory_was_used(body)


def test_a_fact_told_in_one_run_is_recalled_by_a_new_instance(
    memory_clients, openai_server
) -> None:
    allergy = {"text": "Has a severe peanut allergy", "category": "fact"}
    openai_server.responder = AgentModel("Noted, I will keep that in mind.", [allergy])
    client, aclient = memory_clients()
    first_agent = create_agent(chat_openai(client, aclient), tools=[get_weather])
    first_agent.invoke(
        {"messages": [{"role": "user", "content": "I have a severe peanut allergy."}]}
    )
    assert client.memory.flush(30)

    later, alater = memory_clients()  # a new run, new objects
    llm = chat_openai(later, alater)
    in_loop(llm.ainvoke("Can I eat peanut butter cookies given my allergy?"), alater)
    system = [m for m in chat_requests(openai_server)[-1]["messages"] if m["role"] == "system"]
    assert "Has a severe peanut allergy" in system[0]["content"]


def assert_bob_sees_nothing_of_alice(body: dict) -> None:
    assert "Has a severe peanut allergy" not in json.dumps(body)
    assert CONTEXT_OPEN not in json.dumps(body)


def test_two_users_stay_isolated(memory_clients, openai_server, scripted) -> None:
    secret = {"text": "Has a severe peanut allergy", "category": "fact"}
    openai_server.responder = AgentModel("Noted.", [secret])
    alice_llm = chat_openai(*memory_clients("alice"))
    bob_client, bob_async = memory_clients("bob")
    bob_llm = chat_openai(bob_client, bob_async)
    alice_llm.invoke("I have a severe peanut allergy.")
    assert alice_llm.root_client.memory.flush(30)

    openai_server.responder = AgentModel("Noted.", [])
    question = "Do I have any food allergy, peanuts maybe?"
    bob_llm.invoke(question)
    bob_agent = create_agent(bob_llm, tools=[get_weather])
    bob_agent.invoke({"messages": [{"role": "user", "content": question}]})
    in_loop(bob_llm.ainvoke(question), bob_async)
    for body in chat_requests(openai_server)[1:]:  # bob's calls: invoke, the tool loop, ainvoke
        assert_bob_sees_nothing_of_alice(body)
    assert bob_client.memory.flush(30) and bob_client.memory.get_all() == []
    alice_llm.invoke(question)
    assert "Has a severe peanut allergy" in json.dumps(chat_requests(openai_server)[-1])


# -- Azure ---------------------------------------------------------------------------------------


def test_azure_chat_openai_invoke_and_stream(memory_clients, openai_server, scripted) -> None:
    client, aclient = memory_clients(azure=True)
    client.memory.add(KNOWN, category="preference")
    llm = AzureChatOpenAI(
        azure_deployment="travel-gpt",
        api_version=API_VERSION,
        azure_endpoint=openai_server.azure_endpoint,
        client=client.chat.completions,
        root_client=client,
        async_client=aclient.chat.completions,
        root_async_client=aclient,
    )
    assert llm.invoke(QUESTION).content == ANSWER
    chunks = [c.content for c in llm.stream(QUESTION)]
    assert "".join(chunks) == ANSWER
    assert_no_block(*chunks)
    requests = [r for r in openai_server.requests if r.path.endswith("/chat/completions")]
    assert [r.path for r in requests] == ["/openai/deployments/travel-gpt/chat/completions"] * 2
    assert all(r.headers["api-key"] == "azure-key" for r in requests)
    for request in requests:
        assert_memory_was_used(request.body)
    assert client.memory.flush(30)
    assert NEW["text"] in [m.text for m in client.memory.get_all()]


# -- what is not covered, and a mistaken construction ----------------------------------------------


def test_the_responses_api_gets_memory(alice, openai_server, scripted) -> None:
    """``use_responses_api=True``: invoke goes through ``responses.with_raw_response.create``,
    stream through ``responses.create(stream=True)``, ainvoke through the async client's."""
    llm = chat_openai(*alice, use_responses_api=True)
    assert llm.invoke(QUESTION).text == ANSWER
    chunks = [chunk.text for chunk in llm.stream(QUESTION)]
    assert "".join(chunks) == ANSWER
    assert_no_block(*chunks)
    assert in_loop(llm.ainvoke(QUESTION), alice[1]).text == ANSWER
    requests = [r.body for r in openai_server.requests if r.path == "/v1/responses"]
    assert len(requests) == 3
    for body in requests:
        assert_memory_was_used({"messages": chat_messages(body)})
    client = alice[0]
    assert client.memory.flush(30)
    assert NEW["text"] in [m.text for m in client.memory.get_all()]


@pytest.mark.filterwarnings(  # langchain-openai dumps openai's parsed chunk; not ours
    "ignore:Pydantic serializer warnings:UserWarning"
)
@pytest.mark.parametrize("responses_api", [False, True])
def test_streamed_structured_output_gets_memories_but_no_instruction(
    alice, openai_server, caplog, responses_api
) -> None:
    """Streamed, structured output goes through openai's ``beta.chat.completions.stream``
    (or ``responses.stream``) helper."""

    class Plan(BaseModel):
        transport: str

    caplog.set_level(logging.WARNING, logger="headroom_memory_integrations.openai")
    openai_server.responder = lambda body: Reply.text('{"transport": "walk"}', chunk_size=4)
    structured = chat_openai(*alice, use_responses_api=responses_api).with_structured_output(Plan)
    assert list(structured.stream(QUESTION))[-1] == Plan(transport="walk")
    body = openai_server.requests[-1].body
    if responses_api:
        body = {"messages": chat_messages(body)}
    assert_memory_was_used(body, instructed=False)
    assert not [r for r in caplog.records if "not wrapped" in r.getMessage()]


def test_the_whole_client_as_chat_completions_fails_clearly(alice) -> None:
    client, aclient = alice
    mistaken = ChatOpenAI(model="gpt-4o", client=client, async_client=aclient, api_key="unused")
    with pytest.raises(AttributeError, match=r"ChatOpenAI\(client=client\.chat\.completions"):
        mistaken.invoke(QUESTION)
    with pytest.raises(AttributeError, match=r"root_client=client"):
        list(mistaken.stream(QUESTION))
    with pytest.raises(AttributeError, match=r"root_async_client=aclient"):
        in_loop(mistaken.ainvoke(QUESTION), aclient)
