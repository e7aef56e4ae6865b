"""A learned test of whether a chat message could need anything the store knows about the user.

all-MiniLM-L6-v2 places small talk, general knowledge and coding questions ("thanks!", "how long
is a marathon in km?", "what's memoization?") about as near to a user's memories as the
questions that need them, so some pass any relevance floor that keeps the right memories: on
questions written blind for this, 5-20% of such messages got a memory at 10k memories. Yet the
messages themselves are easy to tell apart: a linear score on the message's own vector separates
"how old is my daughter?", "Is skiing a good idea for me this winter?" and "which editor?" from
"Tell me a joke." and "Fix this bug: TypeError ..." (area under the curve 0.97-0.995 on every
blind set).

The gate is that score: a logistic regression on the model's vector and three things read off
the text (:func:`text_features`: whether the writer speaks of themself, how many words, whether
it asks), learned from about 5,000 messages that need a memory and 1,900 that need none,
written for this by model instances that saw no benchmark file, and kept apart from every
benchmark question
(``scripts/train_message_gate.py``; ``benchmarks/adapter_train/`` and
``benchmarks/gate_train/``). A message scoring below :data:`THRESHOLD` gets no memories when it
is injected as a chat message (``MemoryStore.search(..., chat_message=True)``, which the
wrappers use); an explicit search (a retriever, a tool, the CLI) is never gated. Only the model
it was learned for has one (:data:`GATES`), and it reads English only (:func:`reads_as_english`):
a message in another language is never turned away. It costs a dot product and a few regular
expressions per message.
"""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path

import numpy as np

from ..lexical import QUESTION_MARKS
from .base import Vectors
from .shipped import PerModel

GATES = {
    "all-MiniLM-L6-v2": Path(__file__).resolve().parent
    / "models"
    / "all-MiniLM-L6-v2"
    / "message_gate.npy",
}
"""The model name -> the file of its gate (float32: the ``dimension`` weights of the vector, the
weights of :func:`text_features`, then the bias)."""

THRESHOLD = -1.5
"""A message whose score (log-odds that it needs a memory) is below this gets none: one the gate
is fairly sure of (a chance below 18%). Chosen on the development sets of the paraphrase
benchmark at 10k memories (docs/benchmarks.md, "The gate reads the text too"): false injection
12.8% -> 4.9% on their mean, hit@5 0.778 -> 0.765, with "which language?" still let through. A
terse follow-up whose subject is in an earlier turn ("Which language for it?") can be turned
away when it is searched alone (the engine searches a short question with the previous message
when it scores at least 0 here, or when that brings a memory nearer: ``MemoryStore.search``'s
``previous_message``). The curve of other
thresholds is in the paraphrase benchmark's details; weighing the score against the nearest
memory's similarity instead was tried and not adopted (docs/benchmarks.md, "One decision for a
chat message")."""

MAX_CHARS = 300
"""Longer messages are never turned away: every message the gate learned from was shorter
(nearly all under 260 characters), and a long one is often a question with text appended (a
pasted document, a framework's output schema) that the gate was not taught to read."""

_SPEAKS_OF_SELF = re.compile(
    r"\b(?:i|i'm|im|i've|ive|i'd|i'll|my|me|mine|myself|we|our|us)\b", re.IGNORECASE
)


def text_features(text: str) -> np.ndarray:
    """What the gate reads off a message besides its vector: whether the writer speaks of
    themself (I, my, me, we, our...; 1 or 0), the logarithm of 1 + its number of words, and
    whether it has a question mark (also a full-width, Arabic or Greek one). The vector alone
    reads "how much sleep do adults need?" as near "how much sleep do I get?" as any two
    questions on one subject. The pronouns and the word count are English ones (a Chinese
    sentence is one word): the gate only scores English (:func:`reads_as_english`)."""
    return np.array(
        [
            float(_SPEAKS_OF_SELF.search(text) is not None),
            math.log1p(len(text.split())),
            float(any(mark in text for mark in QUESTION_MARKS)),
        ],
        dtype=np.float32,
    )


TEXT_FEATURES = len(text_features(""))

