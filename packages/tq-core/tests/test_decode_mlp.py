"""Decode MLPs replayed from a compiled trace (decode_mlp.py): the same outputs as the plain
call, the plans' Python left out once traced, and a fresh plain call whenever the weights or
the dispatch state change (CPU, the fake plan kernel of conftest.py)."""

import mlx.core as mx
import mlx.nn as nn
import pytest
import tq_core.decode_mlp as decode_mlp
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from tq_core import QuantRecipe, compile_decode_mlps, dispatch, quantize_model
from tq_core.decode_mlp import MAX_ROWS


@pytest.fixture(autouse=True)
def replay_on(monkeypatch):
    """Whatever ``TQ_COMPILE_MLP`` the test run has, these tests replay (decode_mlp.REPLAY)."""
    monkeypatch.setattr(decode_mlp, "REPLAY", True)


def _replaying_mlp(tiny_llama_model):
    """Layer 0's MLP of a tiny llama after three calls on one input (plain, traced,
    replayed), and that input."""
    mlp = tiny_llama_model().model.layers[0].mlp
    x = mx.random.normal((1, 1, 128))
    for _ in range(3):
        mx.eval(mlp(x))
    return mlp, x


def _plain(mlp, x):
    return super(type(mlp), mlp).__call__(x)  # the class the MLP had before


def test_quantize_model_takes_every_dense_mlp_and_keeps_the_tree(tiny_llama_model):
    model = tiny_llama_model()
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(type(m).__name__ == "MLP" and isinstance(m, llama.MLP) for m in mlps)
    assert all(type(m) is not llama.MLP for m in mlps)  # the replaying subclass
    assert type(mlps[0]).__module__ == llama.MLP.__module__  # the attention hook finds it
    names = [k.split(".mlp.")[1] for k, _ in tree_flatten(model.parameters()) if ".mlp." in k]
    projections = {name.split(".")[0] for name in names}
    assert projections == {"gate_proj", "up_proj", "down_proj"}
    assert compile_decode_mlps(model) == 0  # idempotent


def test_replayed_calls_match_the_plain_call_and_skip_the_plans(fake, tiny_llama_model,
                                                                assert_close):  # fmt: skip
    mlp = tiny_llama_model().model.layers[0].mlp
    xs = [mx.random.normal((1, 1, 128)) for _ in range(5)]
    outs = []
    for x in xs:
        outs.append(mlp(x))
        mx.eval(outs[-1])
    # 1st call plain (builds the plans), 2nd traced: 2 launches each (gate/up, down); the
    # rest replay the trace without calling the plans' Python.
    assert fake.launches == 4
    for x, got in zip(xs, outs):
        assert_close(got, _plain(mlp, x))


def test_new_weights_run_plainly_then_trace_again(fake, tiny_llama_model, assert_close):
    mlp, x = _replaying_mlp(tiny_llama_model)
    launches = fake.launches
    fresh = nn.Linear(256, 128, bias=False)
    quantized = QuantRecipe(bits=3, group_size=64)
    donor = nn.Sequential(fresh)
    quantize_model(donor, quantized)
    mlp.down_proj.update(donor.layers[0].parameters())  # new arrays in the same layer
    got = mlp(x)
    assert fake.launches > launches  # not the stale trace
    assert_close(got, _plain(mlp, x))
    for _ in range(3):
        assert_close(mlp(x), _plain(mlp, x))


def test_reference_only_and_prefill_shapes_run_plainly(fake, tiny_llama_model, assert_close):
    mlp, x = _replaying_mlp(tiny_llama_model)
    launches = fake.launches
    with dispatch.reference_only():
        assert_close(mlp(x), _plain(mlp, x))
    assert fake.launches == launches  # reference path: no plan, no replay
    prefill = mx.random.normal((1, MAX_ROWS + 1, 128))
    assert_close(mlp(prefill), _plain(mlp, prefill))
    assert not any(key[0] == prefill.shape for key in mlp.__dict__["_tq_replay"].entries)


def test_a_replaced_projection_is_examined_afresh(fake, tiny_llama_model, assert_close):
    mlp, x = _replaying_mlp(tiny_llama_model)
    mlp.down_proj = nn.Linear(256, 128, bias=False)  # e.g. a sharded layer put in its place
    for _ in range(3):
        assert_close(mlp(x), _plain(mlp, x))
    assert mlp.__dict__["_tq_replay"].layers is None  # no longer an MLP it takes


class _Gated(nn.Module):
    def __init__(self, extra: bool):
        super().__init__()
        self.gate_proj = nn.Linear(64, 128, bias=False)
        self.up_proj = nn.Linear(64, 128, bias=False)
        self.down_proj = nn.Linear(128, 64, bias=False)
        if extra:
            self.extra = mx.ones((64,))  # a parameter a trace would hold stale

    def __call__(self, x):
        y = self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))
        return y * self.extra if "extra" in self else y


def test_mlps_with_other_parameters_or_qjl_are_left_alone():
    taken = nn.Sequential(_Gated(extra=False))
    quantize_model(taken, QuantRecipe(bits=3, group_size=64))
    assert type(taken.layers[0]) is not _Gated and isinstance(taken.layers[0], _Gated)
    extra = nn.Sequential(_Gated(extra=True))
    quantize_model(extra, QuantRecipe(bits=3, group_size=64))
    assert type(extra.layers[0]) is _Gated
    qjl = nn.Sequential(_Gated(extra=False))
    quantize_model(qjl, QuantRecipe(bits=3, group_size=64, use_qjl=True))
    assert type(qjl.layers[0]) is _Gated


def test_off_every_call_runs_plainly(fake, tiny_llama_model, monkeypatch):
    monkeypatch.setattr(decode_mlp, "REPLAY", False)
    mlp = tiny_llama_model().model.layers[0].mlp
    x = mx.random.normal((1, 1, 128))
    for _ in range(5):
        mx.eval(mlp(x))
    assert fake.launches == 10  # gate/up and down, every call
