"""Centred queries: a search discounts a memory for being like the user's other memories
(``engine.centred_query``), with the mean of the user's vectors kept by the in-memory index or
read from a sample."""

from __future__ import annotations

import numpy as np
import pytest

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.embeddings.query_adapter import adapt_queries
from headroom_memory_integrations.engine import (
    CENTROID_PRIOR,
    LEXICAL_WEIGHT,
    QUERY_CENTERING,
    centred_query,
)
from headroom_memory_integrations.lexical import lexical_scores
from headroom_memory_integrations.storage import chroma
from headroom_memory_integrations.storage.vectors import VectorIndex


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_the_index_keeps_the_mean_of_its_vectors_through_writes_and_deletes() -> None:
    vectors = _unit(np.random.default_rng(1).normal(size=(6, 8)))
    index = VectorIndex(8)
    assert index.centroid() is None
    index.put(["a", "b", "c", "d"], vectors[:4])
    index.put(["b"], vectors[4:5])  # a new version of b
    index.remove(["c", "unknown"])
    mean, count = index.centroid()  # type: ignore[misc]
    assert count == 3
    np.testing.assert_allclose(mean, vectors[[0, 4, 3]].mean(axis=0), atol=1e-6)
    index.remove(["a", "b", "d"])
    assert index.centroid() is None


def test_a_memory_is_discounted_by_how_much_more_typical_than_the_average_one_it_is() -> None:
    rows = _unit(np.random.default_rng(2).normal(size=(50, 16)) + 2.0)  # sharing a direction
    query = _unit(np.random.default_rng(3).normal(size=(1, 16)))[0]
    mean = rows.mean(axis=0)
    centred = centred_query(query, (mean, len(rows)))
    weight = QUERY_CENTERING * len(rows) / (len(rows) + CENTROID_PRIOR)
    expected = rows @ query - weight * (rows @ mean - mean @ mean)
    found = centred.similarity_of(rows)
    np.testing.assert_allclose(found, expected, atol=1e-5)
    assert np.isclose(np.linalg.norm(centred.vector), 1.0)
    assert not np.allclose(found, rows @ query, atol=1e-3)  # it is not the plain cosine
    plain = centred_query(query, None)  # no memories yet: plain cosine
    assert plain.similarity_of(rows[0]) == pytest.approx(rows[0] @ query)
    assert centred.similarity(float(rows[0] @ centred.vector)) == pytest.approx(found[0])


def test_search_scores_are_the_centred_similarity_plus_the_lexical_bonus(
    store: MemoryStore,
) -> None:
    texts = [
        "Visited the dentist in Porto on Monday",
        "Visited the bakery in Porto on Tuesday",
        "Visited the museum in Porto on Friday",
        "Is allergic to sesame seeds",
    ]
    store.add_many(texts)
    query = "Can I eat the tahini dip at the party?"
    results = store.search(query, top_k=10, min_score=-1.0)
    vectors = store.embedder.embed(texts)
    asked = adapt_queries(store.embedder.name, store.embedder.embed([query]))[0]
    centred = centred_query(asked, (vectors.mean(axis=0), len(texts)))
    lexical = lexical_scores(query, texts)
    expected = {
        text: float(centred.similarity_of(vector)) + LEXICAL_WEIGHT * overlap
        for text, vector, overlap in zip(texts, vectors, lexical.tolist())
    }
    assert {r.memory.text for r in results} == set(texts)
    for result in results:
        assert result.score == pytest.approx(expected[result.memory.text], abs=1e-4)
    assert results[0].memory.text == "Is allergic to sesame seeds"


def test_without_the_index_the_mean_comes_from_a_sample_read_at_most_every_few_minutes(
    hash_store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    collection = hash_store._open()
    collection._warm_after = None  # no read-ahead, so no index: as above the read-ahead limit
    texts = ["Lives in Porto", "Plays the cello", "Drinks green tea"]
    hash_store.add_many(texts)
    samples: list[dict[str, object]] = []  # reads of vectors (others read records)

    def counted(*args: object, **kwargs: object) -> object:
        if "embeddings" in kwargs.get("include", ()):  # type: ignore[operator]
            samples.append(kwargs)
        return chroma_get(*args, **kwargs)

    chroma_get = collection._collection.get
    collection._collection.get = counted
    mean, count = collection.centroid()
    assert count == 3
    np.testing.assert_allclose(mean, hash_store.embedder.embed(texts).mean(axis=0), atol=1e-6)
    assert samples == [{"limit": chroma.CENTROID_SAMPLE, "include": ["embeddings"]}]
    hash_store.search("Where do I live?")
    assert collection.centroid()[1] == 3 and len(samples) == 1  # served from the last sample
    monkeypatch.setattr(chroma, "CENTROID_SECONDS", 0.0)
    hash_store.add("Runs on Sundays")
    assert collection.centroid()[1] == 4 and len(samples) == 2


def test_a_sample_read_of_ids_without_their_vectors_is_read_again(hash_store: MemoryStore) -> None:
    """Under concurrent writes Chroma once answered the sample read with a record's id and no
    vector (an empty array, seen in a fresh-clone CI run of
    ``test_store.py::test_concurrent_readers_and_writers``): its mean warned "Mean of empty
    slice" and was NaN. Now the read is tried again, as other reads of vectors are."""
    collection = hash_store._open()
    collection._warm_after = None  # no read-ahead, so no index
    hash_store.add_many(["Lives in Porto", "Plays the cello"])
    chroma_get = collection._collection.get
    torn = [True]

    def ids_without_vectors(*args: object, **kwargs: object) -> object:
        found = chroma_get(*args, **kwargs)
        if torn and "embeddings" in kwargs.get("include", ()):  # type: ignore[operator]
            torn.pop()  # (the first such read only)
            found["embeddings"] = np.zeros((0,), dtype=np.float32)
        return found

    collection._collection.get = ids_without_vectors
    mean, count = collection.centroid()
    assert not torn and count == 2  # read again, whole
    np.testing.assert_allclose(
        mean,
        hash_store.embedder.embed(["Lives in Porto", "Plays the cello"]).mean(axis=0),
        atol=1e-6,
    )
    found = hash_store.search("Lives in Porto", min_score=-1.0)
    assert [memory.text for memory, _ in found][:1] == ["Lives in Porto"]


def test_the_sample_of_a_larger_collection_stands_for_all_of_it(
    hash_store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    collection = hash_store._open()
    collection._warm_after = None
    texts = [f"Note number {n} about topic {n * 7}" for n in range(20)]
    hash_store.add_many(texts)
    monkeypatch.setattr(chroma, "CENTROID_SAMPLE", 8)
    mean, count = collection.centroid()
    assert count == 20  # the mean of 8 is weighed as the mean of the user's 20 memories
    np.testing.assert_allclose(mean, hash_store.embedder.embed(texts[:8]).mean(axis=0), atol=1e-6)


def test_a_small_users_sampled_mean_follows_the_writes_of_this_process(
    hash_store: MemoryStore,
) -> None:
    """A search before the first memory must not leave the user uncentred for minutes."""
    collection = hash_store._open()
    collection._warm_after = None
    assert hash_store.search("Where do I live?") == []
    assert collection.centroid() is None
    hash_store.add("Lives in Porto")
    mean, count = collection.centroid()
    assert count == 1
    np.testing.assert_allclose(mean, hash_store.embedder.embed(["Lives in Porto"])[0], atol=1e-6)
