"""MemoryMiddleware: memory for create_agent agents, through a real tool loop.

The agent's model is a real ``ChatOpenAI`` over real HTTP to a :class:`ScriptedOpenAIServer`
answered by :class:`ScriptedChat` (a tool call when the user speaks and tools are offered, a
sentence about the tool's result after it, and a valid memory block when asked for one).
Memories live in real Chroma with the real all-MiniLM-L6-v2 model.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _langchain_support import (
    LYON,
    PLANTED,
    POISON,
    RunRecorder,
    RunSettingsRecorder,
    ScriptedChat,
    TokenRecorder,
    assert_clean,
    texts,
)
from _langchain_support import instruction_nonce as nonce_in
from conftest import GatedEmbedder
from langchain.agents import create_agent
from langchain.agents.middleware import (
    ClearToolUsesEdit,
    ContextEditingMiddleware,
    SummarizationMiddleware,
)
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel

from headroom_memory_integrations.langchain import MemoryChatModel, MemoryMiddleware
from headroom_memory_integrations.prompts import CONTEXT_OPEN
from headroom_memory_integrations.testing import ScriptedOpenAIServer

TEA = {"text": "Prefers green tea over coffee", "category": "preference"}
FINAL = "The tool says: It is sunny in Lyon."
ASK = {"messages": [{"role": "user", "content": "I love green tea. Weather in 'Lyon'?"}]}


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"It is sunny in {city}"


@dataclass
class Context:
    user_id: str


@pytest.fixture
def says(openai_server: ScriptedOpenAIServer) -> ScriptedChat:
    chat = ScriptedChat(memories=[TEA])
    chat.chunk_size = 3
    openai_server.responder = chat
    return chat


def chat_openai(server: ScriptedOpenAIServer) -> ChatOpenAI:
    return ChatOpenAI(
        model="gpt-4o-mini",
        base_url=server.base_url,
        api_key="sk-scripted",
        max_retries=0,
        stream_usage=True,
    )


def agent_with(server: ScriptedOpenAIServer, middleware: MemoryMiddleware, **options: Any) -> Any:
    return create_agent(
        chat_openai(server),
        tools=[get_weather],
        middleware=[middleware],
        checkpointer=InMemorySaver(),
        **options,
    )


def chat_requests(server: ScriptedOpenAIServer) -> list[list[dict[str, Any]]]:
    return [r.body["messages"] for r in server.requests if r.path == "/v1/chat/completions"]  # type: ignore[index]


def thread(name: str, **more: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": name, **more}}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["invoke", "ainvoke"])
def test_an_agent_learns_and_shows_no_block_through_a_tool_loop(
    asynchronous: bool,
    openai_server: ScriptedOpenAIServer,
    says: ScriptedChat,
    db_path: Path,
    model: Any,
) -> None:
    middleware = MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    agent = agent_with(openai_server, middleware)
    tracer, tokens = RunRecorder(), TokenRecorder()
    config = {**thread("t1"), "callbacks": [tracer, tokens]}
    result = asyncio.run(agent.ainvoke(ASK, config)) if asynchronous else agent.invoke(ASK, config)

    messages = result["messages"]
    assert [m.type for m in messages] == ["human", "ai", "tool", "ai"]
    assert messages[-1].text == FINAL
    assert_clean(
        messages,
        list(agent.get_state_history(thread("t1"))),
        tracer.dump(),
        tokens.outputs,
        memories=[TEA["text"]],
    )
    requests = chat_requests(openai_server)
    assert len(requests) == 2 and all(nonce_in(r) for r in requests)  # every model call
    assert requests[1][-1]["role"] == "tool"
    assert texts(middleware.memory) == [TEA["text"]]  # type: ignore[arg-type]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["stream", "astream"])
def test_no_stream_mode_shows_any_part_of_the_block(
    asynchronous: bool,
    openai_server: ScriptedOpenAIServer,
    says: ScriptedChat,
    db_path: Path,
    model: Any,
) -> None:
    agent = agent_with(
        openai_server, MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    )
    modes = ["values", "updates", "messages", "custom", "debug"]

    async def collect_async() -> tuple[list[Any], list[Any]]:
        parts = [part async for part in agent.astream(ASK, thread("a"), stream_mode=modes)]
        events = [e async for e in agent.astream_events(ASK, thread("b"), version="v2")]
        return parts, events

    if asynchronous:
        parts, events = asyncio.run(collect_async())
    else:
        parts = list(agent.stream(ASK, thread("a"), stream_mode=modes))
        events = []

    tokens = [data[0] for mode, data in parts if mode == "messages"]
    final_id = [data for mode, data in parts if mode == "values"][-1]["messages"][-1].id
    assert "".join(t.text for t in tokens if t.id == final_id) == FINAL
    assert {mode for mode, _ in parts} >= {"values", "updates", "messages"}
    assert_clean(parts, events, memories=[TEA["text"]])
    # an agent's astream_events shows no model stream events on Python 3.10, with or without
    # memory (LangChain passes the run's callbacks to the model through asyncio contexts)
    if asynchronous and sys.version_info >= (3, 11):
        streamed = [e for e in events if e["event"] == "on_chat_model_stream"]
        assert streamed and "".join(e["data"]["chunk"].text for e in streamed) == FINAL


def test_a_fact_told_in_one_run_is_recalled_in_the_next(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    first = MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    agent_with(openai_server, first).invoke(ASK, thread("monday"))
    assert texts(first.memory) == [TEA["text"]]  # type: ignore[arg-type]

    later = agent_with(
        openai_server, MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    )
    later.invoke(
        {"messages": [{"role": "user", "content": "What should I drink this morning?"}]},
        thread("tuesday"),
    )
    question = chat_requests(openai_server)[-2]  # the call that answered the user
    assert question[-1]["content"] == "What should I drink this morning?"
    assert CONTEXT_OPEN in question[-2]["content"]
    assert f'"{TEA["text"]}"' in question[-2]["content"]


def test_each_run_names_its_user_in_its_context_or_config(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    middleware = MemoryMiddleware(db_path=db_path, embedder=model)
    agent = agent_with(openai_server, middleware, context_schema=Context)
    agent.invoke(ASK, thread("alice-1"), context=Context(user_id="alice"))
    assert texts(middleware.memory_for("alice")) == [TEA["text"]]

    says.memories = [{"text": "Drinks only espresso", "category": "preference"}]
    espresso = {
        "messages": [{"role": "user", "content": "I drink only espresso. Weather in 'Lyon'?"}]
    }
    asyncio.run(
        agent_with(openai_server, middleware).ainvoke(
            espresso,  # the memory is grounded in the user's words (the tool loop is untrusted)
            thread("bob-1", user_id="bob"),  # no context schema: the config names the user
        )
    )
    assert texts(middleware.memory_for("bob")) == ["Drinks only espresso"]

    says.memories = []
    question = {"messages": [{"role": "user", "content": "Green tea or coffee, what do I prefer?"}]}
    agent.invoke(question, thread("bob-2"), context=Context(user_id="bob"))
    injected = chat_requests(openai_server)[-2][-2]["content"]
    assert '"Drinks only espresso"' in injected and TEA["text"] not in injected  # isolated
    agent.invoke(question, thread("alice-2"), context=Context(user_id="alice"))
    injected = chat_requests(openai_server)[-2][-2]["content"]
    assert f'"{TEA["text"]}"' in injected and "espresso" not in injected

    with pytest.raises(ValueError, match="needs the run's user"):
        agent_with(openai_server, middleware).invoke(ASK, thread("nobody"))


def test_a_run_naming_two_users_is_refused_before_any_memory_is_touched(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    """A run whose context names one user and whose config names another (a context built
    with a default user beside the real one in the config, say): serving either one could put
    one user's memories in the other's run, so the run fails before the model is called, as
    the memory tools fail for it."""
    middleware = MemoryMiddleware(db_path=db_path, embedder=model)
    agent = agent_with(openai_server, middleware, context_schema=Context)
    with pytest.raises(ValueError, match="names two users"):
        agent.invoke(ASK, thread("bob-1", user_id="bob"), context=Context(user_id="guest"))
    assert chat_requests(openai_server) == []
    assert texts(middleware.memory_for("guest")) == []

    agent.invoke(ASK, thread("bob-2", user_id="bob"), context=Context(user_id="bob"))
    assert texts(middleware.memory_for("bob")) == [TEA["text"]]  # the same user twice is fine


def test_a_one_user_middleware_refuses_a_run_naming_another_user(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    """A middleware built for alice in an agent whose runs name their user: a run of bob's
    would get alice's memories and teach them bob's facts, so it fails before the model is
    called; runs naming alice, or no one, are served."""
    middleware = MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    middleware.memory.add("Lives at 12 Rue de la Paix", category="fact")  # type: ignore[union-attr]
    agent = agent_with(openai_server, middleware, context_schema=Context)
    with pytest.raises(ValueError, match="serves user 'alice' only"):
        agent.invoke(ASK, thread("bob-1"), context=Context(user_id="bob"))
    with pytest.raises(ValueError, match="serves user 'alice' only"):
        agent.invoke(ASK, thread("bob-2", user_id="bob"))
    assert chat_requests(openai_server) == []

    agent.invoke(ASK, thread("alice-1"), context=Context(user_id="alice"))
    agent.invoke(ASK, thread("anyone"))
    assert texts(middleware.memory) == sorted([TEA["text"], "Lives at 12 Rue de la Paix"])  # type: ignore[arg-type]


def test_nothing_is_stored_on_the_callers_path(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    gate = threading.Event()
    middleware = MemoryMiddleware(
        user_id="alice", db_path=db_path, embedder=GatedEmbedder(model, TEA["text"], gate)
    )
    result = agent_with(openai_server, middleware).invoke(ASK, thread("t"))
    assert result["messages"][-1].text == FINAL  # answered while the memory could not be stored
    assert middleware.memory.get_all() == []  # type: ignore[union-attr]
    gate.set()
    assert texts(middleware.memory) == [TEA["text"]]  # type: ignore[arg-type]


def test_structured_agent_answers_get_memories_but_no_instruction(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    middleware = MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    middleware.memory.add(TEA["text"], category="preference")  # type: ignore[union-attr]
    agent = agent_with(openai_server, middleware, response_format=Drink)
    question = "What should I drink in 'Lyon' today?"
    result = agent.invoke({"messages": [{"role": "user", "content": question}]}, thread("s"))

    assert isinstance(result["structured_response"], Drink)
    requests = chat_requests(openai_server)
    assert [r[-1]["role"] for r in requests] == ["user", "tool"]
    assert all(nonce_in(r) is None for r in requests)  # JSON must stay JSON: no block asked
    for request in requests:
        injected = next(m["content"] for m in request if m["role"] == "system")
        assert f'"{TEA["text"]}"' in injected


class Drink(BaseModel):
    """A drink suggestion."""

    name: str


@pytest.mark.parametrize("untrusted", [False, True])
def test_untrusted_context_keeps_only_memories_grounded_in_the_users_words(
    untrusted: bool,
    openai_server: ScriptedOpenAIServer,
    says: ScriptedChat,
    db_path: Path,
    model: Any,
) -> None:
    """Retrieved documents in the agent's system prompt (no tool result in the run): with
    ``untrusted_context=True`` the memory they planted is dropped and counted."""
    says.memories = [PLANTED, LYON]
    middleware = MemoryMiddleware(db_path=db_path, embedder=model, untrusted_context=untrusted)
    agent = create_agent(
        chat_openai(openai_server),
        tools=[],
        system_prompt=f"Answer from these documents:\n{POISON}",
        middleware=[middleware],
    )
    question = "I live in Lyon. How long does shipping take to Lyon?"
    result = agent.invoke(
        {"messages": [{"role": "user", "content": question}]}, thread("rag", user_id="bob")
    )
    assert result["messages"][-1].text == "Happy to help with that."
    bob = middleware.memory_for("bob")
    if untrusted:
        assert texts(bob) == [LYON["text"]]
        assert bob.stats()["events"]["ungrounded_memories"] == 1
    else:
        assert texts(bob) == [LYON["text"], PLANTED["text"]]


def test_a_model_that_has_memory_already_is_left_alone(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    chat = MemoryChatModel(
        model=chat_openai(openai_server), user_id="alice", db_path=db_path, embedder=model
    )
    middleware = MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    create_agent(chat, tools=[get_weather], middleware=[middleware]).invoke(ASK)
    for request in chat_requests(openai_server):
        assert sum(m["role"] == "system" for m in request) == 1  # injected once, not twice


def test_a_model_with_another_users_memory_never_serves_the_run(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    """The agent's model is alice's MemoryChatModel; a run of bob gets bob's memories only,
    and what bob says is stored as bob's. A run of alice keeps her model as it is."""
    alice_chat = MemoryChatModel(
        model=chat_openai(openai_server), user_id="alice", db_path=db_path, embedder=model
    )
    alice_chat.memory.add("Lives at 12 Rue de la Paix", category="fact")
    middleware = MemoryMiddleware(db_path=db_path, embedder=model)
    middleware.memory_for("bob").add("Drinks only espresso", category="preference")
    agent = create_agent(alice_chat, tools=[], context_schema=Context, middleware=[middleware])
    says.memories = [TEA]
    question = {"messages": [{"role": "user", "content": "I love green tea. Where do I live?"}]}

    agent.invoke(question, context=Context(user_id="bob"))
    request = chat_requests(openai_server)[-1]
    assert sum(m["role"] == "system" for m in request) == 1  # bob's memory, injected once
    assert "Rue de la Paix" not in json.dumps(request)
    assert "Drinks only espresso" in json.dumps(request)
    assert texts(middleware.memory_for("bob")) == ["Drinks only espresso", TEA["text"]]
    assert texts(alice_chat.memory) == ["Lives at 12 Rue de la Paix"]

    says.memories = []
    agent.invoke(question, context=Context(user_id="alice"))
    request = chat_requests(openai_server)[-1]
    assert sum(m["role"] == "system" for m in request) == 1
    assert "Rue de la Paix" in json.dumps(request) and "espresso" not in json.dumps(request)

    # a middleware of one user replaces another user's model too
    fixed = MemoryMiddleware(user_id="bob", db_path=db_path, embedder=model)
    create_agent(alice_chat, tools=[], middleware=[fixed]).invoke(question)
    request = chat_requests(openai_server)[-1]
    assert "Rue de la Paix" not in json.dumps(request) and "espresso" in json.dumps(request)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["invoke", "ainvoke"])