_AUXILIARIES = r"should|shall|can|could|is|are|am|do|does|did|will|would|was|were|has|have"
_ASKS = re.compile(
    rf"^(?:what|which|how|any|where|when|who|whom|whose|why|{_AUXILIARIES})\b", re.IGNORECASE
)
_QUESTION_MARK = re.compile(  # ending a sentence, not in a link's "?v="; any full-width one
    r"\?+!*(?=\s|$)|[\uff1f\u061f\u037e]"
)
_GREEK_QUESTION = re.compile(r"[\u0370-\u03ff\u1f00-\u1fff][^;]*;$")  # Greek's "?" is ";"
_EXCLAIMS = re.compile(r"^what\s+an?\b", re.IGNORECASE)  # "what a great idea"
_SUBJECTLESS = re.compile(  # an auxiliary with no subject after it: "could be worse"
    rf"^(?:{_AUXILIARIES})(?:n?['’]t)?\s+(?:be|been|have|do|not|never|go|get|wait|happen|work"
    r"|help|fun|really|definitely|always|probably|totally|so|also|just|still)\b",
    re.IGNORECASE,
)


def reads_as_question(text: str) -> bool:
    """Whether a chat message reads as a question: a "?" ends one of its sentences (or it has a
    full-width or Arabic one, "？" or "؟", or a Greek sentence ends with its ";"), or it begins
    with an English question word or auxiliary verb, as people type questions without one
    ("which one for me", "is that ok"). "wish me luck" and "so happy for her" do not. On the
    follow-up sets (``benchmarks/followups*.jsonl``), 96-100% of the follow-ups read as
    questions, and 8-36% of the asides (mostly unrelated quick questions, which the gate turns
    away). Only a short message that reads as a question is searched with the previous one
    (``MemoryStore.search``'s ``previous_message``).

    Without a "?", an exclamation is no question ("how exciting!", "what a great idea"), nor
    is an auxiliary with no subject after it ("could be worse", "can't wait", "will do")."""
    stripped = text.strip()
    if _QUESTION_MARK.search(stripped) or _GREEK_QUESTION.search(stripped):
        return True  # "?", "?!", "vegan options? thanks!", "对我呢？", "και για μένα;"
    if stripped.endswith("!") or _EXCLAIMS.match(stripped) or _SUBJECTLESS.match(stripped):
        return False
    return _ASKS.match(stripped) is not None


ENGLISH_WORDS = frozenset(
    """a about after all am an and any are as at be because been but by can could did do does
    for from had has have he her here him his how i if in into is it its just me mine my no not
    of on or our please she should so than thank thanks that the their them there these they
    this those to us was we were what when where which who why will with would you your""".split()
)
"""Common English words, most of them words of grammar: evidence that a message is English."""

OTHER_LANGUAGES_WORDS = frozenset(
    # French
    """au avec ce ces cette dans des du elle et il ils je les leur mais mes nous ou
    pourquoi quand que quel quelle qui quoi ses soir sont tes toi tu une vous votre """
    # German
    """auch bitte das dein deine dem der ein eine einen heute ich ihr ist kann meine meinem
    meiner mich mir nicht noch oder sein sich sie sind soll und von warum welche wie wir wo zu
    """
    # Spanish and Portuguese
    """como debo ela ele esta este esto hoy meu minha mis para pero por porque puedo
    qual quando una uma """
    # Italian
    """cosa della devo dovrei gli mio oggi quale questa questo sono stasera """
    # Dutch
    """dat een het ik jij mijn moet niet vandaag vanavond voor waar wanneer waarom welke""".split()
)
"""Common words of French, German, Spanish, Portuguese, Italian and Dutch that are no English
words, nor a name, an abbreviation or slang in English messages (not "die", "was", "come",
"son", "hat", "non", "los", "EU", "yo" or "sus"; nor "mon", "est", "con", "del", "mia" or
"che": "C'mon", "Mon at 9 EST", "pros and cons", "Del", "Mia", "Che"): evidence that a
message in the Latin alphabet is not English. A word with an accent is evidence already
("où", "qué", "não", "perché"), unless it is capitalised ("Zoë", "Renée": a name)."""

_WORD = re.compile(r"[^\W\d_]+")  # a run of letters: "qu'est-ce" is "qu", "est", "ce"


