"""Tests for kernel dispatch: registered kernels run, decline, or fail back to the reference."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from tq_core import TurboQuantLinear, dispatch
from tq_core.weight_layer import rotate_shared


@pytest.fixture
def layer():
    return TurboQuantLinear.from_linear(nn.Linear(128, 16, bias=False), bits=3, group_size=64)


@pytest.fixture(autouse=True)
def clean_registry():
    yield
    for op in dispatch.OPS:
        dispatch.unregister_kernel(op)
    dispatch._failed.clear()


def test_registered_kernel_runs_and_gets_rotated_input(layer, assert_close):
    seen = {}

    def kernel(x_rot, codes, qjl, x_sketch):
        seen["x_rot"], seen["qjl"] = x_rot, qjl
        return mx.full((*x_rot.shape[:-1], codes.scales.shape[0]), 7.0, dtype=x_rot.dtype)

    x = mx.random.normal((2, 128))
    ref = layer(x)
    dispatch.register_kernel("weight_matmul", kernel)
    assert mx.all(layer(x) == 7.0).item()
    assert_close(seen["x_rot"], rotate_shared(x, layer.rotation(), ("check",)))
    assert seen["qjl"] is None
    with dispatch.reference_only():
        assert_close(layer(x), ref)


def test_declining_kernel_uses_reference(layer, assert_close):
    x = mx.random.normal((2, 128))
    ref = layer(x)
    dispatch.register_kernel("weight_matmul", lambda *a: None)
    assert_close(layer(x), ref)


def test_failing_kernel_warns_once_and_falls_back(layer, assert_close):
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("Unable to build metal library")

    x = mx.random.normal((2, 128))
    ref = layer(x)
    dispatch.register_kernel("weight_matmul", broken)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert_close(layer(x), ref)
    assert_close(layer(x), ref)  # no second warning: the op is switched off
    assert len(calls) == 1


def test_env_switch_forces_reference(layer, monkeypatch):
    dispatch.register_kernel("weight_matmul", lambda *a: mx.zeros((2, 16)))
    monkeypatch.setenv("TQ_KERNELS", "0")
    assert not mx.all(layer(mx.random.normal((2, 128))) == 0).item()


def test_register_rejects_unknown_op_and_non_callable():
    with pytest.raises(ValueError, match="unknown kernel op"):
        dispatch.register_kernel("matmul", lambda: None)
    with pytest.raises(TypeError, match="callable"):
        dispatch.register_kernel("weight_matmul", 3)


def test_sibling_projections_share_one_rotation(monkeypatch):
    import tq_core.weight_layer as weight_layer

    q = TurboQuantLinear.from_linear(nn.Linear(128, 32), bits=3, group_size=64)
    k = TurboQuantLinear.from_linear(nn.Linear(128, 16), bits=4, group_size=64)
    calls = []
    real = weight_layer._rotate_trusted
    monkeypatch.setattr(weight_layer, "_rotate_trusted", lambda x, r: calls.append(1) or real(x, r))
    x = mx.random.normal((1, 128))
    q(x), k(x)
    assert len(calls) == 1
    q(mx.random.normal((1, 128)))  # a new input is rotated afresh
    assert len(calls) == 2


def test_layer_rotation_equals_checked_rotate_and_follows_new_signs(assert_close):
    from tq_core.rotation import rotate

    layer = TurboQuantLinear.from_linear(nn.Linear(192, 8), bits=3, group_size=64)
    x = mx.random.normal((3, 192))
    x_rot, _ = layer.rotated_inputs(x, mx.float32)
    assert_close(x_rot, rotate(x, layer.rotation()))
    layer.signs = -layer.signs  # new weights loaded: the cached cast must not be reused
    x_rot2, _ = layer.rotated_inputs(mx.array(x), mx.float32)
    assert_close(x_rot2, rotate(x, layer.rotation()))
    assert not mx.allclose(x_rot, x_rot2).item()
