"""Paraphrase needles: facts asked about in other words, among many memories of the same form.

``benchmarks/paraphrase_pairs.jsonl`` holds 132 (fact, question) pairs written for this in eight
domains (health, work, family, places, tools, tastes, schedules; money, pets and learning), e.g.
"Is allergic to sesame seeds" / "Can I eat the tahini dip at the party?": for 128 of them the
question shares no content word with the fact. ``benchmarks/paraphrase_unrelated.jsonl`` holds
120 questions that no memory answers (small talk, general knowledge, coding). Both alternate,
within each domain or kind, between a ``dev`` half (rules and thresholds were tuned on it) and a
``heldout`` half. Both files were committed before anything was tuned.

One user holds the 132 facts, then 1k, 10k and 100k synthetic memories besides
(``corpus.memory_texts``: "Is allergic to peanuts and carries medication when visiting their
aunt Priya in Porto", "Uses Rust and Go for the billing service at a hospital in Oslo", ...;
vectors from the cache, see ``population``), written with ``MemoryStore.add_many``. The facts
are embedded with the real model, as is every question. At each size:

- *injected* (what a wrapper puts in the prompt): ``search(question, top_k=5)`` with the
  default relevance floor. hit@k = the fact among the first k results; *nothing returned* =
  an empty result.
- *raw ranking*: the same without a floor (``min_score=-1``).
- *false injection*: the share of unrelated questions for which ``search(question, top_k=5)``
  returns anything.
- *the floor's curve*: other floor rules replayed on the same candidates. For each question the
  engine's 50 best of its 200 nearest candidates are read once (``min_score=-1``) with their
  scores; a candidate's cosine similarity is computed from the vectors the store was written
  with, so its lexical part is the rest of its score, and a rule keeps what it keeps, in the
  engine's order. The replay of the default rule is checked against the engine's own results.

**A second run, with model-written keys** (``headroom_memory_integrations.keys``): the same
facts and synthetic memories, each written with keys (``NewMemory(text, keys=...)``), at 0, 1k
and 10k memories (embedding 100k index texts would take an hour here); its rows say "with
model-written keys", and ``python -m benchmarks --only paraphrase-keys`` runs it alone. The
keys were written once, before this run existed, by a separate model instance that saw only
the memory texts and the production instruction ("a few comma-separated topic words (3 to 6
short phrases) naming what the memory is about and the words a later question about it might
use"), never a question of either file:

- ``benchmarks/paraphrase_keys.jsonl``: ``{"id", "keys"}`` for each fact of the pairs file
  (same ids, same order), e.g. "health, food allergy, allergic reaction, diet, sesame".
- ``benchmarks/memory_keys.json``: keys for each of the 16 template families of
  ``corpus._template`` and for each value of its slot lists (``corpus.KEYED_LISTS``). A
  synthetic memory's keys are its family's, then those of each value it drew, in order, as
  many distinct phrases as fit beside its questions in eight, then its family's question and
  situation questions with its values (``corpus.keyed_memory_texts``).
- **Situation questions** (2026-12-03, later; ``"situations"`` in every keys file and in
  ``memory_keys.json``): three questions per fact, and three templates per family, about
  situations where the memory matters without being named, written by instances that saw only
  the facts (or the templates) and an instruction like the product's (``prompts.KEYS_HINT``).
  The engine sums each question's vector into the memory's (``keys.memory_vectors``); the
  replay uses the stored vectors, so it still agrees with the engine.

**A fresh set** (2026-12-03), written when the first set's held-out half had been read many
times: ``benchmarks/paraphrase_fresh_pairs.jsonl`` (100 pairs, ten in each of ten domains),
``benchmarks/paraphrase_fresh_unrelated.jsonl`` (60 questions) and
``benchmarks/paraphrase_fresh_keys.jsonl`` (the facts' keys), all of split ``fresh``. A model
instance wrote the pairs and questions under the first set's rules, seeing only the first set's
files (to write nothing twice), no result and no code; another wrote the keys seeing only the
fresh facts and the production instruction. Its facts are planted among the same synthetic
memories with keys, in a user of their own, at 0, 1k and 10k; its rows say "100 facts".
Nothing is tuned on it; every look at it is logged, with its rule, in
``benchmarks/paraphrase_fresh_log.md`` before it is run.

**A third fresh set** (2026-12-03, later still; split ``fresh3``, 138 pairs labelled ``kind``
"topic" or "situation", 80 messages, keys with situation questions), written blind to judge
the situation questions; its pairs near an item the query adapter was learned on are reported
apart (``benchmarks/paraphrase_fresh_log.md``, look 6).

**A fourth fresh set** (2026-12-03, a later session; split ``fresh4``, 140 pairs, ten "topic"
and ten "situation" pairs in each of the seven domains, 80 messages in four kinds of 20), written
blind like the third, its keys (with situation questions) by another instance from the facts
alone: a measure of the engine on questions nobody had tuned anything on (look 7 of the log).

**A fifth fresh set** (2026-12-05; split ``fresh5``), written blind the same way by two other
instances, the pairs' writer told to avoid the clichés of such sets: the fourth set's measure
of the engine repeated on new questions (look 8 of the log).

**A sixth fresh set** (2026-12-05, later; split ``fresh6``, 140 pairs as in the fourth and 120
messages, 30 of each kind, some on the facts' subjects), written blind the same way, to judge
the message gate (``embeddings/message_gate.py``) on messages nobody had seen (look 9).

**A seventh fresh set** (2026-12-05, later; split ``fresh7``, as the sixth, its messages
written as people type them), written blind to judge the gate relearned with more messages
after the sixth set's look (look 10).

**An eighth fresh set** (2026-12-05, a later session; split ``fresh8``, as the seventh),
written blind to judge the gate that reads the message's text as well as its vector, relearned
with more messages after the seventh set's look (look 11).

**A ninth fresh set** (2026-12-05, a later session; split ``fresh9``, as the eighth), written
blind to judge one decision for a chat message that weighed the gate's score against its
nearest memory's similarity, chosen on the eight sets before it (look 13; not adopted).

**A second fresh set** (2026-12-03, later), written when the first fresh set had had three
looks: ``benchmarks/paraphrase_fresh2_{pairs,unrelated,keys}.jsonl`` (140 pairs, 20 in each of
the seven domains above; 80 messages that need no memory: small talk, general knowledge,
coding, and everyday questions on the facts' broad topics that need no fact of this user), all
of split ``fresh2``. Model instances that saw no file of the repository wrote it: one the pairs
and messages, told not to steer toward or away from the facts' topics, another the keys from
the facts alone. The sets run in users and folders of their own, in the ``paraphrase`` section
and alone (``--only paraphrase-fresh``), under the same logged rule.

The engine embeds and matches a memory with keys by its index text, "text (key, key, ...)";
the vectors of the synthetic memories' index texts are cached like the texts' (see
``population.keyed_memory_cache``), and a candidate's cosine in the replay is computed from
the vector of its index text. Without keys a memory is indexed as in the first run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headroom_memory_integrations import (
    ChromaStorage,
    LocalEmbedder,
    Memory,
    MemoryStore,
    NewMemory,
)
from headroom_memory_integrations.embeddings.message_gate import THRESHOLD as GATE_THRESHOLD
from headroom_memory_integrations.embeddings.query_adapter import adapt_queries
from headroom_memory_integrations.engine import (
    DEFAULT_MIN_SCORE,
    LEXICAL_WEIGHT,
    centred_query,
    relevance_floor,
)
from headroom_memory_integrations.keys import clean_keys, index_text, memory_vectors

from .common import ROOT, Context, Row, SectionResult, log, value_at_least, value_at_most
from .corpus import with_questions
from .population import (
    PrecomputedEmbedder,
    VectorCache,
    fill,
    key_questions_of,
    keyed_memory_cache,
    memory_cache,
    wait_for_read_ahead,
)

NAME = "paraphrase"
KEYED_NAME = "paraphrase-keys"  # the section of the run with keys alone
KEYED = ", with model-written keys"  # ends the size in the keyed run's row names
PAIRS = ROOT / "benchmarks" / "paraphrase_pairs.jsonl"
UNRELATED = ROOT / "benchmarks" / "paraphrase_unrelated.jsonl"
FACT_KEYS = ROOT / "benchmarks" / "paraphrase_keys.jsonl"
FRESH_NAME = "paraphrase-fresh"  # the section of the fresh sets alone


def _fresh_files(name: str) -> tuple[Path, Path, Path]:
    """A fresh set's pairs, unrelated questions and facts' keys."""
    return tuple(  # type: ignore[return-value]
        ROOT / "benchmarks" / f"paraphrase_{name}_{part}.jsonl"
        for part in ("pairs", "unrelated", "keys")
    )


FRESH_SETS = {
    name: _fresh_files(name)
    for name in (
        "fresh",
        "fresh2",
        "fresh3",
        "fresh4",
        "fresh5",
        "fresh6",
        "fresh7",
        "fresh8",
        "fresh9",
    )
}
"""Each fresh set's files, by split name (every row of a set is of that split)."""
FRESH_PAIRS, FRESH_UNRELATED, FRESH_KEYS = FRESH_SETS["fresh"]
SPLITS = ("dev", "heldout")
SPLIT_NAMES = {
    "dev": "dev",
    "heldout": "held-out",
    "fresh": "fresh",
    "fresh2": "second fresh",
    "fresh3": "third fresh",
    "fresh4": "fourth fresh",
    "fresh5": "fifth fresh",
    "fresh6": "sixth fresh",
    "fresh7": "seventh fresh",
    "fresh8": "eighth fresh",
    "fresh9": "ninth fresh",
}
WITHOUT_GATE = "size-aware default, without the message gate"
"""The curve's entry for the default floor alone, every message let through."""
GATE_THRESHOLDS = (-0.5, -1.0, -2.0, -2.5, -3.0)
"""Other thresholds of the message gate replayed with the default floor (the gate's curve)."""
REPLAY_DEPTH = 50  # top_k of the no-floor read: 50 keeps the engine's 200 candidates
TARGET_SIZE = 10_000
KEYED_SIZES = (0, 1_000, 10_000)  # embedding 100k index texts would take an hour


