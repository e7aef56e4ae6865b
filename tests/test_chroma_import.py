"""Importing chromadb with ``overrides``' class-creation checks skipped
(storage/chroma_import.py): in a fresh interpreter, none of those checks runs during the import,
the decorator is the original again afterwards, chromadb's methods are still marked as overrides,
and an embedded store opened that way works; the garbage collector waits out the import and is
left as it was. The modules put off during the import are not loaded by it, and work in full
when used afterwards."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from headroom_memory_integrations.storage.chroma_import import _collection_paused

CHILD = textwrap.dedent(
    """
    import gc, json, sys
    import overrides
    checks = sys.modules["overrides.overrides"]
    original = overrides.override
    validated = []
    real_validate = checks._validate_method
    def counting(method, super_class, check_signature):
        validated.append(method.__qualname__)
        return real_validate(method, super_class, check_signature)
    checks._validate_method = counting

    from headroom_memory_integrations.storage.chroma_import import DEFERRED, import_chromadb
    collections = []
    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])
    gc.callbacks.append(count)
    chromadb = import_chromadb("chromadb.api.rust")
    gc.callbacks.remove(count)
    from chromadb.api.rust import RustBindingsAPI
    during_import = len(validated)

    class Base:
        def greet(self, name: str) -> str:
            return name
    try:
        class Broken(Base):
            @overrides.override
            def greet(self, name: int, extra: int) -> str:
                return ""
        checked_after = False
    except TypeError:
        checked_after = True

    put_off = [name for name in DEFERRED if name in sys.modules]
    from chromadb.telemetry import opentelemetry as chroma_tracing
    exporter = chroma_tracing.OTLPSpanExporter(endpoint="http://127.0.0.1:9")
    import httpx
    import httpx._main
    import click

    from headroom_memory_integrations import MemoryStore
    store = MemoryStore("someone", db_path=sys.argv[1])
    stored = store.add("Prefers tea to coffee").text
    found = [memory.text for memory, _ in store.search("tea or coffee?", min_score=-1)]
    print(json.dumps({
        "validated_during_import": during_import,
        "collections_during_import": collections,
        "collector_enabled_after": gc.isenabled(),
        "restored": overrides.override is original and checks.override is original,
        "marked": getattr(RustBindingsAPI._count, "__override__", False),
        "checked_after": checked_after,
        "loaded_by_the_import": put_off,
        "exporter": type(exporter).__module__ + "." + type(exporter).__name__,
        "cli_is_real": isinstance(httpx._main.main, click.Command),
        "httpx_main_reaches_it": httpx.main.__name__ == "main" and callable(httpx.main),
        "stored": stored,
        "found": found,
    }))
    """
)


def test_the_collector_is_left_as_it_was() -> None:
    assert gc.isenabled()
    with _collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with _collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # an application that turned it off keeps it off
    finally:
        gc.enable()


def test_chromadb_is_imported_without_the_checks_and_the_decorator_restored(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["validated_during_import"] == 0
    # the cyclic collector waits out the import (~50 ms of the first answer): at most the one
    # collection of the youngest objects as it is turned on again
    assert result["collections_during_import"] in ([], [0])
    assert result["collector_enabled_after"] is True
    assert result["restored"] is True
    assert result["marked"] is True
    assert result["checked_after"] is True  # other code's @override still checks
    assert result["loaded_by_the_import"] == []
    assert result["exporter"] == (
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter.OTLPSpanExporter"
    )
    assert result["cli_is_real"] is True and result["httpx_main_reaches_it"] is True
    assert result["stored"] == "Prefers tea to coffee"
    assert result["found"] == ["Prefers tea to coffee"]


HTTP_CHILD = textwrap.dedent(
    """
    import json, sys
    import openai
    from headroom_memory_integrations import with_fast_memory
    before = "httpx" in sys.modules
    client = with_fast_memory(openai.OpenAI(api_key="sk-x"), user_id="alice", db_path=sys.argv[1])
    httpx = sys.modules.get("httpx")
    ready = httpx is not None and all(hasattr(httpx, n) for n in ("Timeout", "Client", "main"))
    print(json.dumps({"before": before, "ready": ready, "chromadb": "chromadb" in sys.modules}))
    """
)


def test_the_http_library_is_imported_where_the_storage_is_built(tmp_path: Path) -> None:
    """chromadb (imported on a background thread) brings ``httpx``, which openai 3.x looks up
    in ``sys.modules`` on every request: half imported, it failed the application's calls on
    other threads. It is imported when the wrapper is built, before any background thread."""
    done = subprocess.run(
        [sys.executable, "-c", HTTP_CHILD, str(tmp_path / "db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ready"] is True and result["chromadb"] is False
