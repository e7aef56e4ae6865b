"""A short chat message searched with the user's previous one (``search(...,
previous_message=...)``): a follow-up finds what the two say together, an aside stays alone; every
wrapper passes the previous user message."""

from __future__ import annotations

import pytest
from _reliability_support import read_ahead

from headroom_memory_integrations import MemoryStore, NewMemory
from headroom_memory_integrations.embeddings.message_gate import MAX_CHARS
from headroom_memory_integrations.engine import FOLLOW_UP_NEED, FOLLOW_UP_WORDS

# written for this test (none is in a benchmark file)
KNEE = NewMemory(
    "Recovering from knee surgery in March",
    keys="health, knee, recovery, How is my knee doing?, Can I go skiing this winter?, "
    "Which exercises are safe for me?, Should I join a long hike?",
)
MEMORIES = [
    KNEE,
    NewMemory(
        "Plays cello in a community orchestra",
        keys="music, cello, orchestra, Which instrument do I play?, What gift would suit me?, "
        "Should I join the summer music camp?, Which concerts should I see?",
    ),
    NewMemory(
        "Works night shifts as an ICU nurse",
        keys="work, nursing, night shift, What is my job?, When should I book appointments?, "
        "Should I take the weekend shift?, When can I meet friends?",
    ),
    NewMemory(
        "Lives in Lisbon",
        keys="home, Portugal, Lisbon, Where do I live?, Should I go to the beach this weekend?, "
        "What is the weather like near me?, Which time zone am I in?",
    ),
    NewMemory(
        "Saving for a deposit on a flat",
        keys="money, savings, housing, What am I saving for?, Should I buy the new phone?, "
        "Can I afford a holiday?, How much should I spend on gifts?",
    ),
]
EARLIER = "my friends invited me on a ski trip to the Alps next month"
FOLLOW_UP = "should I go?"
ASIDE = "lol ok"


@pytest.fixture
def alice(db_path, model) -> MemoryStore:
    """Alice's store, read ahead: every search is served from memory. (Otherwise the searches
    until the read-ahead, started on another thread by the first, has finished are Chroma's,
    whose scores differ in the 7th digit: two searches compared were equal only when both
    ran before it finished, as they do on a quiet machine.)"""
    store = MemoryStore("alice", db_path=db_path, embedder=model)
    store.add_many(MEMORIES)
    read_ahead(store)
    return store


def texts(found) -> list[str]:
    return [memory.text for memory, _ in found]


def first_listed(context: str) -> str:
    """The memory an injected context lists first (alone, "should I go?" lists Lisbon first)."""
    shown = [m.text for m in MEMORIES if m.text in context]
    return min(shown, key=context.index) if shown else ""


def test_a_follow_up_is_searched_with_the_message_before_it(alice: MemoryStore) -> None:
    alone = texts(alice.search(FOLLOW_UP, chat_message=True))
    assert alone[:1] != [KNEE.text]  # alone, "should I go?" is nearer other memories' keys
    followed = alice.search(FOLLOW_UP, chat_message=True, previous_message=EARLIER)
    assert texts(followed)[:1] == [KNEE.text]
    assert followed.query == f"{EARLIER}\n{FOLLOW_UP}"  # what was searched


def test_a_short_question_that_needs_a_memory_is_joined_even_if_that_scores_lower(
    alice: MemoryStore,
) -> None:
    earlier = "thinking about joining a ski trip to the Alps with friends next month"
    joined = f"{earlier}\ngood idea?"

    def best(text: str) -> float:
        return alice.search(text, top_k=1, min_score=-1)[0].score

    assert best(joined) < best(earlier)  # the earlier message alone is nearer the knee
    assert alice._query("good idea?").need >= FOLLOW_UP_NEED
    found = alice.search("good idea?", chat_message=True, previous_message=earlier)
    assert found.query == joined and texts(found)[:1] == [KNEE.text]
    assert KNEE.text not in texts(alice.search("good idea?", chat_message=True))
    # a remark the gate reads as about the user is not a question: searched alone
    remark = "I'm so nervous lol"
    assert alice._query(remark).need >= FOLLOW_UP_NEED and best(f"{earlier}\n{remark}") < best(
        earlier
    )
    assert alice.search(remark, chat_message=True, previous_message=earlier).query == remark


