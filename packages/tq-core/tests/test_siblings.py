"""Decode plans and sibling groups: one launch for q/k/v and gate/up, exact against the
reference path, rebuilt when weights or the dispatch state change (CPU, a fake kernel)."""

import mlx.core as mx
import mlx.nn as nn
from tq_core import TurboQuantLinear, dispatch, group_siblings
from tq_core.decode_plan import MAX_PLANS
from tq_core.siblings import SiblingGroup


def test_llama_decode_runs_one_launch_per_sibling_group(tiny_llama_model, fake, assert_close):
    model = tiny_llama_model()
    assert all(
        isinstance(la.__dict__.get("_siblings"), SiblingGroup)
        for name, la in model.named_modules()
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    )
    tok = mx.array([[5]])
    with dispatch.reference_only():
        want = model(tok)
    got = model(tok)
    assert_close(got, want)
    # Per layer: q/k/v, o, gate/up, down; then the lm_head.
    assert sorted(fake.widths) == sorted([3, 1, 2, 1] * 2 + [1])
    builds = fake.builds
    fake.widths.clear()
    assert_close(model(mx.array([[7]])), _reference(model, mx.array([[7]])))
    assert fake.builds == builds and len(fake.widths) == 9  # plans reused, not rebuilt


def _reference(model, tok):
    with dispatch.reference_only():
        return model(tok)


def test_prefill_rows_take_the_layer_path(tiny_llama_model, fake, assert_close):
    model = tiny_llama_model()
    tok = mx.array([[1, 2, 3, 4]])
    assert_close(model(tok), _reference(model, tok))
    assert fake.launches == 0


def siblings(bits=(3, 3, 3), seed=0, bias=False):
    mx.random.seed(1)
    layers = [
        TurboQuantLinear.from_linear(nn.Linear(128, n, bias=bias), bits=b, group_size=64, seed=seed)
        for n, b in zip((32, 16, 48), bits)
    ]
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = layers
    return parent, layers


def test_any_call_order_and_new_inputs_stay_exact(fake, assert_close):
    parent, (q, k, v) = siblings(bias=True)
    assert group_siblings(parent) == 1
    x1, x2 = mx.random.normal((1, 128)), mx.random.normal((1, 128))
    with dispatch.reference_only():
        want = {(n, i): la(x) for n, la in zip("qkv", (q, k, v)) for i, x in ((1, x1), (2, x2))}
    assert_close(v(x1), want["v", 1])
    assert_close(q(x1), want["q", 1])
    assert_close(q(x1), want["q", 1])  # asked twice: computed again, still exact
    assert_close(k(x2), want["k", 2])  # a new input: never an output of x1
    assert_close(k(x1), want["k", 1])
    assert all(w == 3 for w in fake.widths)


def test_incompatible_siblings_are_not_grouped(fake):
    parent, _ = siblings(bits=(3, 4, 3))
    assert group_siblings(parent) == 0
    parent, layers = siblings()
    parent.v_proj = nn.Linear(128, 48)
    assert group_siblings(parent) == 0


def test_plans_rebuild_on_new_weights_and_dispatch_changes(fake, assert_close):
    layer = TurboQuantLinear.from_linear(nn.Linear(128, 24), bits=3, group_size=64)
    x = mx.random.normal((1, 128))
    layer(x), layer(x)
    assert fake.builds == 1 and fake.launches == 2
    other = TurboQuantLinear.from_linear(nn.Linear(128, 24), bits=3, group_size=64)
    layer.update(other.parameters())
    assert_close(layer(x), _reference(layer, x))
    assert fake.builds == 2  # new arrays: a new plan, not the old weights
    with dispatch.reference_only():
        layer(x)
    assert fake.launches == 3  # the reference path ran inside the block
    layer(x)
    assert fake.builds == 3 and fake.launches == 4


def test_plan_cache_stays_bounded(fake):
    layer = TurboQuantLinear.from_linear(nn.Linear(128, 8), bits=3, group_size=64)
    for rows in range(1, 3 * MAX_PLANS):
        layer(mx.zeros((rows, 1, 128)))
    assert len(layer.__dict__["_plans"].entries) <= MAX_PLANS