def load(path: Path = PAIRS) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file of this benchmark."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@dataclass
class Candidate:
    """One result of the no-floor read: its memory id, engine score and similarity (the one
    the floor judges: cosine, discounted as :func:`engine.centred_query` says)."""

    memory_id: str
    score: float
    similarity: float
    keyed: bool = False  # the memory has keys (a replayed rule may hold it to a higher floor)


@dataclass
class Asked:
    """One question asked of the store at one size."""

    question: str
    split: str
    injected: list[str]  # ids returned with the default floor, best first
    candidates: list[Candidate]
    target: str | None = None  # the needle's memory id (None for unrelated questions)
    extra: dict[str, Any] = field(default_factory=dict)
    need: float | None = None  # the message gate's score (None: no gate applies)


# -- floor rules replayed on the candidates ----------------------------------------------------

Rule = Callable[[Candidate, int], bool]  # (candidate, memories in the store) -> kept


def fixed(floor: float) -> Rule:
    return lambda c, n: c.similarity >= floor


def size_aware(base: float, keyed_rise: float = 0.0) -> Rule:
    """The engine's floor from ``base``; a memory with keys must reach it plus ``keyed_rise``
    (the engine holds both to the same floor)."""
    return lambda c, n: c.similarity >= relevance_floor(base, n) + keyed_rise * c.keyed