def test_a_remark_is_searched_alone_even_when_joining_scores_higher(alice: MemoryStore) -> None:
    remark = "skiing is the best"  # not a question: no follow-up, whatever the scores

    def best(text: str) -> float:
        return alice.search(text, top_k=1, min_score=-1)[0].score

    assert best(f"{EARLIER}\n{remark}") > best(EARLIER)
    assert alice.search(remark, chat_message=True, previous_message=EARLIER).query == remark


def test_an_aside_and_a_longer_message_are_searched_alone(alice: MemoryStore) -> None:
    # joined, the aside pulls the text away from the memory the earlier message found
    aside = alice.search(ASIDE, chat_message=True, previous_message=EARLIER)
    assert aside == alice.search(ASIDE, chat_message=True) and aside.query == ASIDE
    longer = f"{FOLLOW_UP} it would be my first time skiing in years"
    assert len(longer.split()) > FOLLOW_UP_WORDS
    found = alice.search(longer, chat_message=True, previous_message=EARLIER)
    assert found.query == longer
    # not a chat message, or no floor at all: the message alone, as asked
    assert alice.search(FOLLOW_UP, previous_message=EARLIER).query == FOLLOW_UP
    kept = alice.search(FOLLOW_UP, chat_message=True, previous_message=EARLIER, min_score=-1)
    assert kept.query == FOLLOW_UP


def test_a_follow_up_of_pasted_text_is_searched_alone(alice: MemoryStore) -> None:
    pasted = f"{EARLIER}. Here is the itinerary they sent: " + "day one, cable cars; " * 20
    assert len(pasted) > MAX_CHARS
    assert alice.search(FOLLOW_UP, chat_message=True, previous_message=pasted).query == FOLLOW_UP


@pytest.mark.parametrize("previous", [None, "", "   ", "\x00\x01", 42])
def test_no_usable_previous_message_leaves_the_message_alone(alice: MemoryStore, previous) -> None:
    found = alice.search(FOLLOW_UP, chat_message=True, previous_message=previous)
    assert found.query == FOLLOW_UP
    assert found == alice.search(FOLLOW_UP, chat_message=True)


def test_a_previous_message_is_cleaned_as_a_query_is(alice: MemoryStore) -> None:
    found = alice.search(FOLLOW_UP, chat_message=True, previous_message=f"{EARLIER}\ud800")
    assert texts(found)[:1] == [KNEE.text] and "\ud800" not in found.query


@pytest.mark.openai_client
def test_the_openai_wrapper_passes_the_previous_user_message(client, openai_server) -> None:
    client.memory.add_many(MEMORIES)
    client.chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "user", "content": EARLIER},
            {"role": "assistant", "content": "Sounds fun! When do you leave?"},
            {"role": "user", "content": FOLLOW_UP},
        ],
    )
    sent = openai_server.requests[-1].body["messages"]
    context = next(m["content"] for m in sent if m["role"] == "system")
    assert first_listed(context) == KNEE.text


@pytest.mark.openai_client
@pytest.mark.parametrize("continued_by", ["previous_response_id", "conversation"])
def test_the_responses_api_remembers_the_previous_user_message_of_stored_turns(
    client, openai_server, continued_by
) -> None:
    """With ``previous_response_id`` or ``conversation`` the request holds only the new
    message: the wrapper remembers the earlier turn's, and searches the follow-up with it."""
    client.memory.add_many(MEMORIES)
    first = client.responses.create(model="gpt-4o", input=EARLIER, conversation="conv_ski")
    continued = {"previous_response_id": first.id, "conversation": "conv_ski"}[continued_by]
    client.responses.create(model="gpt-4o", input=FOLLOW_UP, **{continued_by: continued})
    items = openai_server.requests[-1].body["input"]
    context = "\n".join(i["content"] for i in items if i.get("role") == "system")
    assert first_listed(context) == KNEE.text
    # another thread of turns (or none) leaves the message alone
    client.responses.create(model="gpt-4o", input=FOLLOW_UP, previous_response_id="resp_other")
    items = openai_server.requests[-1].body["input"]
    context = "\n".join(i["content"] for i in items if i.get("role") == "system")
    assert first_listed(context) != KNEE.text


