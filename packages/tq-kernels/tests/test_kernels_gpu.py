"""Fused kernels against tq-core's reference on a GPU (skipped where MLX has none, as on CI):
matvec, rotating and sibling plans, the residual variant, dequantize, MoE gather. Whole
layers and models decoding through them: test_decode_models_gpu.py.

The reference is computed in float32 (dequantize, then matmul); a GPU may round float32
matmuls through TF32 (~1e-3), so tolerances are relative to the output's largest entry and
sized for the activation dtype (gpu_helpers.py).
"""

import importlib.util
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from tq_core import QuantizedWeight
from tq_core.weights import dequantize_weight_rotated, qjl_sketch_values
from tq_kernels import (
    LaunchConfig,
    dequantize,
    kernel_backend,
    matvec,
    rotating_weight_matmul,
    weight_gather_matmul,
    weight_matmul,
)

pytestmark = pytest.mark.skipif(kernel_backend() is None, reason="no GPU backend (Metal/CUDA)")

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tq_kernels_gpu_helpers", ROOT / "gpu_helpers.py")
helpers = sys.modules.setdefault("tq_kernels_gpu_helpers", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(helpers)
TOL, DTYPES = helpers.TOL, helpers.DTYPES
random_codes, random_qjl, reference, rel_err = (
    helpers.random_codes,
    helpers.random_qjl,
    helpers.reference,
    helpers.rel_err,
)


@pytest.fixture(autouse=True)
def _gpu():
    mx.set_default_device(mx.gpu)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_matvec_bits_and_group_sizes(bits, gs):
    n, k = 100, 1536  # 100 rows: not a multiple of 32, nor of the rows per threadgroup
    codes = random_codes((n, k), bits, gs, seed=bits * 7 + gs)
    x = mx.random.normal((1, k), key=mx.random.key(3)).astype(mx.float16)
    y = weight_matmul(x, codes)
    assert y.shape == (1, n) and y.dtype == mx.float16
    assert rel_err(y, reference(x, codes)) < TOL[mx.float16]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_matvec_dtypes_and_rows(dtype, rows):
    dt = DTYPES[dtype]
    n, k = 576, 576
    codes = random_codes((n, k), 3, 64, seed=rows)
    x = mx.random.normal((rows, k), key=mx.random.key(rows)).astype(dt)
    y = weight_matmul(x, codes)
    assert y.dtype == dt and y.shape == (rows, n)
    assert rel_err(y, reference(x, codes)) < TOL[dt]


@pytest.mark.parametrize(("n", "k"), [(2880, 2880), (1536, 576), (77, 14336), (14336, 128)])
def test_matvec_odd_shapes(n, k):
    codes = random_codes((n, k), 4, 64, seed=n)
    x = mx.random.normal((2, 3, k), key=mx.random.key(k)).astype(mx.bfloat16)
    y = weight_matmul(x, codes)
    assert y.shape == (2, 3, n)
    assert rel_err(y, reference(x, codes)) < TOL[mx.bfloat16]


@pytest.mark.parametrize(
    "cfg",
    [LaunchConfig(1, 1, 4), LaunchConfig(2, 2, 4), LaunchConfig(4, 4, 4), LaunchConfig(8, 2, 8)],
)
def test_matvec_every_launch_geometry(cfg):
    codes = random_codes((333, 2880), 3, 32, seed=5)
    x = mx.random.normal((4, 2880), key=mx.random.key(9)).astype(mx.float16)
    assert rel_err(matvec(x, codes, config=cfg), reference(x, codes)) < TOL[mx.float16]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_matvec_with_qjl(dtype, bits):
    dt = DTYPES[dtype]
    n, k, gs = 200, 1536, 64
    codes = random_codes((n, k), bits, gs, seed=bits)
    qjl = random_qjl((n, k), gs)
    x = mx.random.normal((1, k), key=mx.random.key(1)).astype(dt)
    xs = mx.random.normal((1, k), key=mx.random.key(2)).astype(dt)
    y = weight_matmul(x, codes, qjl, xs)
    assert rel_err(y, reference(x, codes, qjl, xs)) < TOL[dt]


@pytest.mark.parametrize("rows", [12, 16, 40])
@pytest.mark.parametrize("with_qjl", [False, True])
def test_many_rows_chunked_and_prefill(rows, with_qjl):
    n, k = 300, 1024
    codes = random_codes((n, k), 3, 64, seed=rows)
    qjl = random_qjl((n, k), 64) if with_qjl else None
    x = mx.random.normal((rows, k), key=mx.random.key(rows)).astype(mx.float16)
    xs = mx.random.normal((rows, k), key=mx.random.key(7)).astype(mx.float16) if qjl else None
    y = weight_matmul(x, codes, qjl, xs)
    assert rel_err(y, reference(x, codes, qjl, xs)) < TOL[mx.float16]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("k", "span"), [(576, 32), (576, 64), (1536, 128), (14336, 64)])
