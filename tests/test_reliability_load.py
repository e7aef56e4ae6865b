"""The load benchmark's short form (benchmarks/load.py): wrapped calls, sync and async, for four
users at once for 20 s against the scripted server. No call fails, no failure is survived
silently, and every acknowledged memory is stored afterwards."""

from __future__ import annotations

from benchmarks.load import drive
from headroom_memory_integrations import flow


def test_a_sustained_load_loses_nothing_and_fails_nothing(tmp_path, model, monkeypatch) -> None:
    # Correctness, not speed (that is the benchmark's): a machine shared with others stalled a
    # recall past its 11 s bound in a CI run, and the call went on without memories as it should
    monkeypatch.setattr(flow, "LOCAL_RECALL_SECONDS", 120.0)
    report = drive(tmp_path / "memories", seconds=20, prefill=50, window=5, embedder=model)
    assert report["errors"] == 0, report["error_examples"]
    assert report["wrapper_failures"] == {}, report["counters"]
    assert report["calls"] > 20 and report["acknowledged_writes"] >= 4
    assert report["flushed"] and report["missing_after_flush"] == 0, report["missing_examples"]
    found, sampled = map(int, report["latest_write_found_by_search"].split("/"))
    assert found == sampled == 4
    assert len(report["over_time"]) >= 3  # latency and rate reported per 5 s window
