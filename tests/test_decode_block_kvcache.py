"""Replayed decoder blocks (tq-core's decode_block) with a TurboQuant KV cache (tq-kvcache):
decode still attends from the packed codes through tq-kvcache's hook, and the logits equal
those of the plain blocks step for step: on the CPU with tq-core's fake plan kernel, and on
a GPU with tq-kernels' own kernels (skipped without one)."""

import importlib.util
from pathlib import Path

import mlx.core as mx
import pytest
import tq_core.decode_block as decode_block
import tq_kvcache.hook as hook
from mlx_lm.models import llama
from tq_core import QuantRecipe, dispatch, quantize_model
from tq_kvcache import make_turboquant_cache

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "tq_core_test_helpers", ROOT / "packages/tq-core/tests/conftest.py"
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


@pytest.fixture
def fake():
    """tq-core's fake plan kernels, on the CPU whatever the machine (on a GPU, tq-kernels'
    own kernels would take the ops the fake does not; they are registered again after)."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    with helpers.fake_kernels() as kernel:
        yield kernel
    mx.set_default_device(device)


def _model(dtype=mx.float32):
    args = llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-5,
        vocab_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    mx.random.seed(3)
    model = llama.Model(args)
    quantize_model(model, QuantRecipe(bits=4, group_size=64))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def _run(model, monkeypatch, replay: bool):
    """Last-position logits of a 40-token prefill and 12 decode steps over a K3V2 cache."""
    monkeypatch.setattr(decode_block, "REPLAY", replay)
    knobs = dict(k_bits=3, v_bits=2, sink_tokens=4, buffer=4, flush_batch=4)
    cache = make_turboquant_cache(model, **knobs)
    out = [model(mx.array([[(i * 7) % 60 + 2 for i in range(40)]]), cache=cache)[:, -1]]
    for t in range(12):
        out.append(model(mx.array([[t + 2]]), cache=cache)[:, -1])
        mx.eval(out[-1])
    return out, cache


def _kinds(model):
    entries = [layer.__dict__["_tq_replay"].entries for layer in model.layers]
    return [[e[0] for key, e in entries.items() if key[0] == (1, 1, 128)] for entries in entries]


def _rel(got, want):
    return mx.abs(got - want).max().item() / max(mx.abs(want).max().item(), 1e-6)


def test_replayed_blocks_attend_from_packed_codes_and_match(fake, monkeypatch):
    model = _model()
    packed = []
    original = hook.cache_attention
    monkeypatch.setattr(
        hook, "cache_attention", lambda *a, **k: packed.append(1) or original(*a, **k)
    )
    want, _ = _run(model, monkeypatch, replay=False)
    packed.clear()
    got, cache = _run(model, monkeypatch, replay=True)
    assert len(packed) == 12 * 2  # every decode step of both layers, replayed or not
    assert cache[0].packed_codes()[0]  # the context is held compressed
    assert _kinds(model) == [["replay"], ["replay"]]
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-5


@pytest.mark.skipif(mx.default_device() == mx.cpu, reason="needs a GPU (Metal or CUDA)")
def test_replayed_blocks_with_kernels_and_packed_attention_on_gpu(monkeypatch):
    """The same on a GPU: tq-kernels' fused plans in the traces, packed attention between."""
    model = _model(mx.float16)
    want, _ = _run(model, monkeypatch, replay=False)
    got, _ = _run(model, monkeypatch, replay=True)
    assert _kinds(model) == [["replay"], ["replay"]]
    for g, w in zip(got, want):
        assert _rel(g.astype(mx.float32), w.astype(mx.float32)) < 1e-2
    assert not dispatch._failed
