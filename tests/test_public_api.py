"""The package's top level: the names users import, and that importing it stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import headroom_memory_integrations as package

PUBLIC = [
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_MIN_SCORE",
    "MAX_TEXT_CHARS",
    "Category",
    "ChromaStorage",
    "Embedder",
    "EmbeddingError",
    "EmbeddingMismatchError",
    "HeadroomMemoryError",
    "InvalidCategoryError",
    "InvalidInputError",
    "LocalEmbedder",
    "Memory",
    "MemoryNotFoundError",
    "MemoryStore",
    "MissingDependencyError",
    "NewMemory",
    "OpenAIEmbedder",
    "Outcome",
    "Remembered",
    "Revision",
    "RollingWindowTransform",
    "SearchResult",
    "Source",
    "StorageError",
    "__version__",
    "with_fast_memory",
    "with_memory",
]


def test_all_is_pinned_and_every_name_resolves() -> None:
    assert sorted(package.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(package, name) is not None
    assert set(PUBLIC) <= set(dir(package))


def test_the_seed_imports_work_from_the_top_level() -> None:
    from headroom_memory_integrations import RollingWindowTransform, with_fast_memory, with_memory
    from headroom_memory_integrations.openai import with_fast_memory as direct
    from headroom_memory_integrations.transforms import RollingWindowTransform as transform

    assert with_fast_memory is direct and RollingWindowTransform is transform
    assert callable(with_memory)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        package.with_slow_memory  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "with_slow_memory" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_package_loads_no_framework_model_or_database() -> None:
    code = (
        "import json, sys; import headroom_memory_integrations; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(
        json.loads(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
    )
    heavy = {"openai", "chromadb", "onnxruntime", "torch", "langchain_core", "llama_index"}
    assert loaded & heavy == set()
