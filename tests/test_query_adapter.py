"""The query adapter of the default model (embeddings/query_adapter.py): what it is learned
from, where it applies, and what it changes in a search."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import check_shipped_file

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.embeddings.query_adapter import (
    ADAPTERS,
    QueryAdapter,
    adapt_queries,
    query_adapter,
)
from headroom_memory_integrations.errors import InvalidInputError

ROOT = ADAPTERS["all-MiniLM-L6-v2"].parents[4]

MEMORIES = [
    "Is vegan and avoids all animal products",
    "Works as a court stenographer in Leeds",
    "Has a 3-year-old son named Otto",
    "Plays bass in a jazz trio on Fridays",
    "Rents a flat above a bakery in Bristol",
    "Is afraid of flying",
    "Drives an electric Kia Niro",
    "Takes blood thinners after heart valve surgery",
    "Is learning Japanese for a trip to Osaka in April",
    "Keeps two chickens in the garden",
]
# written for this test (none is in benchmarks/adapter_train/ or a benchmark), no word shared
NEEDS = {
    "Can I have the carbonara at the wedding dinner?": "Is vegan and avoids all animal products",
    "What's the quickest way for me to get to Madrid next month?": "Is afraid of flying",
}


def test_the_shipped_adapter_is_what_the_script_learns_from_the_committed_data() -> None:
    check_shipped_file("train_query_adapter.py", "questions left out (near a benchmark item)")


def test_only_the_model_it_was_learned_for_is_adapted() -> None:
    adapter = query_adapter("all-MiniLM-L6-v2")
    assert adapter is not None and adapter.dimension == 384
    assert query_adapter("text-embedding-3-small") is None
    vectors = np.eye(3, 384, dtype=np.float32)
    assert adapt_queries("text-embedding-3-small", vectors) is vectors
    other_size = np.eye(2, 1536, dtype=np.float32)
    assert adapt_queries("all-MiniLM-L6-v2", other_size) is other_size


def test_adapted_vectors_are_unit_rows_and_a_row_is_adapted_alone_as_in_a_batch(model) -> None:
    questions = model.embed(list(NEEDS))
    adapted = adapt_queries(model.name, questions)
    assert adapted.shape == questions.shape and adapted.dtype == np.float32
    assert np.allclose(np.linalg.norm(adapted, axis=1), 1.0, atol=1e-5)
    assert np.allclose(adapt_queries(model.name, questions[0]), adapted[0], atol=1e-6)
    assert not np.allclose(adapted, questions, atol=0.05)  # it does move them
    with pytest.raises(ValueError, match="square"):
        QueryAdapter(np.zeros((3, 4)))


def test_a_reworded_question_finds_the_memory_the_model_alone_ranks_below_another(
    db_path, model
) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=model)
    store.add_many(MEMORIES)
    stored = model.embed(MEMORIES)
    for question, needed in NEEDS.items():
        plain_best = MEMORIES[int(np.argmax(stored @ model.embed([question])[0]))]
        assert plain_best != needed  # the model's own vectors put another memory first
        ranked = store.search(question, top_k=1, min_score=-1.0)
        assert [r.memory.text for r in ranked] == [needed], question
    # with the default floor too (the Madrid question sits just under it: 0.119 against 0.12)
    carbonara = next(iter(NEEDS))
    assert [r.memory.text for r in store.search(carbonara, top_k=1)] == [NEEDS[carbonara]]


def test_small_talk_and_code_questions_stay_below_the_floor(db_path, model) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=model)
    store.add_many(MEMORIES)
    for question in ("Tell me a joke.", "How do I reverse a list in Python?", "Thanks a lot!"):
        assert store.search(question) == [], question
    with pytest.raises(InvalidInputError):
        store.search("   ")
