"""Text beyond English: a word keeps its combining marks (Hindi vowel signs, a virama, an accent
written as a character of its own), and the same text in two Unicode forms is one memory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import unicodedata

import pytest

from headroom_memory_integrations import InvalidInputError, MemoryStore, Outcome
from headroom_memory_integrations.concurrency import wording_id
from headroom_memory_integrations.consolidation import (
    Relation,
    relate,
    same_wording,
    same_wording_key,
)
from headroom_memory_integrations.engine import DEFAULT_DUPLICATE_THRESHOLD, clean_text
from headroom_memory_integrations.lexical import MARKS, lexical_scores, terms
from headroom_memory_integrations.prompts import parse_extraction_json

SON = "मेरा बेटा डॉक्टर है"  # "my son is a doctor"
DAUGHTER = "मेरी बेटी डॉक्टर है"  # "my daughter is a doctor": only the vowel signs differ
JOSE = "Married to Jos\u00e9"
JOSE_DECOMPOSED = unicodedata.normalize("NFD", JOSE)  # "e" and U+0301, as macOS types it


def test_marks_are_every_combining_mark() -> None:
    """lexical.MARKS is built from planes 0, 1 and 14 only: no mark is anywhere else."""
    marks = re.compile(MARKS)
    for code in range(sys.maxunicode + 1):
        is_mark = unicodedata.category(chr(code)).startswith("M")
        assert (marks.fullmatch(chr(code)) is not None) is is_mark, hex(code)


def test_vowel_signs_are_part_of_a_words_wording() -> None:
    assert same_wording_key(SON) != same_wording_key(DAUGHTER)
    assert wording_id("priya", SON) != wording_id("priya", DAUGHTER)
    assert (
        relate(SON, DAUGHTER, 0.99, duplicate_threshold=DEFAULT_DUPLICATE_THRESHOLD)
        is not Relation.DUPLICATE
    )
    assert same_wording_key(SON) == SON  # every sign kept, in its word
    assert terms("मेरी बेटी डॉक्टर है") == {"मेरी": 1, "बेटी": 1, "डॉक्टर": 1, "है": 1}
    scores = lexical_scores("बेटी", [SON, DAUGHTER])  # "daughter"
    assert scores[0] == 0 and scores[1] > 0


@pytest.mark.parametrize("duplicate_threshold", [DEFAULT_DUPLICATE_THRESHOLD, None])
def test_two_hindi_facts_that_differ_in_vowel_signs_are_both_stored(
    db_path, model, duplicate_threshold
) -> None:
    store = MemoryStore(
        "priya", db_path=db_path, embedder=model, duplicate_threshold=duplicate_threshold
    )
    assert store.remember(SON).outcome is Outcome.STORED
    assert store.remember(DAUGHTER).outcome is not Outcome.DUPLICATE
    assert sorted(m.text for m in store.get_all()) == sorted([SON, DAUGHTER])


@pytest.mark.parametrize(
    ("text", "stored_id"),
    [  # computed before words kept their marks: a stored memory's text is found by its id
        ("Likes Python", "b00eb438d9b414e5869475a75c9804f9"),
        ("Blood type is A+", "11eca484a926340be2fc449753babbc3"),
        ("Works at Nestl\u00e9 in Gen\u00e8ve", "2bd63952cecd0a5889fbe24f8062c67a"),
        ("Rent is $1,500 a month", "554dbb055dff3078d2458bce05b15c14"),
        ("Email is jane.smith@example.com", "22eee3315034ca2133ec1a05468998cf"),
        ("Живёт в Москве", "146bb28ea3728e0bcb930056b1373e32"),
        ("住在北京", "90bd4f22f8591f956baa6eb268749352"),
        ("Loves \U0001f355 and \u2615\ufe0f", "53dc46bdf51e71689b2c6f558659e13a"),
        ("Wi-Fi password is Tr0ub4dor!", "16a4f4420e3821e06c237eca8f8df5ba"),
    ],
)
def test_a_text_without_combining_marks_keeps_its_id(text: str, stored_id: str) -> None:
    assert wording_id("alice", text) == stored_id


@pytest.mark.parametrize("duplicate_threshold", [DEFAULT_DUPLICATE_THRESHOLD, None])
def test_a_text_stored_under_its_id_from_before_is_still_the_same_memory(
    db_path, model, duplicate_threshold
) -> None:
    """A Hindi memory stored before words kept their marks has another id than the same text
    gets now: said again, it is still found (by its text) and not stored twice."""
    store = MemoryStore(
        "priya", db_path=db_path, embedder=model, duplicate_threshold=duplicate_threshold
    )
    old = store.put("5f0c2b1e9d8a7c6b5a4f3e2d1c0b9a88", SON)  # an id of the old wording
    assert wording_id("priya", SON) != old.id
    again = store.remember(SON)
    assert again.outcome is Outcome.DUPLICATE and again.memory.id == old.id
    assert [m.id for m in store.get_all()] == [old.id]


@pytest.mark.parametrize("text", [JOSE, "Works at Nestl\u00e9 in Gen\u00e8ve", SON])
def test_a_text_in_another_unicode_form_is_the_same_memory(hash_store: MemoryStore, text) -> None:
    first = hash_store.add(text)
    again = hash_store.remember(unicodedata.normalize("NFD", text))
    assert again.outcome is Outcome.DUPLICATE and again.memory.id == first.id
    assert [m.text for m in hash_store.get_all()] == [unicodedata.normalize("NFC", text)]


def test_text_is_stored_composed_and_nothing_visible_changes() -> None:
    assert clean_text(JOSE_DECOMPOSED) == JOSE
    # compatibility forms are what the user wrote: NFKC would change them ("fi", "2", "H")
    assert (
        clean_text("Has an \ufb01ne \u00b2 \uff28 \u2460") == "Has an \ufb01ne \u00b2 \uff28 \u2460"
    )
    block = json.dumps({"memories": [{"text": JOSE_DECOMPOSED, "category": "fact"}]})
    assert [m.text for m in parse_extraction_json(block).memories] == [JOSE]


def test_a_memory_stored_decomposed_before_is_the_same_as_its_composed_form() -> None:
    """Texts stored before they were composed on the way in may be decomposed."""
    assert same_wording_key(JOSE_DECOMPOSED) == same_wording_key(JOSE)
    assert same_wording(JOSE_DECOMPOSED, JOSE)
    assert (
        relate(JOSE_DECOMPOSED, JOSE, 0.98, duplicate_threshold=DEFAULT_DUPLICATE_THRESHOLD)
        is Relation.DUPLICATE
    )


_ZALGO_CHECK = """
import time
from headroom_memory_integrations import consolidation, grounding, lexical
zalgo = "H" + "\\u0301\\u0302\\u0303\\u0304\\u0323\\u0324" * 10 + "e is my friend @ work."
for check in (
    lambda: consolidation.same_wording_key(zalgo),
    lambda: consolidation.tokens(zalgo),
    lambda: consolidation.relate("Has a friend at work", zalgo, 0.9, duplicate_threshold=0.95),
    lambda: grounding.grounded("Has a friend", zalgo),
    lambda: grounding.grounded(zalgo, "Has a friend"),
    lambda: lexical.terms(zalgo),
):
    check()
