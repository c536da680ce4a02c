"""Shared test helpers for tq-core: device-aware closeness for float32 matmul results, fake
``rotating_matmul_plan`` and ``rotating_matmul_residual_plan`` kernels (mlx ops on the CPU,
counting builds and launches) and a tiny quantized llama."""

from contextlib import contextmanager

import mlx.core as mx
import pytest
from tq_core import QuantRecipe, dispatch, quantize_model
from tq_core.rotation import rotate
from tq_core.weights import dequantize_weight_rotated


def _relative_error(a: mx.array, b: mx.array) -> float:
    scale = max(mx.abs(b).max().item(), 1e-12)
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() / scale


@pytest.fixture
def assert_close():
    """``assert_close(got, want)``: max error relative to want's largest entry. A CPU computes
    float32 matmuls exactly enough for 1e-5; a GPU may round them through TF32 (~1e-3)."""
    limit = 1e-5 if mx.default_device() == mx.cpu else 5e-3

    def check(got, want, rel=None):
        assert got.shape == want.shape, (got.shape, want.shape)
        err = _relative_error(got, want)
        assert err <= (rel or limit), f"relative error {err:.2e} > {rel or limit:.0e}"

    return check


@pytest.fixture
def needs_hadamard():
    """``needs_hadamard(n)``: skip when this backend has no kernel for size n (mlx 0.32.4's
    CUDA backend cannot build m = 20 or 28), after checking the error is the clear one."""
    from tq_core import hadamard

    def check(n: int) -> None:
        try:
            mx.eval(hadamard(mx.zeros((1, n))))
        except ValueError as e:
            assert "is not available on" in str(e)
            pytest.skip(str(e))

    return check


class FakePlans:
    """A ``rotating_matmul_plan`` kernel computed with mlx ops, counting builds and launches."""

    def __init__(self):
        self.builds, self.launches, self.widths = 0, 0, []

    def __call__(self, x, codes, rotation):
        if x.size > 2 * x.shape[-1]:
            return None  # like the real kernel: decode rows only
        self.builds += 1
        weights = [dequantize_weight_rotated(c, dtype=x.dtype) for c in codes]

        def plan(x2):
            assert x2.shape == x.shape and x2.dtype == x.dtype
            self.launches += 1
            self.widths.append(len(weights))
            xr = rotate(x2, rotation)
            return [xr @ w.T for w in weights]

        return plan

    def residual(self, x, codes, rotation):
        """The ``rotating_matmul_residual_plan`` kernel: ``plan(x2, r) -> [r + ...]``."""
        inner = self(x, codes, rotation) if len(codes) == 1 else None
        if inner is None:
            return None
        return lambda x2, r: [r + inner(x2)[0]]


@contextmanager
def fake_kernels():
    """A :class:`FakePlans` registered for both plan ops; the kernels registered before (an
    installed tq-kernels' own, on a GPU machine) are registered again afterwards, so later
    tests in the process still get them."""
    kernel = FakePlans()
    dispatch._load_providers()  # an installed tq-kernels must not replace the fake later
    before = {op: dispatch._kernels.get(op) for op in dispatch.OPS}
    dispatch.register_kernel("rotating_matmul_plan", kernel)
    dispatch.register_kernel("rotating_matmul_residual_plan", kernel.residual)
    try:
        yield kernel
    finally:
        for op, fn in before.items():
            if fn is None:
                dispatch.unregister_kernel(op)
            else:
                dispatch.register_kernel(op, fn)
        dispatch._failed.clear()


@pytest.fixture
def fake():
    with fake_kernels() as kernel:
        yield kernel


def _tiny_llama():
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    mx.random.seed(0)
    model = llama.Model(args)
    quantize_model(model, QuantRecipe(bits=3, group_size=64))
    mx.eval(model.parameters())
    return model


@pytest.fixture
def tiny_llama_model():
    """``tiny_llama_model()``: a 2-layer llama of random weights, quantized to 3 bits."""
    return _tiny_llama


def _tiny_gpt_oss(**overrides):
    from mlx.utils import tree_map
    from mlx_lm.models import gpt_oss

    kw = dict(
        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=64,
        hidden_size=128, intermediate_size=128, head_dim=32, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    mx.random.seed(0)
    model = gpt_oss.Model(gpt_oss.ModelArgs(**{**kw, **overrides}))
    # Random sinks and biases too (they start at zero), so a step that drops one shows.
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.fixture
def tiny_gpt_oss():
    """``tiny_gpt_oss(**overrides)``: a 2-layer GPT-OSS of random weights (float), 8 experts
    of 128, top-2, windows of 16 on alternate layers."""
    return _tiny_gpt_oss
