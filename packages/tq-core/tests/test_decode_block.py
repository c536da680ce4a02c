"""Decoder blocks replayed around their KV cache (decode_block.py): the same logits as the plain
call over many decode steps and caches, the projections' Python left out once traced, and a
plain call whenever the weights, the model's structure or the dispatch state change (on the
CPU whatever the machine: the fake plan kernel of conftest.py stands in for the kernels;
tq-kernels' test_replayed_decode_blocks_match_reference_path runs the real ones on a GPU)."""

import mlx.core as mx
import mlx.nn as nn
import pytest
import tq_core.decode_block as decode_block
import tq_core.decode_mlp as decode_mlp
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache
from tq_core import QuantRecipe, compile_decode_blocks, dispatch, quantize_model


@pytest.fixture(autouse=True)
def replay_on_the_cpu(monkeypatch):
    """Whatever ``TQ_COMPILE_BLOCK``/``TQ_COMPILE_MLP`` the run has, these tests replay, on
    the CPU (on a GPU, tq-kernels' own kernels would take the ops the fake does not)."""
    monkeypatch.setattr(decode_block, "REPLAY", True)
    monkeypatch.setattr(decode_mlp, "REPLAY", True)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def _model(module=llama, **extra):
    kw = dict(
        model_type=module.__name__.rsplit(".", 1)[1], hidden_size=128, num_hidden_layers=2,
        intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        vocab_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    args = module.ModelArgs(**{**kw, **extra})
    mx.random.seed(0)
    model = module.Model(args)
    quantize_model(model, QuantRecipe(bits=3, group_size=64))
    mx.eval(model.parameters())
    return model


def _decode(model, make_cache, steps=6, prompt=(1, 2, 3, 4, 5)):
    """Last-position logits of a prefill and ``steps`` greedy-free decode steps."""
    cache = [make_cache() for _ in model.layers]
    out = [model(mx.array([list(prompt)]), cache=cache)[:, -1]]
    for i in range(steps):
        out.append(model(mx.array([[7 + i]]), cache=cache)[:, -1])
        mx.eval(out[-1])
    return out


def _plainly(model, make_cache, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setattr(decode_block, "REPLAY", False)
        return _decode(model, make_cache, **kw)


def _kinds(model):
    return [
        {key[0]: entry[0] for key, entry in layer.__dict__["_tq_replay"].entries.items()}
        for layer in model.layers
    ]


def test_quantize_model_takes_every_llama_block_and_keeps_the_tree():
    model = _model()
    blocks = model.layers
    assert all(type(b) is not llama.TransformerBlock for b in blocks)
    assert all(isinstance(b, llama.TransformerBlock) for b in blocks)
    assert type(blocks[0]).__name__ == "TransformerBlock"
    assert type(blocks[0]).__module__ == llama.__name__
    assert compile_decode_blocks(model) == 0  # idempotent


CACHES = {
    "kv": KVCache,
    "rotating": lambda: RotatingKVCache(max_size=8, keep=0),
    "quantized": lambda: QuantizedKVCache(group_size=32, bits=8),
}


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_replayed_steps_match_the_plain_steps(fake, monkeypatch, cache, assert_close):
    model = _model()
    want = _plainly(model, CACHES[cache], monkeypatch, steps=10)
    launches = fake.launches
    got = _decode(model, CACHES[cache], steps=10)
    # The 5-token prefill has no plan (the fake takes <= 2 rows). Per layer, the 1st decode
    # step (plain) launches q/k/v and o (the MLP replays already); the 2nd builds o's and
    # down's residual plans (one launch each, on zeros), then traces q/k/v, o + residual,
    # gate/up and down + residual; later steps replay: only the lm_head's plan runs.
    assert fake.widths[launches:] == [3, 1] * 2 + [1] + [1, 1, 3, 1, 2, 1] * 2 + [1] * 9
    assert all(k[(1, 1, 128)] == "replay" for k in _kinds(model))
    for g, w in zip(got, want):
        assert_close(g, w)


def test_residual_adds_fold_into_the_projections_or_run_apart(fake, monkeypatch, assert_close):
    model = _model()
    want = _plainly(model, KVCache, monkeypatch)
    built = []
    residual = fake.residual
    monkeypatch.setattr(fake, "residual", lambda *a: built.append(1) or residual(*a))
    dispatch.register_kernel("rotating_matmul_residual_plan", fake.residual)
    for fold in (True, False):
        monkeypatch.setattr(decode_block, "RESIDUAL", fold)
        built.clear()
        got = _decode(model, KVCache)
        assert len(built) == (4 if fold else 0)  # o and down of 2 layers: plans, or none
        assert all(k[(1, 1, 128)] == "replay" for k in _kinds(model))
        for g, w in zip(got, want):
            assert_close(g, w)
        dispatch.register_kernel("rotating_matmul_residual_plan", fake.residual)  # new traces


@pytest.mark.parametrize(
    "module, extra",
    [
        (qwen2, {}),
        (qwen3, {"head_dim": 32, "max_position_embeddings": 4096, "rope_theta": 1e6}),
        (llama, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                  "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 16}}),
        (llama, {"attention_bias": True, "rope_traditional": True}),
    ],
    ids=["qwen2", "qwen3", "llama3-rope", "bias-traditional"],
)  # fmt: skip
def test_other_llama_style_blocks_match(fake, monkeypatch, module, extra, assert_close):
    model = _model(module, **extra)
    assert compile_decode_blocks(model) == 0  # quantize_model took them already
    assert all(isinstance(b, decode_block._ReplayedBlock) for b in model.layers)
    want = _plainly(model, KVCache, monkeypatch, prompt=tuple(range(1, 30)))
    got = _decode(model, KVCache, prompt=tuple(range(1, 30)))
    assert all(k[(1, 1, 128)] == "replay" for k in _kinds(model))
    for g, w in zip(got, want):
        assert_close(g, w)


def test_gpt_oss_blocks_with_sinks_windows_and_moe_match(
    fake, monkeypatch, assert_close, tiny_gpt_oss
):
    """GPT-OSS: biased projections, YaRN RoPE, attention sinks, alternating sliding-window
    (rotating) and full caches, and a MoE block called as it is inside the tail."""
    from mlx_lm.models.cache import make_prompt_cache

    yarn = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": False}  # fmt: skip
    model = tiny_gpt_oss(num_local_experts=4, sliding_window=8, rope_scaling=yarn)
    quantize_model(model, QuantRecipe(bits=4, group_size=64))
    mx.eval(model.parameters())
    blocks = model.model.layers
    assert all(isinstance(b, decode_block._ReplayedBlock) for b in blocks)

    def run():
        cache = make_prompt_cache(model)
        out = [model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)[:, -1]]
        for t in range(12):  # past the window of 8
            out.append(model(mx.array([[t + 6]]), cache=cache)[:, -1])
            mx.eval(out[-1])
        return out

    with monkeypatch.context() as m:
        m.setattr(decode_block, "REPLAY", False)
        want = run()
    got = run()
    kinds = [{k[0]: e[0] for k, e in b.__dict__["_tq_replay"].entries.items()} for b in blocks]
    assert all(k[(1, 1, 128)] == "replay" for k in kinds)
    for g, w in zip(got, want):
        assert_close(g, w)


def test_batched_decode_rows_replay_and_match(fake, monkeypatch, assert_close):
    model = _model()

    def run():
        cache = [KVCache() for _ in model.layers]
        out = [model(mx.array([[1, 2, 3], [4, 5, 6]]), cache=cache)]
        for i in range(4):
            out.append(model(mx.array([[7 + i], [9 + i]]), cache=cache))
        return out

    with monkeypatch.context() as m:
        m.setattr(decode_block, "REPLAY", False)
        want = run()
    got = run()
    assert all(k[(2, 1, 128)] == "replay" for k in _kinds(model))
    for g, w in zip(got, want):
        assert_close(g, w)


def _replaying(model):
    """``model`` after 3 decode steps (plain, traced, replayed) and its cache."""
    cache = [KVCache() for _ in model.layers]
    model(mx.array([[1, 2, 3]]), cache=cache)
    for t in (4, 5, 6):
        mx.eval(model(mx.array([[t]]), cache=cache))
    return cache


def _twin_step(model, cache, token, monkeypatch):
    """The next step's logits, and the plain call's on a copy of the cache."""
    twin = []
    for c in cache:
        t = KVCache()
        t.state, t.offset = [mx.array(a) for a in c.state], c.offset
        twin.append(t)
    got = model(mx.array([[token]]), cache=cache)
    with monkeypatch.context() as m:
        m.setattr(decode_block, "REPLAY", False)
        want = model(mx.array([[token]]), cache=twin)
    return got, want


def test_new_weights_run_plainly_then_trace_again(fake, monkeypatch, assert_close):
    model = _model()
    cache = _replaying(model)
    fresh = _model().layers[0].self_attn.o_proj.parameters()
    fresh["scales"] = mx.ones_like(fresh["scales"])  # new arrays, and other values
    model.layers[0].self_attn.o_proj.update(fresh)
    model.layers[1].input_layernorm.weight = mx.full((128,), 2.0)
    launches = fake.launches
    got, want = _twin_step(model, cache, 8, monkeypatch)
    assert fake.launches > launches  # not the stale traces
    assert_close(got, want)
    for t in (9, 10, 11):
        got, want = _twin_step(model, cache, t, monkeypatch)
        assert_close(got, want)
    assert all(k[(1, 1, 128)] == "replay" for k in _kinds(model))


def test_a_replaced_projection_leaves_the_block_plain(fake, monkeypatch, assert_close):
    model = _model()
    cache = _replaying(model)
    model.layers[0].self_attn.o_proj = nn.Linear(128, 128, bias=False)  # e.g. sharded
    for t in (8, 9, 10):
        got, want = _twin_step(model, cache, t, monkeypatch)
        assert_close(got, want)
    assert _kinds(model)[0][(1, 1, 128)] == "plain"
    assert _kinds(model)[1][(1, 1, 128)] == "replay"


def test_reference_only_prefill_and_no_cache_run_plainly(fake, monkeypatch, assert_close):
    model = _model()
    cache = _replaying(model)
    launches = fake.launches
    with dispatch.reference_only():
        got, want = _twin_step(model, cache, 8, monkeypatch)
        assert_close(got, want)
    assert fake.launches == launches  # the reference path: no plan, no replay
    rows = decode_block.MAX_ROWS + 1
    x = mx.random.normal((1, rows, 128))
    block = model.layers[0]
    plain = super(type(block), block).__call__
    assert_close(block(x, mask="causal", cache=KVCache()), plain(x, "causal", KVCache()))
    assert (1, rows, 128) not in _kinds(model)[0]
    y = mx.random.normal((1, 1, 128))
    assert_close(block(y), plain(y))


def test_off_every_step_runs_plainly(fake, monkeypatch):
    model = _model()
    monkeypatch.setattr(decode_block, "REPLAY", False)
    _decode(model, KVCache, steps=5)
    # q/k/v, o and lm_head every step; the MLPs (gate/up, down) replay from the 3rd on.
    assert fake.launches == 5 * (2 * 2 + 1) + 2 * 2 * 2
    assert _kinds(model) == [{}, {}]


def test_other_blocks_and_mixed_blocks_are_left_alone():
    from mlx_lm.models import gemma

    args = gemma.ModelArgs(
        model_type="gemma", hidden_size=128, num_hidden_layers=1, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
        vocab_size=64,
    )  # fmt: skip
    other = gemma.Model(args)
    quantize_model(other, QuantRecipe(bits=3, group_size=64))
    assert type(other.model.layers[0]) is gemma.TransformerBlock
    mixed = llama.Model(_model().args)
    quantize_model(mixed, QuantRecipe(bits=3, group_size=64, use_qjl=True))
    assert type(mixed.layers[0]) is llama.TransformerBlock
    plain = llama.Model(_model().args)
    assert compile_decode_blocks(plain) == 0  # float projections: affine and fp16 untouched