def discounted(base: float, weight: float) -> Rule:
    """The size-aware floor on the cosine minus ``weight`` times the lexical overlap (0-1): a
    memory that shares the question's words must be that much closer in meaning."""
    return lambda c, n: (
        c.similarity - weight * (c.score - c.similarity) / LEXICAL_WEIGHT
        >= relevance_floor(base, n)
    )


def on_score(floor: float) -> Rule:
    """A floor on the whole score (cosine plus the lexical bonus) instead of the cosine."""
    return lambda c, n: c.score >= floor


def floor_rules() -> dict[str, Rule]:
    found: dict[str, Rule] = {}
    for base in (0.03, 0.045, DEFAULT_MIN_SCORE, 0.075, 0.09):
        name = f"size-aware, {base:.3f} at 1 memory" + (" (default)" * (base == DEFAULT_MIN_SCORE))
        found[name] = size_aware(base)
    for rise in (0.0, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08):  # only memories with keys
        name = f"size-aware, {DEFAULT_MIN_SCORE:.3f}, memories with keys +{rise:.3f} at any size"
        found[name] = size_aware(DEFAULT_MIN_SCORE, rise)
    for weight in (0.1, 0.2):
        found[f"size-aware, {DEFAULT_MIN_SCORE:.3f}, lexical overlap x {weight} off"] = discounted(
            DEFAULT_MIN_SCORE, weight
        )
    for floor in (0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40):
        found[f"cosine >= {floor:.2f}" + (" (old default)" * (floor == 0.25))] = fixed(floor)
    for floor in (0.40, 0.50, 0.60):
        found[f"score (cosine + lexical) >= {floor:.2f}"] = on_score(floor)
    return found


