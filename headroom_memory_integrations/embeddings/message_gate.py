"""A learned test of whether a chat message could need anything the store knows about the user.

all-MiniLM-L6-v2 places small talk, general knowledge and coding questions ("thanks!", "how long
is a marathon in km?", "what's memoization?") about as near to a user's memories as the
questions that need them, so some pass any relevance floor that keeps the right memories: on
questions written blind for this, 5-20% of such messages got a memory at 10k memories. Yet the
messages themselves are easy to tell apart: a linear score on the message's own vector separates
"how old is my daughter?", "Is skiing a good idea for me this winter?" and "which editor?" from
"Tell me a joke." and "Fix this bug: TypeError ..." (area under the curve 0.97-0.995 on every
blind set).

The gate is that score, ``vector . w + b`` (logistic regression on the model's vectors), learned
from about 4,400 messages that need a memory and 1,200 that need none, written for this by
model instances that saw no benchmark file, and kept apart from every benchmark question
(``scripts/train_message_gate.py``; ``benchmarks/adapter_train/`` and
``benchmarks/gate_train/``). A message scoring below :data:`THRESHOLD` gets no memories when it
is injected as a chat message (``MemoryStore.search(..., chat_message=True)``, which the
wrappers use); an explicit search (a retriever, a tool, the CLI) is never gated. Only the model
it was learned for has one (:data:`GATES`). It costs one dot product per message.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Vectors
from .shipped import PerModel

GATES = {
    "all-MiniLM-L6-v2": Path(__file__).resolve().parent
    / "models"
    / "all-MiniLM-L6-v2"
    / "message_gate.npy",
}
"""The model name -> the file of its gate (float32: the ``dimension`` weights, then the bias)."""

THRESHOLD = -2.0
"""A message whose score (log-odds that it needs a memory) is below this gets none: one the gate
is fairly sure of (a chance below 12%). Chosen on the development sets of the paraphrase
benchmark at 10k memories (docs/benchmarks.md, "A gate for messages that need no memory"):
false injection 10.8% -> 6.3% on their mean, hit@5 0.782 -> 0.776. A terse follow-up whose
subject is in an earlier turn ("Which language for it?") can be turned away: the gate reads
the latest message alone."""

MAX_CHARS = 300
"""Longer messages are never turned away: every message the gate learned from was shorter
(nearly all under 260 characters), and a long one is often a question with text appended (a
pasted document, a framework's output schema) that the gate was not taught to read."""


class MessageGate:
    """``vector . weights + bias``: the log-odds that a message needs a memory."""

    def __init__(self, parameters: np.ndarray) -> None:
        if parameters.ndim != 1 or len(parameters) < 2:
            raise ValueError(
                f"a message gate is weights and a bias in one row, not {parameters.shape}"
            )
        self.weights = np.ascontiguousarray(parameters[:-1], dtype=np.float32)
        self.bias = float(parameters[-1])

    @property
    def dimension(self) -> int:
        return len(self.weights)

    def score(self, vectors: Vectors) -> np.ndarray:
        """The score of each message vector (rows); a single vector gives a 0-d array."""
        rows = np.asarray(vectors, dtype=np.float32)
        # einsum's own loop, not BLAS, as in storage/vectors.py: no BLAS threads on the search
        return np.einsum("...j,j->...", rows, self.weights) + self.bias

    def needs_memory(self, vector: Vectors) -> bool:
        """Whether the message with this vector could need a memory (its score reaches
        :data:`THRESHOLD`)."""
        return bool(self.score(vector) >= THRESHOLD)


_gates = PerModel(GATES, MessageGate)


def message_gate(model: str) -> MessageGate | None:
    """The gate for messages embedded by ``model`` (an embedder's ``name``), or None where none
    was learned for it. Loaded once."""
    return _gates(model)


def could_need_memory(model: str, vector: Vectors, length: int) -> bool:
    """Whether a chat message of ``length`` characters with this ``vector`` (of ``model``) could
    need a memory: the gate's verdict where one applies (:func:`message_gate`, a message of at
    most :data:`MAX_CHARS`), else True."""
    gate = message_gate(model)
    if gate is None or np.shape(vector)[-1] != gate.dimension or length > MAX_CHARS:
        return True
    return gate.needs_memory(vector)
