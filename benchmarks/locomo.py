"""Retrieval quality on LoCoMo (Maharana et al., ACL 2024; CC BY-NC 4.0).

The data is read at run time from ``../shared/data/locomo-dev.json`` (relative to the repository
root) and never copied into the repository. Each conversation becomes one user, indexed twice:

- *turns*: every dialogue turn as one memory (:func:`turn_memory_text`), metadata keeping its
  ``dia_id`` and the session date;
- *observations*: the dataset's per-session observation facts as memories
  (:func:`observation_memory_text`), metadata keeping the ``dia_id`` s they rest on.

Both are written with ``MemoryStore.add_many`` and the real local model. Each question is then
searched with ``search(question, top_k=20, min_score=-1.0)`` (no relevance floor, so recall is
not hidden by it). A question's recall@k is the fraction of its evidence ``dia_id`` s found in
the top k (for observations, an evidence id is found when a retrieved observation rests on
it); MRR uses the rank of the first result that hits any evidence id (0 if none in the top 20).
Categories 1-4 make "overall"; category 5 (adversarial) is reported apart.

Injected recall: what a wrapper puts in the prompt is ``search(question, top_k=5,
chat_message=True)``: the default relevance floor, and the message gate
(``embeddings/message_gate.py``), which replayed rules apply too. Its recall is the fraction of
the question's evidence ids that the injected memories carry (0 when nothing is injected).
Other floor rules (the old fixed cosine 0.25, ...) are replayed on the 20 best results of the
no-floor search, with each result's cosine similarity computed from the vectors the store was
written with (see ``paraphrase.replay``); the replay of the default rule is checked against
the engine.

Compression: tokens of the whole conversation (every turn as "speaker: text") against tokens of
what the wrapper would inject for the question: ``format_memory_context`` of
``search(question, top_k=5, chat_message=True)``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headroom_memory_integrations import ChromaStorage, LocalEmbedder, Memory, MemoryStore
from headroom_memory_integrations.embeddings.query_adapter import adapt_queries
from headroom_memory_integrations.engine import centred_query
from headroom_memory_integrations.prompts import format_memory_context, short_ids
from headroom_memory_integrations.transforms import RollingWindowTransform

from .common import ROOT, Context, Row, SectionResult, SectionSkipped, log, value_at_least
from .paraphrase import WITHOUT_GATE, Candidate, floor_rules, replay
from .population import add_batch

NAME = "locomo"
DATA = Path(
    os.environ.get("HEADROOM_LOCOMO_DATA") or ROOT.parent / "shared" / "data" / "locomo-dev.json"
)
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
OVERALL = (1, 2, 3, 4)
KS = (1, 5, 10, 20)
TARGETS = {"turns": value_at_least(0.65), "observations": value_at_least(0.70)}
_DIA_ID = re.compile(r"D:?(\d+):(\d+)")
_DATE = re.compile(r"(\d{1,2}) (\w+),? (\d{4})")


# -- what a user of the library would store ----------------------------------------------------


def session_date(raw: str) -> str:
    """``"4:05 pm on 3 June, 2023"`` -> ``"3 June 2023"`` (the raw text if it does not parse)."""
    found = _DATE.search(raw)
    return " ".join(found.groups()) if found else raw.strip()


def turn_memory_text(speaker: str, text: str, date: str) -> str:
    """The memory stored for one dialogue turn: ``"[3 June 2023] Sam: We adopted a puppy"``."""
    return f"[{date}] {speaker}: {text}"


def observation_memory_text(text: str, date: str) -> str:
    """The memory stored for one observation: ``"[3 June 2023] Sam adopted a puppy."``."""
    return f"[{date}] {text}"


# -- reading the data --------------------------------------------------------------------------


def dia_ids(raw: object) -> list[str]:
    """Evidence ids, normalised to ``"D<session>:<turn>"``. A few in the data are malformed
    (two ids in one string, a stray ":" after "D", a zero-padded turn number, a bare "D"): they
    are split, repaired where unambiguous, and dropped otherwise."""
    values = raw if isinstance(raw, list) else [raw]
    found = []
    for value in values:
        for major, minor in _DIA_ID.findall(str(value)):
            found.append(f"D{int(major)}:{int(minor)}")
    return list(dict.fromkeys(found))


def sessions(sample: dict[str, Any]) -> Iterator[tuple[int, str, list[dict[str, Any]]]]:
    """(session number, date, turns) in order."""
    conversation = sample["conversation"]
    numbers = sorted(
        int(key.split("_")[1])
        for key, value in conversation.items()
        if re.fullmatch(r"session_\d+", key) and isinstance(value, list)
    )
    for number in numbers:
        date = session_date(conversation.get(f"session_{number}_date_time", ""))
        yield number, date, conversation[f"session_{number}"]


def turn_items(sample: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "text": turn_memory_text(turn["speaker"], turn["text"], date),
            "metadata": {"dia_id": turn["dia_id"], "session": number, "session_date": date},
        }
        for number, date, turns in sessions(sample)
        for turn in turns
    ]


def observation_items(sample: dict[str, Any]) -> list[dict[str, Any]]:
    dates = {number: date for number, date, _ in sessions(sample)}
    items = []
    for key, by_speaker in sample.get("observation", {}).items():
        number = int(key.split("_")[1])
        for facts in by_speaker.values():
            for text, evidence in facts:
                ids = dia_ids(evidence)
                items.append(
                    {
                        "text": observation_memory_text(text, dates.get(number, "")),
                        "metadata": {"dia_ids": ",".join(ids), "session": number},
                    }
                )
    return items


def history_text(sample: dict[str, Any]) -> str:
    """The whole conversation as it would sit in a prompt without memory."""
    return "\n".join(
        f"{turn['speaker']}: {turn['text']}" for _, _, turns in sessions(sample) for turn in turns
    )


# -- scoring -----------------------------------------------------------------------------------


@dataclass
class Scores:
    """Recall@k and reciprocal rank of one question."""

    category: int
    recall: dict[int, float]
    reciprocal_rank: float
    ceiling: float  # the recall reachable at all: evidence ids that some stored memory carries


def score(evidence: set[str], ranked: Sequence[set[str]]) -> tuple[dict[int, float], float]:
    """Recall@k for :data:`KS` and the reciprocal rank of the first hit, given the evidence
    ids of each result in rank order."""
    recall = {}
    for k in KS:
        hit = set().union(*ranked[:k]) & evidence if ranked else set()
        recall[k] = len(hit) / len(evidence)
    first = next((rank for rank, ids in enumerate(ranked, 1) if ids & evidence), None)
    return recall, 1.0 / first if first else 0.0


def summarize(scores: Sequence[Scores], categories: Sequence[int]) -> dict[str, Any]:
    chosen = [s for s in scores if s.category in categories]
    if not chosen:
        return {"questions": 0}
    summary: dict[str, Any] = {"questions": len(chosen)}
    for k in KS:
        summary[f"recall@{k}"] = round(sum(s.recall[k] for s in chosen) / len(chosen), 4)
    summary["mrr"] = round(sum(s.reciprocal_rank for s in chosen) / len(chosen), 4)
    summary["recall_ceiling"] = round(sum(s.ceiling for s in chosen) / len(chosen), 4)
    return summary


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Index:
    kind: str
    ids_of: Callable[[Memory], set[str]]
    items: Callable[[dict[str, Any]], list[dict[str, Any]]]


INDEXES = (
    Index("turns", lambda m: {str(m.metadata.get("dia_id"))}, turn_items),
    Index(
        "observations",
        lambda m: set(filter(None, str(m.metadata.get("dia_ids", "")).split(","))),
        observation_items,
    ),
)


class RecordingEmbedder:
    """The local model, keeping every vector it computed (by text), so that the cosine
    similarity of any query and memory can be read back."""

    def __init__(self, real: LocalEmbedder) -> None:
        self.real = real
        self.name = real.name
        self.dimension = real.dimension
        self.vectors: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.asarray(self.real.embed(list(texts)), dtype=np.float32)
        self.vectors.update(zip(texts, vectors))
        return vectors

    def vector(self, text: str) -> np.ndarray:
        if text not in self.vectors:
            self.embed([text])
        return self.vectors[text]


def build(
    storage: ChromaStorage, user: str, items: list[dict[str, Any]], embedder: RecordingEmbedder
) -> tuple[MemoryStore, int]:
    """The user's store holding ``items``, and how many batches ``add_many`` refused."""
    store = MemoryStore(user, storage=storage, embedder=embedder)
    errors = sum(add_batch(store, items[i : i + 200]) for i in range(0, len(items), 200))
    return store, errors


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    if not DATA.is_file():
        raise SectionSkipped(
            f"LoCoMo data not found at {DATA}: it is read from ../shared/data/ next to the "
            "repository; elsewhere, set HEADROOM_LOCOMO_DATA to the file"
        )
    samples = json.loads(DATA.read_text(encoding="utf-8"))[: ctx.pick(None, 2)]
    counter = RollingWindowTransform(1)
    storage = ChromaStorage.at(ctx.scratch("locomo"))
    scores: dict[str, list[Scores]] = defaultdict(list)
    skipped: Counter[int] = Counter()
    details: dict[str, Any] = {"data": str(DATA), "token_counter": counter.counter_name}
    compression: dict[str, list[tuple[int, int]]] = defaultdict(list)  # (history, injected)
    per_conversation = []
    embedder = RecordingEmbedder(LocalEmbedder())
    rules = floor_rules()
    injected_recall: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    agreement: dict[str, list[bool]] = defaultdict(list)
    for sample in samples:
        sample_id = sample["sample_id"]
        known_ids = {t["dia_id"] for _, _, turns in sessions(sample) for t in turns}
        history_tokens = counter.token_counter(history_text(sample))
        questions = []
        for qa in sample["qa"]:
            evidence = set(dia_ids(qa.get("evidence", [])))
            if evidence:
                questions.append((qa["category"], qa["question"], evidence))
            else:
                skipped[qa["category"]] += 1
        conversation: dict[str, Any] = {"sample_id": sample_id, "questions": len(questions)}
        conversation["evidence_ids_not_in_turns"] = sum(len(e - known_ids) for _, _, e in questions)
        for index in INDEXES:
            items = index.items(sample)
            store, errors = build(storage, f"locomo-{index.kind}-{sample_id}", items, embedder)
            conversation[f"{index.kind}_add_many_errors"] = errors
            conversation[f"{index.kind}_offered"] = len(items)
            conversation[f"{index.kind}_stored"] = store.count()
            reachable = set().union(*(index.ids_of(m) for m in store.get_all()))
            memories = store.count()
            centroid = store._open().centroid()  # private: to replay the engine's similarity
            for category, question, evidence in questions:
                found = store.search(question, top_k=20, min_score=-1.0)
                recall, rr = score(evidence, [index.ids_of(m) for m, _ in found])
                ceiling = len(evidence & reachable) / len(evidence)
                scores[index.kind].append(Scores(category, recall, rr, ceiling))
                injected = store.search(question, top_k=5, chat_message=True)
                if category in OVERALL:
                    query = adapt_queries(embedder.name, embedder.vector(question))  # as a search
                    centred = centred_query(query, centroid)
                    candidates = [
                        Candidate(
                            m.id,
                            s,
                            float(centred.similarity_of(embedder.vector(m.text))),
                        )
                        for m, s in found
                    ]
                    ids_of = {m.id: index.ids_of(m) for m, _ in found}
                    actual = [m.id for m, _ in injected]
                    asked = store._query(question).could_need_memory  # private: the gate's verdict
                    for name, rule in rules.items():
                        kept = replay(candidates, rule, memories) if asked else []
                        if name.endswith("(default)"):
                            agreement[index.kind].append(kept == actual)
                            ungated = replay(candidates, rule, memories)
                            carried = set().union(*(ids_of[i] for i in ungated), set())
                            injected_recall[index.kind][WITHOUT_GATE].append(
                                len(carried & evidence) / len(evidence)
                            )
                            injected_recall[index.kind]["turned away by the gate"].append(
                                float(not asked)
                            )
                        carried = set().union(*(ids_of[i] for i in kept)) if kept else set()
                        injected_recall[index.kind][name].append(
                            len(carried & evidence) / len(evidence)
                        )
                    carried = set().union(*(index.ids_of(m) for m, _ in injected), set())
                    injected_recall[index.kind]["engine"].append(
                        len(carried & evidence) / len(evidence)
                    )
                    injected_recall[index.kind]["nothing injected"].append(float(not injected))
                context = format_memory_context(
                    list(zip(short_ids(len(injected)), [m for m, _ in injected]))
                )
                compression[index.kind].append(
                    (history_tokens, counter.token_counter(context) if context else 0)
                )
        log(
            f"locomo: {sample_id}: {len(questions)} questions; "
            f"{conversation['turns_stored']}/{conversation['turns_offered']} turns and "
            f"{conversation['observations_stored']}/{conversation['observations_offered']} "
            "observations stored"
        )
        per_conversation.append(conversation)

    for index in INDEXES:
        kind_scores = scores[index.kind]
        overall = summarize(kind_scores, OVERALL)
        details[index.kind] = {
            "overall (categories 1-4)": overall,
            **{
                f"{number} {label}": summarize(kind_scores, [number])
                for number, label in CATEGORIES.items()
            },
        }
        result.add(
            Row(
                NAME,
                f"{index.kind}: overall (cat 1-4) recall@10",
                overall["recall@10"],
                "",
                n=overall["questions"],
                target=TARGETS[index.kind],
                note=_note(overall),
            )
        )
        for number, label in CATEGORIES.items():
            part = details[index.kind][f"{number} {label}"]
            if part["questions"]:
                result.add(
                    Row(
                        NAME,
                        f"{index.kind}: cat {number} {label} recall@10",
                        part["recall@10"],
                        "",
                        n=part["questions"],
                        note=_note(part),
                    )
                )
        recalls = {
            name: round(sum(values) / len(values), 4)
            for name, values in injected_recall[index.kind].items()
        }
        details[index.kind]["injected_recall (cat 1-4, top 5, floor on)"] = recalls
        checks = agreement[index.kind]
        details[index.kind]["replay_agrees_with_engine"] = round(sum(checks) / len(checks), 4)
        old = next(name for name in recalls if name.endswith("(old default)"))
        result.add(
            Row(
                NAME,
                f"{index.kind}: injected recall (cat 1-4, top 5, floor on)",
                recalls["engine"],
                "",
                n=len(checks),
                note=f"old floor (cosine 0.25): {recalls[old]:.3f}; "
                f"nothing injected for {recalls['nothing injected']:.3f}",
            )
        )
        pairs = compression[index.kind]
        history = sum(h for h, _ in pairs) / len(pairs)
        injected_tokens = sum(i for _, i in pairs) / len(pairs)
        empty = sum(1 for _, i in pairs if i == 0)
        result.add(
            Row(
                NAME,
                f"{index.kind}: compression, history / injected top-5 tokens",
                history / injected_tokens if injected_tokens else float("nan"),
                "x",
                n=len(pairs),
                note=(
                    f"{history:.0f} vs {injected_tokens:.0f} tokens; "
                    f"{empty} questions inject nothing"
                ),
            )
        )
    details["skipped_questions_without_evidence"] = {
        f"{c} {CATEGORIES.get(c, '?')}": n for c, n in sorted(skipped.items())
    }
    details["conversations"] = per_conversation
    result.details = details
    result.add(
        Row(
            NAME,
            "questions skipped (no usable evidence id)",
            sum(skipped.values()),
            "questions",
            note=", ".join(f"cat {c}: {n}" for c, n in sorted(skipped.items())),
        )
    )
    return result


def _note(summary: dict[str, Any]) -> str:
    return (
        f"R@1 {summary['recall@1']:.3f}, R@5 {summary['recall@5']:.3f}, "
        f"R@20 {summary['recall@20']:.3f}, MRR {summary['mrr']:.3f}, "
        f"ceiling {summary['recall_ceiling']:.3f}"
    )
