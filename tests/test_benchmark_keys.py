"""The paraphrase benchmark's run with model-written keys (benchmarks/paraphrase.py): the keyed
synthetic memories, the key files, and the run's machinery on the real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import corpus, paraphrase
from benchmarks.common import Context, SectionResult
from benchmarks.population import CHUNK, VectorCache, fill, keyed_memory_cache
from headroom_memory_integrations import LocalEmbedder, MemoryStore, NewMemory
from headroom_memory_integrations.keys import MAX_KEYS, clean_keys, index_text, key_questions


def test_keyed_memories_are_the_memory_texts_with_keys() -> None:
    for seed in (7, 99):
        keyed = corpus.keyed_memory_texts(3000, seed)
        assert [text for text, _ in keyed] == corpus.memory_texts(3000, seed)
    assert corpus.keyed_memory_texts(200) == corpus.keyed_memory_texts(1000)[:200]


def test_memory_texts_are_unchanged_by_the_recording() -> None:
    # The first texts of seed 7 as generated before the draws were recorded.
    assert corpus.memory_texts(3) == [
        "Speaks Japanese with their colleague Maya and is learning Portuguese for a move to "
        "Rotterdam",
        "Plays saxophone in a string quartet in Seoul every Friday with Yuki",
        "Prefers spicy ramen for late-night snacks when visiting Wanjiru in Austin",
    ]


def test_a_memory_gets_its_familys_keys_then_its_values_keys_then_its_questions() -> None:
    families = corpus.memory_keys()["families"]
    draws = corpus._distinct_draws(7)
    for _ in range(2000):
        drawn = next(draws)
        keys = corpus.keys_of(drawn)
        family = clean_keys(families[str(drawn.family)])
        assert keys[: len(family)] == family
        assert len(family) < len(keys) <= MAX_KEYS
        assert clean_keys(keys) == keys
        asked = [corpus.question_of(drawn), *corpus.situations_of(drawn)]
        assert list(keys[-len(asked) :]) == asked and all(q.endswith("?") for q in asked)
        assert not any("{" in q for q in asked)  # every slot of the templates was filled
    text, keys = corpus.keyed_memory_texts(4)[3]
    assert text.startswith("Is allergic to peanuts")
    assert keys == (
        "health",
        "allergy",
        "medication",
        "family visit",  # family 7's topics, as many as fit beside the questions
        "What should I pack for visiting my niece Youssef?",  # family 7's question
        "Is this restaurant menu safe for me to order from?",  # and its situations
        "What should I bring to a potluck this weekend?",
        "Where's the nearest late-night pharmacy in Seoul?",
    )


def test_key_files_cover_every_fact_family_and_slot_value() -> None:
    pairs = paraphrase.load(paraphrase.PAIRS)
    keys = paraphrase.fact_keys(pairs)  # raises unless the ids match in order
    assert len(keys) == len(pairs) == 132
    assert all(2 <= len(k) <= MAX_KEYS for k in keys)
    rows = paraphrase.load(paraphrase.FACT_KEYS)
    assert all(k[-4:] == (row["asks"], *row["situations"]) for k, row in zip(keys, rows))
    table = corpus.memory_keys()
    assert sorted(table["families"], key=int) == [str(f) for f in range(16)]
    assert sorted(table["asks"], key=int) == [str(f) for f in range(16)]
    assert sorted(table["situations"], key=int) == [str(f) for f in range(16)]
    assert set(table["values"]) == set(corpus.KEYED_LISTS)
    for name, options in corpus.KEYED_LISTS.items():
        assert set(table["values"][name]) == set(options), name
        assert all(clean_keys(k) for k in table["values"][name].values())


def test_the_fresh_set_is_complete_and_apart_from_the_first() -> None:
    """The fresh set (never tuned on): 100 pairs in ten domains, 60 unrelated questions, one
    split, keys for every fact in order, and no fact or question of the first set again."""
    pairs = paraphrase.load(paraphrase.FRESH_PAIRS)
    unrelated = paraphrase.load(paraphrase.FRESH_UNRELATED)
    assert len(pairs) == 100 and len(unrelated) == 60
    assert {row["split"] for row in [*pairs, *unrelated]} == {"fresh"}
    assert len({row["domain"] for row in pairs}) == 10
    keys = paraphrase.fact_keys(pairs, paraphrase.FRESH_KEYS)
    assert all(2 <= len(k) <= MAX_KEYS and k[-1].endswith("?") for k in keys)
    first = paraphrase.load(paraphrase.PAIRS) + paraphrase.load(paraphrase.UNRELATED)
    seen = {row.get("fact") for row in first} | {row["question"] for row in first}
    fresh = [row["fact"] for row in pairs] + [row["question"] for row in [*pairs, *unrelated]]
    assert len(set(fresh)) == len(fresh) and not seen & set(fresh)


def test_the_second_fresh_set_is_complete() -> None:
    """The second fresh set (never tuned on; written blind): 140 pairs, 20 in each of seven
    domains, 80 messages that need no memory, one split, keys for every fact in order, and
    no text twice."""
    pairs_file, unrelated_file, keys_file = paraphrase.FRESH_SETS["fresh2"]
    pairs, unrelated = paraphrase.load(pairs_file), paraphrase.load(unrelated_file)
    assert len(pairs) == 140 and len(unrelated) == 80
    assert {row["split"] for row in [*pairs, *unrelated]} == {"fresh2"}
    domains = [row["domain"] for row in pairs]
    assert {domains.count(domain) for domain in domains} == {20} and len(set(domains)) == 7
    keys = paraphrase.fact_keys(pairs, keys_file)
    assert all(2 <= len(k) <= MAX_KEYS and k[-1].endswith("?") for k in keys)
    texts = [row["fact"] for row in pairs] + [row["question"] for row in [*pairs, *unrelated]]
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize(
    "name, count, messages",
    [
        ("fresh3", 138, 80),
        ("fresh4", 140, 80),
        ("fresh5", 140, 80),
        ("fresh6", 140, 120),
        ("fresh7", 140, 120),
        ("fresh8", 140, 120),
        ("fresh9", 140, 120),
    ],
)
def test_the_later_fresh_sets_are_complete_with_both_kinds_of_question(
    name: str, count: int, messages: int
) -> None:
    """The third to ninth fresh sets (written blind): their pairs in seven domains, 70 of them
    labelled "topic" and the rest "situation", messages that need no memory, and keys
    with the fact's question and three situation questions, in order."""
    pairs_file, unrelated_file, keys_file = paraphrase.FRESH_SETS[name]
    pairs, unrelated = paraphrase.load(pairs_file), paraphrase.load(unrelated_file)
    assert len(pairs) == count and len(unrelated) == messages
    assert {row["split"] for row in [*pairs, *unrelated]} == {name}
    assert len({row["domain"] for row in pairs}) == 7
    kinds = [row["kind"] for row in pairs]
    assert set(kinds) == {"topic", "situation"} and kinds.count("topic") == 70
    keys = paraphrase.fact_keys(pairs, keys_file)
    assert all(len(key_questions(k)) == 4 and len(k) <= MAX_KEYS for k in keys)
    texts = [row["fact"] for row in pairs] + [row["question"] for row in [*pairs, *unrelated]]
    assert len(set(texts)) == len(texts)