def reads_as_english(text: str) -> bool:
    """Whether the gate can read ``text``: whether it is English, or at least not evidently in
    another language. The gate learned from English messages only, and reads English off the
    text (its pronouns, its words parted by spaces, its "?"): a question in French, Russian or
    Chinese scores far below :data:`THRESHOLD`, and is therefore not scored at all.

    A message is read as English unless the words that are evidently of another language
    outnumber the common English ones (:data:`ENGLISH_WORDS`): a word with a letter outside
    ASCII ("régime", "что", a run of Chinese characters, which spaces do not part), but not a
    capitalised one in the Latin alphabet ("Zoë", "Touché": a name or a loanword, as likely in
    English), or a common word of French, German, Spanish, Portuguese, Italian or Dutch
    (:data:`OTHER_LANGUAGES_WORDS`). With no common English word in a message in the Latin
    alphabet, one such word is not enough ("Bon appétit", "déjà vu"): it takes two. "thanks!"
    and "Tell me a joke." are English; "Qu'est-ce que je devrais cuisiner ce soir ?" is not,
    nor "Wat moet ik koken?"; "Is a café au lait ok for my diet?" still is (2 words of another
    language, 4 English ones)."""
    english = other = 0
    latin = True
    for word in _WORD.findall(text):
        lowered = word.lower()
        if lowered in ENGLISH_WORDS:
            english += 1
        elif lowered in OTHER_LANGUAGES_WORDS:
            other += 1
        elif not word.isascii():
            in_latin = _in_latin_alphabet(word)
            latin = latin and in_latin
            other += not (in_latin and word[0].isupper())
    if english == 0 and latin:
        return other < 2
    return other <= english


def _in_latin_alphabet(word: str) -> bool:
    return all(ch.isascii() or unicodedata.name(ch, "").startswith("LATIN ") for ch in word)


class MessageGate:
    """``vector . weights + text_features(text) . text_weights + bias``: the log-odds that a
    message needs a memory."""

    def __init__(self, parameters: np.ndarray) -> None:
        if parameters.ndim != 1 or len(parameters) < TEXT_FEATURES + 2:
            raise ValueError(
                "a message gate is the vector's weights, the text's weights and a bias in one "
                f"row, not {parameters.shape}"
            )
        dimension = len(parameters) - TEXT_FEATURES - 1
        self.weights = np.ascontiguousarray(parameters[:dimension], dtype=np.float32)
        self.text_weights = np.asarray(parameters[dimension:-1], dtype=np.float32)
        self.bias = float(parameters[-1])

    @property
    def dimension(self) -> int:
        return len(self.weights)

    def score(self, vectors: Vectors, texts: str | list[str]) -> np.ndarray:
        """The score of each message (``vectors``' rows, ``texts`` in the same order); a single
        vector and text give a 0-d array."""
        rows = np.asarray(vectors, dtype=np.float32)
        read = (
            text_features(texts)
            if isinstance(texts, str)
            else np.array([text_features(text) for text in texts]).reshape(-1, TEXT_FEATURES)
        )
        # einsum's own loop, not BLAS, as in storage/vectors.py: no BLAS threads on the search
        return (
            np.einsum("...j,j->...", rows, self.weights)
            + np.einsum("...j,j->...", read, self.text_weights)
            + self.bias
        )


_gates = PerModel(GATES, MessageGate)


def message_gate(model: str) -> MessageGate | None:
    """The gate for messages embedded by ``model`` (an embedder's ``name``), or None where none
    was learned for it. Loaded once."""
    return _gates(model)


def need_for_memory(model: str, vector: Vectors, text: str) -> float | None:
    """The gate's score of the chat message ``text``, whose ``vector`` (of ``model``) this is:
    the log-odds that it needs a memory (under :data:`THRESHOLD`: it gets none), or None where
    no gate applies (another model, a message longer than :data:`MAX_CHARS`, or one not in
    English: :func:`reads_as_english`)."""
    gate = message_gate(model)
    if gate is None or np.shape(vector)[-1] != gate.dimension or len(text) > MAX_CHARS:
        return None
    if not reads_as_english(text):
        return None
    return float(gate.score(vector, text))
