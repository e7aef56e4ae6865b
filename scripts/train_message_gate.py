"""Learn the message gate of the bundled all-MiniLM-L6-v2 (``embeddings/message_gate.py``).

    python scripts/train_message_gate.py          # writes the package's message_gate.npy
    python scripts/train_message_gate.py --check  # exit 1 unless the shipped one is what it learns

The gate is a logistic regression on a message's vector and its text's features
(``message_gate.text_features``): the log-odds that the message needs a memory. It is learned,
with numpy alone, from messages that need one (the questions of
``benchmarks/adapter_train/pairs_*.jsonl`` and ``turns.jsonl``, and of
``benchmarks/gate_train/pairs_*.jsonl`` and ``needs_*.jsonl``) and messages that need none
(their ``unrelated*.jsonl`` and ``needless_*.jsonl`` files), all written by model instances
that saw no benchmark file. Any of them within cosine :data:`NEAR` of a question or message of
a paraphrase benchmark set that existed when the shipped gate was learned
(:data:`LEARNED_APART`) is left out. Both classes weigh the same in all;
:data:`RIDGE` keeps the weights small. Its settings and ``message_gate.THRESHOLD`` were chosen
on the development sets of the paraphrase benchmark (docs/benchmarks.md, "A gate for messages
that need no memory" and "The gate reads the text too").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _shipped_file import write_or_check  # noqa: E402

from benchmarks.paraphrase import ADAPTER_NEAR, FRESH_SETS, PAIRS, UNRELATED, load  # noqa: E402
from headroom_memory_integrations import LocalEmbedder  # noqa: E402
from headroom_memory_integrations.embeddings.message_gate import (  # noqa: E402
    GATES,
    text_features,
)

DATA = (ROOT / "benchmarks" / "adapter_train", ROOT / "benchmarks" / "gate_train")
NEAR = ADAPTER_NEAR
LEARNED_APART = ("fresh", "fresh2", "fresh3", "fresh4", "fresh5", "fresh6", "fresh7", "fresh8")
"""The fresh sets whose neighbours were left out of the shipped gate's training (with the first
set); a later set was written after it, by instances that saw none of its training files."""
RIDGE = 1.0
NEWTON_STEPS = 30
TOLERANCE = 1e-3  # --check: largest difference from the shipped parameters (BLAS order)


def _messages(pattern: str) -> list[str]:
    """The messages of the training files matching ``pattern`` (``question`` or ``message``)."""
    rows = [
        json.loads(line)
        for folder in DATA
        for path in sorted(folder.glob(pattern))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line
    ]
    return [row.get("question") or row["message"] for row in rows]


def _features(model: LocalEmbedder, texts: list[str]) -> np.ndarray:
    """What the gate reads of each message: its vector, then its text's features."""
    return np.hstack(
        [model.embed(texts), np.array([text_features(text) for text in texts])]
    ).astype(np.float64)


def training_set(model: LocalEmbedder) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """What the gate reads of each message (its vector and its text's features), their labels
    (1: needs a memory) and counts."""
    benchmark = [
        row["question"]
        for pairs, unrelated in [
            (PAIRS, UNRELATED),
            *((FRESH_SETS[name][0], FRESH_SETS[name][1]) for name in LEARNED_APART),
        ]
        for path in (pairs, unrelated)
        for row in load(path)
    ]
    seen = model.embed(benchmark)
    texts = [
        _messages("pairs_*.jsonl") + _messages("turns.jsonl") + _messages("needs_*.jsonl"),
        _messages("unrelated*.jsonl") + _messages("needless_*.jsonl"),
    ]
    needing, needless = (_features(model, these) for these in texts)
    keep_needing = (needing[:, : seen.shape[1]] @ seen.T).max(axis=1) <= NEAR
    keep_needless = (needless[:, : seen.shape[1]] @ seen.T).max(axis=1) <= NEAR
    vectors = np.concatenate([needing[keep_needing], needless[keep_needless]])
    labels = np.concatenate([np.ones(keep_needing.sum()), np.zeros(keep_needless.sum())])
    counts = {
        "messages that need a memory": int(keep_needing.sum()),
        "left out (near a benchmark message)": int((~keep_needing).sum()),
        "messages that need none": int(keep_needless.sum()),
        "left out of those": int((~keep_needless).sum()),
    }
    return vectors, labels, counts


def learn(vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The weights (of the vector and the text's features) and bias, by Newton's method on the
    weighted log-loss plus :data:`RIDGE` x ``|weights|^2 / 2``."""
    rows = np.hstack([vectors, np.ones((len(vectors), 1))])
    weight = np.where(labels == 1, 1.0, labels.sum() / (len(labels) - labels.sum()))
    penalty = RIDGE * np.diag(np.r_[np.ones(vectors.shape[1]), 0.0])  # the bias is free
    parameters = np.zeros(rows.shape[1])
    for _ in range(NEWTON_STEPS):
        chance = 1 / (1 + np.exp(-rows @ parameters))
        gradient = rows.T @ (weight * (chance - labels)) + penalty @ parameters
        curvature = (rows * (weight * chance * (1 - chance))[:, None]).T @ rows + penalty
        parameters -= np.linalg.solve(curvature, gradient)
    return parameters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped gate")
    args = parser.parse_args()
    # learned on the model's float32 vectors; the default 8-bit form's messages use it too
    vectors, labels, counts = training_set(LocalEmbedder(backend="onnx"))
    print(", ".join(f"{name}: {count}" for name, count in counts.items()))
    parameters = learn(vectors, labels)
    target = GATES["all-MiniLM-L6-v2"]
    return write_or_check(target, parameters, np.float32, TOLERANCE, args.check)


if __name__ == "__main__":
    sys.exit(main())
