"""What the local BERT sentence encoders share: the model folder, tokenisation, batching and
mean pooling. A subclass supplies the transformer's forward pass (ONNX Runtime or numpy).

The model is a folder (``config.json``, ``tokenizer.json``, ``model.safetensors``) of a BERT
encoder with mean pooling, such as all-MiniLM-L6-v2: a sentence-transformers folder, or the
compact copy this package ships (float16 matrices, widened to float32 when loaded). On the same
weights, both forward passes give sentence-transformers' vectors (max difference ~2e-7).
"""

from __future__ import annotations

import json
import mmap
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .base import Vectors

Array = npt.NDArray[np.float32]
TokenIds = npt.NDArray[np.int64]


SCALE_SUFFIX = ":scale"
LAYER_MATRICES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "out": "attention.output.dense",
    "up": "intermediate.dense",
    "down": "output.dense",
}
"""The matrix products of each transformer layer: short name -> the checkpoint's name within
``encoder.layer.<n>.`` (each has a ``.weight`` and a ``.bias``)."""
_SAFETENSORS_TYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "I32": np.int32,
    "I64": np.int64,
}


def read_safetensors(path: Path) -> dict[str, npt.NDArray[Any]]:
    """The tensors of a ``.safetensors`` file (an 8-byte header length, a JSON header, the
    raw data), as arrays over a copy-on-write map of the file rather than read into memory.

    safetensors' own loader reads and copies the bundled model in ~30 ms with the GIL held, on
    the first answer's path beside the import of Chroma; this takes ~0.4 ms, and the pages are
    read when the forward pass's loader touches them (ONNX Runtime: outside the GIL).
    """
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    (length,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8 : 8 + length])
    start_of_data = 8 + length
    tensors: dict[str, npt.NDArray[Any]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        kind = _SAFETENSORS_TYPES.get(entry["dtype"])
        if kind is None:
            raise ValueError(f"{path.name}: tensor {name!r} is {entry['dtype']}, not read here")
        start, end = entry["data_offsets"]
        dtype = np.dtype(kind)
        if not 0 <= start <= end <= len(mapped) - start_of_data:
            raise ValueError(f"{path.name}: tensor {name!r} lies outside the file")
        flat = np.frombuffer(
            mapped, dtype, count=(end - start) // dtype.itemsize, offset=start_of_data + start
        )
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


def float32_weights(
    tensors: dict[str, npt.NDArray[Any]], keep_float16: bool = False
) -> dict[str, Array]:
    """A checkpoint's tensors as float32, whatever form they were stored in (float16 ones
    left as they are with ``keep_float16``, for a forward pass that widens them itself).

    float32 tensors are kept as they are, float16 ones widened, all in one pass: on the first
    answer the model loads beside the import of Chroma on another thread, where each numpy
    call releases the GIL and waits to take it back, so a hundred calls cost several times one
    (the ONNX Runtime encoder widens them in its graph instead, outside the GIL). An int8
    tensor ``name`` comes with a ``name:scale`` tensor (one scale per row, broadcast along
    the row) and becomes ``int8 * scale``. (The bundled model stores float16;
    scripts/build_local_model.py can write int8 rows too.)
    """
    weights: dict[str, Array] = {}
    halves = [
        name
        for name, array in tensors.items()
        if array.dtype == np.float16 and not name.endswith(SCALE_SUFFIX)
    ]
    if keep_float16:
        weights.update((name, tensors[name]) for name in halves)
    elif halves:  # widened in one pass, each tensor a view of the result
        widened = np.concatenate([tensors[name].ravel() for name in halves]).astype(np.float32)
        start = 0
        for name in halves:
            size = tensors[name].size
            weights[name] = widened[start : start + size].reshape(tensors[name].shape)
            start += size
    for name, array in tensors.items():
        if name.endswith(SCALE_SUFFIX) or name in weights:
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is not None:
            weights[name] = array.astype(np.float32) * scale.astype(np.float32)
        else:
            weights[name] = array.astype(np.float32, copy=False)
    return weights


class BertEncoder(ABC):
    """Mean-pooled, normalised BERT sentence embeddings.

    Args:
        model_dir: A model folder (see the module docstring).
        max_tokens: Longer texts are truncated (sentence-transformers' ``max_seq_length``):
            a text to store keeps its first ``max_tokens`` tokens, a query its last ones
            (``encode(..., keep_end=True)``: the question of a long message usually comes last).
        threads: CPU threads while encoding.
        chunk_workers: Chunks of a large batch encoded at once, each on a thread of its own
            (for a forward pass that runs outside the GIL on ``threads`` threads).

    Attributes:
        config: The model's ``config.json``.
        dimension: Length of the vectors.
    """

    def __init__(
        self, model_dir: Path, max_tokens: int = 256, threads: int = 1, chunk_workers: int = 1
    ) -> None:
        from tokenizers import Tokenizer

        self.model_dir = model_dir
        self.threads = threads
        self.chunk_workers = chunk_workers
        self.config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        self.dimension: int = self.config["hidden_size"]
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_tokens)
        self._max_tokens = max_tokens
        self._tail_tokenizer: Tokenizer | None = None  # made on the first long query
        self._tail_tokenizer_lock = threading.Lock()
        weights = float32_weights(
            read_safetensors(model_dir / "model.safetensors"), keep_float16=self.widens_float16
        )
        self._load({name.removeprefix("bert."): array for name, array in weights.items()})

    def _tokenizer_of_ends(self) -> Any:
        """A tokenizer that truncates a long text from the left, keeping its last tokens
        (made when first needed: loading one takes ~0.1 s)."""
        with self._tail_tokenizer_lock:
            if self._tail_tokenizer is None:
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
                tokenizer.no_padding()
                tokenizer.enable_truncation(self._max_tokens, direction="left")
                self._tail_tokenizer = tokenizer
            return self._tail_tokenizer

    widens_float16 = False  # whether _load takes float16 tensors as they are
    max_batch: int | None = None  # most texts one forward pass may take (None: batch_size)

    @abstractmethod
    def _load(self, weights: dict[str, Array]) -> None:
        """Prepare the forward pass from the checkpoint's tensors (``bert.`` prefix removed),
        float32, or float16 too where :attr:`widens_float16` says so."""

    @abstractmethod
    def _forward(self, ids: TokenIds, mask: Array) -> Array:
        """The mean of the last hidden states over each row's real tokens, ``(batch, dim)``.

        ``ids`` is right-padded with zeros; ``mask`` is 1.0 on real tokens, 0.0 on padding.
        """

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, *, keep_end: bool = False
    ) -> Vectors:
        """Mean-pooled vectors of ``texts`` (not yet normalised); similar lengths are batched
        together to waste little on padding, and with :attr:`chunk_workers` above 1 the chunks
        of a large batch are encoded on that many threads at once (the same vectors; see
        :func:`balanced_chunks`). A text longer than ``max_tokens`` is read from its start,
        or with ``keep_end`` (queries) up to its end."""
        encodings = self._tokenizer.encode_batch(list(texts))
        if keep_end:
            long = [i for i, encoding in enumerate(encodings) if encoding.overflowing]
            if long:
                tails = self._tokenizer_of_ends().encode_batch([texts[i] for i in long])
                for i, tail in zip(long, tails):
                    encodings[i] = tail
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        result = np.zeros((len(texts), self.dimension), dtype=np.float32)

        def encode_chunk(chunk: list[int]) -> None:
            rows = [encodings[i].ids for i in chunk]
            ids = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
            mask = np.zeros(ids.shape, dtype=np.float32)
            for row, row_ids in enumerate(rows):
                ids[row, : len(row_ids)] = row_ids
                mask[row, : len(row_ids)] = 1.0
            result[chunk] = self._forward(ids, mask)

        chunks = balanced_chunks(order, min(batch_size, self.max_batch or batch_size))
        if self.chunk_workers > 1 and len(chunks) > 1:
            from concurrent.futures import ThreadPoolExecutor

            try:
                with ThreadPoolExecutor(min(self.chunk_workers, len(chunks))) as pool:
                    list(pool.map(encode_chunk, chunks))  # list(): re-raise a chunk's error
                return result
            except RuntimeError as exc:  # no new threads (the interpreter is shutting down)
                if "shutdown" not in str(exc):
                    raise
        for chunk in chunks:
            encode_chunk(chunk)
        return result

    def layer_weights(
        self, weights: dict[str, Array], layer: int, transpose: bool = True
    ) -> dict[str, Array]:
        """One transformer layer's tensors under short names: ``query``, ``key``, ``value``,
        ``out``, ``up``, ``down`` and their ``*_bias``; ``norm1``/``norm2`` and their
        ``*_bias``. The matrices are laid out for ``x @ W`` (the checkpoint stores them
        transposed), or left as stored with ``transpose=False``."""
        prefix = f"encoder.layer.{layer}."
        tensors: dict[str, Array] = {}
        for short, name in LAYER_MATRICES.items():
            matrix = weights[f"{prefix}{name}.weight"]
            tensors[short] = np.ascontiguousarray(matrix.T) if transpose else matrix
            tensors[f"{short}_bias"] = weights[f"{prefix}{name}.bias"]
        for short, name in (("norm1", "attention.output.LayerNorm"), ("norm2", "output.LayerNorm")):
            tensors[short] = weights[f"{prefix}{name}.weight"]
            tensors[f"{short}_bias"] = weights[f"{prefix}{name}.bias"]
        return tensors

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def eps(self) -> float:
        return float(self.config.get("layer_norm_eps", 1e-12))


def balanced_chunks(items: list[int], most: int) -> list[list[int]]:
    """``items`` cut in order into chunks of at most ``most`` and of equal sizes (within one),
    an even number of them when there are several, so that two threads share them evenly: 100
    texts are 4 chunks of 25, not 32, 32, 32 and 4, whose last round would keep one thread idle
    while the other encodes 32 texts. The cut does not depend on the number of threads, so
    neither do the vectors."""
    count = -(-len(items) // most)
    if count > 1 and most > 1:
        count += count % 2
    size, extra = divmod(len(items), max(count, 1))
    chunks, start = [], 0
    for index in range(count):
        stop = start + size + (index < extra)
        chunks.append(items[start:stop])
        start = stop
    return chunks
