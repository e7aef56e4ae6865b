"""The BERT forward pass on ONNX Runtime: the default for the bundled model.

No exported model file is shipped or downloaded, and the ``onnx`` package is not used. The
graph (~200 operators, a few KB) is written here from the model's config (by
:mod:`.onnx_format`), and the checkpoint's tensors are handed to ONNX Runtime as in-memory
initializers, without copying them into the graph. ONNX Runtime fuses a few patterns (bias +
GELU, scaled matrix products) and runs the matrix products with its own kernels: in float32 a
query embeds in ~3.5-4.5 ms on one core (numpy: ~6-7 ms), a batch ~4x faster than numpy's, with
the same vectors. (Writing the graph with ONNX Runtime's fused attention and layer-norm
operators was measured too: no faster.) With ``int8=True`` (the default embedder's form) the
layers' matrix products run in 8-bit integers: ~3x faster again, the vectors a little further
from the original's (see :class:`OnnxBertEncoder`); their 8-bit matrices ship ready-made
(:data:`INT8_FILE`), so loading does no numpy arithmetic.

Each ``run`` uses its own call's thread (``threads`` intra-op threads), so a foreground query
and a background batch can embed at once without sharing a process-wide thread setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

# onnxruntime's Linux wheels (1.24 on) collect usage events by default: a device id and an
# event cache under ~/.cache/Microsoft, and an uploader that calls Microsoft's servers. The
# local model is sold as private and offline, so they are off unless the application set the
# variable itself; it is read when onnxruntime starts, so it must be set before the import.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort

from . import onnx_format
from .bert import LAYER_MATRICES, Array, BertEncoder, TokenIds, read_safetensors

OPSET = 17  # LayerNormalization is a standard operator from 17 on
INT8_FILE = "model.int8.safetensors"
"""The file, beside ``model.safetensors``, of the layers' matrices already in 8-bit form
(:func:`int8_layer_matrices`), written by ``scripts/quantize_model.py``. Read where present
(mapped: no arithmetic at load). Otherwise ONNX Runtime quantizes the float matrices as it
loads the graph: the same numbers, outside the GIL, ~0.15 s more."""
COLUMN_SCALES = ":column_scales"
_EXTERNAL_TYPES = {np.dtype(np.int8): onnx_format.INT8, np.dtype(np.float16): onnx_format.FLOAT16}


def int8_columns(matrix: Array) -> tuple[Array, Array]:
    """A checkpoint's ``(out, in)`` matrix as the ``(in, out)`` int8 matrix ``x @ W`` takes
    and one scale per output column (symmetric: the largest magnitude of each column maps to
    127)."""
    rows = matrix.astype(np.float32)  # a copy: scaled in place below
    scales = np.abs(rows).max(axis=1) / np.float32(127.0)
    scales[scales == 0] = 1.0
    np.divide(rows, scales[:, None], out=rows)  # now within [-127, 127]
    quantized = np.rint(rows, out=rows).astype(np.int8)
    return np.ascontiguousarray(quantized.T), scales.astype(np.float32)


def int8_matrix_names(layers: int) -> list[str]:
    """The checkpoint's names (``bert.`` prefix removed) of the matrices the 8-bit form runs
    in integers: the six of each layer."""
    return [
        f"encoder.layer.{index}.{name}.weight"
        for index in range(layers)
        for name in LAYER_MATRICES.values()
    ]


def int8_layer_matrices(weights: dict[str, Array], layers: int) -> dict[str, Array]:
    """The layers' matrices as the 8-bit form takes them: for each name of
    :func:`int8_matrix_names`, the :func:`int8_columns` matrix under the name and its scales
    under the name + ``":column_scales"``. What :data:`INT8_FILE` holds."""
    tensors: dict[str, Array] = {}
    for name in int8_matrix_names(layers):
        tensors[name], tensors[name + COLUMN_SCALES] = int8_columns(weights[name])
    return tensors


def read_int8_layer_matrices(
    model_dir: Path, weights: dict[str, Array], layers: int
) -> dict[str, Array] | None:
    """The :func:`int8_layer_matrices` of ``model_dir``'s :data:`INT8_FILE` (mapped, not
    read), or None where the folder has no such file. A file that lacks a matrix, or holds
    one of another shape or type than ``weights`` imply, is an error rather than a model
    silently built from other weights."""
    path = model_dir / INT8_FILE
    if not path.is_file():
        return None
    stored = {name.removeprefix("bert."): array for name, array in read_safetensors(path).items()}
    for name in int8_matrix_names(layers):
        columns, scales = stored.get(name), stored.get(name + COLUMN_SCALES)
        rows, width = weights[name].shape
        if (
            columns is None
            or scales is None
            or columns.dtype != np.int8
            or columns.shape != (width, rows)
            or scales.dtype != np.float32
            or scales.shape != (rows,)
        ):
            raise ValueError(
                f"{path} does not match model.safetensors at {name!r}: remake it with "
                "scripts/quantize_model.py, or delete it"
            )
    return stored


def session_options(threads: int) -> ort.SessionOptions:
    """ONNX Runtime's options for the model's session, on ``threads`` intra-op threads.

    The 8-bit products are computed exactly on every x86 CPU. Without VNNI instructions (AVX2
    only: many AMD EPYC and older Intel CPUs), ONNX Runtime's kernel adds each pair of
    (unsigned activation x signed weight) products in a 16-bit register, which saturates for
    large activations and weights: the vectors came out different from those of a CPU with
    VNNI, which adds in 32 bits (a question's cosine to a memory moved by up to 0.07, 0.009
    on average, over 1.5 million pairs), and thresholds measured on one held less on the other.
    ``session.x64quantprecision`` makes ONNX Runtime run such products in its exact kernel on
    those CPUs (0.1-0.2 ms more a query on an AMD EPYC), and changes nothing on the others."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    if threads > 1:  # idle workers sleep rather than spin on a small machine
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.x64quantprecision", "1")
    return options


