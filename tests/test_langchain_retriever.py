"""HeadroomRetriever: a user's memories as documents, with real Chroma and the real model, and
LangChain's own standard retriever tests."""

from __future__ import annotations

import asyncio
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_tests.integration_tests import RetrieversIntegrationTests

from headroom_memory_integrations import InvalidInputError, LocalEmbedder, MemoryStore
from headroom_memory_integrations.langchain import HeadroomRetriever

FOOD = [
    ("Is vegetarian", "fact"),
    ("Loves spicy Thai curries", "preference"),
    ("Dislikes mushrooms", "preference"),
    ("Enjoys fresh Italian pasta", "preference"),
    ("Hates the taste of coriander", "preference"),
]
OTHER = [
    ("Is learning to bake sourdough bread", "context"),
    ("Works as a tax accountant", "fact"),
    ("Drives a blue bicycle", "fact"),
]
QUERY = "What food do I like and dislike?"  # all of FOOD is relevant, none of OTHER


@pytest.fixture
def alice(db_path, model) -> MemoryStore:
    store = MemoryStore("alice", db_path=db_path, embedder=model)
    store.add_many([{"text": t, "category": c} for t, c in FOOD + OTHER])
    return store


def test_documents_carry_the_memory_and_its_metadata(alice) -> None:
    retriever = HeadroomRetriever(memory=alice)
    docs = retriever.invoke(QUERY)
    assert sorted(d.page_content for d in docs) == sorted(t for t, _ in FOOD)
    assert docs[0].page_content == "Dislikes mushrooms"
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True)
    stored = {m.id: m for m in alice.get_all()}
    for doc in docs:
        memory = stored[doc.id]
        assert doc.metadata == {
            "id": memory.id,
            "category": memory.category.value,
            "source": "manual",
            "score": doc.metadata["score"],
            "created_at": memory.created_at.isoformat(),
            "updated_at": memory.updated_at.isoformat(),
        }
        assert datetime.fromisoformat(doc.metadata["created_at"]).tzinfo is not None


def test_k_in_the_constructor_and_per_call(alice) -> None:
    query = QUERY
    assert len(HeadroomRetriever(memory=alice, k=2).invoke(query)) == 2
    retriever = HeadroomRetriever(memory=alice, k=3)
    assert len(retriever.invoke(query)) == 3
    assert len(retriever.invoke(query, k=1)) == 1
    assert retriever.invoke(query, k=1)[0].page_content == retriever.invoke(query)[0].page_content
    with pytest.raises(InvalidInputError, match="top_k"):
        retriever.invoke(query, k=0)
    with pytest.raises(ValueError):
        HeadroomRetriever(memory=alice, k=0)


def test_unknown_arguments_are_refused(alice) -> None:
    """A misspelt argument fails (pydantic's ValidationError, a ValueError) instead of being
    ignored; LangChain's own retriever fields still work."""
    with pytest.raises(ValueError, match=r"top_k\n  Extra inputs are not permitted"):
        HeadroomRetriever(memory=alice, top_k=1)
    with pytest.raises(ValueError, match=r"min_scor\n  Extra inputs are not permitted"):
        HeadroomRetriever(memory=alice, min_scor=0.5)
    tagged = HeadroomRetriever(memory=alice, k=1, tags=["memories"], metadata={"team": "a"})
    assert tagged.tags == ["memories"] and len(tagged.invoke(QUERY)) == 1


def test_the_relevance_floor_and_categories(alice) -> None:
    retriever = HeadroomRetriever(memory=alice, k=10)
    assert retriever.invoke("What is 2+2?") == []
    assert retriever.invoke("   ") == []
    every = HeadroomRetriever(memory=alice, k=10, min_score=-1.0).invoke("What is 2+2?")
    assert len(every) == len(FOOD + OTHER)
    preferences = HeadroomRetriever(memory=alice, k=10, categories=["preference"])
    found = preferences.invoke(QUERY)
    assert len(found) == 4 and {d.metadata["category"] for d in found} == {"preference"}


def test_built_from_user_id_and_db_path_and_isolated(alice, db_path, model) -> None:
    MemoryStore("bob", db_path=db_path, embedder=model).add("Is allergic to shellfish")
    bob = HeadroomRetriever(user_id="bob", db_path=db_path, embedder=model)
    assert bob.user_id == "bob"
    assert [d.page_content for d in bob.invoke("Do I have any food allergies?")] == [
        "Is allergic to shellfish"
    ]
    alice_docs = HeadroomRetriever(user_id="alice", db_path=db_path, embedder=model, k=10).invoke(
        "Do I have any food allergies?"
    )
    assert "Is allergic to shellfish" not in {d.page_content for d in alice_docs}
    with pytest.raises(ValueError, match="pass user_id="):  # pydantic's ValidationError
        HeadroomRetriever(db_path=db_path, embedder=model)


def test_async_and_in_a_chain(alice) -> None:
    retriever = HeadroomRetriever(memory=alice, k=2)
    query = QUERY
    docs = asyncio.run(retriever.ainvoke(query, k=1))
    assert [d.page_content for d in docs] == [retriever.invoke(query)[0].page_content]
    prompt = ChatPromptTemplate.from_template("Known: {memories}\nQ: {question}")

    def join(found: list[Document]) -> str:
        return "; ".join(d.page_content for d in found)

    chain = {"memories": retriever | join, "question": RunnablePassthrough()} | prompt
    text = chain.invoke(query).to_string()
    assert "Dislikes mushrooms" in text and text.endswith(f"Q: {query}")