def test_a_text_the_adapter_learned_is_not_apart_from_its_training(model: LocalEmbedder) -> None:
    learned = paraphrase.load(paraphrase.ADAPTER_TRAINING / "pairs_1.jsonl")[0]
    far = "The quarterly tax filing for the bakery's VAT is due on the ninth"
    assert paraphrase.apart_from_training(model, [learned["fact"], learned["question"], far]) == [
        False,
        False,
        True,
    ]


def test_fact_keys_refuse_pairs_in_another_order() -> None:
    pairs = paraphrase.load(paraphrase.PAIRS)
    with pytest.raises(ValueError, match="ids"):
        paraphrase.fact_keys(pairs[::-1])


def test_the_keyed_cache_writes_memories_with_their_keys(
    tmp_path: Path, model: LocalEmbedder
) -> None:
    full = keyed_memory_cache(tmp_path / "cache", model, 1000)
    assert len(full.texts) > CHUNK
    few = 40  # a cache of the first texts only, so that the test embeds few
    cache = VectorCache(full.texts[:few], tmp_path / "cache", model, items=full.items[:few])
    embedder = cache.embedder()
    store = MemoryStore("u", db_path=tmp_path / "db", embedder=embedder)
    report = fill(store, cache, 30)
    assert report["memories"] == store.count() >= 30
    # the engine asked for exactly the cached index texts: nothing was embedded while writing
    assert embedder.misses == 0
    written = {item.text: item.keys for item in cache.items if isinstance(item, NewMemory)}
    for memory in store.get_all():
        assert memory.keys == written[memory.text] and len(memory.keys) >= 5
        assert index_text(memory.text, memory.keys) in cache.table