class _Graph:
    """Collects ONNX nodes and initializers; each method returns its output's name."""

    def __init__(self) -> None:
        self.nodes: list[bytes] = []
        self.initializers: list[bytes] = []
        self.external: dict[str, Array] = {}  # large tensors, handed over in memory
        self.domains: set[str] = set()  # operator sets used besides the standard one

    def op(self, kind: str, *inputs: str, domain: str = "", **attributes: Any) -> str:
        output = f"{kind}_{len(self.nodes)}"
        self.nodes.append(onnx_format.node(kind, inputs, [output], domain, **attributes))
        if domain:
            self.domains.add(domain)
        return output

    def constant(self, value: Any, dtype: type = np.float32) -> str:
        """A small tensor, stored in the graph."""
        name = f"constant_{len(self.initializers)}"
        self.initializers.append(onnx_format.tensor(name, np.asarray(value, dtype=dtype)))
        return name

    def weight(self, array: Array, widen: bool = True) -> str:
        """A model tensor, which ONNX Runtime will read from our memory, not from the graph.
        A float16 one is widened by a Cast that ONNX Runtime folds as it loads the graph, or
        left float16 with ``widen=False``."""
        name = f"weight_{len(self.external)}"
        self.external[name] = np.ascontiguousarray(array)
        if array.dtype == np.float16 and widen:
            self.initializers.append(
                onnx_format.external_tensor(name, array.shape, onnx_format.FLOAT16)
            )
            return self.op("Cast", name, to=onnx_format.FLOAT)
        kind = _EXTERNAL_TYPES.get(array.dtype, onnx_format.FLOAT)
        self.initializers.append(onnx_format.external_tensor(name, array.shape, kind))
        return name

    def model(self, output: str) -> bytes:
        inputs = [
            onnx_format.value_info("input_ids", onnx_format.INT64, ["batch", "length"]),
            onnx_format.value_info("mask", onnx_format.FLOAT, ["batch", "length"]),
        ]
        outputs = [onnx_format.value_info(output, onnx_format.FLOAT, ["batch", "dimension"])]
        domains = [(domain, 1) for domain in sorted(self.domains)]
        return onnx_format.model(
            "bert", self.nodes, self.initializers, inputs, outputs, OPSET, domains
        )


