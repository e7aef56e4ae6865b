"""Hybrid search: exact words count, and one shared word cannot lift an unrelated memory."""

from __future__ import annotations

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.embeddings.query_adapter import adapt_queries
from headroom_memory_integrations.lexical import lexical_scores, terms


def test_terms_drop_stop_words_and_trim_endings() -> None:
    assert terms("I went hiking with my dogs in Lisbon") == {
        "went": 1,
        "hik": 1,
        "dog": 1,
        "lisbon": 1,
    }
    assert terms("The the THE") == {}


def test_lexical_scores_are_shares_of_the_best_possible_score() -> None:
    docs = ["Caroline went to a support group", "Melanie painted a sunrise", "Caroline painted"]
    scores = lexical_scores("When did Melanie paint the sunrise?", docs)
    assert scores.argmax() == 1 and 0 < scores[1] <= 1 and scores[0] == 0
    assert lexical_scores("the of and", docs).tolist() == [0, 0, 0]  # stop words only
    assert lexical_scores("anything", []).size == 0


def test_a_rare_exact_word_outranks_vaguer_semantic_matches(store: MemoryStore, model) -> None:
    store.add_many(
        [
            "Enjoys cooking Italian food on weekends",
            "Recently started learning to cook Thai curries",
            "Her favourite restaurant is called Osteria Francescana",
            "Likes trying new recipes with friends",
        ]
    )
    question = "Have I told you about Osteria Francescana?"
    top = store.search(question, top_k=1)
    assert top[0].memory.text == "Her favourite restaurant is called Osteria Francescana"
    query, text = model.embed([question, top[0].memory.text])
    assert top[0].score > float(query @ text) + 0.2  # cosine plus a lexical bonus


def test_one_shared_token_does_not_lift_an_unrelated_memory(store: MemoryStore, model) -> None:
    store.add("Has 2 cats and a dog")
    query = "What is 2+2?"
    [found] = store.search(query, min_score=-1.0)
    question, memory = model.embed([query, "Has 2 cats and a dog"])
    cosine = float(adapt_queries(model.name, question) @ memory)  # the query as a search moves it
    assert found.score > cosine + 0.5  # the shared "2" gives it a large lexical bonus ...
    assert store.search(query, min_score=cosine + 0.01) == []  # ... but the floor judges meaning
    assert store.search(query, min_score=cosine - 0.01)  # (the cosine alone) whatever the bonus


def test_a_memory_updated_elsewhere_is_ranked_by_its_new_text(db_path, model) -> None:
    first = MemoryStore("alice", db_path=db_path, embedder=model)
    second = MemoryStore("alice", db_path=db_path, embedder=model)
    memory = first.add("Drives a red Toyota")
    assert second.search("What car does she drive? Toyota?")[0].memory.text == "Drives a red Toyota"
    first.update(memory.id, "Sold the Toyota and now cycles everywhere")
    [hit] = second.search("Does she cycle?")
    assert hit.memory.text == "Sold the Toyota and now cycles everywhere"


def test_a_search_keeps_its_memories_terms_not_its_questions() -> None:
    """Every chat message is a new question: cached, 50,000 of them filled the process's
    memory (~78 MB with the documents) and none was read again."""
    from headroom_memory_integrations import lexical

    before = lexical._document.cache_info().currsize
    for number in range(500):
        lexical.lexical_scores(f"question {number} about green tea", ["Drinks green tea daily"])
    assert lexical._document.cache_info().currsize - before <= 1
    assert not hasattr(lexical.terms, "cache_info")


def test_term_statistics_come_from_the_nearest_candidates_only() -> None:
    near = ["Plays tennis", "Plays chess", "Drinks tea"]
    deeper = ["Plays golf", "Plays cards", "Plays darts"]
    alone = lexical_scores("who plays tennis", near)
    widened = lexical_scores("who plays tennis", near + deeper, statistics_of=len(near))
    assert widened[:3].tolist() == alone.tolist()


def test_the_best_results_do_not_depend_on_how_many_are_asked_for(store: MemoryStore) -> None:
    from benchmarks.corpus import memory_texts

    texts = memory_texts(600, seed=7)
    store.add_many(texts)
    differ = []
    for text in texts[:300:10]:
        words = text.split()
        query = f"Who do I {words[0].lower()} {' '.join(words[1:4])} with?"
        few = [r.memory.id for r in store.search(query, top_k=5)]
        many = [r.memory.id for r in store.search(query, top_k=100)][:5]
        if few != many:
            differ.append(query)
    assert differ == []


def test_a_sentence_written_without_spaces_is_read_as_character_pairs(hash_store) -> None:
    """BM25 read "我住在北京" (I live in Beijing) as one term, which no question ever held, so
    a Chinese or Japanese memory never had a lexical score. Its terms are its character pairs
    now, as grounding reads it (one function, lexical.split_unspaced): a question sharing
    "北京" (Beijing) ranks the memory above the others, whose scores are their similarity
    alone (the test embedder's vectors of these texts are near orthogonal)."""
    assert terms("我住在北京") == {"我住": 1, "住在": 1, "在北": 1, "北京": 1}
    assert terms("東京に住む, likes hiking") == {
        "東京": 1, "京に": 1, "に住": 1, "住む": 1, "lik": 1, "hik": 1
    }  # fmt: skip
    hash_store.add_many(["我喜欢喝茶", "我住在北京", "我有一只猫"])  # tea; Beijing; a cat
    hits = hash_store.search("北京的天气怎么样", min_score=-1.0)  # how is the weather in Beijing
    assert hits[0].memory.text == "我住在北京"
    assert hits[0].score > 0.02 > 0.001 > max(abs(hit.score) for hit in hits[1:])