def responses_context(openai_server) -> str:
    items = openai_server.requests[-1].body["input"]
    return "\n".join(i["content"] for i in items if i.get("role") == "system")


@pytest.mark.openai_client
def test_the_responses_api_carries_the_previous_message_over_tool_rounds_and_client_copies(
    client, openai_server
) -> None:
    """A tool's output sent back (a turn with no user message) passes the user's message on to
    the turn after it; a copy made by ``with_options`` continues the same stored turns."""
    from headroom_memory_integrations.testing import Reply

    client.memory.add_many(MEMORIES)
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    openai_server.script(Reply.tool_call("get_weather", {"city": "Chamonix"}, id="call_1"))
    asked = client.responses.create(model="gpt-4o", input=EARLIER, tools=tools)
    output = [{"type": "function_call_output", "call_id": "call_1", "output": "Sunny, -3C"}]
    answered = client.responses.create(
        model="gpt-4o", input=output, previous_response_id=asked.id, tools=tools
    )
    client.responses.create(model="gpt-4o", input=FOLLOW_UP, previous_response_id=answered.id)
    assert first_listed(responses_context(openai_server)) == KNEE.text
    copy = client.with_options(timeout=20)
    copy.responses.create(model="gpt-4o", input=FOLLOW_UP, previous_response_id=asked.id)
    assert first_listed(responses_context(openai_server)) == KNEE.text


@pytest.mark.openai_client
def test_the_responses_api_keeps_no_long_message_to_search_a_follow_up_with(
    client, openai_server
) -> None:
    """A message too long to be joined to a follow-up (pasted text) is not kept: the next
    follow-up is searched alone, as it would be with the message in the request."""
    client.memory.add_many(MEMORIES)
    pasted = EARLIER + "\n" + "Itinerary: day one, cable car and lunch. " * 2000
    first = client.responses.create(model="gpt-4o", input=pasted)
    assert all(len(text) <= 300 for text in client.responses._flow._asked.values())
    client.responses.create(model="gpt-4o", input=FOLLOW_UP, previous_response_id=first.id)
    assert first_listed(responses_context(openai_server)) != KNEE.text


def test_the_langchain_chat_model_passes_the_previous_user_message(
    openai_server, db_path, model
) -> None:
    from _langchain_support import sent
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_openai import ChatOpenAI

    from headroom_memory_integrations.langchain import MemoryChatModel

    base = ChatOpenAI(
        model="gpt-4o-mini", base_url=openai_server.base_url, api_key="sk-scripted", max_retries=0
    )
    chat = MemoryChatModel(model=base, user_id="alice", db_path=db_path, embedder=model)
    chat.memory.add_many(MEMORIES)
    chat.invoke([HumanMessage(EARLIER), AIMessage("Sounds fun!"), HumanMessage(FOLLOW_UP)])
    context = next(m["content"] for m in sent(openai_server) if m["role"] == "system")
    assert first_listed(context) == KNEE.text


def test_the_llama_index_llm_and_buffer_pass_the_previous_user_message(db_path, model) -> None:
    from _llama_index_support import ScriptedLLM
    from llama_index.core.base.llms.types import ChatMessage

    from headroom_memory_integrations.llama_index import HeadroomChatMemoryBuffer, MemoryLLM

    conversation = [
        ChatMessage(role="user", content=EARLIER),
        ChatMessage(role="assistant", content="Sounds fun!"),
        ChatMessage(role="user", content=FOLLOW_UP),
    ]
    base = ScriptedLLM()
    llm = MemoryLLM(llm=base, user_id="alice", db_path=db_path, embedder=model)
    llm.memory.add_many(MEMORIES)
    llm.chat(conversation)
    system = [m["content"] for m in base.brain.requests[-1] if m["role"] == "system"]
    assert system and first_listed(system[-1]) == KNEE.text
    llm.memory.close()

    buffer = HeadroomChatMemoryBuffer.from_defaults(
        user_id="alice", db_path=db_path, embedder=model, llm=ScriptedLLM()
    )
    for message in conversation:
        buffer.put(message)
    memories = [m for m in buffer.get() if m.role == "system"]  # placed by the latest message
    assert memories and first_listed(str(memories[0].content)) == KNEE.text
    buffer.memory.close()