@pytest.mark.parametrize("rows", [1, 2])
def test_rotating_matvec_equals_rotate_then_matvec(dtype, k, span, rows):
    from tq_core.rotation import make_rotation, rotate

    dt = DTYPES[dtype]
    n = 77  # not a multiple of the rows per warp; K = 576 leaves lanes idle (18 blocks)
    codes = random_codes((n, k), 3, 64, seed=k + span)
    rot = make_rotation(k, seed=span, block=span)
    rot = type(rot)(rot.dim, rot.block, rot.seed, rot.signs.astype(dt))
    x = mx.random.normal((rows, 1, k), key=mx.random.key(rows)).astype(dt)
    got = rotating_weight_matmul(x, codes, rot)
    assert got is not None and got.shape == (rows, 1, n) and got.dtype == dt
    want = reference(rotate(x.astype(mx.float32), make_rotation(k, seed=span, block=span)), codes)
    assert rel_err(got, want) < TOL[dt]


@pytest.mark.parametrize(
    "cfg",
    [
        LaunchConfig(1, 1, 4),
        LaunchConfig(4, 4, 4),
        LaunchConfig(8, 2, 8),
        LaunchConfig(4, 2, 4, rotate_shared=False),
        LaunchConfig(2, 1, 8, rotate_shared=False),
    ],
)
def test_rotating_matvec_every_launch_geometry(cfg):
    from tq_core.rotation import make_rotation, rotate
    from tq_kernels import pack_sign_bits, rotating_matvec

    k = 2880  # 90 blocks of 32: a K-split leaves some warps' last step half idle
    rot = make_rotation(k, seed=3, block=64)
    codes = random_codes((333, k), 4, 32, seed=5)
    x = mx.random.normal((2, k), key=mx.random.key(9))
    got = rotating_matvec(x, codes, pack_sign_bits(rot.signs), 64, config=cfg)
    assert rel_err(got, reference(rotate(x, rot), codes)) < TOL[mx.float32]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("k", "span"), [(576, 32), (2048, 64), (8192, 128), (14336, 64)])
@pytest.mark.parametrize("rows", [1, 2])
def test_residual_plan_adds_the_residual_in_the_kernel(dtype, k, span, rows):
    """``rotating_matmul_residual_plan``: ``r + rotate(x) @ W.T`` in one launch, against the
    plain plan plus ``r`` (the sum rounded once instead of twice) and the reference."""
    from tq_core.rotation import make_rotation, rotate
    from tq_kernels import rotating_matmul_plan, rotating_matmul_residual_plan

    dt = DTYPES[dtype]
    n = 333
    codes = random_codes((n, k), 3, 64, seed=k)
    rot = make_rotation(k, seed=span, block=span)
    rot_dt = type(rot)(rot.dim, rot.block, rot.seed, rot.signs.astype(dt))
    x = mx.random.normal((rows, 1, k), key=mx.random.key(rows)).astype(dt)
    r = (10 * mx.random.normal((rows, 1, n), key=mx.random.key(7))).astype(dt)
    plan = rotating_matmul_residual_plan(x, [codes], rot_dt)
    assert plan is not None
    got = plan(x, r)[0]
    assert got.shape == (rows, 1, n) and got.dtype == dt
    unfused = r + rotating_matmul_plan(x, [codes], rot_dt)(x)[0]
    assert rel_err(got, unfused.astype(mx.float32)) < TOL[dt]
    want = r.astype(mx.float32) + reference(rotate(x.astype(mx.float32), rot), codes)
    assert rel_err(got, want) < TOL[dt]
    x2 = mx.random.normal(x.shape, key=mx.random.key(11)).astype(dt)  # the plan is reused
    want2 = r.astype(mx.float32) + reference(rotate(x2.astype(mx.float32), rot), codes)
    assert rel_err(plan(x2, r)[0], want2) < TOL[dt]
    assert rotating_matmul_residual_plan(x, [codes, codes], rot_dt) is None  # one weight only


