"""Tests for the TurboQuant layers: each equals its dequantized float counterpart."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from tq_core import (
    TurboQuantEmbedding,
    TurboQuantLinear,
    TurboQuantSwitchLinear,
    dequantize_weight,
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_dims", [576, 1536, 2880])
def test_linear_equals_dequantized(bias, in_dims, assert_close):
    lin = nn.Linear(in_dims, 48, bias=bias)
    q = TurboQuantLinear.from_linear(lin, bits=3, group_size=64)
    x = mx.random.normal((2, 5, in_dims))
    ref = x @ dequantize_weight(q.codes(), q.rotation()).T + (lin.bias if bias else 0)
    assert_close(q(x), ref)
    rel = mx.abs(q(x) - lin(x)).max() / mx.abs(lin(x)).max()
    assert rel.item() < 0.4  # 3-bit weights, random input


def test_linear_dtypes_follow_input():
    q = TurboQuantLinear.from_linear(nn.Linear(128, 32), bits=4, group_size=32)
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        assert q(mx.ones((1, 128), dtype=dtype)).dtype == dtype


def test_switch_linear_decode_and_prefill_paths(assert_close):
    from mlx_lm.models.switch_layers import SwitchLinear

    sw = SwitchLinear(64, 32, 8, bias=True)
    q = TurboQuantSwitchLinear.from_switch_linear(sw, bits=4, group_size=32)
    full = dequantize_weight(q.codes(), q.rotation())
    for tokens in (1, 3, 40):  # 1-3 tokens: gathered experts only; 40: all experts
        x = mx.random.normal((tokens, 1, 1, 64))
        idx = mx.random.randint(0, 8, (tokens, 2))
        got = q(x, idx)
        ref = mx.gather_mm(x, full.swapaxes(-1, -2), rhs_indices=idx)
        ref = ref + mx.expand_dims(sw.bias[idx], -2)
        assert_close(got, ref)


def test_embedding_lookup_and_tied_head(assert_close):
    emb = nn.Embedding(100, 128)
    q = TurboQuantEmbedding.from_embedding(emb, bits=4, group_size=64)
    table = dequantize_weight(q.codes(), q.rotation())
    ids = mx.array([[0, 5, 99]])
    assert_close(q(ids), table[ids])
    x = mx.random.normal((2, 128))
    assert_close(q.as_linear(x), x @ table.T)


@pytest.mark.parametrize(
    ("dims", "span", "use_qjl"),
    [(128, 64, False), (256, 64, True), (192, 192, False), (320, 320, False)],
)
def test_decode_lookups_replay_a_trace_equal_to_the_ops(
    dims, span, use_qjl, monkeypatch, assert_close
):
    """Lookups of decode size run plainly once, then replay one trace (spans of base 1, 12
    and 20, with and without QJL); loaded weights show up without a retrace."""
    from tq_core import embedding

    emb = nn.Embedding(50, dims)
    q = TurboQuantEmbedding.from_embedding(
        emb, bits=3, group_size=64, seed=dims + 7, span=span, use_qjl=use_qjl
    )
    ran = []
    plain = embedding._lookup
    monkeypatch.setattr(embedding, "_lookup", lambda *a: ran.append(1) or plain(*a))
    for t, tok in enumerate([3, 3, 17, 49, 0]):
        ids = mx.array([[tok]])
        want = plain(*_lookup_key(q), ids, *_lookup_arrays(q))
        assert_close(q(ids), want)
    assert len(ran) == 2  # the plain call, then the trace; the rest replayed it
    fresh = TurboQuantEmbedding.from_embedding(
        nn.Embedding(50, dims), bits=3, group_size=64, seed=dims + 7, span=span, use_qjl=use_qjl
    )
    q.update(fresh.parameters())
    ids = mx.array([[5]])
    assert_close(q(ids), fresh(ids))
    assert len(ran) == 2
    assert q(mx.arange(20)[None]).shape == (1, 20, dims)  # prefill size: plain
    assert len(ran) == 3


def _lookup_key(q):
    out = mx.float32 if mx.default_device() == mx.cpu else q.scales.dtype
    return (q.bits, q.group_size, q.span, q.seed, q.input_dims, out)


def _lookup_arrays(q):
    extra = [q.qjl_signs, q.qjl_scales, q.qjl_flips] if q.use_qjl else []
    return [q.indices, q.scales, q.signs, *extra]


def test_layers_share_rotation_by_seed():
    a = TurboQuantLinear.from_linear(nn.Linear(256, 16), bits=4, group_size=64, seed=5)
    b = TurboQuantLinear.from_linear(nn.Linear(256, 32), bits=3, group_size=64, seed=5)
    assert mx.array_equal(a.signs, b.signs).item()


def test_layer_refuses_indivisible_group():
    with pytest.raises(ValueError, match="must divide the input dimension"):
        TurboQuantLinear(100, 8, bits=4, group_size=64)


@pytest.mark.parametrize("use_qjl", [False, True])
def test_chunked_quantization_equals_one_pass(use_qjl, monkeypatch):
    import tq_core.weight_layer as weight_layer
    from mlx_lm.models.switch_layers import SwitchLinear

    lin = nn.Linear(128, 40, bias=False)
    sw = SwitchLinear(64, 24, 4, bias=False)
    whole = TurboQuantLinear.from_linear(lin, 3, 64, use_qjl=use_qjl)
    whole_sw = TurboQuantSwitchLinear.from_switch_linear(sw, 2, 32, use_qjl=use_qjl)
    monkeypatch.setattr(weight_layer, "QUANTIZE_CHUNK", 128 * 7)  # 7 rows, uneven last chunk
    parts = TurboQuantLinear.from_linear(lin, 3, 64, use_qjl=use_qjl)
    parts_sw = TurboQuantSwitchLinear.from_switch_linear(sw, 2, 32, use_qjl=use_qjl)
    for a, b in ((whole, parts), (whole_sw, parts_sw)):
        assert a.indices.shape == b.indices.shape and a.scales.shape == b.scales.shape
        assert mx.array_equal(a.indices, b.indices).item()
        assert mx.array_equal(a.scales, b.scales).item()
        if use_qjl:
            assert mx.array_equal(a.qjl_signs, b.qjl_signs).item()
            assert mx.array_equal(a.qjl_scales, b.qjl_scales).item()
