"""Emoji: the local model reads each as one unknown token, so texts that differ only by an emoji
had one vector. The embedder is given their names (``embeddings.symbols``), and consolidation
reads them as words."""

from __future__ import annotations

import numpy as np
import pytest

from headroom_memory_integrations import LocalEmbedder, MemoryStore, Outcome
from headroom_memory_integrations.embeddings.symbols import named_symbols

APPLE = "Favourite fruit emoji is \U0001f34e"
BANANA = "Favourite fruit emoji is \U0001f34c"


@pytest.mark.parametrize(
    ("text", "read"),
    [
        ("Likes \U0001f355", "Likes  slice of pizza "),
        ("\U0001f44d\U0001f3fd", " thumbs up sign medium skin tone "),
        ("\U0001f1eb\U0001f1f7", " flag FR "),
        ("\U0001f468\u200d\U0001f469\u200d\U0001f467", " man woman girl "),  # joined by ZWJ
        ("Signs off with \u2764\ufe0f", "Signs off with  heavy black heart "),
        ("Is 20\u00b0C \u2192 ok \u2122", "Is 20\u00b0C \u2192 ok \u2122"),  # the model knows these
        ("Plain text", "Plain text"),
    ],
)
def test_an_emoji_is_read_by_its_name(text: str, read: str) -> None:
    assert named_symbols(text) == read


def test_texts_that_differ_by_an_emoji_have_vectors_of_their_own(
    model: LocalEmbedder, db_path
) -> None:
    """The model alone gives the two texts one vector; a store embeds them apart, and a search
    finds each by its fruit, named or drawn."""
    same = model.embed([APPLE, BANANA])
    assert float(same[0] @ same[1]) > 0.9999  # why: one unknown token each

    store = MemoryStore("alice", db_path=db_path, embedder=model, duplicate_threshold=None)
    store.add_many([APPLE, BANANA])
    for query, ranked in (
        ("banana", [BANANA, APPLE]),
        ("apple", [APPLE, BANANA]),
        ("\U0001f34c", [BANANA, APPLE]),
        ("\U0001f34e", [APPLE, BANANA]),
    ):
        found = store.search(query, top_k=2, min_score=0.0)
        assert [r.memory.text for r in found] == ranked, query
        assert found[0].score > found[1].score, query


def test_an_emoji_replaced_supersedes_and_an_emoji_swapped_is_never_dropped(
    store: MemoryStore,
) -> None:
    store.add("Team mascot is \U0001f436")
    done = store.remember("Team mascot is \U0001f431")
    assert done.outcome is Outcome.SUPERSEDED
    assert [r.text for r in done.memory.history] == ["Team mascot is \U0001f436"]

    store.add("Likes \U0001f355 but hates \U0001f363")
    swapped = store.remember("Likes \U0001f363 but hates \U0001f355")
    assert swapped.outcome is not Outcome.DUPLICATE
    assert "Likes \U0001f363 but hates \U0001f355" in [m.text for m in store.get_all()]


def test_another_embedder_reads_the_emoji_as_written(db_path) -> None:
    """Naming emoji mends the bundled model's vocabulary; an embedder of its own (an OpenAI
    model, a user's) reads emoji, and gets the text as the user wrote it."""
    seen: list[str] = []

    class Recording:
        name = "recording"
        dimension = 3

        def embed(self, texts: list[str]) -> np.ndarray:
            seen.extend(texts)
            return np.tile(np.array([1.0, 0.0, 0.0], dtype=np.float32), (len(texts), 1))

    store = MemoryStore("bob", db_path=db_path, embedder=Recording())
    memory = store.add("Mood today: \U0001f600")
    assert memory.text == "Mood today: \U0001f600"
    assert seen == ["Mood today: \U0001f600"]
    store.search("\U0001f600 mood", min_score=0.0)
    assert seen[-1] == "\U0001f600 mood"
