"""Text the user did not write (tool results, ReAct observations, retrieved documents) never
becomes a memory about the user through the LlamaIndex adapters."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from _llama_index_support import (
    CODE_RESULT,
    FACT,
    PLANTED,
    POISON,
    Brain,
    ChatOnly,
    CodeActBrain,
    DocumentFollowingBrain,
    GullibleBrain,
    PoisonedRetriever,
    ReActBrain,
    ScriptedLLM,
    ScriptedTextBrain,
    flush,
    lookup,
    lookup_tool,
    scripted_openai_like,
)
from llama_index.core import Document, SummaryIndex, get_response_synthesizer
from llama_index.core.agent.workflow import (
    AgentWorkflow,
    CodeActAgent,
    FunctionAgent,
    ReActAgent,
)
from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.bridge.pydantic import BaseModel
from llama_index.core.chat_engine import (
    CondensePlusContextChatEngine,
    ContextChatEngine,
    SimpleChatEngine,
)
from llama_index.core.extractors import DocumentContextExtractor
from llama_index.core.memory import ChatSummaryMemoryBuffer, FactExtractionMemoryBlock, Memory
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.postprocessor.rankGPT_rerank import RankGPTRerank
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.program import LLMTextCompletionProgram
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.core.storage.docstore import SimpleDocumentStore

from headroom_memory_integrations.llama_index import (
    HeadroomChatMemoryBuffer,
    HeadroomMemoryBlock,
    MemoryLLM,
)

_NONCE = re.compile(r"<memory-([0-9a-f]{8,32})>")


def texts(store: Any) -> list[str]:
    flush(store)
    return sorted(m.text for m in store.get_all())


def run(agent: Any, text: str, memory: Any = None) -> str:
    async def go() -> str:
        return str(await agent.run(user_msg=text, **({"memory": memory} if memory else {})))

    return asyncio.run(go())


# -- HeadroomChatMemoryBuffer in agents: tool results arrive only at finalize -----------------


@pytest.fixture
def buffer(db_path, model):
    def build(llm: Any, **options: Any) -> HeadroomChatMemoryBuffer:
        return HeadroomChatMemoryBuffer.from_defaults(
            user_id="alice", db_path=db_path, embedder=model, llm=llm, **options
        )

    return build


@pytest.mark.parametrize("workflow", [False, True])
def test_an_agent_turn_with_a_tool_result_is_learnt_as_untrusted(workflow, buffer) -> None:
    brain = GullibleBrain()
    llm = ScriptedLLM(brain=brain)
    memory = buffer(llm)
    brain.tool_calls.append(("lookup", {"order": "A1"}))
    agent = (
        AgentWorkflow.from_tools_or_functions([lookup_tool()], llm=llm)
        if workflow
        else FunctionAgent(tools=[lookup_tool()], llm=llm)
    )
    answer = run(agent, FACT, memory)
    assert "12345" in answer  # the model repeated the tool's text in its answer
    assert [m.role.value for m in memory.get_all()] == ["user", "assistant", "tool", "assistant"]
    assert texts(memory.memory) == [FACT]  # the user's words kept, the planted one dropped
    assert memory.memory.counters["ungrounded_memories"] == 1


def test_a_return_direct_tool_output_is_not_taken_as_the_answer(buffer) -> None:
    brain = GullibleBrain()
    llm = ScriptedLLM(brain=brain)
    memory = buffer(llm)
    brain.tool_calls.append(("lookup", {"order": "A1"}))
    answer = run(FunctionAgent(tools=[lookup_tool(return_direct=True)], llm=llm), FACT, memory)
    assert answer == lookup()  # the tool's raw output is the agent's answer
    assert texts(memory.memory) == [FACT]
    (conversation,) = brain.conversations
    assert FACT in conversation and "12345" not in conversation  # nor the extracted answer


def test_react_transcripts_in_the_buffer_are_tool_results(buffer) -> None:
    brain = ReActBrain()
    llm = ScriptedLLM(brain=brain)
    memory = buffer(llm)
    for question in (FACT, "And where is order A1 now?"):
        run(ReActAgent(tools=[lookup_tool()], llm=llm), question, memory)
        flush(memory.memory)
    stored = memory.get_all()
    assert [m.role.value for m in stored] == ["user", "assistant"] * 2
    assert "Observation: Order A1 shipped" in stored[1].content  # ReAct's stored scratchpad
    assert texts(memory.memory) == [FACT]
    assert len(brain.conversations) == 2  # each turn was learnt from ...
    assert all("12345" not in c for c in brain.conversations)  # ... but not from the transcript


# -- MemoryLLM in ReAct: observations come back as user messages -------------------------------


@pytest.fixture
def new_llm(db_path, model):
    def build(base: ScriptedLLM, **options: Any) -> MemoryLLM:
        return MemoryLLM(llm=base, user_id="alice", db_path=db_path, embedder=model, **options)

    return build


OLDER = "I use Python at work"
"""A memory from an earlier conversation, recalled for :data:`FACT`."""


def resumed(new_llm: Any, base: ScriptedLLM, request: list[dict[str, str]]) -> MemoryLLM:
    """A new MemoryLLM (as in a new process) asked ``request``, an agent's later step, without
    the memories the first MemoryLLM put in it: no earlier call of the turn was prepared
    through it, so the step gets the instruction."""
    llm = new_llm(base)
    llm.chat(
        [
            ChatMessage(role=m["role"], content=m["content"])
            for m in request
            if m["role"] != "system" or "<user-memories>" not in m["content"]
        ]
    )
    return llm


@pytest.mark.parametrize("workflow", [False, True])
def test_a_react_observation_is_not_the_users_message(workflow, new_llm) -> None:
    brain = ReActBrain()
    llm = new_llm(ChatOnly(brain=brain))
    llm.memory.add(OLDER, category="fact")
    if workflow:
        agent: Any = AgentWorkflow.from_tools_or_functions([lookup_tool()], llm=llm)
        assert [type(a) for a in agent.agents.values()] == [ReActAgent]
    else:
        agent = ReActAgent(tools=[lookup_tool()], llm=llm)
    answer = run(agent, FACT)
    assert "12345" in answer
    observed = brain.requests[-1]
    assert [m["role"] for m in observed][-4:] == ["system", "user", "assistant", "user"]
    assert observed[-3]["content"] == FACT  # the memories sit before the user's own message
    assert OLDER in observed[-4]["content"] and FACT not in observed[-4]["content"]
    assert "<memory-" not in json.dumps(observed)  # a later step: the turn is learnt from once
    assert observed[-1]["content"].startswith("Observation: ")
    assert texts(llm.memory) == sorted([FACT, OLDER])

    # instructed (no earlier call of the turn in this process), the observation is recorded
    # as said, and dropped
    again = resumed(new_llm, ChatOnly(brain=brain), observed)
    assert "<memory-" in brain.requests[-1][-4]["content"]
    assert texts(again.memory) == sorted([FACT, OLDER])
    assert again.memory.counters["ungrounded_memories"] == 1


def test_a_user_message_that_starts_like_an_observation_is_still_the_users(new_llm) -> None:
    llm = new_llm(ScriptedLLM())
    said = "Observation: I prefer Python for backend work"
    llm.chat([ChatMessage(role="user", content=said)])  # no ReAct step before it
    assert texts(llm.memory) == [said]


# -- CodeActAgent: the output of the code it runs comes back as a user message ----------------


async def run_code(code: str) -> str:
    """What the code printed: an order record that asks to be remembered."""
    return lookup()


@pytest.mark.parametrize("adapter", ["buffer", "block", "memory_llm"])
def test_codeacts_code_output_is_not_the_users_message(adapter, db_path, model) -> None:
    brain = CodeActBrain()
    llm: Any = ScriptedLLM(brain=brain)
    where = {"user_id": "alice", "db_path": db_path, "embedder": model}
    memory: Any = None
    if adapter == "buffer":
        memory = HeadroomChatMemoryBuffer.from_defaults(llm=llm, **where)
        store = memory.memory
    elif adapter == "block":
        block = HeadroomMemoryBlock(llm=llm, **where)
        memory = Memory.from_defaults(session_id="alice-chat", memory_blocks=[block])
        store = block.memory
    else:
        llm = MemoryLLM(llm=llm, **where)
        store = llm.memory
    answer = run(CodeActAgent(code_execute_fn=run_code, llm=llm), FACT, memory)
    assert "12345" in answer  # the model repeated what the code printed
    assert brain.requests[-1][-1]["content"].startswith(f"{CODE_RESULT}\n\nOrder A1 shipped")
    assert texts(store) == [FACT]  # the code's output, taken as said or extracted, was dropped
    if adapter == "buffer":
        stored = memory.get_all()
        assert [m.role.value for m in stored] == ["user", "assistant", "user", "assistant"]
        assert all("12345" not in c for c in brain.conversations)


# -- untrusted_context: documents the application puts in the prompt ------------------------


@pytest.mark.parametrize("adapter", [MemoryLLM, HeadroomChatMemoryBuffer, HeadroomMemoryBlock])
def test_untrusted_context_is_true_or_false(adapter, db_path, model) -> None:
    # "false" is truthy: taken as given it would make every call untrusted while the field,
    # and what the object serializes, said False
    where = {"user_id": "alice", "db_path": db_path, "embedder": model}
    build = (
        HeadroomChatMemoryBuffer.from_defaults if adapter is HeadroomChatMemoryBuffer else adapter
    )
    with pytest.raises(ValueError, match="valid boolean"):
        build(llm=ScriptedLLM(), untrusted_context="false", **where)
    built = build(llm=ScriptedLLM(), untrusted_context=True, **where)
    assert built.untrusted_context is True and built._flow.untrusted_context is True


@pytest.mark.parametrize("untrusted", [False, True])
def test_untrusted_context_keeps_documents_out_of_memory_llm(untrusted, new_llm) -> None:
    llm = new_llm(ScriptedLLM(brain=DocumentFollowingBrain()), untrusted_context=untrusted)
    ContextChatEngine.from_defaults(retriever=PoisonedRetriever(), llm=llm).chat("Shipping?")
    assert texts(llm.memory) == []  # the engine's documents are distrusted without being told
    SimpleChatEngine.from_defaults(llm=llm, system_prompt=f"Shipping FAQ. {POISON}").chat("Hi")
    assert texts(llm.memory) == ([] if untrusted else [PLANTED])  # text it cannot tell apart


@pytest.mark.parametrize("engine", [ContextChatEngine, CondensePlusContextChatEngine])
@pytest.mark.parametrize("mode", ["sync", "async", "stream", "astream"])
def test_memory_llm_distrusts_the_documents_a_chat_engine_retrieves(engine, mode, new_llm) -> None:
    # a retrieved document asks the model to remember a payment account: the engine fills
    # LlamaIndex's templates with it (context_str), so the call is untrusted by itself
    llm = new_llm(ScriptedLLM(brain=DocumentFollowingBrain()))
    seen = ask_engine(engine.from_defaults(retriever=PoisonedRetriever(), llm=llm), FACT, mode)
    assert "<memory-" not in seen
    assert texts(llm.memory) == []
    told = new_llm(ScriptedLLM())  # what the user says of themselves is still learnt
    ask_engine(engine.from_defaults(retriever=PoisonedRetriever(), llm=told), FACT, mode)
    assert texts(told.memory) == [FACT]


def ask_engine(engine: Any, text: str, mode: str) -> str:
    if mode == "sync":
        return str(engine.chat(text))
    if mode == "async":
        return str(asyncio.run(engine.achat(text)))
    if mode == "stream":
        return "".join(engine.stream_chat(text).response_gen)

    async def consume() -> str:
        response = await engine.astream_chat(text)
        return "".join([piece async for piece in response.async_response_gen()])

    return asyncio.run(consume())


class DocumentEchoingLLM(ScriptedLLM):
    """Answers by repeating the document in its context; its brain extracts."""

    def chat(self, messages: Any, **kwargs: Any) -> ChatResponse:
        system = "\n".join(m.content or "" for m in messages if m.role.value == "system")
        if "Shipping FAQ" not in system or system.startswith("You maintain long-term memory"):
            return super().chat(messages, **kwargs)
        answer = ChatMessage(role="assistant", content=f"Per the FAQ: {POISON}")
        return ChatResponse(message=answer)


@pytest.mark.parametrize("untrusted", [False, True])
def test_untrusted_context_keeps_documents_out_of_the_buffer(untrusted, buffer) -> None:
    llm = DocumentEchoingLLM(brain=GullibleBrain())
    memory = buffer(llm, untrusted_context=untrusted)
    engine = ContextChatEngine.from_defaults(retriever=PoisonedRetriever(), llm=llm, memory=memory)
    assert "12345" in str(engine.chat(FACT))
    assert texts(memory.memory) == ([FACT] if untrusted else sorted([FACT, PLANTED]))

    data = json.loads(json.dumps(memory.to_dict()))
    assert data["untrusted_context"] is untrusted
    again = HeadroomChatMemoryBuffer.from_dict(data, llm=llm)
    assert again.untrusted_context is untrusted
    again.memory.clear()
    ContextChatEngine.from_defaults(retriever=PoisonedRetriever(), llm=llm, memory=again).chat(FACT)
    assert texts(again.memory) == ([FACT] if untrusted else sorted([FACT, PLANTED]))


def test_the_block_takes_and_keeps_untrusted_context(db_path, model) -> None:
    block = HeadroomMemoryBlock(
        user_id="alice", db_path=db_path, embedder=model, llm=ScriptedLLM(), untrusted_context=True
    )
    data = block.model_dump()
    assert data["untrusted_context"] is True
    assert HeadroomMemoryBlock(**data, llm=ScriptedLLM()).untrusted_context is True


# -- ReAct's retry prompts: the agent's words, sent as user messages ---------------------------


@dataclass
class RetriedReActBrain(ReActBrain):
    """Its first answer is not in ReAct's format (``sloppy``: "" or some text), so ReAct asks
    again in a user message ("FAILURE: ..." or "Error while parsing the output: ..."); then it
    answers. Given the inline instruction, it records what the latest user message says, as
    a model that takes the retry prompt for the user's words would."""

    sloppy: str | None = None

    def answer(self, messages: Any, *, tools: bool = False) -> Any:
        said = [{"role": m["role"], "content": str(m.get("content") or "")} for m in messages]
        system = "\n".join(m["content"] for m in said if m["role"] == "system")
        if system.startswith("You maintain long-term memory"):
            return super().answer(messages, tools=tools)
        self.requests.append(said)
        latest = [m["content"] for m in said if m["role"] == "user"][-1]
        if self.sloppy is not None:
            text, self.sloppy = self.sloppy, None
        else:
            text = "Thought: I can answer.\nAnswer: Python it is."
        nonce = _NONCE.search(system)
        if nonce:
            found = [{"text": latest, "category": "fact"}]
            tag = nonce.group(1)
            text += f"\n<memory-{tag}>{json.dumps(found)}</memory-{tag}>"
        return text


