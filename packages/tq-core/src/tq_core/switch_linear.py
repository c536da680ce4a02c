"""TurboQuantSwitchLinear: a drop-in for mlx-lm's ``SwitchLinear`` (MoE experts)."""

from __future__ import annotations

import mlx.core as mx

from . import dispatch
from .weight_layer import TurboQuantWeights, compute_dtype
from .weights import QJLResidual, QuantizedWeight, dequantize_weight_rotated, qjl_sketch_values


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
        use_qjl: bool = False,
    ):
        super().__init__(
            (num_experts, output_dims, input_dims), bits, group_size, seed, span, use_qjl
        )
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
        cls,
        layer,
        bits: int,
        group_size: int,
        seed: int = 0,
        span=None,
        scale_method="lsq",
        use_qjl: bool = False,
    ) -> TurboQuantSwitchLinear:
        num_experts, out_dims, in_dims = layer.weight.shape
        has_bias = "bias" in layer
        q = cls(in_dims, out_dims, num_experts, has_bias, bits, group_size, seed, span, use_qjl)
        q.set_weight(layer.weight, scale_method)
        if has_bias:
            q.bias = layer.bias
        q.freeze()
        return q

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False):
        dtype = compute_dtype(x)
        x_rot, x_sketch = self.rotated_inputs(x, dtype)
        y = dispatch.call_kernel(
            "weight_gather_matmul",
            x_rot,
            self.codes(),
            indices,
            sorted_indices,
            self.qjl(),
            x_sketch,
        )
        if y is None:
            y = self._reference(x_rot, x_sketch, indices, sorted_indices, dtype)
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices].astype(dtype), -2)
        return y.astype(x.dtype)

    def _reference(self, x_rot, x_sketch, indices, sorted_indices, dtype):
        codes, qjl = self.codes(), self.qjl()
        rhs = indices
        if indices.size < self.num_experts:
            # Few tokens (decode): dequantize only the experts the router picked.
            flat = indices.flatten()
            codes = QuantizedWeight(
                self.indices[flat], self.scales[flat], self.bits, self.group_size
            )
            if qjl is not None:
                qjl = QJLResidual(self.qjl_signs[flat], self.qjl_scales[flat], self.group_size)
            rhs = mx.arange(flat.size).reshape(indices.shape)
        w = dequantize_weight_rotated(codes, dtype=dtype).swapaxes(-1, -2)
        y = mx.gather_mm(x_rot, w, rhs_indices=rhs, sorted_indices=sorted_indices)
        if qjl is not None:
            z = qjl_sketch_values(qjl, dtype=dtype).swapaxes(-1, -2)
            y = y + mx.gather_mm(x_sketch, z, rhs_indices=rhs, sorted_indices=sorted_indices)
        return y
