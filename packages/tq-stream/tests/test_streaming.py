"""Streamed experts give the resident model's logits and tokens, bit for bit."""

import json

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from moe_models import CONFIGS, save_float, save_turboquant
from tq_core.lm.load import build_model, cast_dtype
from tq_core.lm.load import load as load_resident
from tq_stream import StreamedExperts, load_streaming

PROMPT = mx.array([[3, 17, 99, 4, 42, 7, 81, 23, 5, 64, 11, 2]])


def greedy(model, steps: int = 6) -> tuple[list[int], list[mx.array]]:
    """Prefill the prompt, then decode ``steps`` tokens greedily: (tokens, logits)."""
    cache = make_prompt_cache(model)
    logits = model(PROMPT, cache=cache)[:, -1]
    tokens, all_logits = [], [logits]
    for _ in range(steps):
        tok = mx.argmax(logits, axis=-1)
        tokens.append(tok.item())
        logits = model(tok[None], cache=cache)[:, -1]
        all_logits.append(logits)
    mx.eval(all_logits)
    return tokens, all_logits


def assert_identical(streamed, resident):
    s_tok, s_logits = greedy(streamed)
    r_tok, r_logits = greedy(resident)
    assert s_tok == r_tok
    for a, b in zip(s_logits, r_logits):
        assert mx.array_equal(a, b).item()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tq_checkpoint(request, tmp_path_factory):
    path = save_turboquant(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")
    resident, _ = load_resident(path, tokenizer=False)
    return request.param, path, resident


def _expert_bytes(path):
    _, _, session = load_streaming(path, 1 << 40, tokenizer=False)
    lay = session.layouts[0]
    session.close()
    return lay.expert_nbytes, lay.num_experts, len(session.layouts)


@pytest.mark.parametrize("budget", ["top_k", "half_layer", "all"])
def test_streamed_equals_resident(tq_checkpoint, budget):
    name, path, resident = tq_checkpoint
    per_expert, experts, layers = _expert_bytes(path)
    top_k = CONFIGS[name]["num_experts_per_tok"]
    nbytes = {
        "top_k": per_expert * top_k,
        "half_layer": per_expert * experts // 2,
        "all": per_expert * experts * layers,
    }[budget]
    model, _, session = load_streaming(path, nbytes, workers=3, tokenizer=False)
    assert any(isinstance(m, StreamedExperts) for _, m in model.named_modules())
    assert_identical(model, resident)
    report = session.report(tokens=7)
    assert report["cache_bytes"] <= nbytes or budget == "top_k"  # a call may hold its top-k
    assert report["bytes_read"] > 0 and report["misses"] > 0
    if budget == "all":
        assert report["evictions"] == 0
    else:
        assert report["evictions"] > 0
    session.close()


def test_prefetch_and_pinning_keep_outputs(tq_checkpoint, tmp_path):
    name, path, resident = tq_checkpoint
    per_expert, experts, layers = _expert_bytes(path)
    top_k = CONFIGS[name]["num_experts_per_tok"]
    model, _, session = load_streaming(path, 1 << 40, tokenizer=False)
    layer_names = [lay.layer for lay in session.layouts]
    session.close()
    pin = tmp_path / "pin.json"
    pin.write_text(json.dumps({"layers": {layer_names[-1]: [0, 1]}}))
    budget = per_expert * (top_k + 2)  # the two pins plus one token's experts
    model, _, session = load_streaming(
        path, budget, workers=2, prefetch_ahead=True, pin_file=pin, tokenizer=False
    )
    assert_identical(model, resident)
    assert (layer_names[-1], 0) in session.cache or (layer_names[-1], 1) in session.cache
    report = session.report(tokens=7)
    assert report["prefetched"] >= 0 and 0.0 <= report["hit_rate"] <= 1.0
    session.close()


@pytest.mark.parametrize(("name", "dtype"), [("qwen3_moe", mx.float16), ("gpt_oss", mx.bfloat16)])
def test_float_checkpoint_streams_bit_identically(name, dtype, tmp_path):
    path = save_float(name, tmp_path / "float", dtype=dtype)
    resident = build_model(json.loads((path / "config.json").read_text()))
    resident.load_weights(list(mx.load(str(path / "model.safetensors")).items()))
    cast_dtype(resident, mx.float32)
    resident.eval()
    model, _, session = load_streaming(path, 1 << 20, tokenizer=False)
    assert_identical(model, resident)
    session.close()