@pytest.mark.parametrize(
    "cfg",
    [
        LaunchConfig(1, 1, 4),
        LaunchConfig(4, 4, 4),
        LaunchConfig(4, 2, 4, rotate_shared=False),
        LaunchConfig(2, 1, 8, rotate_shared=False),
    ],
)
def test_residual_in_every_launch_geometry(cfg):
    """Both epilogues (one warp per row group, and K-split warps meeting in shared memory)."""
    from tq_core.rotation import make_rotation, rotate
    from tq_kernels import pack_sign_bits, rotating_matvec

    k = 2880
    rot = make_rotation(k, seed=3, block=64)
    codes = random_codes((333, k), 4, 32, seed=5)
    x = mx.random.normal((2, k), key=mx.random.key(9))
    r = mx.random.normal((2, 333), key=mx.random.key(10))
    got = rotating_matvec(x, codes, pack_sign_bits(rot.signs), 64, config=cfg, residual=r)
    assert rel_err(got, r + reference(rotate(x, rot), codes)) < TOL[mx.float32]


def test_rotating_matvec_declines_what_it_cannot_do():
    from tq_core.rotation import make_rotation

    codes = random_codes((64, 576), 3, 64)
    x = mx.ones((3, 576), dtype=mx.float16)
    assert rotating_weight_matmul(x, codes, make_rotation(576, block=64)) is None  # 3 rows
    assert rotating_weight_matmul(x[:1], codes, make_rotation(576, block=192)) is None  # m=12


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_matches_reference_exactly(bits):
    codes = random_codes((3, 50, 640), bits, 128, seed=bits)
    got = dequantize(codes, mx.float32)
    want = dequantize_weight_rotated(codes, dtype=mx.float32)
    assert got.shape == want.shape
    assert mx.array_equal(got, want).item()


def test_zero_groups_and_extreme_scales():
    n, k = 96, 512
    codes = random_codes((n, k), 4, 64, seed=11)
    s = codes.scales.astype(mx.float32)
    s = mx.where(mx.arange(n)[:, None] % 3 == 0, 0.0, s)  # zero groups
    s = mx.where(mx.arange(n)[:, None] % 3 == 1, 6.0e4, s)  # near float16's max
    codes = QuantizedWeight(codes.indices, s.astype(mx.float16), 4, 64)
    x = mx.random.normal((1, k), key=mx.random.key(0)).astype(mx.float32)
    y = weight_matmul(x, codes)
    ref = reference(x, codes)
    assert mx.all(y[:, ::3] == 0).item()
    assert rel_err(y, ref) < TOL[mx.float32]


def test_nan_and_inf_propagate():
    n, k = 64, 256
    codes = random_codes((n, k), 3, 64, seed=2)
    x = mx.random.normal((2, k), key=mx.random.key(0)).astype(mx.float16)
    x = mx.where((mx.arange(2)[:, None] == 1) & (mx.arange(k)[None] == 5), mx.nan, x)
    y = weight_matmul(x, codes)
    assert not mx.any(mx.isnan(y[0])).item() and mx.all(mx.isnan(y[1])).item()
    s = mx.where(mx.arange(n)[:, None] == 7, mx.inf, codes.scales.astype(mx.float32))
    codes = QuantizedWeight(codes.indices, s.astype(mx.float16), 3, 64)
    xf = mx.random.normal((1, k), key=mx.random.key(1))
    got, ref = weight_matmul(xf, codes), reference(xf, codes)
    assert mx.array_equal(mx.isfinite(got), mx.isfinite(ref)).item()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("with_qjl", [False, True])
