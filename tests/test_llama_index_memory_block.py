"""HeadroomMemoryBlock: long-term memory as a block of llama_index.core.memory.Memory."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from _llama_index_support import CASES, FACT, QUESTION, RECALLED, ScriptedLLM, ask, flush
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory import Memory

from headroom_memory_integrations.llama_index import HeadroomMemoryBlock


@pytest.fixture
def llm() -> ScriptedLLM:
    return ScriptedLLM()


@pytest.fixture
def new_memory(db_path, model, llm):
    """A new ``Memory`` (a new session) with a new block for ``user``."""

    def build(user: str = "alice") -> Memory:
        block = HeadroomMemoryBlock(user_id=user, db_path=db_path, embedder=model, llm=llm)
        return Memory.from_defaults(session_id=f"{user}-{uuid.uuid4()}", memory_blocks=[block])

    return build


def block_of(memory: Memory) -> HeadroomMemoryBlock:
    (block,) = memory.memory_blocks
    assert isinstance(block, HeadroomMemoryBlock)
    return block


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_recalls_a_fact_told_in_an_earlier_session(kind, mode, new_memory, llm) -> None:
    first = new_memory()
    told = ask(kind, llm, first, FACT, mode)
    assert RECALLED not in told.text
    store = block_of(first).memory
    flush(store)
    # learnt from a short conversation, although Memory flushed nothing to its blocks
    assert [m.text for m in store.get_all()] == [FACT]
    assert llm.brain.extractions == 1

    second = new_memory()
    seen = ask(kind, llm, second, QUESTION, mode)
    assert f"{RECALLED} {FACT}" in seen.text
    stored = "\n".join(str(m.content) for m in second.get_all())
    assert QUESTION in stored and "<user-memories>" not in stored


def test_memories_go_in_memorys_system_message(new_memory) -> None:
    memory = new_memory()
    block_of(memory).memory.add(FACT, category="preference")
    memory.put(ChatMessage(role="user", content=QUESTION))
    got = memory.get()
    assert [m.role.value for m in got] == ["system", "user"]
    assert "<user_memories>" in got[0].content  # Memory's template, the block's name
    assert "<user-memories>" in got[0].content and FACT in got[0].content
    assert [m.role.value for m in memory.get(input="What is 2+2?")] == ["user"]


def test_each_user_message_is_learnt_once(new_memory, llm) -> None:
    memory = new_memory()

    async def turn(text: str) -> None:
        await memory.aput(ChatMessage(role="user", content=text))
        await memory.aget()
        await memory.aget(input=text)  # an agent asks again after tool calls
        await memory.aput(ChatMessage(role="assistant", content="Noted."))
        await memory.aget()  # and once more after its answer

    asyncio.run(turn(FACT))
    asyncio.run(turn("I work at a fintech startup"))
    store = block_of(memory).memory
    flush(store)
    assert llm.brain.extractions == 2
    assert sorted(m.text for m in store.get_all()) == [FACT, "I work at a fintech startup"]


def test_two_users_stay_isolated(new_memory, llm) -> None:
    alice = new_memory("alice")
    ask("simple", llm, alice, FACT, "sync")
    flush(block_of(alice).memory)
    bob = new_memory("bob")
    seen = ask("simple", llm, bob, QUESTION, "sync")
    assert RECALLED not in seen.text and block_of(bob).memory.get_all() == []


def test_memory_with_the_block_serializes_without_clients(new_memory) -> None:
    memory = new_memory()
    data = memory.to_dict()
    (block,) = data["memory_blocks"]
    assert block["name"] == "user_memories"
    assert "_flow" not in block and "memory" not in block


def test_memory_with_the_block_pickles_and_recalls(new_memory, llm) -> None:
    import pickle

    memory = new_memory()
    block_of(memory).memory.add(FACT, category="preference")
    flush(block_of(memory).memory)
    again = pickle.loads(pickle.dumps(memory))  # a process pool, a cache that pickles
    block = block_of(again)
    assert isinstance(block._extraction_llm, ScriptedLLM) and block.user_id == "alice"
    seen = ask("simple", llm, again, QUESTION, "sync")
    assert f"{RECALLED} {FACT}" in seen.text


def test_an_agent_asking_again_in_the_same_turn_gets_the_same_memories(new_memory, llm) -> None:
    # FunctionAgent asks Memory again after its tool calls (aget(input=the user's message)):
    # by then the block has learnt that message, which must not come back as a memory "from
    # an earlier conversation", nor change the prompt within the turn
    memory = new_memory()
    block = block_of(memory)
    block.memory.add("I work at a fintech startup", category="fact")

    async def turn(text: str) -> tuple[str, str]:
        await memory.aput(ChatMessage(role="user", content=text))
        first = await memory.aget()
        flush(block.memory)  # the background extraction of the message is done
        again = await memory.aget(input=text)
        return contents_of_system(first), contents_of_system(again)

    first, again = asyncio.run(turn(FACT))
    assert again == first and FACT not in again
    assert llm.brain.extractions == 1
    assert [m.text for m in block.memory.get_all() if m.text == FACT] == [FACT]

    # the next message is a new turn: what was learnt from the previous one is recalled
    question = "Which language should I pick for backend services?"
    first, again = asyncio.run(turn(question))
    assert FACT in first and again == first

    # a tool run in the turn changes or forgets memories: the turn's next call sees it
    async def ask_again() -> str:
        return contents_of_system(await memory.aget(input=question))

    (python,) = [m for m in block.memory.get_all() if m.text == FACT]
    block.memory.update(python.id, "I prefer Go for backend work")
    assert "Go for backend" in asyncio.run(ask_again()) and FACT not in asyncio.run(ask_again())
    block.memory.clear()
    assert asyncio.run(ask_again()) == ""


def contents_of_system(messages: list[ChatMessage]) -> str:
    return "\n".join(str(m.content) for m in messages if m.role.value == "system")


def test_the_same_words_after_an_answer_are_a_new_turn(new_memory, llm) -> None:
    # a user who says the same thing twice ("yes", "yes"): the second time is a new turn,
    # recalled for anew and learnt from, not a later call of the first
    memory = new_memory()
    block = block_of(memory)

    async def turn() -> str:
        await memory.aput(ChatMessage(role="user", content=FACT))
        shown = await memory.aget()
        await memory.aput(ChatMessage(role="assistant", content="Noted."))
        flush(block.memory)
        return contents_of_system(shown)

    assert FACT not in asyncio.run(turn())
    assert FACT in asyncio.run(turn())  # learnt in the first turn: from an earlier one now
    assert llm.brain.extractions == 2
