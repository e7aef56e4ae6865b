"""The paraphrase needles with model-written keys alone: ``python -m benchmarks --only
paraphrase-keys`` (the ``paraphrase`` section runs it too, after the run without keys; see
``benchmarks/paraphrase.py``)."""

from __future__ import annotations

from .paraphrase import run_keyed as run

__all__ = ["run"]
