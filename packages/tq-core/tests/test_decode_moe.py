"""MoE blocks replayed from a compiled trace (decode_moe.py): the same outputs as the plain call
over decode steps of GPT-OSS- and Qwen3-MoE-shaped models, the experts' Python left out once
traced, and a plain call whenever the weights, the experts or the sharding change (on the CPU,
with a counting stand-in for the gather kernel that leaves the product to the reference)."""

import mlx.core as mx
import mlx.nn as nn
import pytest
import tq_core.decode_moe as decode_moe
from mlx_lm.models import qwen3_moe
from tq_core import QuantRecipe, compile_decode_moe, dispatch, quantize_model


class _CountingGather:
    """Registered as ``weight_gather_matmul``: counts the calls and returns ``None``, so the
    layer computes its reference product (the replay logic is what is tested)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return None


@pytest.fixture
def gather(monkeypatch):
    monkeypatch.setattr(decode_moe, "REPLAY", True)
    monkeypatch.setattr(decode_moe, "ON_CPU", True)
    kernel = _CountingGather()
    dispatch._load_providers()
    before = dispatch._kernels.get("weight_gather_matmul")
    dispatch.register_kernel("weight_gather_matmul", kernel)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield kernel
    mx.set_default_device(device)
    if before is None:
        dispatch.unregister_kernel("weight_gather_matmul")
    else:
        dispatch.register_kernel("weight_gather_matmul", before)


def _qwen3_moe():
    mx.random.seed(0)
    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=64, rms_norm_eps=1e-5, vocab_size=64,
        num_key_value_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=False,
        max_position_embeddings=4096, norm_topk_prob=True,
    )  # fmt: skip
    model = qwen3_moe.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def quantized(tiny_gpt_oss):
    """``quantized(name)``: (a tiny model quantized to 4 bits, its MoE blocks)."""
    makers = {"gpt_oss": tiny_gpt_oss, "qwen3_moe": _qwen3_moe}

    def make(name):
        model = makers[name]()
        quantize_model(model, QuantRecipe(bits=4, group_size=64))
        mx.eval(model.parameters())
        return model, [layer.mlp for layer in model.model.layers]

    return make


def _plain(block, x):
    return super(type(block), block).__call__(x)


@pytest.mark.parametrize("name", ["gpt_oss", "qwen3_moe"])
def test_replayed_moe_blocks_match_the_plain_call(gather, quantized, name, assert_close):
    model, blocks = quantized(name)
    assert all(isinstance(b, decode_moe._ReplayedMoE) for b in blocks)
    assert compile_decode_moe(model) == 0  # idempotent
    block = blocks[0]
    xs = [mx.random.normal((1, 1, 128), key=mx.random.key(i)) for i in range(5)]
    outs = []
    for x in xs:
        outs.append(block(x))
        mx.eval(outs[-1])
    # 3 gathers (gate, up, down) at the plain call and at the traced one; replays skip them.
    assert gather.calls == 6
    assert block.__dict__["_tq_moe_replay"][((1, 1, 128), mx.float32)][0] == "replay"
    for x, got in zip(xs, outs):
        assert_close(got, _plain(block, x))


def test_whole_model_decode_matches(gather, quantized, assert_close, monkeypatch):
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = quantized("gpt_oss")

    def run():
        cache = make_prompt_cache(model)
        out = [model(mx.array([[1, 2, 3, 4]]), cache=cache)[:, -1]]
        for t in range(6):
            out.append(model(mx.array([[t + 5]]), cache=cache)[:, -1])
            mx.eval(out[-1])
        return out

    with monkeypatch.context() as m:
        m.setattr(decode_moe, "REPLAY", False)
        want = run()
    for g, w in zip(run(), want):
        assert_close(g, w)


def test_new_weights_sharding_and_replaced_experts_run_plainly(gather, quantized, assert_close):
    _, blocks = quantized("qwen3_moe")
    block = blocks[0]
    x = mx.random.normal((1, 1, 128))
    for _ in range(3):
        mx.eval(block(x))
    calls = gather.calls
    mx.eval(block(x))
    assert gather.calls == calls  # replayed
    up = block.switch_mlp.up_proj
    up.scales = up.scales * 2  # a new array in the same layer
    assert_close(block(x), _plain(block, x))
    assert gather.calls > calls  # not the stale trace
    for _ in range(2):
        assert_close(block(x), _plain(block, x))
    assert decode_moe._replay(block, x) is not None
    block.sharding_group = object()  # mlx-lm's shard(): the block's call sums over ranks
    assert decode_moe._replay(block, x) is None
    block.sharding_group = None
    block.switch_mlp = nn.Identity()  # e.g. streamed experts put in their place
    assert decode_moe._replay(block, x) is None
    assert decode_moe._replay(block, x) is None
    assert block.__dict__["_tq_moe_replay"][(x.shape, x.dtype)][0] == "plain"


def test_off_and_cpu_without_the_override_run_plainly(gather, quantized, monkeypatch):
    _, blocks = quantized("gpt_oss")
    block = blocks[0]
    x = mx.random.normal((1, 1, 128))
    monkeypatch.setattr(decode_moe, "ON_CPU", False)
    for _ in range(3):
        mx.eval(block(x))
    assert gather.calls == 9  # every call plain on the CPU
    monkeypatch.setattr(decode_moe, "ON_CPU", True)
    monkeypatch.setattr(decode_moe, "REPLAY", False)
    for _ in range(3):
        mx.eval(block(x))
    assert gather.calls == 18
    assert block.__dict__["_tq_moe_replay"] == {}


def test_float_experts_are_left_alone(tiny_gpt_oss):
    model = tiny_gpt_oss()
    assert compile_decode_moe(model) == 0  # float experts
    assert not any(isinstance(layer.mlp, decode_moe._ReplayedMoE) for layer in model.layers)
