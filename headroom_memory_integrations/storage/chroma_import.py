"""Importing chromadb about a third sooner.

chromadb marks some 160 methods with the ``overrides`` package's ``@override``. At class
creation, that decorator reads the bytecode of the defining frame to find the base classes and
compares each method's signature and type hints with the base's: checks of chromadb's own code
(which its test suite runs anyway) that took ~100 ms of the ~380 ms of importing chromadb and
opening an embedded client (measured on 2 cores, after ``import openai``). On the first answer,
that import is the slowest step.

:func:`import_chromadb` imports chromadb with the decorator reduced to what the rest of
``overrides`` relies on (it marks the method, which ``EnforceOverrides`` looks for), then puts
the original back. Nothing else changes: chromadb's classes and methods are the same objects.
Where chromadb is already imported, or ``overrides`` is not laid out as expected, it is a plain
import.

The import also runs with Python's cyclic garbage collector paused (turned on again after,
unless the application had turned it off): chromadb's modules create tens of thousands of
objects that live as long as the process, and the collector scanned them again and again as
they were made, a full collection among them (~45 ms of the first answer after ``import
openai``; one collection of the new objects follows the import instead).

Two modules chromadb imports but never uses in an embedded store are also put off until first
used (:data:`DEFERRED`, ~115 ms together): httpx's command-line client (``httpx._main``, which
loads click, rich and pygments for ``httpx.main``) and OpenTelemetry's OTLP span exporter (with
gRPC and protobuf, only built when Chroma's tracing is configured). While chromadb imports, each
is a stand-in whose names import the real module when called; afterwards the stand-in leaves
``sys.modules``, so any later import of either gets the real module.
"""

from __future__ import annotations

import gc
import importlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any

_lock = threading.Lock()
_NAMES = ("override", "overrides")
DEFERRED = {
    "httpx._main": ("main",),
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter": ("OTLPSpanExporter",),
}
"""Modules put off while chromadb imports: module -> the names chromadb takes from it."""


def import_chromadb(*submodules: str) -> ModuleType:
    """``chromadb``, with these of its submodules imported too (``"chromadb.api.rust"`` is
    what an embedded client loads, ``"chromadb.api.fastapi"`` a server client)."""
    wanted = ("chromadb", *submodules)
    if any(name not in sys.modules for name in wanted):
        with _lock, _collection_paused(), _override_checks_skipped(), _modules_deferred():
            importlib.import_module("chromadb")
            for name in submodules:
                # in another layout, chromadb imports what it needs itself
                with suppress(ImportError):
                    importlib.import_module(name)
    return sys.modules["chromadb"]


def import_http_client() -> None:
    """Import the HTTP library chromadb uses (``httpx``) now, on the calling thread.

    Chroma is opened, so chromadb imported, on a background thread (the first search's, the
    writer's). openai 3.x looks ``httpx`` up in ``sys.modules`` on every request (to accept
    that library's clients too), so while a background import of it was half done, the
    application's openai calls on other threads failed with ``AttributeError`` (partially
    initialized module). Importing it first, where the storage is built (~15 ms, its
    command-line client put off as above), leaves no such window."""
    if "httpx" in sys.modules:
        return
    with _lock, _modules_deferred(), suppress(ImportError):
        importlib.import_module("httpx")


@contextmanager
def _collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while chromadb imports (as it was, after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _mark(method: Any = None, **options: Any) -> Any:
    """``@override`` without its checks: marks the method (``@override(...)`` too)."""
    if method is None:
        return _mark
    method.__override__ = True
    return method


@contextmanager
def _override_checks_skipped() -> Iterator[None]:
    try:
        import overrides

        modules: tuple[ModuleType, ...] = (overrides, sys.modules["overrides.overrides"])
    except (ImportError, KeyError):
        yield
        return
    originals: list[tuple[ModuleType, str, Any]] = [
        (module, name, getattr(module, name, None)) for module in modules for name in _NAMES
    ]
    if not all(callable(original) for _, _, original in originals):
        yield
        return
    for module, name, _ in originals:
        setattr(module, name, _mark)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def _forwarder(module: str, name: str) -> Any:
    """A stand-in for ``module.name`` that calls the real one, imported on first call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


@contextmanager
def _modules_deferred() -> Iterator[None]:
    placed = {}
    for module, names in DEFERRED.items():
        if module in sys.modules:
            continue
        stand_in = ModuleType(module, "put off while chromadb imports (chroma_import.py)")
        for name in names:
            setattr(stand_in, name, _forwarder(module, name))
        placed[module] = sys.modules[module] = stand_in
    try:
        yield
    finally:
        for module, stand_in in placed.items():
            if sys.modules.get(module) is stand_in:
                del sys.modules[module]
