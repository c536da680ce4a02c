"""TurboQuantSwitchLinear: a drop-in for mlx-lm's ``SwitchLinear`` (MoE experts)."""

from __future__ import annotations

import mlx.core as mx

from .rotation import rotate
from .weight_layer import TurboQuantWeights, compute_dtype
from .weights import QuantizedWeight, dequantize_weight_rotated


class TurboQuantSwitchLinear(TurboQuantWeights):
    """Experts (E, out, in) coded with TurboQuant. All experts share one rotation, so the
    activation is rotated once whichever experts the router picks."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        bias: bool = False,
        bits: int = 4,
        group_size: int = 64,
        seed: int = 0,
        span: int | None = None,
    ):
        super().__init__((num_experts, output_dims, input_dims), bits, group_size, seed, span)
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    @property
    def output_dims(self) -> int:
        return self.indices.shape[1]

    @property
    def num_experts(self) -> int:
        return self.indices.shape[0]

    @classmethod
    def from_switch_linear(
        cls, layer, bits: int, group_size: int, seed: int = 0, span=None, scale_method="lsq"
    ) -> TurboQuantSwitchLinear:
        num_experts, out_dims, in_dims = layer.weight.shape
        has_bias = "bias" in layer
        q = cls(in_dims, out_dims, num_experts, has_bias, bits, group_size, seed, span)
        q.set_weight(layer.weight, scale_method)
        if has_bias:
            q.bias = layer.bias
        q.freeze()
        return q

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False):
        dtype = compute_dtype(x)
        xr = rotate(x.astype(dtype), self.rotation())
        if indices.size < self.num_experts:
            # Few tokens (decode): dequantize only the experts the router picked.
            flat = indices.flatten()
            picked = QuantizedWeight(
                self.indices[flat], self.scales[flat], self.bits, self.group_size
            )
            w = dequantize_weight_rotated(picked, dtype=dtype)
            rhs = mx.arange(flat.size).reshape(indices.shape)
        else:
            w = dequantize_weight_rotated(self.codes(), dtype=dtype)
            rhs = indices
        y = mx.gather_mm(xr, w.swapaxes(-1, -2), rhs_indices=rhs, sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices].astype(dtype), -2)
        return y.astype(x.dtype)