def _replayer(
    rule: Rule, memories: int, threshold: float | None = GATE_THRESHOLD
) -> Callable[[Asked], list[str]]:
    """What ``rule`` keeps of a question's candidates in a store of ``memories``: nothing for a
    message whose gate score is under ``threshold`` (by default the engine's; None: no gate),
    as a wrapper's injection does."""
    return lambda asked: (
        []
        if threshold is not None and asked.need is not None and asked.need < threshold
        else replay(asked.candidates, rule, memories)
    )


def replay(candidates: Sequence[Candidate], rule: Rule, memories: int, top_k: int = 5) -> list[str]:
    """The ids ``rule`` keeps of ``candidates`` (in the engine's order), at most ``top_k``."""
    return [c.memory_id for c in candidates if rule(c, memories)][:top_k]


def measure(
    needles: Sequence[Asked], unrelated: Sequence[Asked], pick: Callable[[Asked], list[str]]
) -> dict[str, dict[str, float]]:
    """hit@1, hit@5, nothing returned (needles) and false injection (unrelated), per split
    (in the order the needles come in)."""
    summary: dict[str, dict[str, float]] = {}
    for split in dict.fromkeys(a.split for a in needles):
        mine = [a for a in needles if a.split == split]
        other = [a for a in unrelated if a.split == split]
        picked = [pick(a) for a in mine]
        summary[split] = {
            "needles": len(mine),
            "hit@1": _share(bool(p) and p[0] == a.target for a, p in zip(mine, picked)),
            "hit@5": _share(a.target in p[:5] for a, p in zip(mine, picked)),
            "nothing": _share(not p for p in picked),
            "unrelated": len(other),
            "false_injection": _share(bool(pick(a)) for a in other),
        }
    return summary


def _share(flags: Any) -> float:
    values = list(flags)
    return round(sum(values) / len(values), 4) if values else float("nan")


# -- the run -----------------------------------------------------------------------------------