def test_a_chains_whole_input_is_refused_rather_than_finding_nothing(alice) -> None:
    """The usual LCEL slip: the chain's input dict reaches the retriever. It must not come
    back empty (the model would answer as if the user had no memories): it says what to do."""
    retriever = HeadroomRetriever(memory=alice)
    prompt = ChatPromptTemplate.from_template("Known: {memories}\nQ: {question}")
    chain = {"memories": retriever, "question": itemgetter("question")} | prompt
    with pytest.raises(InvalidInputError, match=r"got dict.*itemgetter\('question'\)"):
        chain.invoke({"question": QUERY})
    with pytest.raises(InvalidInputError, match="got dict"):
        asyncio.run(retriever.ainvoke({"question": QUERY}))  # type: ignore[arg-type]
    fixed = {"memories": itemgetter("question") | retriever, "question": itemgetter("question")}
    assert "Dislikes mushrooms" in (fixed | prompt).invoke({"question": QUERY}).to_string()


@pytest.mark.parametrize("query", ["", "   ", "\u200b", "\x1b", " \x07 ", "\x1b\r\x00"])
def test_a_blank_or_control_character_query_finds_nothing_in_a_chain(alice, query) -> None:
    """A stray ESC or BEL from a terminal is no query: the chain gets no memories, as for a
    blank query, instead of failing."""
    retriever = HeadroomRetriever(memory=alice)
    prompt = ChatPromptTemplate.from_template("Known: {memories}\nQ: {question}")
    chain = {"memories": retriever, "question": RunnablePassthrough()} | prompt
    assert "Known: []" in chain.invoke(query).to_string()
    assert retriever.invoke(query) == asyncio.run(retriever.ainvoke(query)) == []


# The suite's async test carries no marker and asyncio_mode is strict here: mark the class (the
# sync tests' "marked asyncio but not async" warning is expected).
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function:pytest.PytestWarning")
class TestHeadroomRetrieverStandard(RetrieversIntegrationTests):
    """LangChain's standard retriever tests. Nothing is skipped: the retriever needs no chat
    model, only Chroma and the local embedding model, both real here."""

    memories_db: Path
    embedder: LocalEmbedder

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _memories(cls, tmp_path_factory: pytest.TempPathFactory, model: LocalEmbedder) -> None:
        db = tmp_path_factory.mktemp("retriever-standard") / "memories"
        store = MemoryStore("standard-tests", db_path=db, embedder=model)
        store.add_many([{"text": t, "category": c} for t, c in FOOD + OTHER])
        cls.memories_db = db
        cls.embedder = model

    @property
    def retriever_constructor(self) -> type[HeadroomRetriever]:
        return HeadroomRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"user_id": "standard-tests", "db_path": self.memories_db, "embedder": self.embedder}

    @property
    def retriever_query_example(self) -> str:
        return QUERY


PanicException = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})
"""What pyo3 raises on a panic in Rust code (HF ``tokenizers``): not an ``Exception``."""


@pytest.mark.parametrize("failing", ["storage", "embedder", "panicking embedder"])
def test_a_storage_failure_returns_no_documents_and_is_counted(failing, db_path, model) -> None:
    """Also when the embedding API is down (``OpenAIEmbedder``): its error failed the chain;
    and when the embedder's native code panics: the panic, a BaseException, crashed the run."""
    from conftest import closed_server_url
    from openai import OpenAI

    from headroom_memory_integrations import OpenAIEmbedder

    down = closed_server_url()
    if failing == "storage":
        retriever = HeadroomRetriever(user_id="alice", db_path=down, embedder=model)
    elif failing == "panicking embedder":

        class Panicking:
            name, dimension = model.name, model.dimension

            def embed(self, texts):
                raise PanicException("called `Option::unwrap()` on a `None` value")

        retriever = HeadroomRetriever(user_id="alice", db_path=db_path, embedder=Panicking())
    else:
        client = OpenAI(base_url=f"{down}/v1", api_key="sk-x", max_retries=0)
        embedder = OpenAIEmbedder(client)
        retriever = HeadroomRetriever(user_id="alice", db_path=db_path, embedder=embedder)
    assert retriever.invoke(QUERY) == []
    assert asyncio.run(retriever.ainvoke(QUERY)) == []
    assert retriever.memory.counters["retrieve_failures"] == 2


def test_a_retriever_for_one_user_refuses_a_run_of_another(db_path, model) -> None:
    """As the other adapters built for one user do: it served alice's memories to bob's run."""
    from langchain_core.runnables import RunnableLambda

    alice = MemoryStore("alice", db_path=db_path, embedder=model)
    alice.add("Loves spicy Thai curries", category="preference")
    retriever = HeadroomRetriever(memory=alice)
    chain = RunnableLambda(lambda question: question) | retriever
    for user, call in (("bob", retriever.invoke), ("bob", chain.invoke)):
        with pytest.raises(InvalidInputError, match="serves user 'alice' only"):
            call(QUERY, {"configurable": {"user_id": user}})
    with pytest.raises(InvalidInputError, match="serves user 'alice' only"):
        asyncio.run(retriever.ainvoke(QUERY, {"configurable": {"user_id": "bob"}}))
    found = chain.invoke(QUERY, {"configurable": {"user_id": "alice"}})
    assert [d.page_content for d in found] == ["Loves spicy Thai curries"]
    assert [d.page_content for d in retriever.invoke(QUERY)] == ["Loves spicy Thai curries"]
