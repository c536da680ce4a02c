"""Whole layers and models decoding through the fused kernels on a GPU (skipped where MLX has
none, as on CI): layers through dispatch, a llama through sibling groups, and the replayed
decode MLPs, decoder blocks and MoE blocks of tq-core, against the reference path or the
same kernels called plainly. The kernels alone: test_kernels_gpu.py."""

import importlib.util
import math
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from tq_core import dispatch
from tq_kernels import kernel_backend, register_all, weight_matmul

pytestmark = pytest.mark.skipif(kernel_backend() is None, reason="no GPU backend (Metal/CUDA)")

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tq_kernels_gpu_helpers", ROOT / "gpu_helpers.py")
helpers = sys.modules.setdefault("tq_kernels_gpu_helpers", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(helpers)
TOL, rel_err = helpers.TOL, helpers.rel_err


@pytest.fixture(autouse=True)
def _gpu():
    mx.set_default_device(mx.gpu)


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
