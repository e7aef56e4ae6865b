"""The consolidation benchmark's data and its run with model-written keys
(``benchmarks/consolidation.py``): every text of the labelled pairs has its keys, and a pair
is judged with both memories stored with them."""

from __future__ import annotations

from pathlib import Path

from benchmarks import consolidation
from headroom_memory_integrations import ChromaStorage, LocalEmbedder, MemoryStore
from headroom_memory_integrations.keys import key_questions


def test_every_text_of_the_pairs_has_keys_with_its_questions() -> None:
    pairs = consolidation.load_pairs()
    keys = consolidation.load_keys()
    assert set(keys) == {text for pair in pairs for text in (pair["old"], pair["new"])}
    assert all(len(key_questions(k)) == 4 and len(k) > 4 for k in keys.values())


def test_a_pair_is_judged_with_both_memories_stored_with_their_keys(
    tmp_path: Path, model: LocalEmbedder
) -> None:
    wanted = {"family-dup-04", "family-upd-04", "health-dup-01"}
    pairs = [pair for pair in consolidation.load_pairs() if pair["id"] in wanted]
    keys = consolidation.load_keys()
    storage = ChromaStorage.at(tmp_path)
    judged = consolidation.judge_pairs(pairs, storage, model, keys)
    assert {j["id"]: j["predicted"] for j in judged} == {
        "family-dup-04": "duplicate",
        "family-upd-04": "update",
        "health-dup-01": "duplicate",
    }
    for number, pair in enumerate(pairs):
        (stored,) = MemoryStore(f"keyed-pair-{number}", storage=storage, embedder=model).get_all()
        assert stored.keys == keys[pair["new"] if pair["label"] == "update" else pair["old"]]


def test_a_held_out_set_is_judged_but_its_errors_are_never_listed(
    tmp_path: Path, model: LocalEmbedder
) -> None:
    """The held-out pairs are judged like the others, and no error of theirs reaches the
    report (which the benchmark prints and saves)."""
    held_out = sorted(consolidation.HELD_OUT)
    pairs = [
        pair
        for name in held_out
        for pair in consolidation.load_pairs(consolidation.BLIND_SETS[name], name)[:4]
    ]
    other = consolidation.load_pairs(consolidation.BLIND_SETS["blind3"], "blind3")[:4]
    judged = consolidation.judge_pairs(pairs + other, ChromaStorage.at(tmp_path), model)
    expected = [name for name in held_out for _ in range(4)] + ["blind3"] * 4
    assert [j["split"] for j in judged] == expected
    for j in judged:  # every pair wrong
        j["predicted"] = "update" if j["label"] == "duplicate" else "duplicate"
    listed = consolidation.listed_errors(judged)
    assert [e["id"] for e in listed] == [j["id"] for j in judged[len(pairs) :]]
