"""Shared state of TurboQuant weight layers: packed indices, fp16 group scales, rotation."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .pack import packed_words
from .rotation import Rotation, random_signs
from .weights import QuantizedWeight, quantize_weight, weight_rotation


def compute_dtype(x: mx.array):
    """float32 on the CPU (its float16 matmul is ~60x slower), the input's dtype on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else x.dtype


class TurboQuantWeights(nn.Module):
    """Base of the TurboQuant layers: codes of a (..., out, in) weight and its rotation.

    The rotation is along the input dimension, in blocks of ``span`` (default: group size),
    signs drawn from ``seed``; layers with the same input size and seed share it, so one
    rotated activation serves them all. The signs are stored with the layer.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        bits: int,
        group_size: int,
        seed: int = 0,
        span: int | None = None,
    ):
        super().__init__()
        *lead, out_dims, in_dims = shape
        if in_dims % group_size:
            raise ValueError(f"group_size={group_size} must divide the input dimension {in_dims}")
        self.bits, self.group_size, self.seed = bits, group_size, seed
        self.span = span or group_size
        self.indices = mx.zeros((*lead, out_dims, packed_words(in_dims, bits)), dtype=mx.uint32)
        self.scales = mx.zeros((*lead, out_dims, in_dims // group_size), dtype=mx.float16)
        self.signs = random_signs(in_dims, seed).astype(mx.float16)
        self.freeze()

    @property
    def input_dims(self) -> int:
        return self.signs.shape[0]

    def rotation(self) -> Rotation:
        return Rotation(self.input_dims, self.span, self.seed, self.signs.astype(mx.float32))

    def codes(self) -> QuantizedWeight:
        return QuantizedWeight(self.indices, self.scales, self.bits, self.group_size)

    def set_weight(self, weight: mx.array, scale_method: str = "lsq") -> None:
        """Quantize ``weight`` into this layer's codes."""
        rot = weight_rotation(weight.shape[-1], self.group_size, self.seed, self.span)
        q = quantize_weight(weight, self.bits, self.group_size, rot, scale_method)
        self.indices, self.scales = q.indices, q.scales

    def _extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, span={self.span}, seed={self.seed}"