def ask_all(
    reader: MemoryStore,
    vectors: dict[str, np.ndarray],
    real: LocalEmbedder,
    rows: Sequence[dict[str, Any]],
    targets: Sequence[str | None],
) -> list[Asked]:
    questions = [row["question"] for row in rows]
    query_vectors = adapt_queries(real.name, real.embed(questions))  # as a search does
    centroid = reader._open().centroid()  # private: the benchmark replays the engine's similarity
    asked = []
    for row, target, query_vector in zip(rows, targets, query_vectors):
        found_for_chat = reader.search(row["question"], top_k=5, chat_message=True)
        injected = [r.memory.id for r in found_for_chat]
        found = reader.search(row["question"], top_k=REPLAY_DEPTH, min_score=-1.0)
        stored = _stored_vectors([r.memory for r in found], vectors, real)
        centred = centred_query(query_vector, centroid)
        candidates = [
            Candidate(r.memory.id, r.score, float(centred.similarity_of(v)), bool(r.memory.keys))
            for r, v in zip(found, stored)
        ]
        need = reader._query(row["question"]).need  # private: the gate's score
        asked.append(Asked(row["question"], row["split"], injected, candidates, target, {}, need))
    return asked


def run(ctx: Context) -> SectionResult:
    """Both runs: memories without keys (up to 100k), then with model-written keys."""
    result = SectionResult(NAME)
    real = LocalEmbedder()
    result.details = _run_plain(ctx, result, real)
    result.details["with_keys"] = _run_keyed(ctx, result, real)
    result.details["fresh"] = _run_fresh(ctx, result, real)
    return result


def run_keyed(ctx: Context) -> SectionResult:
    """The run with model-written keys alone (the ``paraphrase-keys`` section)."""
    result = SectionResult(KEYED_NAME)
    result.details = _run_keyed(ctx, result, LocalEmbedder())
    return result


def run_fresh(ctx: Context) -> SectionResult:
    """The fresh sets alone (the ``paraphrase-fresh`` section)."""
    result = SectionResult(FRESH_NAME)
    result.details = _run_fresh(ctx, result, LocalEmbedder())
    return result


def _run_plain(ctx: Context, result: SectionResult, real: LocalEmbedder) -> dict[str, Any]:
    """Facts and synthetic memories written as texts, without keys."""
    pairs = load(PAIRS)
    sizes = ctx.pick((0, 1_000, 10_000, 100_000), (0, 1_000))
    facts: list[str | NewMemory] = [row["fact"] for row in pairs]
    return _run_sizes(ctx, result, real, facts, memory_cache(ctx.cache, real), sizes, "")


def _run_keyed(
    ctx: Context,
    result: SectionResult,
    real: LocalEmbedder,
    files: tuple[Path, Path, Path] = (PAIRS, UNRELATED, FACT_KEYS),
    store: str | None = None,
) -> dict[str, Any]:
    """Facts and synthetic memories written with their model-written keys. ``files``: the
    pairs, the unrelated questions and the facts' keys (by default the first set's)."""
    pairs_file, unrelated_file, keys_file = files
    pairs, unrelated = load(pairs_file), load(unrelated_file)
    sizes = ctx.pick(KEYED_SIZES, (0, 1_000))
    facts: list[str | NewMemory] = [
        NewMemory(row["fact"], keys=keys) for row, keys in zip(pairs, fact_keys(pairs, keys_file))
    ]
    cache = keyed_memory_cache(ctx.cache, real, max(sizes))
    return _run_sizes(ctx, result, real, facts, cache, sizes, KEYED, (pairs, unrelated), store)


def _run_fresh(ctx: Context, result: SectionResult, real: LocalEmbedder) -> dict[str, Any]:
    """Each fresh set's facts, with their keys, among synthetic memories written with keys
    (a user and a scratch folder of its own for each set). A set the query adapter was not
    learned apart from is also reported on its pairs and messages that are not near a
    training item (:func:`apart_from_training`)."""
    details = {}
    for name, files in FRESH_SETS.items():
        details[name] = _run_keyed(ctx, result, real, files, name)
        if name not in ADAPTER_LEARNED_APART:
            _report_apart(result, real, files, name, details[name])
    return details


ADAPTER_TRAINING = ROOT / "benchmarks" / "adapter_train"
ADAPTER_NEAR = 0.8
"""Texts within this cosine of a benchmark text are left out of the adapter's training."""
ADAPTER_LEARNED_APART = ("fresh", "fresh2")
"""The fresh sets that existed when the shipped adapter was learned (their neighbours were left
out of its training; ``scripts/train_query_adapter.py``)."""


