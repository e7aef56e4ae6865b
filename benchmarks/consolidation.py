"""Consolidation quality: is a new memory merged, does it supersede, or is it kept beside?

Measured through ``MemoryStore`` with the real local model:

- **Labelled pairs** (``benchmarks/consolidation_pairs.jsonl``, 338 pairs in 11 domains written
  for this: health, work, family, places, tools, tastes, schedules, ids, travel, pets,
  learning). Each pair is an existing memory and a new one, labelled ``duplicate`` (the new
  one says nothing new), ``update`` (it makes the old one no longer current) or ``distinct``
  (both can be true). The pairs alternate between a ``dev`` half, on which the rules and
  thresholds were tuned, and a ``heldout`` half. For each pair a fresh user stores the old text
  with ``add`` and then ``remember(new)``; its outcome (``duplicate``, ``superseded`` or
  ``stored``) is compared with the label. The number that must be 0 is **new information
  discarded**: an update or a distinct fact that came back as a duplicate, so the new memory
  was dropped and the old one stayed current. The old rule (a duplicate at cosine >= 0.95 or
  the same wording; never a supersede) is scored on the same pairs for comparison.
- **The same pairs with model-written keys** (``benchmarks/consolidation_keys.jsonl``): the
  wrappers store each memory with keys (topic words, the question it answers, situation
  questions; :mod:`headroom_memory_integrations.keys`), and two conversations word them
  differently, so the stored vectors of a pair are further apart than their texts (a median
  of 0.82 for the updates). The keys were written for each of the 616 texts on its own by three
  model instances that saw the texts shuffled, without their pairs or labels, and the
  product's keys instruction. Each pair is judged again with both memories stored with keys.
- **A blind set** (``benchmarks/consolidation_blind_pairs.jsonl``, 220 pairs): written in stop
  33 by a model instance that read no file of the repository, asked to trick a rule-based
  consolidation into calling new information a duplicate (160 updates and distinct facts in 20
  classes: modifiers left out, acronyms, units, signs, versions, ...) with 60 true rewordings
  as a control. Looked at once before two fixes (a minus before a currency sign, dotted
  abbreviations), so it is not held out any more; it is reported as one set. A second blind
  set (``consolidation_blind2_pairs.jsonl``, 240 pairs: 100 updates, 80 distinct facts, 60
  rewordings), written the same way later in stop 33 and asked to trick the rules both ways
  (new information dropped, a true memory retired), was looked at once before three rules
  (a narrower statement after a verb of several things, a one-off after a habit, a negation
  changed with its object), so it is not held out either. A third (``..._blind3_pairs.jsonl``,
  220 pairs: 90 updates, 70 distinct facts, 60 rewordings of the kind a model writes over
  months), written the same way at the end of stop 33, was looked at once and changed
  nothing then; in stop 34 its error list was seen after the rule for changes told in other
  words was written, so it is not held out any more.
- **Changes told in other words** (stop 34), written blind the same way: a development set
  (``consolidation_reworded_pairs.jsonl``, 260 pairs: 140 corrections worded anew in seven
  forms, 80 distinct facts written to look like changes, 40 rewordings); a set of related
  facts that use change words but leave the old memory true
  (``consolidation_related_pairs.jsonl``, 200 pairs: 150 distinct in 11 classes, 50
  updates), both looked at while the rule was written; and a held-out set
  (``consolidation_blind4_pairs.jsonl``, 240 pairs: 120 updates, 90 of them worded anew, 70
  distinct facts, 50 rewordings), whose errors are never listed (:data:`HELD_OUT`).
- **Corrections an audit wrote blind** (stop 46, ``consolidation_blind5_pairs.jsonl``, 155
  pairs: 113 corrections of one value in 14 domains, from doses and e-mail addresses to
  versions, units, emoji and four languages, and 42 rewordings, 25 of them strict): it found
  that a value corrected by one mark ("jane_smith" -> "jane.smith") was dropped as a
  duplicate, so it is a development set now.
- **A sixth blind set** (stop 49, ``consolidation_blind6_pairs.jsonl``, 160 pairs: 70
  updates, 50 distinct facts, 40 rewordings in 12 domains), written by a model instance that
  read no file of the repository, asked to trick the rules into calling new information a
  duplicate in ways of its own. Its first run found none; its errors were listed then, so it is
  a development set from now on.
- **A seventh blind set** (stop 52, ``consolidation_blind7_pairs.jsonl``, 240 pairs: 110
  updates, half of one value in near-identical wording and half told in other words, 80
  distinct facts written to look like changes, 50 rewordings, in 12 domains), written by a
  model instance that read no file of the repository but three lines of another set (for the
  format). Held out from its first run: only its counts were ever seen (:data:`HELD_OUT`).
- **Teammates**: 1,000 distinct facts in nearly the same words ("Teammate 59 is busy with
  pottery work", "Teammate 62 ...") added with ``remember_many`` in batches of 100; all must be
  stored. The old rule's count is computed on the same vectors.

Run alone with ``python -m benchmarks.consolidation`` (prints the confusion matrices), or as
the ``consolidation`` section of ``python -m benchmarks``.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from headroom_memory_integrations import (
    DEFAULT_DUPLICATE_THRESHOLD,
    ChromaStorage,
    LocalEmbedder,
    MemoryStore,
    Outcome,
)
from headroom_memory_integrations.consolidation import same_wording_key
from headroom_memory_integrations.keys import clean_keys

from .common import Context, Row, SectionResult, log, value_at_least, value_at_most
from .corpus import with_questions

NAME = "consolidation"
PAIRS = Path(__file__).with_name("consolidation_pairs.jsonl")
KEYS = Path(__file__).with_name("consolidation_keys.jsonl")
BLIND_SETS = {
    "blind": Path(__file__).with_name("consolidation_blind_pairs.jsonl"),
    "blind2": Path(__file__).with_name("consolidation_blind2_pairs.jsonl"),
    "blind3": Path(__file__).with_name("consolidation_blind3_pairs.jsonl"),
    "reworded": Path(__file__).with_name("consolidation_reworded_pairs.jsonl"),
    "related": Path(__file__).with_name("consolidation_related_pairs.jsonl"),
    "blind4": Path(__file__).with_name("consolidation_blind4_pairs.jsonl"),
    "blind5": Path(__file__).with_name("consolidation_blind5_pairs.jsonl"),
    "blind6": Path(__file__).with_name("consolidation_blind6_pairs.jsonl"),
    "blind7": Path(__file__).with_name("consolidation_blind7_pairs.jsonl"),
}
HELD_OUT = frozenset({"blind4", "blind7"})
"""Sets whose pairs are counted, never listed: their errors are not printed or kept, so that a
run does not show what a later rule could be written for."""
LABELS = ("duplicate", "update", "distinct")
SPLITS = ("dev", "heldout")
AS_LABEL = {
    Outcome.DUPLICATE: "duplicate",
    Outcome.SUPERSEDED: "update",
    Outcome.STORED: "distinct",
}
TEAMMATES = 1_000
HOBBIES = "pottery chess garden carpentry painting knitting baking cycling sailing yoga".split()


def load_pairs(path: Path = PAIRS, split: str | None = None) -> list[dict[str, str]]:
    """The labelled pairs of ``path``; ``split`` for a file that is one split only."""
    pairs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    for pair in pairs:
        pair.setdefault("split", split or "")
        if pair["label"] not in LABELS or pair["split"] not in (*SPLITS, *BLIND_SETS):
            raise ValueError(f"bad pair {pair['id']}: {pair['label']!r} / {pair['split']!r}")
    return pairs


def teammates(count: int = TEAMMATES) -> list[str]:
    rng = random.Random(7)
    return [f"Teammate {n} is busy with {rng.choice(HOBBIES)} work" for n in range(1, count + 1)]


def old_rule(old: str, new: str, similarity: float) -> str:
    """What the engine did before: a duplicate at cosine >= 0.95 or the same wording, else
    stored; it never superseded on its own."""
    same = same_wording_key(old) == same_wording_key(new)
    return "duplicate" if same or similarity >= DEFAULT_DUPLICATE_THRESHOLD else "distinct"


def load_keys(path: Path = KEYS) -> dict[str, tuple[str, ...]]:
    """Each text's model-written keys: its topic words, its question, its situation
    questions."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {
        row["text"]: with_questions(clean_keys(row["keys"]), [row["asks"], *row["situations"]])
        for row in rows
    }


