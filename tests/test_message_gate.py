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
    reads_as_english,
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
        ("对我来说呢？", True),  # full-width, Arabic and Greek question marks
        ("好吗？谢谢", True),
        ("وماذا عني؟", True),
        ("και για μένα;", True),
        ("see you; bye", False),  # an English ";" is no question mark
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


# the same question in other languages: the gate scored every one far below the threshold
# (French -2.8, Russian -2.6, Chinese -4.2, Arabic -4.9, Korean -4.0; English +5.2)
ASKED_ELSEWHERE = {
    "fr": "Qu'est-ce que je devrais cuisiner ce soir avec mon régime ?",
    "de": "Was soll ich heute Abend mit meiner Diät kochen?",
    "es": "¿Qué debo cocinar esta noche con mi dieta?",
    "pt": "O que devo cozinhar hoje à noite com a minha dieta?",
    "it": "Cosa dovrei cucinare stasera con la mia dieta?",
    "nl": "Wat moet ik vanavond koken met mijn dieet?",
    "ru": "Что мне приготовить на ужин с учётом моей диеты?",
    "zh": "考虑到我的饮食，今晚我应该做什么菜？",
    "ja": "私の食事制限を考えると、今夜は何を作ればいいですか？",
    "ko": "내 식단을 고려하면 오늘 저녁에 뭘 요리해야 할까?",
    "ar": "ماذا يجب أن أطبخ الليلة بالنظر إلى نظامي الغذائي؟",
    "hi": "मुझे अपने आहार के अनुसार आज रात क्या बनाना चाहिए?",
    "el": "Τι να μαγειρέψω απόψε με τη διατροφή μου;",
}
ENGLISH = [
    *NEEDLESS,
    *NEEDING,
    SHORT,
    "thanks!",
    "Tell me a joke.",
    "Fix this bug: TypeError: undefined is not a function",
    "what's memoization?",
    "lol ok",
    "👍",
    "Is a café au lait ok for my diet?",  # two words of French, four of English
    "Explain the von Neumann architecture",
    'what does "je ne sais quoi" mean?',
    # a name or a loanword with an accent, and English words that are also French, Spanish or
    # Italian ones: these read as another language, so the gate no longer turned them away
    "Good morning, Zoë!",
    "Good night, Renée",
    "C'mon, really?",
    "Meeting Mon at 9 EST",
    "Touché",
    "Déjà vu, haha",
    "Bon appétit",
]


@pytest.mark.parametrize("message", ENGLISH)
def test_english_reads_as_english(message) -> None:
    assert reads_as_english(message)


@pytest.mark.parametrize("language", ASKED_ELSEWHERE)
def test_other_languages_do_not_read_as_english(language) -> None:
    assert not reads_as_english(ASKED_ELSEWHERE[language])


@pytest.mark.parametrize("message", ["Привет!", "Что?", "Γεια σου", "Merci, à vous aussi"])
def test_short_messages_in_another_language_do_not_read_as_english(message) -> None:
    """A capitalised word outside the Latin alphabet is no name taken into English, and two
    words of another language are enough when none is English."""
    assert not reads_as_english(message)


def test_the_gate_scores_english_only(model) -> None:
    """The gate learned from English and reads English off the text (its pronouns, its words
    parted by spaces, its "?"): it turned away the same question in nearly any other language."""
    assert text_features("今晚吃什么？")[2] == 1.0  # a full-width question mark asks too
    texts = [*ASKED_ELSEWHERE.values(), *ENGLISH]
    for text, vector in zip(texts, model.embed(texts)):
        need = need_for_memory(model.name, vector, text)
        assert (need is None) is (text in ASKED_ELSEWHERE.values()), text


def test_a_chat_message_in_another_language_gets_its_memories(db_path, model) -> None:
    store = MemoryStore("lea", db_path=db_path, embedder=model)
    store.add_many(
        [
            "Is vegetarian and allergic to peanuts",
            "Est végétarienne et allergique aux arachides",
            "是素食者，对花生过敏",
        ]
    )
    for language in ("fr", "zh", "ru", "ar"):
        assert store.search(ASKED_ELSEWHERE[language], chat_message=True), language
    assert store.search("What should I cook for dinner tonight given my diet?", chat_message=True)
    assert store.search("Tell me a joke.", chat_message=True) == []  # English is still gated
    assert store.stats()["events"]["gated_messages"] == 1
