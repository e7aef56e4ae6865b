"""The follow-ups benchmark (benchmarks/followups.py): its blind set is whole, with keys for
every fact, and a run at 0 memories besides reports each way of asking, on both halves, with
and without the keys."""

from __future__ import annotations

from pathlib import Path

from benchmarks import followups
from benchmarks.common import Context
from benchmarks.paraphrase import KEYED, fact_keys
from headroom_memory_integrations.keys import key_questions


def test_the_followups_set_is_whole_with_two_halves() -> None:
    items = followups.load()
    assert len(items) == 120 and len({item["id"] for item in items}) == 120
    fields = {"id", "domain", "fact", "earlier", "follow_up", "aside"}
    assert all(set(item) == fields and all(item.values()) for item in items)
    assert all(2 <= len(item["follow_up"].split()) <= 6 for item in items)
    halves = [followups._half(item) for item in items]
    assert halves.count("dev") == halves.count("held-out") == 60
    assert len({item["fact"] for item in items}) == 120
    keys = fact_keys(items, followups.KEYS)  # the same ids in the same order
    assert all(len(key_questions(k)) == 4 for k in keys)


def test_a_quick_run_reports_every_way_of_asking_on_both_halves(tmp_path: Path) -> None:
    ctx = Context(quick=True, workdir=tmp_path, cache=tmp_path / "cache")
    result = followups.run(ctx)
    assert set(result.details) == {"0", "0" + KEYED}
    runs = [result.details["0"], result.details["0" + KEYED]]
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
    assert len(result.rows) == 2 * 2 * (4 * 2 + 3)
