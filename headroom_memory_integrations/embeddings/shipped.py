"""Small learned arrays shipped beside a model (its query adapter, its message gate), each
loaded once per process, on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

Built = TypeVar("Built")


class PerModel(Generic[Built]):
    """The object built from the array file of each model that has one (by embedder ``name``)."""

    def __init__(self, files: Mapping[str, Path], build: Callable[[np.ndarray], Built]) -> None:
        self.files = files
        self._build = build
        self._loaded: dict[str, Built | None] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str) -> Built | None:
        """The object for ``model``, or None where no file was shipped for it."""
        path = self.files.get(model)
        if path is None:
            return None
        with self._lock:
            if model not in self._loaded:
                self._loaded[model] = self._build(np.load(path)) if path.exists() else None
            return self._loaded[model]
