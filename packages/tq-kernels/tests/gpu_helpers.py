"""Helpers of the GPU tests (loaded by file: importlib mode): random codes, the float32
reference product and the error measure. A GPU may round float32 matmuls through TF32
(~1e-3), so errors are relative to the output's largest entry and tolerances sized for the
activation dtype."""

import mlx.core as mx
from tq_core import QJLResidual, QuantizedWeight, pack
from tq_core.weights import dequantize_weight_rotated, qjl_sketch_values

TOL = {mx.float32: 5e-3, mx.float16: 5e-3, mx.bfloat16: 2e-2}
DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}


def random_codes(shape, bits, gs, seed=0, scale=0.05):
    """Random packed indices and positive fp16 scales for a (..., N, K) weight."""
    k1, k2 = mx.random.split(mx.random.key(seed))
    idx = mx.random.randint(0, 2**bits, shape, key=k1).astype(mx.uint32)
    groups = (*shape[:-1], shape[-1] // gs)
    scales = (scale * (0.5 + mx.random.uniform(shape=groups, key=k2))).astype(mx.float16)
    return QuantizedWeight(pack(idx, bits), scales, bits, gs)


def random_qjl(shape, gs, seed=1):
    k1, k2 = mx.random.split(mx.random.key(seed))
    bits = mx.random.randint(0, 2, shape, key=k1).astype(mx.uint32)
    groups = (*shape[:-1], shape[-1] // gs)
    scales = (0.01 * mx.random.uniform(shape=groups, key=k2)).astype(mx.float16)
    return QJLResidual(pack(bits, 1), scales, gs)


def reference(x, codes, qjl=None, xs=None):
    w = dequantize_weight_rotated(codes, dtype=mx.float32)
    y = x.astype(mx.float32) @ w.swapaxes(-1, -2)
    if qjl is not None:
        y = y + xs.astype(mx.float32) @ qjl_sketch_values(qjl).swapaxes(-1, -2)
    return y


def rel_err(got, want):
    scale = max(mx.abs(want).max().item(), 1e-12)
    return mx.abs(got.astype(mx.float32) - want).max().item() / scale
