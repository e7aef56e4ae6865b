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

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
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
    rough stem so that word forms meet ("hike", "hikes", "hiked", "hiking" -> "hik")."""
    return Counter(stem(word) for word in _WORD.findall(text.lower()) if word not in STOPWORDS)


def stem(word: str) -> str:
    """A deliberately light stemmer: one common ending off, then a final "e"."""
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
    query: str, documents: Sequence[str], *, k1: float = 1.2, b: float = 0.75
) -> npt.NDArray[np.float64]:
    """The share of ``query``'s best possible BM25 score each document reaches, in [0, 1].

    Document frequencies and lengths are those of ``documents`` (a search's candidates).
    Plain Python over the few (document, term) pairs that match: numpy's per-call cost is
    larger than the work for a couple of hundred short texts.
    """
    wanted = set(terms(query))
    count = len(documents)
    if not wanted or not count:
        return np.zeros(count)
    parsed = [_document(d) for d in documents]
    average = max(sum(length for _, length in parsed) / count, 1.0)
    holders: dict[str, list[int]] = {term: [] for term in wanted}
    for index, (counted, _) in enumerate(parsed):
        for term in wanted.intersection(counted):
            holders[term].append(index)
    scores = [0.0] * count
    best = 0.0
    for term, holding in holders.items():
        idf = math.log(1 + (count - len(holding) + 0.5) / (len(holding) + 0.5))
        best += idf * (k1 + 1)
        for index in holding:
            counted, length = parsed[index]
            frequency = counted[term]
            saturation = frequency + k1 * (1 - b + b * length / average)
            scores[index] += idf * frequency * (k1 + 1) / saturation
    return np.asarray(scores) / best