def apart_from_training(real: LocalEmbedder, texts: Sequence[str]) -> list[bool]:
    """Whether each text is farther than :data:`ADAPTER_NEAR` from every memory and question of
    the query adapter's pairs and unrelated messages (the items its training keeps apart from
    the benchmark's)."""
    learned: list[str] = []
    for path in [
        *sorted(ADAPTER_TRAINING.glob("pairs_*.jsonl")),
        ADAPTER_TRAINING / "unrelated.jsonl",
    ]:
        for row in load(path):
            learned += [row[k] for k in ("fact", "question") if k in row]
    seen = real.embed(list(dict.fromkeys(learned)))
    return [bool((seen @ vector).max() <= ADAPTER_NEAR) for vector in real.embed(list(texts))]


def _report_apart(
    result: SectionResult,
    real: LocalEmbedder,
    files: tuple[Path, Path, Path],
    name: str,
    details: dict[str, Any],
) -> None:
    """Rows for the pairs (fact and question) and messages of a fresh set that are apart from
    the adapter's training; their ids go into ``details["apart"]``."""
    pairs, unrelated = load(files[0]), load(files[1])
    texts = [row["fact"] for row in pairs] + [row["question"] for row in [*pairs, *unrelated]]
    apart = apart_from_training(real, texts)  # the training texts embedded once
    fact_ok, question_ok = apart[: len(pairs)], apart[len(pairs) : 2 * len(pairs)]
    message_ok = apart[2 * len(pairs) :]
    pair_ids = {row["id"] for row, a, b in zip(pairs, fact_ok, question_ok) if a and b}
    messages = {row["question"] for row, ok in zip(unrelated, message_ok) if ok}
    details["apart"] = {"pairs": sorted(pair_ids), "messages": len(messages)}
    for label in [key for key in ("0", "1k", "10k") if key in details]:
        needles = [n for n in details[label]["needles"] if n["id"] in pair_ids]
        hits = sum(n["injected_rank"] is not None and n["injected_rank"] <= 5 for n in needles)
        empty = sum(n["injected"] == 0 for n in needles)
        wrong = sum(f["question"] in messages for f in details[label]["false_injections"])
        where = f"{len(pairs)} facts + {label} memories{KEYED}, {SPLIT_NAMES[name]}"
        judged = label == "10k"
        for measure, value, count, target in (
            ("hit@5 injected", hits, len(needles), value_at_least(0.85)),
            ("nothing returned", empty, len(needles), value_at_most(0.05)),
            ("false injection (unrelated questions)", wrong, len(messages), value_at_most(0.05)),
        ):
            result.add(
                Row(
                    NAME,
                    f"{where}, apart from the adapter's training: {measure}",
                    round(value / count, 4) if count else float("nan"),
                    "",
                    n=count,
                    target=target if judged else None,
                )
            )


def fact_keys(pairs: Sequence[dict[str, Any]], path: Path = FACT_KEYS) -> list[tuple[str, ...]]:
    """The keys of each pair's fact, from ``path`` (which must list the same ids in the same
    order): its topic words, then its question (``asks``) and those about situations where it
    matters (``situations``)."""
    rows = load(path)
    ids = [row["id"] for row in rows]
    if ids != [pair["id"] for pair in pairs]:
        raise ValueError(f"{path.name} does not list the ids of the pairs in order")
    return [
        with_questions(clean_keys(row["keys"]), [row["asks"], *row.get("situations", ())])
        for row in rows
    ]


