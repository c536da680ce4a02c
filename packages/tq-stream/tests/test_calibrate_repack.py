"""Calibration picks hot and co-activated experts; repacking keeps the model's function."""

import mlx.core as mx
import numpy as np
import pytest
from moe_models import save_turboquant
from test_streaming import greedy
from tq_core.lm.load import load as load_resident
from tq_stream import (
    ExpertUsage,
    StreamError,
    choose_pins,
    co_activation_order,
    load_streaming,
    repack_experts,
)


def test_usage_counts_pins_and_order():
    usage = ExpertUsage({"a": 4, "b": 4})
    usage.observe("a", np.array([[[0, 1]], [[0, 1]], [[2, 3]]]))
    usage.observe("b", np.array([[[3, 2]], [[3, 0]], [[3, 1]]]))
    assert usage.counts["a"].tolist() == [2, 2, 1, 1] and usage.tokens == 3
    assert usage.pairs["a"][0, 1] == 2 and usage.pairs["a"][0, 2] == 0
    assert co_activation_order(usage.counts["a"], usage.pairs["a"])[:2] == [0, 1]
    assert co_activation_order(usage.counts["b"], usage.pairs["b"])[0] == 3
    # hottest first: b/3 (3 uses), then a/1 and a/0 (2 each, higher index first); 2 fit
    pins = choose_pins(usage, [_Sized("a", 10), _Sized("b", 10)], budget=25)
    assert pins == {"layers": {"a": [1], "b": [3]}, "bytes": 20}


class _Sized:
    def __init__(self, layer, nbytes):
        self.layer, self.expert_nbytes = layer, nbytes


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss", "deepseek_v2"])
def test_repacked_checkpoint_computes_the_same(name, tmp_path):
    path = save_turboquant(name, tmp_path / "ckpt")
    _, _, session = load_streaming(path, 1 << 30, tokenizer=False)
    rng = np.random.default_rng(0)
    perm = {lay.layer: rng.permutation(lay.num_experts).tolist() for lay in session.layouts}
    session.close()
    out = repack_experts(path, perm, tmp_path / "repacked")
    before, _ = load_resident(path, tokenizer=False)
    after, _ = load_resident(out, tokenizer=False)
    t0, l0 = greedy(before)
    t1, l1 = greedy(after)
    assert t0 == t1
    for a, b in zip(l0, l1):
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()
    # and the repacked checkpoint streams like the original
    model, _, session = load_streaming(out, 1 << 30, tokenizer=False)
    assert greedy(model)[0] == t0
    session.close()


def test_repack_refuses_bad_permutations(tmp_path):
    path = save_turboquant("qwen3_moe", tmp_path / "ckpt")
    with pytest.raises(StreamError, match="not a permutation"):
        repack_experts(path, {"model.layers.1.mlp.switch_mlp": [0, 1, 2]}, tmp_path / "o")
    with pytest.raises(StreamError, match="not an expert layer"):
        repack_experts(path, {"model.layers.7.mlp.switch_mlp": [0]}, tmp_path / "o")
    assert not (tmp_path / "o").exists()