RETRIES = {
    "": "FAILURE: Your previous response was empty.",
    "Thought: Python?": "Error while parsing",
}


@pytest.mark.parametrize("sloppy", list(RETRIES))
def test_reacts_retry_prompt_is_not_the_users_message(sloppy, new_llm) -> None:
    brain = RetriedReActBrain(sloppy=sloppy)
    llm = new_llm(ChatOnly(brain=brain))
    llm.memory.add(OLDER, category="fact")
    assert "Python it is." in run(ReActAgent(tools=[lookup_tool()], llm=llm), FACT)
    assert texts(llm.memory) == sorted([FACT, OLDER])
    retried = brain.requests[-1]
    assert retried[-1]["role"] == "user" and retried[-1]["content"].startswith(RETRIES[sloppy])
    assert OLDER in retried[-4]["content"] and retried[-3]["content"] == FACT  # memory before it
    assert "<memory-" not in json.dumps(retried)  # a later step: the turn is learnt from once

    # instructed, the retry prompt is recorded as said, and dropped
    again = resumed(new_llm, ChatOnly(brain=brain), retried)
    assert "<memory-" in brain.requests[-1][-4]["content"]
    assert texts(again.memory) == sorted([FACT, OLDER])
    assert again.memory.counters["ungrounded_memories"] == 1