def _run_sizes(
    ctx: Context,
    result: SectionResult,
    real: LocalEmbedder,
    facts: Sequence[str | NewMemory],
    cache: VectorCache,
    sizes: Sequence[int],
    variant: str,
    questions: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """One user holds ``facts``, then each of ``sizes`` synthetic memories besides (from
    ``cache``); every question of both files (``questions``: the pairs and the unrelated
    questions, by default those of :data:`PAIRS` and :data:`UNRELATED`) is asked at each size.
    Adds the rows to ``result`` (their names end the size with ``variant``) and returns the
    details. ``store`` names the scratch folder."""
    pairs, unrelated_rows = questions or (load(PAIRS), load(UNRELATED))
    vectors = cache.table  # every index text written, with its vector (grows as it fills)
    indexed = list(dict.fromkeys([_index_text(item) for item in facts]))
    indexed += [question for question in key_questions_of(facts) if question not in indexed]
    # and the plain texts, which consolidation embeds to judge a rewording of a keyed memory
    texts = [item if isinstance(item, str) else item.text for item in facts]
    indexed += [text for text in dict.fromkeys(texts) if text not in indexed]
    vectors.update(zip(indexed, real.embed(indexed)))  # the facts' texts and key questions
    storage = ChromaStorage.at(
        ctx.scratch(store or ("paraphrase-keys" if variant else "paraphrase"))
    )
    embedder = PrecomputedEmbedder(real, vectors)
    # the pairs' facts stand for many users' (two homes, two employers): they are planted in one
    # store with consolidation off, so that none supersedes another ("Lives in Reykjavik,
    # Iceland" would update "Lives in Anchorage, Alaska", as it should for one user); the
    # distractors are added as usual
    planter = MemoryStore(
        "paraphrase-user", storage=storage, embedder=embedder, duplicate_threshold=None
    )
    planted = planter.add_many(facts)
    writer = MemoryStore("paraphrase-user", storage=storage, embedder=embedder)
    if len({m.id for m in planted}) != len(facts):
        raise RuntimeError("the engine merged two facts of the pairs file")
    details: dict[str, Any] = {"pairs": len(pairs), "unrelated": len(unrelated_rows)}
    all_rules = floor_rules()
    for size in sizes:
        population = fill(writer, cache, size + len(facts)) if size else {}
        now = {m.id: m.text for m in writer.get_many([m.id for m in planted])}
        changed = sum(1 for m in planted if now.get(m.id) != m.text)
        memories = writer.count()
        label = f"{size // 1000}k" if size else "0"
        where = f"{len(facts)} facts + {label} memories{variant}"
        log(f"paraphrase: {where} ({memories} stored); asking")
        reader = MemoryStore("paraphrase-user", storage=storage, embedder=real)
        wait_for_read_ahead(reader)
        needles = ask_all(reader, vectors, real, pairs, [m.id for m in planted])
        unrelated = ask_all(reader, vectors, real, unrelated_rows, [None] * len(unrelated_rows))
        injected = measure(needles, unrelated, lambda a: a.injected)
        raw = measure(needles, unrelated, lambda a: [c.memory_id for c in a.candidates])
        default = all_rules[next(n for n in all_rules if n.endswith("(default)"))]
        agreement = sum(
            _replayer(default, memories)(a) == a.injected for a in [*needles, *unrelated]
        ) / (len(needles) + len(unrelated))
        curve = {
            name: measure(needles, unrelated, _replayer(rule, memories))
            for name, rule in all_rules.items()
        }
        curve[WITHOUT_GATE] = measure(needles, unrelated, _replayer(default, memories, None))
        for threshold in GATE_THRESHOLDS:
            curve[f"size-aware default, the gate at {threshold}"] = measure(
                needles, unrelated, _replayer(default, memories, threshold)
            )
        details[label] = {
            "memories": memories,
            "floor": relevance_floor(DEFAULT_MIN_SCORE, memories),
            "population": population,
            "facts_changed_by_consolidation": changed,
            "injected": injected,
            "raw_ranking": raw,
            "replay_agrees_with_engine": round(agreement, 4),
            "curve": curve,
            "needles": [_needle_detail(a, pairs[i]) for i, a in enumerate(needles)],
            "false_injections": [
                {"question": a.question, "split": a.split, "injected": len(a.injected)}
                for a in unrelated
                if a.injected
            ],
            "false_injection_by_kind": _by_kind(unrelated, unrelated_rows),
        }
        _rows(result, where, size, memories, injected, raw, curve[WITHOUT_GATE])
    details["index_texts_embedded_while_writing"] = embedder.misses
    return details


def _by_kind(unrelated: Sequence[Asked], rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """How many of each kind of unrelated question (small talk, general knowledge, ...) got a
    memory, as "injected / asked"."""
    counts: dict[str, list[int]] = {}
    for asked, row in zip(unrelated, rows):
        tally = counts.setdefault(row.get("kind", "?"), [0, 0])
        tally[0] += bool(asked.injected)
        tally[1] += 1
    return {kind: f"{hit} / {total}" for kind, (hit, total) in counts.items()}


def _stored_vectors(
    memories: Sequence[Memory], vectors: dict[str, np.ndarray], real: LocalEmbedder
) -> np.ndarray:
    """The vectors the engine stored ``memories`` with (``keys.memory_vectors``), from the
    table of texts' vectors (what it lacks embedded and added to it)."""
    embed = PrecomputedEmbedder(real, vectors).embed
    return memory_vectors(embed, [(m.text, clean_keys(m.keys)) for m in memories])


def _index_text(item: str | NewMemory | Memory) -> str:
    """What the engine embeds for ``item`` (a memory to write, or one written): its text
    with its keys."""
    if isinstance(item, str):
        return item
    return index_text(item.text, clean_keys(item.keys))


def _needle_detail(asked: Asked, pair: dict[str, Any]) -> dict[str, Any]:
    ranked = [c.memory_id for c in asked.candidates]
    rank = ranked.index(asked.target) + 1 if asked.target in ranked else None
    cosine = next((c.similarity for c in asked.candidates if c.memory_id == asked.target), None)
    return {
        "id": pair["id"],
        "split": asked.split,
        "raw_rank": rank,
        "cosine": round(cosine, 3) if cosine is not None else None,
        "injected_rank": (asked.injected.index(asked.target) + 1)
        if asked.target in asked.injected
        else None,
        "injected": len(asked.injected),
        "gate": None if asked.need is None else round(asked.need, 2),
    }


def _rows(
    result: SectionResult,
    where: str,
    size: int,
    memories: int,
    injected: dict[str, dict[str, float]],
    raw: dict[str, dict[str, float]],
    ungated: dict[str, dict[str, float]],
) -> None:
    at_target = size == TARGET_SIZE
    floor = relevance_floor(DEFAULT_MIN_SCORE, memories)
    for split in injected:
        part, bare, open_ = injected[split], raw[split], ungated[split]
        name = SPLIT_NAMES[split]
        judged = at_target and split != "dev"  # the targets are for questions not tuned on
        note = (
            f"floor {floor:.3f}; raw ranking (no floor) hit@5 {bare['hit@5']:.3f}; "
            f"without the message gate {open_['hit@5']:.3f}"
        )
        result.add(
            Row(NAME, f"{where}, {name}: hit@1 injected", part["hit@1"], "", n=int(part["needles"]))
        )
        result.add(
            Row(
                NAME,
                f"{where}, {name}: hit@5 injected",
                part["hit@5"],
                "",
                n=int(part["needles"]),
                target=value_at_least(0.85) if judged else None,
                note=note,
            )
        )
        result.add(
            Row(
                NAME,
                f"{where}, {name}: nothing returned",
                part["nothing"],
                "",
                n=int(part["needles"]),
                target=value_at_most(0.05) if judged else None,
            )
        )
        result.add(
            Row(
                NAME,
                f"{where}, {name}: false injection (unrelated questions)",
                part["false_injection"],
                "",
                n=int(part["unrelated"]),
                target=value_at_most(0.05) if at_target else None,
                note=f"without the message gate {open_['false_injection']:.3f}",
            )
        )
