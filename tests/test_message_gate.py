"""The message gate of the default model (embeddings/message_gate.py): what it is learned from,
where it applies, and what it changes in what a wrapper injects."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import check_shipped_file

from headroom_memory_integrations import MemoryStore
from headroom_memory_integrations.embeddings.message_gate import (
    GATES,
    MAX_CHARS,
    THRESHOLD,
    MessageGate,
    message_gate,
    need_for_memory,
    reads_as_question,
    text_features,
)
from headroom_memory_integrations.prompts import CONTEXT_OPEN

ROOT = GATES["all-MiniLM-L6-v2"].parents[4]

# written for this test (none is in a training file or a benchmark)
MEMORIES = [
    "Debugs flaky Rust tests on the payments team",
    "Bakes sourdough every Sunday morning",
    "Sings baritone in a community choir",
    "Keeps a saltwater aquarium with two clownfish",
]
# each draws one memory past the relevance floor, and needs nothing about the user
NEEDLESS = {
    "How do I fix 'borrowed value does not live long enough' in Rust?": MEMORIES[0],
    "Why does bread dough need to rest?": MEMORIES[1],
    "What is the salinity of seawater?": MEMORIES[3],
    "Tell me a fun fact about clownfish.": MEMORIES[3],
}
NEEDING = {
    "when's my choir rehearsal?": MEMORIES[2],
    "Should I bring a loaf to the potluck on Sunday?": MEMORIES[1],
}
SHORT = "which language?"  # the short question that must find "Prefers Python for ..."
# one subject asked in general and about the writer: the vector alone reads them as alike
GENERAL_AND_PERSONAL = [
    ("How many hours of sleep do adults need?", "How many hours of sleep do I need?"),
    ("how often should a saltwater tank be cleaned", "when did I last clean my tank?"),
]


def test_the_shipped_gate_is_what_the_script_learns_from_the_committed_data() -> None:
    check_shipped_file("train_message_gate.py", "left out (near a benchmark message)")


def test_only_the_model_it_was_learned_for_is_gated() -> None:
    gate = message_gate("all-MiniLM-L6-v2")
    assert gate is not None and gate.dimension == 384
    assert message_gate("text-embedding-3-small") is None
    assert need_for_memory("text-embedding-3-small", np.zeros(1536, dtype=np.float32), "hi") is None
    assert need_for_memory("all-MiniLM-L6-v2", np.zeros(1536, dtype=np.float32), "hi") is None
    with pytest.raises(ValueError, match="and a bias in one row"):
        MessageGate(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="and a bias in one row"):
        MessageGate(np.zeros(4))  # no room for the text's weights


def test_the_gate_scores_a_row_alone_as_in_a_batch(model) -> None:
    gate = message_gate(model.name)
    assert gate is not None
    texts = [*NEEDLESS, *NEEDING, SHORT]
    vectors = model.embed(texts)
    scores = gate.score(vectors, texts)
    assert scores.shape == (len(vectors),)
    assert float(gate.score(vectors[0], texts[0])) == pytest.approx(float(scores[0]), abs=1e-5)
    assert (scores[: len(NEEDLESS)] < THRESHOLD).all(), scores
    assert (scores[len(NEEDLESS) :] >= THRESHOLD).all(), scores
    # a message longer than any it learned from has no score: it is let through, whatever it says
    at_most = need_for_memory(model.name, vectors[0], texts[0].ljust(MAX_CHARS))
    assert at_most is not None and at_most < THRESHOLD
    assert need_for_memory(model.name, vectors[0], texts[0].ljust(MAX_CHARS + 1)) is None


def test_the_gate_reads_whether_the_writer_asks_about_themself(model) -> None:
    assert text_features("How do I fix my bike?").tolist() == pytest.approx([1.0, np.log1p(6), 1.0])
    assert text_features("tell me a joke").tolist()[0] == 1.0  # "me"
    assert text_features("Summarise this: Imagine it").tolist()[::2] == [0.0, 0.0]  # no "i"
    gate = message_gate(model.name)
    assert gate is not None
    for general, personal in GENERAL_AND_PERSONAL:
        vectors = model.embed([general, personal])
        assert (
            float(gate.score(vectors[0], general))
            < THRESHOLD
            <= float(gate.score(vectors[1], personal))
        ), (general, personal)


@pytest.mark.parametrize(
    ("message", "asks"),
    [
        ("good idea?", True),
        ("which one for me", True),
        ("Is that OK", True),
        ("  any tips for the flight  ", True),
        ("what's 2 to the 10th", True),
        ("wish me luck", False),
        ("so happy for her", False),
        ("shorter please", False),
        ("whatever works", False),  # "what" only as a word of its own
        ("how exciting!", False),  # exclamations, remarks with no subject
        ("what a great idea", False),
        ("could be worse", False),
        ("can't wait", False),
        ("will do", False),
        ("could it be worse?", True),
        ("should I go", True),
        ("wait, is it safe?!", True),
        ("Any restrictions? Thanks!", True),  # a question, then thanks
        ("which one? help!", True),
        ("vegan options? thanks!", True),
        ("here: youtube.com/watch?v=dQw4w9", False),  # a link's "?" ends no sentence
        ('she literally said "why?" lol', False),
        ("", False),
    ],
)
def test_a_message_reads_as_a_question_by_its_mark_or_its_first_word(message, asks) -> None:
    assert reads_as_question(message) is asks


def test_a_chat_message_that_needs_nothing_gets_nothing_a_search_still_finds(
    db_path, model
) -> None:
    store = MemoryStore("alice", db_path=db_path, embedder=model)
    store.add_many(MEMORIES)
    for message, drawn in NEEDLESS.items():
        assert drawn in [m.text for m, _ in store.search(message)]  # the floor lets it through
        gated = store.search(message, chat_message=True)
        assert gated == [] and gated.min_score is None
        # no floor at all: no gate either
        assert store.search(message, chat_message=True, min_score=-1)
    for message, needed in NEEDING.items():
        found = [m.text for m, _ in store.search(message, chat_message=True)]
        assert found and found[0] == needed
    for general, _ in GENERAL_AND_PERSONAL:
        assert store.search(general, chat_message=True) == []
    gated = len(NEEDLESS) + len(GENERAL_AND_PERSONAL)
    assert store.stats()["events"]["gated_messages"] == gated


@pytest.mark.openai_client
def test_a_wrapper_injects_nothing_for_a_message_that_needs_nothing(
    client, openai_server, model_says
) -> None:
    client.memory.add_many(MEMORIES)
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Why does bread dough need to rest?"}]
    )
    assert CONTEXT_OPEN not in openai_server.requests[-1].body["messages"][0]["content"]
    client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Should I bring a loaf to the potluck on Sunday?"}],
    )
    sent = openai_server.requests[-1].body["messages"][0]["content"]
    assert CONTEXT_OPEN in sent and MEMORIES[1] in sent