# -- the buffer's trust follows what the model sees ----------------------------------------


@dataclass
class ParaphrasingBrain(GullibleBrain):
    """Extracts "I'm vegan" as a paraphrase that shares no word with it (kept only when the
    call is trusted: see grounding)."""

    def _extract(self, conversation: str) -> str:
        found = json.loads(super()._extract(conversation))["memories"]
        if "vegan" in conversation:
            found.append({"text": "Eats no meat or dairy", "category": "preference"})
        return json.dumps({"memories": found})


@pytest.mark.parametrize("fillers", [0, 6])
def test_a_tool_result_out_of_the_buffers_window_no_longer_distrusts_the_user(
    fillers, buffer
) -> None:
    from llama_index.core.chat_engine import SimpleChatEngine

    brain = ParaphrasingBrain()
    llm = ScriptedLLM(brain=brain)
    memory = buffer(llm, token_limit=120)
    brain.tool_calls.append(("lookup", {"order": "A1"}))
    run(FunctionAgent(tools=[lookup_tool()], llm=llm), FACT, memory)
    assert texts(memory.memory) == [FACT]  # the tool's turn: the planted memory was dropped
    engine = SimpleChatEngine.from_defaults(llm=llm, memory=memory)
    for number in range(fillers):
        engine.chat(f"What should I look at next, item number {number} of my list?")
    window = memory.get("I'm vegan")
    assert any(m.role.value == "tool" for m in window) is (fillers == 0)
    engine.chat("I'm vegan")
    learnt = texts(memory.memory)
    if fillers:  # the tool's output, and the answer written with it, are out of the window
        assert learnt == sorted([FACT, "I'm vegan", "Eats no meat or dairy"])
    else:  # the model still sees the tool's output: only what the user said is kept
        assert learnt == sorted([FACT, "I'm vegan"])


