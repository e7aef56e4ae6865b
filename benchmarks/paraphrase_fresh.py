"""The fresh paraphrase set alone: ``python -m benchmarks --only paraphrase-fresh`` (the
``paraphrase`` section runs it too, after the runs of the first set; see
``benchmarks/paraphrase.py``)."""

from __future__ import annotations

from .paraphrase import run_fresh as run

__all__ = ["run"]
