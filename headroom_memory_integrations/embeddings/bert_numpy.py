"""The BERT forward pass in numpy: the fallback where ONNX Runtime is not installed.

It needs nothing beyond numpy and gives the same vectors as the ONNX Runtime pass, at about
half its speed (numpy's BLAS runs the matrix products; elementwise work is numpy's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Vectors
from .bert import Array, BertEncoder, TokenIds


def _erf(x: Array) -> Array:
    """erf to ~1e-7 (Abramowitz & Stegun 7.1.26): float32 precision, no scipy needed."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = (
        (((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592
    ) * t
    return sign * (1.0 - poly * np.exp(-a * a))


def _layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    mean = x.mean(-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(-1, keepdims=True)
    return centered / np.sqrt(variance + eps) * weight + bias


class NumpyBertEncoder(BertEncoder):
    """Embeddings, post-norm transformer layers and mean pooling with numpy.

    BLAS runs on at most ``threads`` threads while encoding (restored afterwards, when no other
    thread of the process still needs it limited: :func:`.storage.vectors.few_blas_threads`):
    on a small machine, BLAS threads competing for cores make a batch 10-15 times slower.
    """

    def _load(self, weights: dict[str, Array]) -> None:
        self._words = weights["embeddings.word_embeddings.weight"]
        self._positions = weights["embeddings.position_embeddings.weight"]
        self._token_type = weights["embeddings.token_type_embeddings.weight"][0]
        self._embed_norm = (
            weights["embeddings.LayerNorm.weight"],
            weights["embeddings.LayerNorm.bias"],
        )
        self._layers = []
        for index in range(self.layers):
            layer = self.layer_weights(weights, index)
            parts = ("query", "key", "value")
            layer["qkv"] = np.concatenate([layer.pop(p) for p in parts], axis=1)
            layer["qkv_bias"] = np.concatenate([layer.pop(f"{p}_bias") for p in parts])
            self._layers.append(layer)

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, *, keep_end: bool = False
    ) -> Vectors:
        from ..storage.vectors import few_blas_threads

        with few_blas_threads(self.threads):
            return super().encode(texts, batch_size, keep_end=keep_end)

    def _forward(self, ids: TokenIds, mask: Array) -> Array:
        batch, length = ids.shape
        eps, heads = self.eps, self.heads
        head_dim = self.dimension // heads
        x = self._words[ids] + self._positions[:length] + self._token_type
        x = _layer_norm(x, *self._embed_norm, eps)
        attention_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1.0 / np.sqrt(head_dim))
        for w in self._layers:
            qkv = (x @ w["qkv"] + w["qkv_bias"]).reshape(batch, length, 3, heads, head_dim)
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + attention_bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, self.dimension)
            x = _layer_norm(
                context @ w["out"] + w["out_bias"] + x, w["norm1"], w["norm1_bias"], eps
            )
            hidden = x @ w["up"] + w["up_bias"]
            hidden = np.float32(0.5) * hidden * (1.0 + _erf(hidden * np.float32(1 / np.sqrt(2))))
            x = _layer_norm(
                hidden @ w["down"] + w["down_bias"] + x, w["norm2"], w["norm2_bias"], eps
            )
        pooled: Array = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled
