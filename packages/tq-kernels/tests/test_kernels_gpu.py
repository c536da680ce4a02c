"""Fused kernels against tq-core's reference on a GPU (skipped where MLX has none, as on CI).

The reference is computed in float32 (dequantize, then matmul); a GPU may round float32
matmuls through TF32 (~1e-3), so tolerances are relative to the output's largest entry and
sized for the activation dtype.
"""

import math

import mlx.core as mx
import pytest
from tq_core import QJLResidual, QuantizedWeight, dispatch, pack
from tq_core.weights import dequantize_weight_rotated, qjl_sketch_values
from tq_kernels import (
    LaunchConfig,
    dequantize,
    kernel_backend,
    matvec,
    register_all,
    rotating_weight_matmul,
    weight_gather_matmul,
    weight_matmul,
)

pytestmark = pytest.mark.skipif(kernel_backend() is None, reason="no GPU backend (Metal/CUDA)")

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


def test_layers_through_dispatch_match_reference_path():
    import mlx.nn as nn
    from tq_core import TurboQuantLinear

    register_all()
    lin = nn.Linear(1536, 320)
    layer = TurboQuantLinear.from_linear(lin, bits=3, group_size=64, use_qjl=True)
    x = mx.random.normal((1, 1, 1536), key=mx.random.key(0)).astype(mx.float16)
    fused = layer(x)
    with dispatch.reference_only():
        ref = layer(x)
    assert dispatch._kernels.get("weight_matmul") is weight_matmul
    assert not dispatch._failed
    assert rel_err(fused, ref.astype(mx.float32)) < 1e-2
    assert math.isfinite(mx.abs(fused).max().item())


def test_layers_rotating_path_matches_reference_path():
    import mlx.nn as nn
    from tq_core import TurboQuantEmbedding, TurboQuantLinear

    register_all()
    lin = TurboQuantLinear.from_linear(nn.Linear(576, 1536), bits=4, group_size=64)
    emb = TurboQuantEmbedding.from_embedding(nn.Embedding(1000, 576), bits=3, group_size=64)
    for x in (mx.random.normal((1, 1, 576)), mx.random.normal((1, 2, 576))):
        for dt in (mx.float16, mx.bfloat16):
            xd = x.astype(dt)
            fused_lin, fused_head = lin(xd), emb.as_linear(xd)
            with dispatch.reference_only():
                ref_lin, ref_head = lin(xd), emb.as_linear(xd)
            assert rel_err(fused_lin, ref_lin.astype(mx.float32)) < TOL[dt]
            assert rel_err(fused_head, ref_head.astype(mx.float32)) < TOL[dt]
    assert not dispatch._failed


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


def _quantized_llama(layers: int, seed: int):
    """A llama of random weights (d 512, ffn 1536, 8 query / 2 KV heads), quantized to 3 bits
    (sibling groups, replay-ready MLPs), float16, with the kernels registered."""
    from mlx_lm.models import llama
    from tq_core import QuantRecipe, quantize_model

    register_all()
    args = llama.ModelArgs(
        model_type="llama", hidden_size=512, num_hidden_layers=layers, intermediate_size=1536,
        num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300,
        tie_word_embeddings=True,
    )  # fmt: skip
    mx.random.seed(seed)
    model = llama.Model(args)
    quantize_model(model, QuantRecipe(bits=3, group_size=64))
    model.set_dtype(mx.float16)
    return model


def test_llama_decode_with_sibling_groups_matches_reference_path():
    from tq_core.siblings import SiblingGroup

    model = _quantized_llama(layers=2, seed=0)
    assert isinstance(model.model.layers[0].self_attn.q_proj.__dict__["_siblings"], SiblingGroup)
    group = model.model.layers[0].mlp.gate_proj.__dict__["_siblings"]
    for tok in ([[3]], [[4]], [[4], [9]]):
        t = mx.array(tok)
        fused = model(t)
        # The fused plan ran (reference_only below invalidates it, so look now).
        assert group.plans.entries[((t.shape[0], 1, 512), mx.float16)].plan is not None
        with dispatch.reference_only():
            ref = model(t)
        assert rel_err(fused, ref.astype(mx.float32)) < 1e-2
    assert not dispatch._failed


def test_replayed_decode_mlp_matches_reference_path(monkeypatch):
    """A llama MLP of TurboQuant projections replaying its compiled decode trace (tq_core's
    decode_mlp: the fused plans recorded once, replayed from C++) against the reference."""
    import tq_core.decode_mlp as decode_mlp

    monkeypatch.setattr(decode_mlp, "REPLAY", True)
    model = _quantized_llama(layers=1, seed=1)
    mlp = model.model.layers[0].mlp
    xs = [mx.random.normal((1, 1, 512)).astype(mx.float16) for _ in range(5)]
    with dispatch.reference_only():
        want = [mlp(x) for x in xs]
        mx.eval(want)
    got = []
    for x in xs:  # plain (builds the plans), traced, then replayed
        got.append(mlp(x))
        mx.eval(got[-1])
    entry = mlp.__dict__["_tq_replay"].entries[(xs[0].shape, mx.float16)]
    assert entry[0] == "replay"
    for g, w in zip(got, want):
        assert rel_err(g, w.astype(mx.float32)) < 1e-2
    assert not dispatch._failed


def test_replayed_decode_blocks_match_reference_path(monkeypatch):
    """Llama decoder blocks replaying their two compiled decode traces around an fp16 KV cache
    (tq_core's decode_block: the fused plans and RoPE at an offset array, recorded once)
    against the reference path, step for step."""
    import tq_core.decode_block as decode_block
    from mlx_lm.models.cache import KVCache

    monkeypatch.setattr(decode_block, "REPLAY", True)
    model = _quantized_llama(layers=2, seed=2)
    prompt = mx.array([[5, 17, 42, 7, 99, 3]])

    def run():
        cache = [KVCache() for _ in model.layers]
        out = [model(prompt, cache=cache)[:, -1]]
        for t in range(8):
            out.append(model(mx.array([[t + 10]]), cache=cache)[:, -1])
            mx.eval(out[-1])
        return out

    with dispatch.reference_only():
        want = run()
    got = run()
    for layer in model.layers:
        assert layer.__dict__["_tq_replay"].entries[((1, 1, 512), mx.float16)][0] == "replay"
    for g, w in zip(got, want):
        assert rel_err(g, w.astype(mx.float32)) < 1e-2
    assert not dispatch._failed


def test_replayed_gpt_oss_blocks_match_the_plain_kernels(monkeypatch):
    """GPT-OSS decoder blocks (tq_core's decode_block: sinks, windows) and their MoE blocks
    of TurboQuant experts (decode_moe: router, top-k, the gather kernels, weighting)
    replaying their compiled decode traces, against the same
    kernels called plainly, whole-model decode steps over mlx-lm's caches (against the
    reference path a near-tie in the router could pick other experts; the gather kernel
    itself is checked against the reference above)."""
    import tq_core.decode_moe as decode_moe
    from mlx_lm.models import gpt_oss
    from mlx_lm.models.cache import make_prompt_cache
    from tq_core import QuantRecipe, quantize_model

    monkeypatch.setattr(decode_moe, "REPLAY", True)
    register_all()
    args = gpt_oss.ModelArgs(
        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=4, vocab_size=300,
        hidden_size=512, intermediate_size=512, head_dim=64, num_attention_heads=8,
        num_key_value_heads=2, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    mx.random.seed(4)
    model = gpt_oss.Model(args)
    quantize_model(model, QuantRecipe(bits=3, group_size=64))
    model.set_dtype(mx.float16)

    def run():
        cache = make_prompt_cache(model)
        out = [model(mx.array([[5, 17, 42, 7, 99, 3]]), cache=cache)[:, -1]]
        for t in range(8):
            out.append(model(mx.array([[t + 10]]), cache=cache)[:, -1])
            mx.eval(out[-1])
        return out

    import tq_core.decode_block as decode_block

    for module in (decode_moe, decode_block):  # GPT-OSS blocks replay around their caches too
        monkeypatch.setattr(module, "REPLAY", False)
    want = run()
    for module in (decode_moe, decode_block):
        monkeypatch.setattr(module, "REPLAY", True)
    got = run()
    for layer in model.model.layers:
        block_entry = layer.__dict__["_tq_replay"].entries[((1, 1, 512), mx.float16)]
        assert block_entry[0] == "replay"
        entries = layer.mlp.__dict__["_tq_moe_replay"]
        assert entries[((1, 1, 512), mx.float16)][0] == "replay"
    for g, w in zip(got, want):
        assert rel_err(g, w.astype(mx.float32)) < 1e-2
    assert not dispatch._failed
