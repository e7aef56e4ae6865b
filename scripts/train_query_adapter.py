"""Learn the query adapter of the bundled all-MiniLM-L6-v2 (``embeddings/query_adapter.py``).

    python scripts/train_query_adapter.py          # writes the package's query_adapter.npy
    python scripts/train_query_adapter.py --check  # exit 1 unless the shipped one is what it learns

The adapter moves a query's vector ``q`` to ``unit(q + q D)``. ``D`` is learned here, with numpy
alone, from the files of ``benchmarks/adapter_train/`` (written for it by model instances that
saw no benchmark file; docs/benchmarks.md, "A query adapter"):

- ``pairs_*.jsonl``: a user's question and the memory that answers it ("Is it okay to take the
  amoxicillin ...?" / "Is allergic to penicillin"), with no content word in common; each memory
  also with its keys (``keys_*.jsonl``, written by another instance that saw only the memories);
- ``unrelated.jsonl``: messages that need no memory (small talk, general knowledge, code, ...);
- ``turns.jsonl``: questions about people in past conversations, with the conversation line
  ("[date] Name: ...") and an observation drawn from it.

Any question or memory within cosine :data:`NEAR` of a question or fact of the paraphrase
benchmark (every set) is left out, so that no benchmark item is learned.

Each question scores every memory of its kind and a "nothing" option whose score is learned (a
softmax with temperature :data:`TEMPERATURE`): a question's memory must beat the others and
"nothing"; an unrelated message's "nothing" must beat every memory. ``D`` starts at zero and is
kept small (:data:`SHRINK` times its squared norm), so a query moves only as far as the data
asks. Settings were chosen on the dev half of the paraphrase set and a LoCoMo check.
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

from benchmarks.corpus import with_question  # noqa: E402
from benchmarks.paraphrase import (  # noqa: E402
    ADAPTER_LEARNED_APART,
    ADAPTER_NEAR,
    FRESH_SETS,
    PAIRS,
    UNRELATED,
    load,
)
from headroom_memory_integrations import LocalEmbedder  # noqa: E402
from headroom_memory_integrations.embeddings.query_adapter import ADAPTERS  # noqa: E402
from headroom_memory_integrations.keys import clean_keys, index_text  # noqa: E402

DATA = ROOT / "benchmarks" / "adapter_train"
NEAR = ADAPTER_NEAR
KEPT_APART = ADAPTER_LEARNED_APART  # a later fresh set is judged on its items apart from these
TEMPERATURE = 0.05
SHRINK = 0.05
STEPS = 300
LEARNING_RATE = 1e-3
NOTHING_SCORE = 0.35  # where the learned score of "nothing" starts
WEIGHTS = {"pairs": 1.0, "unrelated": 1.5, "turns": 2.0}
TOLERANCE = 2e-3  # --check: largest difference from the shipped D (float16, BLAS order)

Task = tuple[np.ndarray, np.ndarray, list[np.ndarray], float]  # queries, answers, banks, weight


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def training_tasks(model: LocalEmbedder) -> tuple[list[Task], dict[str, int]]:
    """The three tasks (queries, the index of each one's memory or -1 for none, the memory
    vectors in one or more forms, weight), and counts of what was kept and left out."""
    kept_apart = [FRESH_SETS[name] for name in KEPT_APART]
    pair_files = [PAIRS, *(pairs for pairs, _, _ in kept_apart)]
    unrelated_files = [UNRELATED, *(unrelated for _, unrelated, _ in kept_apart)]
    benchmark_pairs = [row for path in pair_files for row in load(path)]
    benchmark_questions = [r["question"] for r in benchmark_pairs]
    benchmark_questions += [r["question"] for path in unrelated_files for r in load(path)]
    questions_seen = model.embed(benchmark_questions)
    facts_seen = model.embed([r["fact"] for r in benchmark_pairs])

    def near(vector: np.ndarray) -> bool:
        return bool(max((questions_seen @ vector).max(), (facts_seen @ vector).max()) > NEAR)

    facts: list[str] = []
    keyed: list[str] = []
    position: dict[str, int] = {}
    questions: list[str] = []
    answers: list[int] = []
    left_out = 0
    for pairs_file in sorted(DATA.glob("pairs_*.jsonl")):
        rows = _rows(pairs_file)
        keys_file = pairs_file.with_name(pairs_file.name.replace("pairs", "keys"))
        keys = {r["id"]: r for r in _rows(keys_file)}
        fact_vectors = dict(zip([r["fact"] for r in rows], model.embed([r["fact"] for r in rows])))
        for row, question in zip(rows, model.embed([r["question"] for r in rows])):
            fact_id = row["id"].rsplit("-", 1)[0]
            if near(fact_vectors[row["fact"]]) or near(question):
                left_out += 1
                continue
            if fact_id not in position:
                position[fact_id] = len(facts)
                facts.append(row["fact"])
                its = keys[fact_id]
                its_keys = with_question(clean_keys(its["keys"]), its["asks"])
                keyed.append(index_text(row["fact"], its_keys))
            questions.append(row["question"])
            answers.append(position[fact_id])
    unrelated = [r["question"] for r in _rows(DATA / "unrelated.jsonl")]
    unrelated_vectors = model.embed(unrelated)
    kept = [bool((questions_seen @ v).max() <= NEAR) for v in unrelated_vectors]
    banks = [model.embed(facts), model.embed(keyed)]

    turn_rows = _rows(DATA / "turns.jsonl")
    lines: dict[str, int] = {}
    turns: list[str] = []
    observations: list[str] = []
    turn_answers: list[int] = []
    for row in turn_rows:
        line_id = row["id"].rsplit("-", 1)[0]
        if line_id not in lines:
            lines[line_id] = len(turns)
            turns.append(row["turn"])
            observations.append(row["observation"])
        turn_answers.append(lines[line_id])
    tasks: list[Task] = [
        (model.embed(questions), np.array(answers), banks, WEIGHTS["pairs"]),
        (unrelated_vectors[kept], np.full(sum(kept), -1), banks, WEIGHTS["unrelated"]),
        (
            model.embed([r["question"] for r in turn_rows]),
            np.array(turn_answers),
            [model.embed(turns), model.embed(observations)],
            WEIGHTS["turns"],
        ),
    ]
    counts = {
        "memories": len(facts),
        "questions": len(questions),
        "questions left out (near a benchmark item)": left_out,
        "unrelated": sum(kept),
        "unrelated left out": len(kept) - sum(kept),
        "conversation questions": len(turn_rows),
    }
    return tasks, counts


def _choice_gradients(
    queries: np.ndarray, memories: np.ndarray, answers: np.ndarray, nothing: float
) -> tuple[float, np.ndarray, float]:
    """Cross-entropy of choosing each query's answer (-1: "nothing") among ``memories`` and
    "nothing"; its gradient with respect to the unit ``queries`` and to ``nothing``."""
    scores = np.concatenate([np.full((len(queries), 1), nothing), queries @ memories.T], axis=1)
    logits = scores / TEMPERATURE
    logits -= logits.max(axis=1, keepdims=True)
    chances = np.exp(logits)
    chances /= chances.sum(axis=1, keepdims=True)
    chosen = answers + 1  # column 0 is "nothing"
    rows = np.arange(len(queries))
    loss = float(-np.log(chances[rows, chosen] + 1e-12).mean())
    chances[rows, chosen] -= 1
    chances /= len(queries) * TEMPERATURE
    return loss, chances[:, 1:] @ memories, float(chances[:, 0].sum())


def learn(tasks: list[Task], log: bool = False) -> np.ndarray:
    """``D``, by Adam on the tasks' weighted losses plus :data:`SHRINK` x ``|D|^2``."""
    dimension = tasks[0][0].shape[1]
    delta = np.zeros((dimension, dimension))
    nothing = NOTHING_SCORE
    first, second = np.zeros_like(delta), np.zeros_like(delta)
    first_n = second_n = 0.0
    total = sum(weight * len(queries) for queries, _, _, weight in tasks)
    for step in range(1, STEPS + 1):
        gradient, gradient_n, loss = 2 * SHRINK * delta, 0.0, 0.0
        for queries, answers, banks, weight in tasks:
            moved = queries + queries @ delta
            length = np.linalg.norm(moved, axis=1, keepdims=True)
            unit = moved / length
            share = weight * len(queries) / total * len(tasks)
            d_unit = np.zeros_like(unit)
            for memories in banks:
                part, d_part, d_nothing = _choice_gradients(unit, memories, answers, nothing)
                loss += share * part
                d_unit += share * d_part
                gradient_n += share * d_nothing
            d_moved = (d_unit - (d_unit * unit).sum(axis=1, keepdims=True) * unit) / length
            gradient += queries.T @ d_moved
        first = 0.9 * first + 0.1 * gradient
        second = 0.999 * second + 0.001 * gradient * gradient
        delta -= (
            LEARNING_RATE * (first / (1 - 0.9**step)) / (np.sqrt(second / (1 - 0.999**step)) + 1e-8)
        )
        first_n = 0.9 * first_n + 0.1 * gradient_n
        second_n = 0.999 * second_n + 0.001 * gradient_n * gradient_n
        nothing -= (
            LEARNING_RATE
            * (first_n / (1 - 0.9**step))
            / (np.sqrt(second_n / (1 - 0.999**step)) + 1e-8)
        )
        if log and step % 50 == 0:
            print(f"step {step}: loss {loss:.4f}, |D| {np.linalg.norm(delta):.2f}", flush=True)
    return delta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped adapter")
    args = parser.parse_args()
    # learned on the model's float32 vectors; the default 8-bit form's queries use it too
    tasks, counts = training_tasks(LocalEmbedder(backend="onnx"))
    print(", ".join(f"{name}: {count}" for name, count in counts.items()))
    delta = learn(tasks, log=True)
    return write_or_check(ADAPTERS["all-MiniLM-L6-v2"], delta, np.float16, TOLERANCE, args.check)


if __name__ == "__main__":
    sys.exit(main())