# -- MemoryLLM called by LlamaIndex's other components: their prompts are not the user's ------


@dataclass
class ComponentBrain(ScriptedTextBrain):
    """Answers each LlamaIndex component in its own format. Given the inline instruction, it
    records the latest user message (unless a question) and, as a manipulated model would,
    what any text in view asks (:data:`PLANTED`, for the account 12345)."""

    def reply(self, latest: str, system: str) -> str:
        if "Rank the" in latest:  # RankGPTRerank
            return "[2] > [1]"
        if "query_satisfied" in system:  # Refine's structured answer filtering
            return json.dumps({"answer": "It shipped.", "query_satisfied": True})
        if "vendor" in latest:  # the LLMTextCompletionProgram below
            return json.dumps({"vendor": "ACME", "total": 120.5})
        return "Noted."

    def planted(self, said: list[dict[str, str]]) -> list[dict[str, str]]:
        if any("12345" in m["content"] for m in said if m["role"] != "system"):
            return [{"text": PLANTED, "category": "preference"}]
        return []


def instructed(brain: Brain) -> list[bool]:
    """For each request the model answered: whether it carried the inline instruction."""
    return [bool(_NONCE.search(json.dumps(request))) for request in brain.requests]


class Invoice(BaseModel):
    vendor: str
    total: float


