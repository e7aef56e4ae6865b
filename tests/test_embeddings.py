"""The embedders: every local backend gives sentence-transformers' vectors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from headroom_memory_integrations import Embedder, LocalEmbedder
from headroom_memory_integrations.embeddings.local import bundled_model_dir

TEXTS = [
    "I prefer Python for backend work",
    "What language should I use?",
    "Ünïcödé and emoji 🙂 survive tokenization",
    "A much longer sentence " * 40,  # past the 256-token truncation
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return LocalEmbedder(backend="sentence-transformers").embed(TEXTS)


@pytest.mark.parametrize("backend", ["auto", "onnx", "numpy"])
def test_local_backends_match_sentence_transformers(backend: str, reference: np.ndarray) -> None:
    ours = LocalEmbedder(backend=backend).embed(TEXTS)  # type: ignore[arg-type]
    assert ours.shape == reference.shape == (4, 384)
    np.testing.assert_allclose((ours * reference).sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_the_default_backend_is_onnx_runtime(model: LocalEmbedder) -> None:
    from headroom_memory_integrations.embeddings.bert_onnx import OnnxBertEncoder

    assert isinstance(model._encoder(), OnnxBertEncoder)


def test_threads_embed_at_once_and_each_gets_its_own_vectors(model: LocalEmbedder) -> None:
    """A foreground query and a background batch share one ONNX Runtime session."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [[f"{text} #{i}" for text in TEXTS] for i in range(8)]
    expected = [model.embed(batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(model.embed, batches))
    for mine, theirs in zip(got, expected):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)


def test_vectors_are_unit_length_and_batch_independent(model: LocalEmbedder) -> None:
    batch = model.embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([model.embed([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batch, one_by_one, atol=1e-5)
    assert model.embed([]).shape == (0, 384)


def test_meaning(model: LocalEmbedder) -> None:
    a, b, c = model.embed(
        ["Prefers Python for backend work", "Which language should I use?", "What is 2+2?"]
    )
    assert float(a @ b) > 0.3 > float(a @ c)


def test_default_model_resolves_to_the_offline_copy() -> None:
    folder = bundled_model_dir()
    assert folder is not None and (folder / "tokenizer.json").exists()
    assert isinstance(LocalEmbedder(), Embedder)
    assert LocalEmbedder("sentence-transformers/all-MiniLM-L6-v2").name == "all-MiniLM-L6-v2"


def test_a_missing_model_folder_is_a_clear_error(tmp_path) -> None:
    from headroom_memory_integrations import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="no local copy"):
        LocalEmbedder(str(tmp_path), backend="numpy").embed(["x"])


def test_thread_count_can_be_configured(monkeypatch) -> None:
    from headroom_memory_integrations.embeddings.local import cpu_threads

    monkeypatch.setenv("HEADROOM_MEMORY_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.setenv("HEADROOM_MEMORY_THREADS", "many")
    assert cpu_threads() == (1 if (os.cpu_count() or 1) <= 2 else min(os.cpu_count() or 1, 8))


@pytest.mark.openai_client
def test_openai_embedder_over_real_http(openai_server, db_path) -> None:
    from headroom_memory_integrations import MemoryStore, OpenAIEmbedder

    embedder = OpenAIEmbedder(openai_server.client(), batch_size=2)
    assert embedder.dimension == 1536 and embedder.name == "openai/text-embedding-3-small"
    vectors = embedder.embed(["a", "b", "c"])  # two requests of at most two texts
    assert vectors.shape == (3, 1536)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    calls = [r for r in openai_server.requests if r.path == "/v1/embeddings"]
    assert [c.body["input"] for c in calls] == [["a", "b"], ["c"]]
    assert embedder.embed([]).shape == (0, 1536)

    store = MemoryStore("alice", db_path=db_path, embedder=embedder)
    store.add("Prefers Python for backend work")
    assert store.search("Prefers Python for backend work")[0].score > 0.99
    assert "sk-" not in repr(embedder)
    shorter = OpenAIEmbedder(openai_server.client(), dimensions=256)
    assert shorter.embed(["x"]).shape == (1, 256) and shorter.name.endswith("@256")


@pytest.mark.openai_client
def test_wrapper_with_openai_embeddings(openai_server, db_path) -> None:
    from headroom_memory_integrations.openai import with_fast_memory

    client = with_fast_memory(
        openai_server.async_client(), user_id="alice", db_path=db_path, use_local_embeddings=False
    )
    assert client.memory.embedder.name == "openai/text-embedding-3-small"
    client.memory.add("Prefers Python for backend work")
    assert client.memory.stats()["embedding_dimension"] == 1536