print("done")
"""


def test_a_letter_under_many_marks_is_read_at_once() -> None:
    """ "Zalgo" text (a letter under dozens of combining marks, a chat prank) made the word
    pattern backtrack: each run of marks could be parted in 2**n ways, and a pattern that then
    failed tried them all, holding the GIL (24 marks: 4 s; 30: over 30 s, in any user's message
    or memory). 60 marks here: a pattern that backtracks never ends; the child is given 60 s."""
    ran = subprocess.run(
        [sys.executable, "-c", _ZALGO_CHECK], capture_output=True, text=True, timeout=60
    )
    assert ran.stdout.strip() == "done", ran.stderr


@pytest.mark.parametrize("invisible", ["\u200b", " \u200b\u200d ", "\ufeff", "\u2060\n\u200c"])
def test_a_text_of_invisible_format_characters_alone_is_empty(
    hash_store: MemoryStore, invisible: str
) -> None:
    with pytest.raises(InvalidInputError, match="invisible"):
        hash_store.add(invisible)
    assert hash_store.count() == 0


ZWJ_FAMILY = "Family: \U0001f468\u200d\U0001f469\u200d\U0001f467"  # one emoji, joined by ZWJ
PERSIAN = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \u0686\u0627\u06cc"  # a ZWNJ inside


@pytest.mark.parametrize("text", [ZWJ_FAMILY, PERSIAN])
def test_format_characters_inside_real_text_are_kept(hash_store: MemoryStore, text: str) -> None:
    assert hash_store.add(text).text == text


def test_a_long_message_of_letters_nfc_writes_as_two_is_searched(db_path) -> None:
    """A long Hindi message typed with precomposed nukta letters (U+095B, "za"): NFC writes each
    as two characters, so its last 2,000 characters (query_tail) were more than 2,000 once
    composed, and the search refused them. The retriever found nothing and the LangGraph
    store listed every memory unranked, as for no query."""
    from conftest import HashEmbedder

    from headroom_memory_integrations.engine import MAX_TEXT_CHARS, query_tail
    from headroom_memory_integrations.langchain import HeadroomRetriever, HeadroomStore

    message = "\u095b\u0930\u093e " * 700 + "\u092a\u0928\u0940\u0930"  # "a little" ..., "paneer"
    assert len(clean_text(query_tail(message), "query")) <= MAX_TEXT_CHARS
    graph_store = HeadroomStore(db_path=db_path, embedder=HashEmbedder(), min_score=-1.0)
    graph_store.put(("alice",), "paneer", {"text": "Likes \u092a\u0928\u0940\u0930"})
    graph_store.put(("alice",), "tea", {"text": "Drinks green tea"})
    [first, *_] = graph_store.search(("alice",), query=message)
    assert first.key == "paneer" and first.score is not None
    retriever = HeadroomRetriever(memory=graph_store.stores("alice"), min_score=-1.0, k=1)
    assert [document.id for document in retriever.invoke(message)] == ["paneer"]


def test_a_long_run_of_combining_marks_is_cut_before_it_is_composed() -> None:
    """NFC sorts a run of combining marks in quadratic time, holding the GIL: composing a whole
    240 KB message of alternating marks froze the process for 24 s (the chat call's recall
    deadline cannot cut C code short). Only a bounded tail is composed, and a text too long
    however it composes is refused before it is."""
    from conftest import grows_linearly

    from headroom_memory_integrations.engine import MAX_TEXT_CHARS, query_tail

    def marks(pairs: int) -> str:
        return "a" + "\u0301\u0316" * pairs

    def seconds_for(pairs: int) -> float:
        started = time.thread_time()
        tail = query_tail(marks(pairs))
        with pytest.raises(InvalidInputError, match="maximum"):
            clean_text(marks(pairs))
        took = time.thread_time() - started
        assert len(tail) <= MAX_TEXT_CHARS
        return took

    assert grows_linearly(seconds_for, 40_000)


@pytest.mark.parametrize(
    "query",
    [
        "",
        " \n\t",
        "\x1b",
        "\u200b" * 10_000,  # longer than a search reads
        "\n\x00" * 3_000,
        "What should I cook?" + "\u200b" * 2_500,
        "\u0301",  # a lone mark is visible (as the search sees it)
        "Likes tea " * 500,
    ],
)
def test_search_text_is_the_querys_tail_or_none_when_nothing_is_visible(query: str) -> None:
    """One rule for every search of a query (the chat call's recall, the retriever, the
    LangGraph store, the search tool): its tail, or None when nothing visible is left; the
    tail has something visible exactly when the whole query has."""
    from headroom_memory_integrations.engine import has_visible_text, query_tail, search_text

    text = search_text(query)
    assert text == (query_tail(query) if has_visible_text(query) else None)
    assert text is None or has_visible_text(text)
