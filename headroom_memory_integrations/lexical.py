"""Lexical relevance: how much of a query's wording a memory shares, by BM25.

Dense embeddings miss exact names, numbers and rare words ("Caroline", "PostgreSQL", "2023");
BM25 catches them. The engine scores the nearest candidates of a search lexically and adds the
result to their similarity (see :data:`engine.LEXICAL_WEIGHT`). Term statistics come
from the candidates themselves, so no index has to be kept in step with the store, and what
another process wrote is scored like the rest.

The lexical score of a memory is the share of the query's largest possible BM25 score that it
reaches: 0 when it shares no query term, near 1 when it repeats every one. It does not depend on
the other memories' scores, so it can be compared across searches and held to a floor.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt


def _mark_ranges(codes: Iterable[int]) -> str:
    """The combining marks (Unicode categories Mn, Mc, Me) among ``codes``, as the ranges of a
    regex character class."""
    ranges: list[tuple[int, int]] = []
    for code in codes:
        if unicodedata.category(chr(code))[0] != "M":
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges)


MARKS = (
    f"(?:[{_mark_ranges(range(0x10000))}]"
    f"|(?=[\U00010000-\U0010ffff])"
    f"[{_mark_ranges(itertools.chain(range(0x10000, 0x20000), range(0xE0000, 0xE1000)))}])"
)
"""A combining mark: a vowel sign, a virama, an accent written as a character of its own
("बेटी" is ब, े, ट, ी; "José" may be written "Jose" and U+0301). Those of the first plane in one
class, which a regex looks up at once, and the others (planes 1 and 14: none are elsewhere, as
``tests/test_unicode_text.py`` checks) in a second one, tried for a character past the first
plane only: in one class, their ranges were compared one by one with every character that
ends a word, and reading the words of a text took up to four times as long. Built once, at
import (about 15 ms here)."""
WORD = rf"[^\W_]+(?:{MARKS}[^\W_]*)*"
"""A word, as every module here reads one: letters and digits, with the combining marks that
belong to them. ``[^\\W_]+`` alone cuts a word at each mark and loses the marks, so that Hindi
"मेरा बेटा" (my son) and "मेरी बेटी" (my daughter) read as the same words. A word written
without marks matches exactly as it did."""
LETTERS = rf"[^\W\d_]+(?:{MARKS}[^\W\d_]*)*"
"""A word of letters only (and their marks)."""
QUESTION_MARKS = "?\uff1f\u061f\u037e"
"""The question marks a text may end a question with: ASCII, full-width (Chinese, Japanese),
Arabic, Greek (what the message gate reads as a question, and what marks a key phrase as one)."""
_WORD = re.compile(WORD)
UNSPACED = re.compile(  # scripts written without spaces between words (a group: split)
    "([\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3005\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"  # Japanese kana, "々"
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+)"  # Han
)
"""A run of a script written without spaces between its words (Chinese, Japanese, Thai, ...)."""


def split_unspaced(token: str, words: re.Pattern[str]) -> list[str]:
    """The words of ``token``: a run of a script written without spaces (:data:`UNSPACED`) is
    not one word but its character pairs ("对花生过敏" is "对花", "花生", "生过", "过敏"; a run
    of one character is that character), so that a text sharing part of a sentence shares its
    words; the rest of the token is read with ``words``. A token without such a run is itself.
    Grounding and BM25 read words so."""
    if not UNSPACED.search(token):
        return [token]
    found: list[str] = []
    for index, part in enumerate(UNSPACED.split(token)):
        if index % 2:
            found += [part[i : i + 2] for i in range(len(part) - 1)] or [part]
        else:
            found += words.findall(part)
    return found


_SUFFIXES = ("ing", "ed", "es", "s")  # tried in this order

STOPWORDS = frozenset(
    """a an the and or but if of to in on at for with by from as is are was were be been being
    it its this that these those i you he she we they me him her us them my your his our their
    what when where which who whom why how do does did done have has had not no yes so too very
    can could would should will just about into over after before than then there here also up
    down out off again more most some any such only own same s t don now am im let get got
    """.split()
)


def terms(text: str) -> Counter[str]:
    """The counted terms of ``text``: lower-cased words without stop words, each cut to a
    rough stem so that word forms meet ("hike", "hikes", "hiked", "hiking" -> "hik"). In a
    script written without spaces the words are character pairs (:func:`split_unspaced`):
    "我住在北京" is not one term, never met, but "我住", "住在", "在北", "北京"."""
    words = _WORD.findall(text.lower())
    if not text.isascii() and UNSPACED.search(text):  # one look for the common case
        words = [part for word in words for part in split_unspaced(word, _WORD)]
    return Counter(stem(word) for word in words if word not in STOPWORDS)


@lru_cache(maxsize=65_536)
def stem(word: str) -> str:
    """A deliberately light stemmer: one common ending off, then a final "e". Cached: a
    search reads the terms of up to a couple of hundred memories it has not read before, and
    their words are mostly words already met."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[: -len(suffix)]
            break
    return word[:-1] if len(word) > 3 and word.endswith("e") else word


@lru_cache(maxsize=50_000)
def _document(text: str) -> tuple[Counter[str], int]:
    """A document's counted terms and its length in terms: memories are scored again and
    again, so they are cached (a query is not: a chat message is seldom asked twice, and
    caching each filled 50,000 entries that were never read)."""
    counted = terms(text)
    return counted, sum(counted.values())


def lexical_scores(
    query: str,
    documents: Sequence[str],
    *,
    statistics_of: int | None = None,
    k1: float = 1.2,
    b: float = 0.75,
) -> npt.NDArray[np.float64]:
    """The share of ``query``'s best possible BM25 score each document reaches, in [0, 1].

    Document frequencies and the average length are those of the first ``statistics_of``
    documents (all of them by default): a search's nearest candidates, however many more it
    scores, so that a memory's score does not depend on how many results were asked for.
    Plain Python over the few (document, term) pairs that match: numpy's per-call cost is
    larger than the work for a couple of hundred short texts.
    """
    wanted = set(terms(query))
    count = len(documents)
    if not wanted or not count:
        return np.zeros(count)
    parsed = [_document(d) for d in documents]
    sample = count if statistics_of is None else max(min(statistics_of, count), 1)
    average = max(sum(length for _, length in parsed[:sample]) / sample, 1.0)
    holders: dict[str, list[int]] = {term: [] for term in wanted}
    for index, (counted, _) in enumerate(parsed):
        for term, holding in holders.items():
            if term in counted:
                holding.append(index)
    scores = [0.0] * count
    best = 0.0
    for term, holding in holders.items():
        frequency_in_sample = sum(1 for index in holding if index < sample)
        idf = math.log(1 + (sample - frequency_in_sample + 0.5) / (frequency_in_sample + 0.5))
        best += idf * (k1 + 1)
        for index in holding:
            counted, length = parsed[index]
            frequency = counted[term]
            saturation = frequency + k1 * (1 - b + b * length / average)
            scores[index] += idf * frequency * (k1 + 1) / saturation
    return np.asarray(scores) / best
