"""The relevance floor: it rises with the number of memories a user has, short real questions
find what they mean in a small store, and unrelated questions find nothing."""

from __future__ import annotations

import pytest

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.cli import main
from headroom_memory_integrations.engine import (
    DEFAULT_MIN_SCORE,
    FLOOR_RISE,
    relevance_floor,
)


def test_the_floor_rises_with_the_number_of_memories_and_then_stays() -> None:
    sizes = (0, 1, 2, 10, 100, 1_000, 10_000, 100_000)
    floors = [relevance_floor(DEFAULT_MIN_SCORE, n) for n in sizes]
    assert floors[0] == floors[1] == DEFAULT_MIN_SCORE
    assert floors == sorted(floors) and len(set(floors)) == len(floors) - 1
    assert floors[-1] == round(DEFAULT_MIN_SCORE + FLOOR_RISE[-1][1], 3)
    assert relevance_floor(DEFAULT_MIN_SCORE, 10**7) == floors[-1]
    assert relevance_floor(0.3, 100) == round(0.3 + 0.16, 3)  # min_score moves the whole curve
    assert relevance_floor(-1.0, 10_000) == relevance_floor(-5.0, 1) == -1.0  # off


def test_the_readme_cli_example_finds_the_memory_for_a_short_question(
    db_path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("HEADROOM_MEMORY_DB", str(db_path))
    added = ["add", "--user", "alice", "Prefers Python for backend work", "--category"]
    assert main([*added, "preference"]) == 0
    capsys.readouterr()
    assert main(["search", "--user", "alice", "which language?"]) == 0
    out = capsys.readouterr().out
    assert "Prefers Python for backend work" in out and "(no memories)" not in out


def test_the_readme_api_example_answers_unrelated_questions_with_nothing(store) -> None:
    store.add("Prefers Python for backend work", category="preference")
    store.add_many(
        ["Works at a fintech startup", {"text": "Migrating auth to OAuth", "category": "context"}]
    )
    (found, score), *weaker = store.search("What language should I use?", top_k=5)
    assert found.text == "Prefers Python for backend work" and score > 0.2
    assert weaker == []  # the other two stay under the floor of a user with 3 memories
    assert store.search("What is 2+2?") == []
    assert store.search("Tell me a joke.") == []


@pytest.mark.parametrize("count", [3, 250])
def test_a_search_applies_the_floor_of_the_users_size(hash_store: MemoryStore, count) -> None:
    hash_store.add_many([f"note number {i} about topic {i * 7919 % 1000}" for i in range(count)])
    found = hash_store.search("note number 1", top_k=3, min_score=0.0)
    assert found.min_score == relevance_floor(0.0, count)  # the floor the search applied
    assert all(score >= 0.0 for _, score in found)
    assert hash_store.search("note number 1", min_score=-1.0).min_score == -1.0


def test_more_memories_raise_the_bar_for_a_weak_match(store) -> None:
    store.add("Prefers Python for backend work", category="preference")
    assert store.search("which language?")  # 0.077 clears the floor of one memory (0.06)
    store.add("Has a rescue greyhound called Pretzel")
    assert store.search("which language?") == []  # but not that of two (0.079)
    assert store.search("Which programming language do I prefer for backend work?")


def test_a_question_after_a_long_pasted_text_is_what_the_search_reads(store) -> None:
    """The model reads 256 tokens: a search keeps the end of a long message (its question),
    not its start (the document pasted before it)."""
    store.add_many(
        [
            "Is allergic to shellfish",
            "Lives in Lisbon with their partner",
            "Plays tennis on Saturday mornings",
            "Is training for a half marathon in April",
            "Prefers window seats on flights",
        ]
    )
    pasted = (
        "Hi all, here is the plan for next week's team offsite. We meet at the office at 8:30 "
        "on Tuesday and take the coach to the venue, about ninety minutes away. The morning "
        "sessions cover the quarterly roadmap, the hiring plan and the new on-call rota. After "
        "lunch we split into three working groups and each presents its proposals at 16:00. "
    ) * 4
    question = "I'm booking the dinner for this: is there anything on a seafood menu I must avoid?"
    found = store.search(f"{pasted}\n\n{question}", chat_message=True)
    assert "Is allergic to shellfish" in [r.memory.text for r in found]
