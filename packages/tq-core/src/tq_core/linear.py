"""TurboQuantLinear: a drop-in for ``nn.Linear`` with TurboQuant-coded weights."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .rotation import rotate
from .weight_layer import TurboQuantWeights, compute_dtype
from .weights import dequantize_weight_rotated


class TurboQuantLinear(TurboQuantWeights):
    """``y = (s ⊙ C[idx]) (R x) + b``: rotate the activation once, multiply by the codebook
    weights in the rotated basis (reference path: dequantize, then ``matmul``)."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = False,
        bits: int = 4,
        group_size: int = 64,
        seed: int = 0,
        span: int | None = None,
    ):
        super().__init__((output_dims, input_dims), bits, group_size, seed, span)
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
    ) -> TurboQuantLinear:
        out_dims, in_dims = linear.weight.shape
        layer = cls(in_dims, out_dims, "bias" in linear, bits, group_size, seed, span)
        layer.set_weight(linear.weight, scale_method)
        if "bias" in linear:
            layer.bias = linear.bias
        layer.freeze()
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        dtype = compute_dtype(x)
        w = dequantize_weight_rotated(self.codes(), dtype=dtype)
        y = rotate(x.astype(dtype), self.rotation()) @ w.T
        if "bias" in self:
            y = y + self.bias.astype(dtype)
        return y.astype(x.dtype)
