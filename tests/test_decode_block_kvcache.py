"""Replayed decoder blocks (tq-core's decode_block) with a TurboQuant KV cache (tq-kvcache):
decode still attends from the packed codes through tq-kvcache's hook, and the logits equal
those of the plain blocks step for step (CPU, tq-core's fake plan kernel)."""

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
def fake(monkeypatch):
    monkeypatch.setattr(decode_block, "REPLAY", True)
    kernel = helpers.FakePlans()
    dispatch._load_providers()
    dispatch.register_kernel("rotating_matmul_plan", kernel)
    yield kernel
    for op in dispatch.OPS:
        dispatch.unregister_kernel(op)


def _model():
    args = llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-5,
        vocab_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    mx.random.seed(3)
    model = llama.Model(args)
    quantize_model(model, QuantRecipe(bits=4, group_size=64))
    mx.eval(model.parameters())
    return model


def test_replayed_blocks_attend_from_packed_codes_and_match(fake, monkeypatch):
    model = _model()
    packed = []
    original = hook.cache_attention
    monkeypatch.setattr(
        hook, "cache_attention", lambda *a, **k: packed.append(1) or original(*a, **k)
    )
    prompt = mx.array([[(i * 7) % 60 + 2 for i in range(40)]])

    def run(replay: bool):
        monkeypatch.setattr(decode_block, "REPLAY", replay)
        knobs = dict(k_bits=3, v_bits=2, sink_tokens=4, buffer=4, flush_batch=4)
        cache = make_turboquant_cache(model, **knobs)
        out = [model(prompt, cache=cache)[:, -1]]
        for t in range(12):
            out.append(model(mx.array([[t + 2]]), cache=cache)[:, -1])
            mx.eval(out[-1])
        return out, cache

    want, _ = run(False)
    packed.clear()
    got, cache = run(True)
    assert len(packed) == 12 * 2  # every decode step of both layers, replayed or not
    assert cache[0].packed_codes()[0]  # the context is held compressed
    kinds = [layer.__dict__["_tq_replay"].entries[((1, 1, 128), mx.float32)][0] for layer in model.layers]  # fmt: skip
    assert kinds == ["replay", "replay"]
    for g, w in zip(got, want):
        assert mx.abs(g - w).max().item() <= 1e-5 * max(mx.abs(w).max().item(), 1.0)