def test_the_models_own_callbacks_tags_and_metadata_still_see_every_call(
    asynchronous: bool,
    openai_server: ScriptedOpenAIServer,
    says: ScriptedChat,
    db_path: Path,
    model: Any,
) -> None:
    handler = RunSettingsRecorder()
    llm = ChatOpenAI(
        model="gpt-4o-mini",
        base_url=openai_server.base_url,
        api_key="sk-scripted",
        max_retries=0,
        callbacks=[handler],
        tags=["billing:team-a"],
        metadata={"team": "a"},
    )
    middleware = MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    agent = create_agent(llm, tools=[get_weather], middleware=[middleware])
    result = asyncio.run(agent.ainvoke(ASK)) if asynchronous else agent.invoke(ASK)
    assert result["messages"][-1].text == FINAL
    assert len(handler.starts) == 2 and len(handler.ends) == 2  # both calls of the tool loop
    for tags, metadata in handler.starts:
        assert "billing:team-a" in tags and metadata.get("team") == "a"
    assert_clean(handler.ends, memories=[TEA["text"]])  # the visible answers only
    assert texts(middleware.memory) == [TEA["text"]]  # type: ignore[arg-type]


# -- many users: a bounded set of open stores --------------------------------------------------


def test_a_service_keeps_a_bounded_number_of_users_open_and_an_evicted_user_comes_back(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    middleware = MemoryMiddleware(db_path=db_path, embedder=model, max_users=3)
    agent = create_agent(
        chat_openai(openai_server), tools=[], context_schema=Context, middleware=[middleware]
    )
    told = {"messages": [{"role": "user", "content": "I love green tea."}]}
    users = [f"user-{n}" for n in range(8)]
    first = weakref.ref(middleware.memory_for(users[0]))
    for user in users:
        agent.invoke(told, context=Context(user_id=user))
        assert len(middleware._flows) <= 3  # never more users open than max_users
    assert list(middleware._flows) == users[-3:]  # the most recently served ones
    assert middleware.memory_for(users[-1]).flush(30)
    gc.collect()
    assert first() is None  # an evicted user's store is let go (nothing else holds it)

    says.memories = []
    question = {"messages": [{"role": "user", "content": "Green tea or coffee, what do I prefer?"}]}
    result = agent.invoke(question, context=Context(user_id="user-0"))  # evicted long ago
    assert result["messages"][-1].text == "Happy to help with that."
    injected = chat_requests(openai_server)[-1][-2]["content"]
    assert f'"{TEA["text"]}"' in injected  # reopened: their memory is still theirs
    assert list(middleware._flows) == [*users[-2:], "user-0"]
    for user in users:
        assert texts(middleware.memory_for(user)) == [TEA["text"]]
    assert len(middleware._flows) == 3

    with pytest.raises(ValueError, match="max_users"):
        MemoryMiddleware(db_path=db_path, embedder=model, max_users=0)


def test_a_write_still_queued_when_its_user_is_evicted_is_not_lost(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    gate = threading.Event()
    middleware = MemoryMiddleware(
        db_path=db_path, embedder=GatedEmbedder(model, TEA["text"], gate), max_users=1
    )
    agent = create_agent(
        chat_openai(openai_server), tools=[], context_schema=Context, middleware=[middleware]
    )
    told = {"messages": [{"role": "user", "content": "I love green tea."}]}
    agent.invoke(told, context=Context(user_id="alice"))  # her memory waits for the gate
    says.memories = []
    agent.invoke(told, context=Context(user_id="bob"))  # alice is evicted, her write pending
    assert list(middleware._flows) == ["bob"]
    gate.set()

    question = {"messages": [{"role": "user", "content": "Green tea or coffee, what do I prefer?"}]}
    agent.invoke(question, context=Context(user_id="alice"))
    assert texts(middleware.memory_for("alice")) == [TEA["text"]]
    assert texts(middleware.memory_for("bob")) == []


def test_a_store_from_memory_for_keeps_working_after_its_user_is_evicted(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    """An application keeps a user's store (for a "forget me" endpoint, say); the user is
    evicted meanwhile: its flush still waits for the user's queued write, and forget_user
    still reaches the queue, so nothing forgotten comes back."""
    gate = threading.Event()
    middleware = MemoryMiddleware(
        db_path=db_path, embedder=GatedEmbedder(model, TEA["text"], gate), max_users=1
    )
    agent = create_agent(
        chat_openai(openai_server), tools=[], context_schema=Context, middleware=[middleware]
    )
    alice = middleware.memory_for("alice")
    told = {"messages": [{"role": "user", "content": "I love green tea."}]}
    agent.invoke(told, context=Context(user_id="alice"))  # her memory waits for the gate
    says.memories = []
    agent.invoke(told, context=Context(user_id="bob"))  # alice is evicted, her write pending
    assert list(middleware._flows) == ["bob"]

    assert alice.flush(0.3) is False  # her write is still queued: not done
    gate.set()
    assert alice.flush(30) is True
    assert texts(alice) == [TEA["text"]]
    assert alice.forget_user() == 1
    assert middleware.memory_for("bob").flush(30)
    assert texts(middleware.memory_for("alice")) == []


def test_opening_a_new_user_never_holds_up_the_users_already_open(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    """A user's store that is slow to open (a Chroma server slow to answer) delays that user's
    run only: runs of users already open, and of other new users, go on meanwhile."""
    release, opening = threading.Event(), threading.Event()

    class SlowToOpen(MemoryMiddleware):
        def _open(self, user_id: str) -> Any:
            if user_id == "slow":
                opening.set()
                assert release.wait(60)
            return super()._open(user_id)

    middleware = SlowToOpen(db_path=db_path, embedder=model)
    agent = create_agent(
        chat_openai(openai_server), tools=[], context_schema=Context, middleware=[middleware]
    )
    told = {"messages": [{"role": "user", "content": "I love green tea."}]}
    agent.invoke(told, context=Context(user_id="alice"))
    slow = threading.Thread(target=agent.invoke, args=(told,), kwargs={"context": Context("slow")})
    slow.start()
    answers: list[str] = []

    def others() -> None:  # while "slow" is still opening
        for user in ("alice", "bob"):
            answers.append(agent.invoke(told, context=Context(user_id=user))["messages"][-1].text)

    try:
        assert opening.wait(30)
        meanwhile = threading.Thread(target=others)
        meanwhile.start()
        meanwhile.join(30)
        assert not meanwhile.is_alive() and answers == ["Happy to help with that."] * 2
        assert slow.is_alive()
    finally:
        release.set()
        slow.join(60)
    assert texts(middleware.memory_for("slow")) == [TEA["text"]]


@pytest.mark.parametrize("top_k", [0, 1001, "5", True])
def test_a_bad_top_k_is_refused_when_built(db_path: Path, model: Any, top_k: Any) -> None:
    """Not on every run later (or, past the engine's 1,000, memory silently never injected)."""
    from headroom_memory_integrations import InvalidInputError

    with pytest.raises(InvalidInputError, match="top_k must be an integer from 1 to 1000"):
        MemoryMiddleware(db_path=db_path, embedder=model, top_k=top_k)
    with pytest.raises(InvalidInputError, match="top_k must be an integer from 1 to 1000"):
        MemoryMiddleware("alice", db_path=db_path, embedder=model, top_k=top_k)
    if isinstance(top_k, int) and not isinstance(top_k, bool):  # pydantic takes "5" as 5
        with pytest.raises(ValueError, match="top_k must be an integer from 1 to 1000"):
            MemoryChatModel(
                model=ChatOpenAI(model="gpt-4o-mini", api_key="sk-x"),
                user_id="alice",
                db_path=db_path,
                embedder=model,
                top_k=top_k,
            )


def test_a_tool_loops_next_step_is_not_shown_what_its_first_step_learnt(
    openai_server: ScriptedOpenAIServer, says: ScriptedChat, db_path: Path, model: Any
) -> None:
    # the model writes a sentence with its tool call, and the memory block in it: the step
    # after the tool's result is a later call of the same turn (MemoryFlow.start's later_step)
    says.talks = True
    middleware = MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    agent_with(openai_server, middleware).invoke(ASK, thread("t1"))
    first, after_tool = chat_requests(openai_server)
    assert nonce_in(first) and after_tool[-1]["role"] == "tool"
    assert not nonce_in(after_tool)  # the turn is learnt from once
    assert CONTEXT_OPEN not in json.dumps(after_tool)  # not TEA, learnt in the first step
    assert texts(middleware.memory) == [TEA["text"]]  # type: ignore[arg-type]

    # the same words in a new turn: recalled for anew (TEA is from an earlier turn now)
    agent_with(openai_server, middleware).invoke(ASK, thread("t2"))
    assert nonce_in(chat_requests(openai_server)[2])
    assert TEA["text"] in json.dumps(chat_requests(openai_server)[2])


HOT_DRINK = "Drinks a hot drink every morning"


def agent_steps(server: ScriptedOpenAIServer) -> list[list[dict[str, Any]]]:
    """The agent's model calls, not ``SummarizationMiddleware``'s summary requests."""
    return [r for r in chat_requests(server) if "Messages to summarize" not in json.dumps(r)]


@pytest.mark.parametrize("rewriter", ["summarization", "context_editing"])
def test_a_tool_loops_next_step_is_of_its_turn_when_middleware_rewrite_what_came_before(
    rewriter: str,
    openai_server: ScriptedOpenAIServer,
    says: ScriptedChat,
    db_path: Path,
    model: Any,
) -> None:
    """Middleware that summarise or clear the messages before the user's between two steps of
    a turn keep the user's message and its id: the step after the tool is still a later step
    of that turn (no instruction, not shown what the first step learnt as an earlier memory)."""
    says.talks, says.memories = True, []
    middleware = MemoryMiddleware(user_id="alice", db_path=db_path, embedder=model)
    middleware.memory.add(HOT_DRINK, category="preference")  # type: ignore[union-attr]
    rewrite: Any = (
        SummarizationMiddleware(
            model=chat_openai(openai_server), trigger=("messages", 7), keep=("messages", 3)
        )
        if rewriter == "summarization"
        else ContextEditingMiddleware(edits=[ClearToolUsesEdit(trigger=20, keep=1)])
    )
    agent = create_agent(
        chat_openai(openai_server),
        tools=[get_weather],
        middleware=[middleware, rewrite],
        checkpointer=InMemorySaver(),
    )
    agent.invoke({"messages": [{"role": "user", "content": "Weather in 'Rome'?"}]}, thread("t"))
    says.memories = [TEA]
    question = "I love green tea. Which hot drink suits the weather in 'Paris'?"
    agent.invoke({"messages": [{"role": "user", "content": question}]}, thread("t"))

    first, after_tool = agent_steps(openai_server)[2:4]
    rewritten = "summary of the conversation" if rewriter == "summarization" else "[cleared]"
    assert rewritten not in json.dumps(first) and rewritten in json.dumps(after_tool)
    assert after_tool[-1]["role"] == "tool" and nonce_in(first)
    assert not nonce_in(after_tool)  # the turn is learnt from once
    assert HOT_DRINK in json.dumps(after_tool)  # what the first step was shown
    assert TEA["text"] not in json.dumps(after_tool)  # not what it learnt


class _ServesAnotherUserOnce:
    """The real model, serving another user (``serve``) from another thread the first time it
    embeds a question of more than one word: a request of bob's served while alice's first
    step is still recalling."""

    def __init__(self, model: Any, serve: Any) -> None:
        self._model, self._serve, self.served = model, serve, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def embed_queries(self, texts: list[str]) -> Any:
        if not self.served and any(len(text.split()) > 1 for text in texts):
            self.served = True
            other = threading.Thread(target=self._serve)
            other.start()
            other.join()
        return self._model.embed_queries(texts)


@pytest.mark.parametrize("bob_served", ["while the tool runs", "while the first step recalls"])
def test_a_run_whose_user_is_let_go_of_while_its_tool_runs_goes_on_with_its_turn(
    openai_server: ScriptedOpenAIServer,
    says: ScriptedChat,
    db_path: Path,
    model: Any,
    bob_served: str,
) -> None:
    """A service with max_users=1 serves another user while alice's tool runs, or while her
    first step still recalls (before it has noted its turn): her flow is let go of, and the
    step after her tool gets a new one, which goes on with her turn."""
    says.talks = True  # the tool-call step carries the memory block
    embedder = _ServesAnotherUserOnce(model, lambda: middleware.memory_for("bob"))
    if bob_served == "while the tool runs":
        embedder.served = True
    middleware = MemoryMiddleware(db_path=db_path, embedder=embedder, max_users=1)
    middleware.memory_for("alice").add(HOT_DRINK, category="preference")

    @tool
    def weather_while_bob_is_served(city: str) -> str:
        """The weather in a city."""
        if bob_served == "while the tool runs":
            middleware.memory_for("bob")  # another user's run, served meanwhile
        return f"It is sunny in {city}"

    agent = create_agent(
        chat_openai(openai_server),
        tools=[weather_while_bob_is_served],
        context_schema=Context,
        middleware=[middleware],
    )
    agent.invoke(ASK, context=Context(user_id="alice"))
    first, after_tool = chat_requests(openai_server)
    assert list(middleware._flows) == ["alice"]  # bob's came and went in between
    assert nonce_in(first) and after_tool[-1]["role"] == "tool"
    assert not nonce_in(after_tool)  # the turn is learnt from once
    assert HOT_DRINK in json.dumps(after_tool)  # what the first step was shown
    assert TEA["text"] not in json.dumps(after_tool)  # not what it learnt
    assert sorted(texts(middleware.memory_for("alice"))) == sorted([HOT_DRINK, TEA["text"]])
