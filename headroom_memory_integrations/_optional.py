"""Optional dependencies: the adapters import their framework only when they are imported."""

from __future__ import annotations

import importlib

from .errors import MissingDependencyError


def require(*modules: str, extra: str) -> None:
    """Import ``modules`` or raise :class:`MissingDependencyError` naming the pip command that
    installs ``extra``."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingDependencyError.for_extra(module, extra) from exc
