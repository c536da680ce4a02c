"""TurboQuantEmbedding: a drop-in for ``nn.Embedding`` (and a tied output head)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .rotation import unrotate
from .weight_layer import TurboQuantWeights, compute_dtype
from .weights import (
    QJLResidual,
    QuantizedWeight,
    dequantize_qjl_rotated,
    dequantize_weight_rotated,
)


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
        use_qjl: bool = False,
    ):
        super().__init__((num_embeddings, dims), bits, group_size, seed, span, use_qjl)

    @classmethod
    def from_embedding(
        cls,
        emb: nn.Embedding,
        bits: int,
        group_size: int,
        seed=0,
        span=None,
        scale_method="lsq",
        use_qjl: bool = False,
    ) -> TurboQuantEmbedding:
        num, dims = emb.weight.shape
        layer = cls(num, dims, bits, group_size, seed, span, use_qjl)
        layer.set_weight(emb.weight, scale_method)
        layer.freeze()
        return layer

    def __call__(self, ids: mx.array) -> mx.array:
        rows = QuantizedWeight(self.indices[ids], self.scales[ids], self.bits, self.group_size)
        rotated = dequantize_weight_rotated(rows)
        if self.use_qjl:
            res = QJLResidual(self.qjl_signs[ids], self.qjl_scales[ids], self.group_size)
            rotated = rotated + dequantize_qjl_rotated(res, self.sketch())
        out = unrotate(rotated, self.rotation())
        # The residual stream starts here: float32 on the CPU, the stored dtype on a GPU.
        return out.astype(mx.float32 if mx.default_device() == mx.cpu else self.scales.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.dense_product(x, compute_dtype(x)).astype(x.dtype)
