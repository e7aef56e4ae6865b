"""The follow-ups benchmark (benchmarks/followups.py): its two blind sets are whole, with keys
for every fact, and a run at 0 memories besides reports each way of asking, on both halves of
each set, with and without the keys, and what a short message costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import followups
from benchmarks.common import Context
from benchmarks.paraphrase import KEYED, fact_keys
from headroom_memory_integrations.keys import key_questions


@pytest.mark.parametrize("which", list(followups.SETS))
def test_each_followups_set_is_whole_with_two_halves(which: str) -> None:
    path, keys_path = followups.SETS[which]
    items = followups.load(path)
    assert len(items) == 120 and len({item["id"] for item in items}) == 120
    fields = {"id", "domain", "fact", "earlier", "follow_up", "aside"}
    assert all(set(item) == fields and all(item.values()) for item in items)
    assert all(2 <= len(item["follow_up"].split()) <= 6 for item in items)
    halves = [followups._half(item) for item in items]
    assert halves.count("dev") == halves.count("held-out") == 60
    assert len({item["fact"] for item in items}) == 120
    keys = fact_keys(items, keys_path)  # the same ids in the same order
    assert all(len(key_questions(k)) == 4 for k in keys)


def test_a_quick_run_reports_every_way_of_asking_on_both_halves(tmp_path: Path) -> None:
    ctx = Context(quick=True, workdir=tmp_path, cache=tmp_path / "cache")
    result = followups.run(ctx)
    sets = list(followups.SETS)
    assert sets == ["", ", second set", ", third set", ", fourth set", ", fifth set"]
    variants = [size + which for which in sets for size in ("0", "0" + KEYED)]
    assert set(result.details) == set(variants)
    runs = [result.details[variant] for variant in variants]
    for measured in [half for run in runs for half in run.values()]:
        assert set(measured) == {
            "earlier message alone",
            "follow-up alone",
            "follow-up joined to the earlier message",
            "aside alone",
            "aside joined to the earlier message",
            followups.ENGINE_FOLLOW_UP,
            followups.ENGINE_ASIDE,
        }
        for way, values in measured.items():
            assert all(0.0 <= value <= 1.0 for value in values.values()), way
        # joined to a message about the user, an aside draws that message's memories
        assert (
            measured["aside joined to the earlier message"]["false injection"]
            > measured["aside alone"]["false injection"]
        )
        # the engine joins an aside only when that brings a memory nearer
        assert (
            measured[followups.ENGINE_ASIDE]["false injection"]
            < measured["aside joined to the earlier message"]["false injection"]
        )
    assert all(set(run) == {"dev", "held-out"} for run in runs)
    timings = [row for row in result.rows if row.unit == "ms"]
    assert [row.name for row in timings] == [
        f"120 facts + 0 memories{KEYED}{which}: {what}"
        for which in sets
        for what in ("a short message alone", "a short message after the earlier one (the engine)")
    ]
    # (the quick mode times the first few items' follow-up and aside)
    assert all(row.n == 2 * followups.QUICK_TIMED and 0 < row.value <= row.p95 for row in timings)
    assert len(result.rows) == len(sets) * (2 * 2 * (4 * 2 + 3) + 2)