class OnnxBertEncoder(BertEncoder):
    """The encoder on ONNX Runtime's CPU provider.

    Args:
        int8: Run the matrix products of the layers in 8-bit integers
            (:func:`int8_columns`, read from :data:`INT8_FILE` where the model folder has it;
            ONNX Runtime's ``DynamicQuantizeMatMul``), ~3x faster and
            within :data:`.local.INT8_TOLERANCE` of the float32 vectors. Each text is then encoded
            alone: the activations are quantized with one scale per call, so a text in a
            batch would get a vector that depends on the other texts.
    """

    int8 = False

    def __init__(self, model_dir: Path, *, int8: bool = False, **options: Any) -> None:
        self.int8 = int8
        if int8:
            self.max_batch = 1
        super().__init__(model_dir, **options)

    # the checkpoint's float16 tensors are handed over as they are, widened and transposed by
    # ONNX Runtime as it loads the graph (constant folding, outside the GIL; the embedding
    # tables' rows are widened as they are picked, on each run): on the first answer, the
    # model loads beside the Chroma import on another thread
    widens_float16 = True

    def _load(self, weights: dict[str, Array]) -> None:
        quantized = None
        if self.int8:
            quantized = read_int8_layer_matrices(self.model_dir, weights, self.layers)
        graph = _Graph()
        self._output = self._build(graph, weights, quantized)
        options = session_options(self.threads)
        names = list(graph.external)
        # the session reads these buffers for its whole life: keep them referenced
        self._weights = [ort.OrtValue.ortvalue_from_numpy(graph.external[n]) for n in names]
        options.add_external_initializers(names, self._weights)
        self._session = ort.InferenceSession(
            graph.model(self._output), options, providers=["CPUExecutionProvider"]
        )

    def _forward(self, ids: TokenIds, mask: Array) -> Array:
        pooled: Array = self._session.run([self._output], {"input_ids": ids, "mask": mask})[0]
        return pooled

    def _build(
        self, g: _Graph, weights: dict[str, Array], quantized: dict[str, Array] | None = None
    ) -> str:
        """The forward pass as ONNX operators; returns the pooled output's name. The 8-bit
        form takes the layers' matrices from ``quantized`` (:func:`int8_layer_matrices`), or
        without it quantizes them in the graph."""
        hidden, heads, eps = self.dimension, self.heads, self.eps
        head_dim = hidden // heads

        def int8_columns_in_graph(matrix: Array) -> tuple[str, str]:
            """:func:`int8_columns` as operators on a constant, which ONNX Runtime computes
            (folds) as it loads the graph, outside the GIL (numpy's ~50 ms took ~250 ms on
            the first answer, beside the import of Chroma): the same numbers, as each step
            is exact or correctly rounded in float32 and both round halves to even."""
            rows = g.weight(matrix)  # float32 (a float16 matrix widened)
            largest = g.op("ReduceMax", g.op("Abs", rows), axes=[1], keepdims=0)
            scales = g.op("Div", largest, g.constant(127.0))
            zero = g.op("Equal", scales, g.constant(0.0))
            scales = g.op("Where", zero, g.constant(1.0), scales)
            column = g.op("Unsqueeze", scales, g.constant([1], np.int64))
            rounded = g.op("Round", g.op("Div", rows, column))
            quantized = g.op("Cast", rounded, to=onnx_format.INT8)
            return g.op("Transpose", quantized, perm=[1, 0]), scales

        def linear(x: str, w: dict[str, Array], name: str) -> str:
            if self.int8:  # ``index``: the layer the loop below is building
                matrix_name = f"encoder.layer.{index}.{LAYER_MATRICES[name]}.weight"
                if quantized is not None:
                    columns = g.weight(quantized[matrix_name])
                    scales = g.weight(quantized[matrix_name + COLUMN_SCALES])
                else:
                    columns, scales = int8_columns_in_graph(w[name])
                return g.op(
                    "DynamicQuantizeMatMul",
                    x,
                    columns,
                    scales,
                    "",  # no zero points: the quantization is symmetric
                    g.weight(w[f"{name}_bias"].astype(np.float32, copy=False)),
                    domain="com.microsoft",
                )
            # the checkpoint's (out, in) matrix, transposed as the graph loads
            matrix = g.op("Transpose", g.weight(w[name]), perm=[1, 0])
            return g.op("Add", g.op("MatMul", x, matrix), g.weight(w[f"{name}_bias"]))

        def layer_norm(x: str, weight: Array, bias: Array) -> str:
            return g.op(
                "LayerNormalization", x, g.weight(weight), g.weight(bias), axis=-1, epsilon=eps
            )

        def rows(table: Array, kind: str, *inputs: str) -> str:
            """The rows of a table that ``kind`` picks, widened to float32 once picked: the
            whole table widened as the graph loads would cost more than the rest of the load
            (the word embeddings are 30522 rows)."""
            picked = g.op(kind, g.weight(table, widen=False), *inputs)
            if table.dtype == np.float32:
                return picked
            return g.op("Cast", picked, to=onnx_format.FLOAT)

        # embeddings: word + position + token type 0, normalised
        words = rows(weights["embeddings.word_embeddings.weight"], "Gather", "input_ids")
        length = g.op("Shape", "input_ids", start=1, end=2)
        zero = g.constant([0], np.int64)
        positions = weights["embeddings.position_embeddings.weight"]
        positions_used = rows(positions, "Slice", zero, length, zero)
        token_type = g.weight(weights["embeddings.token_type_embeddings.weight"][0])
        x = g.op("Add", g.op("Add", words, positions_used), token_type)
        x = layer_norm(
            x, weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"]
        )

        padding = g.op("Sub", g.constant(1.0), "mask")
        attention_bias = g.op(
            "Unsqueeze", g.op("Mul", padding, g.constant(-1e9)), g.constant([1, 2], np.int64)
        )
        split_heads = g.constant([0, 0, heads, head_dim], np.int64)
        merge_heads = g.constant([0, 0, hidden], np.int64)
        scale = g.constant(1.0 / np.sqrt(head_dim))
        half, one, root2 = g.constant(0.5), g.constant(1.0), g.constant(np.sqrt(2.0))

        for index in range(self.layers):
            w = self.layer_weights(weights, index, transpose=False)
            # (batch, heads, length, head_dim); keys transposed for q @ k
            q, k, v = (
                g.op("Transpose", g.op("Reshape", linear(x, w, name), split_heads), perm=perm)
                for name, perm in (
                    ("query", [0, 2, 1, 3]),
                    ("key", [0, 2, 3, 1]),
                    ("value", [0, 2, 1, 3]),
                )
            )
            scores = g.op("Add", g.op("Mul", g.op("MatMul", q, k), scale), attention_bias)
            context = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
            context = g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]), merge_heads)
            attended = g.op("Add", linear(context, w, "out"), x)
            x = layer_norm(attended, w["norm1"], w["norm1_bias"])
            up = linear(x, w, "up")
            erf = g.op("Erf", g.op("Div", up, root2))
            gelu = g.op("Mul", g.op("Mul", up, half), g.op("Add", one, erf))
            x = layer_norm(g.op("Add", linear(gelu, w, "down"), x), w["norm2"], w["norm2_bias"])

        # mean over each row's real tokens
        mask = g.op("Unsqueeze", "mask", g.constant([2], np.int64))
        axis1 = g.constant([1], np.int64)
        total = g.op("ReduceSum", g.op("Mul", x, mask), axis1, keepdims=0)
        return g.op("Div", total, g.op("ReduceSum", "mask", axis1, keepdims=1))
