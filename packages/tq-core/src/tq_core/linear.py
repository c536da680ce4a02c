"""TurboQuantLinear: a drop-in for ``nn.Linear`` with TurboQuant-coded weights."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .weight_layer import TurboQuantWeights, compute_dtype


class TurboQuantLinear(TurboQuantWeights):
    """``y = (s ⊙ C[idx]) (R x) + b``: rotate the activation once, multiply by the codebook
    weights in the rotated basis; with QJL add ``(gamma ⊙ z) (S R x)``. A registered fused
    kernel runs the product where it applies; the reference path dequantizes, then
    ``matmul``."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = False,
        bits: int = 4,
        group_size: int = 64,
        seed: int = 0,
        span: int | None = None,
        use_qjl: bool = False,
    ):
        super().__init__((output_dims, input_dims), bits, group_size, seed, span, use_qjl)
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @property
    def output_dims(self) -> int:
        return self.indices.shape[0]

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int,
        group_size: int,
        seed: int = 0,
        span: int | None = None,
        scale_method: str = "lsq",
        use_qjl: bool = False,
    ) -> TurboQuantLinear:
        out_dims, in_dims = linear.weight.shape
        layer = cls(in_dims, out_dims, "bias" in linear, bits, group_size, seed, span, use_qjl)
        layer.set_weight(linear.weight, scale_method)
        if "bias" in linear:
            layer.bias = linear.bias
        layer.freeze()
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        group = self.__dict__.get("_siblings")
        # A sibling's launch already computed this product for this very x, or this call
        # launches the group (siblings.py): most projections of a decode step, so it skips
        # the product's layers.
        y = None if group is None else group.call(self, x)
        if y is None:
            dtype = compute_dtype(x)
            # A plain layer's product is the fused kernel first (dense_product): asked
            # straight, without those frames, every decode step.
            if type(self) is TurboQuantLinear:
                y = self.fused_rotating_matmul(x, dtype)
            if y is None:
                y = self.product(x, dtype)
        dtype = y.dtype
        if "bias" in self:
            y = y + self.bias.astype(dtype)
        return y.astype(x.dtype)

    def product(self, x: mx.array, dtype) -> mx.array:
        """``W^ x`` in ``dtype``, without the bias (a row-parallel shard sums these partial
        products across ranks before adding the bias once)."""
        return self.dense_product(x, dtype)