def test_gather_matvec_like_switch_glu(bits, with_qjl):
    e, n, k, topk = 8, 200, 576, 3
    codes = random_codes((e, n, k), bits, 64, seed=bits)
    qjl = random_qjl((e, n, k), 64) if with_qjl else None
    # mlx-lm's SwitchGLU: x (B, L, 1, 1, K), indices (B, L, top-k) -> (B, L, top-k, 1, N)
    x = mx.random.normal((1, 2, 1, 1, k), key=mx.random.key(0)).astype(mx.float16)
    xs = x[..., ::-1] if with_qjl else None
    idx = mx.array([[[0, 5, 7], [5, 2, 0]]], dtype=mx.uint32)
    got = weight_gather_matmul(x, codes, idx, False, qjl, xs)
    want = mx.gather_mm(
        x.astype(mx.float32),
        dequantize_weight_rotated(codes).swapaxes(-1, -2),
        rhs_indices=idx,
    )
    if qjl is not None:
        want = want + mx.gather_mm(
            xs.astype(mx.float32), qjl_sketch_values(qjl).swapaxes(-1, -2), rhs_indices=idx
        )
    assert got.shape == want.shape == (1, 2, topk, 1, n)
    assert rel_err(got, want) < TOL[mx.float16]


def test_gather_sorted_many_entries_uses_dequantized_experts():
    e, n, k = 4, 64, 256
    codes = random_codes((e, n, k), 3, 64, seed=4)
    idx = mx.sort(mx.random.randint(0, e, (40,), key=mx.random.key(1))).astype(mx.uint32)
    x = mx.random.normal((40, 1, k), key=mx.random.key(2)).astype(mx.float16)
    got = weight_gather_matmul(x, codes, idx, True)
    want = mx.gather_mm(
        x.astype(mx.float32),
        dequantize_weight_rotated(codes).swapaxes(-1, -2),
        rhs_indices=idx,
        sorted_indices=True,
    )
    assert rel_err(got, want) < TOL[mx.float16]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("ns", [(300, 77), (2048, 512, 512), (5, 96, 1)])
@pytest.mark.parametrize("rows", [1, 2])
def test_sibling_plan_equals_each_weight_alone(dtype, ns, rows):
    from tq_core.rotation import make_rotation, rotate
    from tq_kernels import rotating_matmul_plan

    dt, k = DTYPES[dtype], 1536
    codes = [random_codes((n, k), 3, 64, seed=i) for i, n in enumerate(ns)]
    rot32 = make_rotation(k, seed=4, block=64)
    rot = type(rot32)(rot32.dim, rot32.block, rot32.seed, rot32.signs.astype(dt))
    x = mx.random.normal((1, rows, k), key=mx.random.key(rows)).astype(dt)
    plan = rotating_matmul_plan(x, codes, rot)
    assert plan is not None
    for trial in range(2):  # the compiled launch replays on a new input
        xt = x if trial == 0 else mx.random.normal(x.shape, key=mx.random.key(9)).astype(dt)
        outs = plan(xt)
        assert [o.shape for o in outs] == [(1, rows, n) for n in ns]
        xr = rotate(xt.astype(mx.float32), rot32)
        for out, c in zip(outs, codes):
            assert out.dtype == dt
            assert rel_err(out, reference(xr, c)) < TOL[dt]
            alone = rotating_weight_matmul(xt, c, rot)
            assert rel_err(out, alone.astype(mx.float32)) < 1e-6 + (0 if dt == mx.float32 else 1e-3)


def test_sibling_plan_declines_mixed_weights():
    from tq_core.rotation import make_rotation
    from tq_kernels import rotating_matmul_plan

    rot = make_rotation(512, block=64)
    x = mx.ones((1, 512))
    a, b = random_codes((64, 512), 3, 64), random_codes((64, 512), 4, 64)
    assert rotating_matmul_plan(x, [a, b], rot) is None  # bits differ
    assert rotating_matmul_plan(x, [a, a, a, a], rot) is None  # more than 3
    assert rotating_matmul_plan(mx.ones((3, 512)), [a], rot) is None  # 3 rows