def test_the_keyed_run_reports_its_rows(tmp_path: Path, model: LocalEmbedder) -> None:
    ctx = Context(quick=True, workdir=tmp_path, cache=tmp_path / "cache")
    pairs = paraphrase.load(paraphrase.PAIRS)
    facts: list[str | NewMemory] = [
        NewMemory(row["fact"], keys=keys) for row, keys in zip(pairs, paraphrase.fact_keys(pairs))
    ]
    result = SectionResult(paraphrase.KEYED_NAME)
    cache = keyed_memory_cache(ctx.cache, model, 0)
    details = paraphrase._run_sizes(ctx, result, model, facts, cache, (0,), paraphrase.KEYED)

    names = [row.name for row in result.rows]
    assert len(names) == 8 and all(", with model-written keys, " in name for name in names)
    assert "132 facts + 0 memories, with model-written keys, held-out: hit@5 injected" in names
    at_zero = details["0"]
    assert at_zero["memories"] == 132 and at_zero["facts_changed_by_consolidation"] == 0
    assert details["index_texts_embedded_while_writing"] == 0
    # the replay computes cosines from the stored vectors (keys.memory_vectors): it agrees
    assert at_zero["replay_agrees_with_engine"] == 1.0
    for split in paraphrase.SPLITS:
        assert at_zero["raw_ranking"][split]["hit@5"] >= 0.8
        assert at_zero["injected"][split]["hit@1"] <= at_zero["injected"][split]["hit@5"]
    stored = MemoryStore(
        "paraphrase-user", db_path=tmp_path / "paraphrase-keys", embedder=model
    ).get_all()
    assert {m.text: m.keys for m in stored} == {
        row["fact"]: keys for row, keys in zip(pairs, paraphrase.fact_keys(pairs))
    }


def test_the_pairs_facts_are_planted_apart_though_one_would_update_another(
    tmp_path: Path, model: LocalEmbedder
) -> None:
    """The pairs' facts stand for many users: two homes are both kept (for one user the engine
    makes the later an update of the earlier, as the eighth fresh set's first run found)."""
    homes = ["Lives in Anchorage, Alaska", "Lives in Reykjavík, Iceland"]
    alone = MemoryStore("one-user", db_path=tmp_path / "one", embedder=model)
    assert [done.outcome.value for done in alone.remember_many(homes)] == ["stored", "superseded"]

    ctx = Context(quick=True, workdir=tmp_path, cache=tmp_path / "cache")
    rows = [
        {"id": f"h-{i}", "split": "dev", "fact": fact, "question": question}
        for i, (fact, question) in enumerate(
            zip(homes, ["Do I need snow tyres?", "Can I see the northern lights from home?"])
        )
    ]
    unrelated = [{"id": "u-1", "split": "dev", "question": "What is 2 + 2?"}]
    result = SectionResult("paraphrase")
    details = paraphrase._run_sizes(
        ctx,
        result,
        model,
        homes,
        keyed_memory_cache(ctx.cache, model, 0),
        (0,),
        "",
        (rows, unrelated),
        "homes",
    )
    assert details["0"]["memories"] == 2
    assert {
        m.text
        for m in MemoryStore(
            "paraphrase-user", db_path=tmp_path / "homes", embedder=model
        ).get_all()
    } == set(homes)