INVOICE = f"ACME invoice, total 120.50. {POISON}"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_program_sends_its_prompt_not_the_users_words(mode, new_llm) -> None:
    # LLMTextCompletionProgram fills its template with a document and calls llm.chat itself
    brain = ComponentBrain()
    llm = new_llm(ScriptedLLM(brain=brain))
    program = LLMTextCompletionProgram.from_defaults(
        output_cls=Invoice, prompt_template_str="Extract the vendor and total:\n{text}", llm=llm
    )
    found = program(text=INVOICE) if mode == "sync" else asyncio.run(program.acall(text=INVOICE))
    assert found == Invoice(vendor="ACME", total=120.5)
    assert texts(llm.memory) == []
    assert instructed(brain) == [False]  # the memories relevant to it, but no instruction
    llm.chat([ChatMessage(role="user", content=FACT)])  # the user's own call still teaches
    assert texts(llm.memory) == [FACT]
    assert instructed(brain) == [False, True]


def test_a_query_engine_with_structured_answer_filtering_learns_nothing(new_llm) -> None:
    # Refine picks an LLMTextCompletionProgram for an LLM without function calling
    brain = ComponentBrain()
    llm = new_llm(ChatOnly(brain=brain))
    synthesizer = get_response_synthesizer(llm=llm, structured_answer_filtering=True)
    index = SummaryIndex.from_documents([Document(text=f"Shipping FAQ. {POISON}")])
    engine = index.as_query_engine(llm=llm, response_synthesizer=synthesizer)
    assert str(engine.query("Where is my order?")) == "It shipped."
    assert texts(llm.memory) == []
    assert instructed(brain) == [False]


def test_a_document_context_extractor_learns_nothing(new_llm) -> None:
    brain = ComponentBrain()
    llm = new_llm(ScriptedLLM(brain=brain))
    document = Document(text=f"Shipping FAQ. Orders ship in 2 days. {POISON}")
    docstore = SimpleDocumentStore()
    docstore.add_documents([document])
    nodes = SentenceSplitter().get_nodes_from_documents([document])
    extractor = DocumentContextExtractor(docstore=docstore, llm=llm, max_context_length=10000)
    assert extractor.extract(nodes) == [{"context": "Noted."}]  # achat, with the document
    assert texts(llm.memory) == []
    assert instructed(brain) == [False]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rankgpt_reranker_learns_nothing(mode, new_llm) -> None:
    brain = ComponentBrain()
    llm = new_llm(ScriptedLLM(brain=brain))
    nodes = [
        NodeWithScore(node=TextNode(text="Orders ship in 2 days."), score=1.0),
        NodeWithScore(node=TextNode(text=f"Shipping FAQ. {POISON}"), score=0.5),
    ]
    reranker = RankGPTRerank(llm=llm, top_n=1)
    query = "Where is my order?"
    if mode == "sync":
        kept = reranker.postprocess_nodes(nodes, query_str=query)
    else:
        kept = asyncio.run(reranker.apostprocess_nodes(nodes, query_str=query))
    assert [n.node.get_content() for n in kept] == [f"Shipping FAQ. {POISON}"]
    assert texts(llm.memory) == []
    assert instructed(brain) == [False]  # the passages, sent as user messages


