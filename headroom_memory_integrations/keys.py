"""Memory keys: a few topic words and questions, written with a memory and indexed with it.

A memory says what the user said ("Is allergic to shellfish"); a later question often names the
topic in other words ("Any seafood dishes I should avoid?"), or only a situation the memory
bears on ("Which tapas can I order tonight?"). The model that writes
a memory in the inline block (or the background extraction) may add keys: a few topic words,
one short question in the user's voice that the memory answers, and questions about situations
where it matters, e.g. ``"diet, food allergy, seafood, What can't I eat?, Is the paella safe
for me?"``. The engine embeds a memory with its keys (:func:`memory_vectors`) and scores the
query's wording against both, so they count without being shown to anyone: the injected context
and every listing show the text.

A memory's vector is the direction of its index text's vector ("text (key, key, ...)":
:func:`index_text`) plus the mean of its key questions' own vectors (the text weighs as much as
all its questions). Written into the index text only, questions dilute it (a sentence vector is
a mean over tokens); summed as vectors, they pull the memory toward questions like them. On a
set of questions written blind, half naming the memory's topic in other words and half a
situation it bears on, hit@5 at 10k memories rose from 0.31 to 0.62 (docs/benchmarks.md,
"Situation questions in the keys"). A memory without keys, or without questions among them,
is indexed exactly as before.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from .errors import InvalidInputError
from .lexical import QUESTION_MARKS

MAX_KEYS = 8
"""Most key phrases a memory keeps."""

MAX_KEY_CHARS = 120
"""Longest key phrase (a question fits)."""

__all__ = [
    "MAX_KEYS",
    "MAX_KEY_CHARS",
    "clean_keys",
    "index_text",
    "key_questions",
    "lenient_keys",
    "memory_vectors",
]


def _phrases(keys: object) -> list[str]:
    """The phrases of ``keys``: a comma-separated string or an iterable of strings."""
    if keys is None:
        return []
    if isinstance(keys, str):
        return keys.split(",")
    if isinstance(keys, Iterable) and not isinstance(keys, (bytes, bytearray, dict)):
        phrases = list(keys)
        if all(isinstance(phrase, str) for phrase in phrases):
            return phrases
    raise InvalidInputError(
        f"keys must be a comma-separated string or a list of strings, got {type(keys).__name__}"
    )


def _tidy(phrase: str) -> str:
    """One phrase on one line: control and format characters dropped, spaces collapsed."""
    kept = (
        " " if ch.isspace() else ch
        for ch in phrase
        if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Zl", "Zp")
    )
    return " ".join("".join(kept).split()).strip(" ,;")


def _distinct(phrases: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    kept = []
    for phrase in phrases:
        if phrase and phrase.casefold() not in seen:
            seen.add(phrase.casefold())
            kept.append(phrase)
    return kept


def clean_keys(keys: object) -> tuple[str, ...]:
    """The key phrases of ``keys`` (a comma-separated string or a list of strings), tidied
    (one line each, no repeats); ``()`` for ``None`` or nothing.

    Raises:
        InvalidInputError: ``keys`` is of another type, a phrase is longer than
            :data:`MAX_KEY_CHARS`, or there are more than :data:`MAX_KEYS`.
    """
    phrases = _distinct(_tidy(phrase) for phrase in _phrases(keys))
    for phrase in phrases:
        if len(phrase) > MAX_KEY_CHARS:
            raise InvalidInputError(
                f"key {phrase[:20]!r}... is {len(phrase)} characters; the maximum is "
                f"{MAX_KEY_CHARS}"
            )
    if len(phrases) > MAX_KEYS:
        raise InvalidInputError(f"{len(phrases)} keys; the maximum is {MAX_KEYS}")
    return tuple(phrases)


def lenient_keys(keys: object) -> tuple[str, ...]:
    """Keys as a model wrote them: like :func:`clean_keys`, but what is not valid is left out
    (a phrase too long, one past :data:`MAX_KEYS`, a value of another type) instead of
    refused, so that a memory is never lost over its keys."""
    try:
        phrases = _phrases(keys)
    except InvalidInputError:
        return ()
    kept = [p for p in (_tidy(phrase) for phrase in phrases) if len(p) <= MAX_KEY_CHARS]
    return tuple(_distinct(kept)[:MAX_KEYS])


def index_text(text: str, keys: tuple[str, ...]) -> str:
    """What is embedded and matched for a memory: its text, then its keys in parentheses."""
    return f"{text} ({', '.join(keys)})" if keys else text


def key_questions(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The keys that are questions (end with a question mark: "?", or the full-width, Arabic or
    Greek one the message gate reads too): each gets a vector of its own."""
    return tuple(phrase for phrase in keys if phrase.endswith(tuple(QUESTION_MARKS)))


def memory_vectors(
    embed: Callable[[Sequence[str]], npt.NDArray[np.float32]],
    memories: Sequence[tuple[str, tuple[str, ...]]],
) -> npt.NDArray[np.float32]:
    """The vectors ``(text, keys)`` memories are stored with: each one's index text's vector
    plus the mean of its key questions' vectors, to unit length (the text weighs as much as all
    its questions). A memory without key questions gets its index text's vector unchanged.
    ``embed`` is called once for the index texts and once for the questions, if any: short
    questions batched with long index texts would be padded to their length (a keyed memory
    alone: ~24 ms instead of ~52)."""
    vectors = np.asarray(embed([index_text(text, keys) for text, keys in memories]), np.float32)
    owners: list[int] = []
    questions: list[str] = []
    for position, (_, keys) in enumerate(memories):
        asked = key_questions(keys)
        questions.extend(asked)
        owners.extend([position] * len(asked))
    if not owners:
        return vectors
    counts = np.bincount(owners, minlength=len(memories)).astype(np.float32)
    vectors = vectors * np.maximum(counts, 1.0)[:, None]  # the text weighs as much as them all
    np.add.at(vectors, owners, np.asarray(embed(questions), dtype=np.float32))
    with_questions = np.unique(owners)
    vectors[with_questions] /= np.linalg.norm(vectors[with_questions], axis=1, keepdims=True)
    return vectors
