"""TurboQuantEmbedding: a drop-in for ``nn.Embedding`` (and a tied output head)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .rotation import rotate, unrotate
from .weight_layer import TurboQuantWeights, compute_dtype
from .weights import QuantizedWeight, dequantize_weight_rotated


class TurboQuantEmbedding(TurboQuantWeights):
    """Rows of the table coded with TurboQuant along the embedding dimension. A lookup
    un-rotates only the rows it reads; ``as_linear`` (tied heads) rotates the activation."""

    def __init__(
        self,
        num_embeddings: int,
        dims: int,
        bits: int = 4,
        group_size: int = 64,
        seed: int = 0,
        span: int | None = None,
    ):
        super().__init__((num_embeddings, dims), bits, group_size, seed, span)

    @classmethod
    def from_embedding(
        cls, emb: nn.Embedding, bits: int, group_size: int, seed=0, span=None, scale_method="lsq"
    ) -> TurboQuantEmbedding:
        num, dims = emb.weight.shape
        layer = cls(num, dims, bits, group_size, seed, span)
        layer.set_weight(emb.weight, scale_method)
        layer.freeze()
        return layer

    def __call__(self, ids: mx.array) -> mx.array:
        rows = QuantizedWeight(self.indices[ids], self.scales[ids], self.bits, self.group_size)
        out = unrotate(dequantize_weight_rotated(rows), self.rotation())
        # The residual stream starts here: float32 on the CPU, the stored dtype on a GPU.
        return out.astype(mx.float32 if mx.default_device() == mx.cpu else self.scales.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        dtype = compute_dtype(x)
        w = dequantize_weight_rotated(self.codes(), dtype=dtype)
        return (rotate(x.astype(dtype), self.rotation()) @ w.T).astype(x.dtype)