def judge_pairs(
    pairs: list[dict[str, str]],
    storage: ChromaStorage,
    model: LocalEmbedder,
    keys: dict[str, tuple[str, ...]] | None = None,
) -> list[dict[str, Any]]:
    """Each pair through a fresh user's store (both memories stored with their ``keys``, if
    given): the outcome, the old rule's answer, the texts' similarity."""
    olds = model.embed([p["old"] for p in pairs])
    news = model.embed([p["new"] for p in pairs])
    similarities = np.einsum("ij,ij->i", olds, news).tolist()
    judged = []
    prefix = "keyed-pair" if keys else "pair"
    for number, (pair, similarity) in enumerate(zip(pairs, similarities)):
        store = MemoryStore(f"{prefix}-{number}", storage=storage, embedder=model)
        store.add(pair["old"], keys=keys[pair["old"]] if keys else None)
        done = store.remember(pair["new"], keys=keys[pair["new"]] if keys else None)
        judged.append(
            {
                **pair,
                "similarity": round(similarity, 4),
                "predicted": AS_LABEL[done.outcome],
                "old_rule": old_rule(pair["old"], pair["new"], similarity),
            }
        )
    return judged


def matrix(judged: list[dict[str, Any]], key: str = "predicted") -> dict[str, dict[str, int]]:
    """Label -> predicted -> count."""
    counts = Counter((j["label"], j[key]) for j in judged)
    return {label: {p: counts[(label, p)] for p in LABELS} for label in LABELS}


def summary(judged: list[dict[str, Any]], key: str = "predicted") -> dict[str, Any]:
    table = matrix(judged, key)
    return {
        "pairs": len(judged),
        "matrix": table,
        "accuracy": round(sum(table[x][x] for x in LABELS) / max(len(judged), 1), 3),
        "new_information_discarded": table["update"]["duplicate"] + table["distinct"]["duplicate"],
        "true_memory_retired": table["distinct"]["update"],
        "stale_memory_kept": table["update"]["distinct"],
        "duplicate_kept_or_rewritten": table["duplicate"]["update"]
        + table["duplicate"]["distinct"],
    }


def format_matrix(table: dict[str, dict[str, int]]) -> str:
    width = max(len(label) for label in LABELS) + 2
    lines = ["label \\ outcome".ljust(width + 8) + "".join(p.rjust(width) for p in LABELS)]
    for label in LABELS:
        cells = "".join(str(table[label][p]).rjust(width) for p in LABELS)
        lines.append(label.ljust(width + 8) + cells)
    return "\n".join(lines)


def teammates_stored(storage: ChromaStorage, model: LocalEmbedder, count: int) -> dict[str, Any]:
    texts = teammates(count)
    store = MemoryStore("teammates", storage=storage, embedder=model)
    outcomes: Counter[str] = Counter()
    for start in range(0, len(texts), 100):
        outcomes.update(d.outcome.value for d in store.remember_many(texts[start : start + 100]))
    vectors = model.embed(texts)
    kept: list[int] = []  # the old rule: dropped if this close to any memory kept before it
    for index, vector in enumerate(vectors):
        if not kept or float(np.max(vectors[kept] @ vector)) < DEFAULT_DUPLICATE_THRESHOLD:
            kept.append(index)
    return {
        "offered": len(texts),
        "stored": store.count(),
        "outcomes": dict(outcomes),
        "old_rule_stored": len(kept),
    }


def measure(workdir: Path, teammate_count: int) -> dict[str, Any]:
    model = LocalEmbedder()
    storage = ChromaStorage.at(workdir)
    pairs = load_pairs()
    judged = judge_pairs(pairs, storage, model)
    keyed = judge_pairs(pairs, storage, model, load_keys())
    report: dict[str, Any] = {}
    for split in SPLITS:
        half = [j for j in judged if j["split"] == split]
        report[split] = summary(half)
        report[f"{split}_old_rule"] = summary(half, "old_rule")
        report[f"{split}_with_keys"] = summary([j for j in keyed if j["split"] == split])
    blind: list[dict[str, Any]] = []
    for name, path in BLIND_SETS.items():
        # a storage of its own: its users are pair-0, pair-1, ... too
        judged_set = judge_pairs(load_pairs(path, name), ChromaStorage.at(workdir / name), model)
        report[name] = summary(judged_set)
        report[f"{name}_old_rule"] = summary(judged_set, "old_rule")
        blind += judged_set
    report["errors"] = listed_errors(judged + blind)
    report["teammates"] = teammates_stored(storage, model, teammate_count)
    return report


def listed_errors(judged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs whose outcome is not their label, but those of the :data:`HELD_OUT` sets."""
    return [
        {k: j[k] for k in ("id", "split", "label", "predicted", "similarity", "old", "new")}
        for j in judged
        if j["predicted"] != j["label"] and j["split"] not in HELD_OUT
    ]


def _pair_rows(
    result: SectionResult, where: str, judged: dict[str, Any], notes: tuple[str, str]
) -> None:
    """The two rows of one half's pairs judged one way: new information discarded (must be
    0) and the share whose outcome is the label."""
    result.add(
        Row(
            NAME,
            f"new information discarded, {where}",
            judged["new_information_discarded"],
            "pairs",
            n=judged["pairs"],
            target=value_at_most(0),
            note=notes[0],
        )
    )
    result.add(
        Row(
            NAME,
            f"outcome = label, {where}",
            judged["accuracy"],
            "",
            n=judged["pairs"],
            note=notes[1],
        )
    )


def run(ctx: Context) -> SectionResult:
    result = SectionResult(NAME)
    report = measure(ctx.scratch(NAME), ctx.pick(TEAMMATES, 200))
    for split in SPLITS:
        label = "held-out" if split == "heldout" else split
        now, before = report[split], report[f"{split}_old_rule"]
        keyed = report[f"{split}_with_keys"]
        old_rule = (
            f"old rule: {before['new_information_discarded']}",
            f"old rule: {before['accuracy']:.3f}",
        )
        _pair_rows(result, f"{label} pairs", now, old_rule)
        log(f"{NAME}, {label} half:\n{format_matrix(now['matrix'])}")
        stale = (
            f"stale memory kept: {keyed['stale_memory_kept']} "
            f"(without keys: {now['stale_memory_kept']})"
        )
        _pair_rows(result, f"{label} pairs, with model-written keys", keyed, (stale, ""))
    for name in BLIND_SETS:
        blind, before = report[name], report[f"{name}_old_rule"]
        old_rule = (
            f"old rule: {before['new_information_discarded']}",
            f"old rule: {before['accuracy']:.3f}",
        )
        _pair_rows(result, f"{name} pairs", blind, old_rule)
        log(f"{NAME}, {name} set:\n{format_matrix(blind['matrix'])}")
    mates = report["teammates"]
    result.add(
        Row(
            NAME,
            f"teammates stored of {mates['offered']} distinct facts",
            mates["stored"],
            "memories",
            target=value_at_least(mates["offered"]),
            note=f"old rule: {mates['old_rule_stored']}",
        )
    )
    result.details = report
    return result


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="headroom-consolidation-"))
    try:
        report = measure(workdir, TEAMMATES)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    printed = [
        (f"{split} half, {title}", key)
        for split in SPLITS
        for key, title in (
            (split, "this engine"),
            (f"{split}_with_keys", "this engine, memories with model-written keys"),
            (f"{split}_old_rule", "old rule"),
        )
    ] + [
        (f"{name} set, {title}", key)
        for name in BLIND_SETS
        for key, title in ((name, "this engine"), (f"{name}_old_rule", "old rule"))
    ]
    for heading, key in printed:
        part = report[key]
        print(f"\n{heading} ({part['pairs']} pairs, accuracy {part['accuracy']}):")
        print(format_matrix(part["matrix"]))
        print(
            f"new information discarded: {part['new_information_discarded']}; true memory "
            f"retired: {part['true_memory_retired']}; stale memory kept: "
            f"{part['stale_memory_kept']}"
        )
    mates = report["teammates"]
    print(
        f"\nteammates: {mates['stored']} of {mates['offered']} stored "
        f"(old rule: {mates['old_rule_stored']})"
    )
    print(f"\nmismatches (not of the held-out {', '.join(sorted(HELD_OUT))}):")
    for error in report["errors"]:
        print(
            f"  {error['split']:<7} {error['label']:>9} -> {error['predicted']:<9} "
            f"{error['similarity']:.3f}  {error['old']!r} -> {error['new']!r}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