def test_the_llama_index_llm_searches_a_follow_up_in_a_workflow_with_state(db_path, model) -> None:
    """AgentWorkflow(initial_state=...) sends each user message inside its state prompt (and
    keeps it so in the chat history): the user's words alone are searched, with the ones
    before them."""
    import asyncio

    from _llama_index_support import ScriptedLLM
    from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent
    from llama_index.core.memory import ChatMemoryBuffer
    from llama_index.core.workflow import Context

    from headroom_memory_integrations.llama_index import MemoryLLM

    base = ScriptedLLM()
    llm = MemoryLLM(llm=base, user_id="alice", db_path=db_path, embedder=model)
    llm.memory.add_many(MEMORIES)
    agent = FunctionAgent(name="a", description="a", tools=[], llm=llm)
    workflow = AgentWorkflow(agents=[agent], initial_state={"guests": 4})

    async def run() -> None:
        ctx, history = Context(workflow), ChatMemoryBuffer.from_defaults(token_limit=3000)
        await workflow.run(user_msg=EARLIER, ctx=ctx, memory=history)
        await workflow.run(user_msg=FOLLOW_UP, ctx=ctx, memory=history)

    asyncio.run(run())
    sent = base.brain.requests[-1]
    assert [m["content"] for m in sent if m["role"] == "user"][-1].startswith("Current state:")
    system = [m["content"] for m in sent if m["role"] == "system"]
    assert system and first_listed(system[-1]) == KNEE.text
    llm.memory.close()


def test_the_llama_index_memory_block_passes_the_previous_user_message(db_path, model) -> None:
    from _llama_index_support import ScriptedLLM
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.core.memory import Memory

    from headroom_memory_integrations.llama_index import HeadroomMemoryBlock

    block = HeadroomMemoryBlock(user_id="alice", db_path=db_path, embedder=model, llm=ScriptedLLM())
    block.memory.add_many(MEMORIES)
    memory = Memory.from_defaults(session_id="alice-ski", memory_blocks=[block])
    memory.put_messages(
        [
            ChatMessage(role="user", content=EARLIER),
            ChatMessage(role="assistant", content="Sounds fun!"),
            ChatMessage(role="user", content=FOLLOW_UP),
        ]
    )
    system = [str(m.content) for m in memory.get() if m.role == "system"]
    assert system and first_listed(system[0]) == KNEE.text
    # the same block, asked "should I go?" with nothing before it, lists another memory first
    alone = Memory.from_defaults(session_id="alice-alone", memory_blocks=[block])
    alone.put(ChatMessage(role="user", content=FOLLOW_UP))
    system = [str(m.content) for m in alone.get() if m.role == "system"]
    assert not system or first_listed(system[0]) != KNEE.text
    block.memory.close()


def test_the_classic_langchain_memory_passes_the_previous_user_message(db_path, model) -> None:
    """``HeadroomMemory`` sees only the run's input: the previous message is the input of the
    last exchange it saved, or the user message before the latest one in a list of messages."""
    from langchain_core.messages import AIMessage, HumanMessage

    from headroom_memory_integrations.langchain import HeadroomMemory

    with pytest.warns(UserWarning, match="no llm"):  # recall only: nothing is extracted
        memory = HeadroomMemory(user_id="alice", db_path=db_path, embedder=model)
    memory.memory.add_many(MEMORIES)

    def recalled(value) -> str:
        return memory.load_memory_variables({"input": value})["memories"]

    assert first_listed(recalled(FOLLOW_UP)) != KNEE.text  # nothing saved before it
    memory.save_context({"input": EARLIER}, {"output": "Sounds fun!"})
    assert first_listed(recalled(FOLLOW_UP)) == KNEE.text
    memory.clear()  # forgets the conversation too
    memory.memory.add_many(MEMORIES)
    assert first_listed(recalled(FOLLOW_UP)) != KNEE.text

    history = [HumanMessage(EARLIER), AIMessage("Sounds fun!"), HumanMessage(FOLLOW_UP)]
    assert first_listed(recalled(history)) == KNEE.text
    memory.memory.close()