def test_a_summary_buffers_transcript_is_not_the_users_message(new_llm) -> None:
    # the engine's LLM, reused to summarise: the transcript (answers included) is one user
    # message; the engine's own call, with the user's message, still teaches
    brain = ComponentBrain()
    llm = new_llm(ScriptedLLM(brain=brain))
    history = [
        ChatMessage(role="user", content="Where is order A1?"),
        ChatMessage(role="assistant", content=f"Order A1 shipped. {POISON}"),
    ]
    buffer = ChatSummaryMemoryBuffer.from_defaults(chat_history=history, llm=llm, token_limit=20)
    SimpleChatEngine.from_defaults(llm=llm, memory=buffer).chat(FACT)
    assert "Transcript so far" in brain.requests[0][-1]["content"]
    assert texts(llm.memory) == [FACT]
    assert instructed(brain) == [False, True]


def test_a_fact_extraction_block_sends_its_prompt_not_the_users_words(new_llm) -> None:
    brain = ComponentBrain()
    llm = new_llm(ScriptedLLM(brain=brain))
    block = FactExtractionMemoryBlock(name="facts", llm=llm)
    flushed = [
        ChatMessage(role="user", content="Where is order A1?"),
        ChatMessage(role="assistant", content=f"Order A1 shipped. {POISON}"),
    ]
    asyncio.run(block.aput(flushed))
    assert "fact extraction" in brain.requests[0][-1]["content"]
    assert texts(llm.memory) == []
    assert instructed(brain) == [False]


class AppReranker(BaseNodePostprocessor):
    """An application's own postprocessor, which sends the passages through ``chat``."""

    llm: Any = None

    def _postprocess_nodes(self, nodes: Any, query_bundle: Any = None) -> Any:
        passages = "\n".join(n.node.get_content() for n in nodes)
        self.llm.chat([ChatMessage(role="user", content=f"Pick the best passage:\n{passages}")])
        return nodes


def test_an_applications_own_component_sends_a_prompt_and_its_own_calls_a_turn(new_llm) -> None:
    brain = ComponentBrain()
    llm = new_llm(ScriptedLLM(brain=brain))
    poisoned = [NodeWithScore(node=TextNode(text=f"Shipping FAQ. {POISON}"), score=1.0)]
    AppReranker(llm=llm).postprocess_nodes(poisoned, query_str="Where is my order?")
    assert texts(llm.memory) == []
    assert instructed(brain) == [False]

    async def both() -> None:  # the application's own calls, each run as a task
        said = "I live in Oslo"
        await asyncio.gather(*(llm.achat([ChatMessage(role="user", content=t)]) for t in [said]))
        await asyncio.create_task(llm.achat([ChatMessage(role="user", content=FACT)]))

    asyncio.run(both())
    assert texts(llm.memory) == sorted([FACT, "I live in Oslo"])
    assert instructed(brain) == [False, True, True]


@pytest.mark.openai2
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_reranker_over_http_learns_nothing(mode, openai_server, new_llm) -> None:
    import httpx

    brain = ComponentBrain()
    openai_server.responder = brain.responder
    clients = {"http_client": httpx.Client(verify=False)}
    clients["async_http_client"] = httpx.AsyncClient(verify=False)
    llm = new_llm(scripted_openai_like(openai_server.base_url, **clients))
    nodes = [
        NodeWithScore(node=TextNode(text="Orders ship in 2 days."), score=1.0),
        NodeWithScore(node=TextNode(text=f"Shipping FAQ. {POISON}"), score=0.5),
    ]
    reranker = RankGPTRerank(llm=llm, top_n=1)
    if mode == "sync":
        reranker.postprocess_nodes(nodes, query_str="Where is my order?")
    else:
        asyncio.run(reranker.apostprocess_nodes(nodes, query_str="Where is my order?"))
    llm.chat([ChatMessage(role="user", content=FACT)])  # the application's own call teaches
    assert texts(llm.memory) == [FACT]
    assert instructed(brain) == [False, True]
    clients["http_client"].close()
