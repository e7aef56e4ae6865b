"""A memory stored without keys (the CLI, the API) takes the keys of a model's later
restatement, which is otherwise a duplicate: reworded questions then find it."""

from __future__ import annotations

from headroom_memory_integrations import MemoryStore, Outcome


def test_a_restatement_with_keys_gives_them_to_the_memory_without(store: MemoryStore) -> None:
    first = store.remember("Is allergic to shellfish")
    assert first.outcome is Outcome.STORED and first.memory.keys == ()
    question = "What can't I eat at a fish restaurant?"
    for filler in ("Works as a nurse in Leeds", "Plays the cello", "Has a dog called Biscuit"):
        store.add(filler)
    keys = ("diet", "food allergy", "seafood", question)
    before = store.search(question, min_score=-1)[0]
    assert before.memory.id == first.memory.id

    again = store.remember("is allergic to shellfish.", keys=keys)

    assert again.outcome is Outcome.DUPLICATE and again.memory.id == first.memory.id
    assert again.memory.keys == keys and again.memory.text == "Is allergic to shellfish"
    assert again.memory.history == () and again.memory.updated_at == first.memory.updated_at
    assert store.get(first.memory.id).keys == keys
    assert store.count() == 4
    after = store.search(question)[0]
    assert after.memory.id == first.memory.id
    assert after.score > before.score + 0.15  # now indexed with the question it answers


def test_a_memory_with_keys_keeps_them_against_a_restatement(store: MemoryStore) -> None:
    own = ("diet", "food allergy", "What can't I eat?")
    first = store.remember("Is allergic to shellfish", keys=own).memory
    again = store.remember("Is allergic to shellfish", keys=("seafood", "Any fish I avoid?"))
    assert again.outcome is Outcome.DUPLICATE and again.memory.keys == own
    assert store.get(first.id).keys == own
    bare = store.remember("Is allergic to shellfish")
    assert bare.outcome is Outcome.DUPLICATE and store.get(first.id).keys == own
