"""Fused packed-KV attention kernels against the reference path (GPU; skipped on CI's CPU)."""

import mlx.core as mx
import numpy as np
import pytest
from tq_kernels import kernel_backend, zeros_kernel, zeros_kernel_factory
from tq_kvcache.attention import reference_cache_attention
from tq_kvcache.cache import TurboQuantKVCache
from tq_kvcache.fused_attention import fused_attention_enabled, fused_cache_attention

gpu = pytest.mark.skipif(kernel_backend() is None, reason="no GPU backend (Metal/CUDA)")


def _filled_cache(b, h, d, n, dtype=mx.float16, seed=0, extra=0, **knobs):
    mx.random.seed(seed)
    cache = TurboQuantKVCache(**knobs)
    k = (mx.random.normal((b, h, n, d)) * (1 + mx.arange(d) / d)).astype(dtype)
    v = mx.random.normal((b, h, n, d)).astype(dtype)
    cache.update_and_fetch(k, v)
    cache.compress()
    if extra:  # tokens after the flush stay in the fp16 tail
        cache.update_and_fetch(
            mx.random.normal((b, h, extra, d)).astype(dtype),
            mx.random.normal((b, h, extra, d)).astype(dtype),
        )
    return cache


def _pretend_cuda(monkeypatch, kernel_factory):
    """The CUDA backend pretended and the attention kernels replaced by ``kernel_factory``."""
    import tq_kernels.attention as attention
    import tq_kernels.attention_plan as plan
    import tq_kvcache.fused_attention as fused

    monkeypatch.setattr(fused, "fused_attention_enabled", lambda: True)
    monkeypatch.setattr(fused, "_verified", set())
    monkeypatch.setattr(attention, "kernel_backend", lambda: "cuda")
    monkeypatch.setattr(plan, "kernel_backend", lambda: "cuda")
    for name in ("_attend_kernel", "_finish_kernel", "_combine_kernel"):
        monkeypatch.setattr(attention, name, kernel_factory)


def test_routing_between_kernel_paths_with_stubbed_kernels(monkeypatch):
    """Which path a decode call takes (tensor cores, SIMT body, reference), checked on any
    device: the backend is pretended and the kernels return zeros of their shapes, so the
    routing and the launch plumbing run, not the kernels (the GPU tests check those)."""
    import tq_kernels.attention_plan as plan
    import tq_kvcache.fused_attention as fused

    _pretend_cuda(monkeypatch, zeros_kernel_factory)
    monkeypatch.setattr(plan, "MMA_ATTEND", True)
    monkeypatch.setattr(plan, "MMA_MIN_CHUNK", 512)
    q = mx.random.normal((1, 32, 1, 64)).astype(mx.float16)
    # 264 threadgroups over 8 KV heads: 33 splits; 9000 tokens make 512-token splits.
    long = _filled_cache(1, 8, 64, 9000, k_bits=4, v_bits=3)
    short = _filled_cache(1, 8, 64, 2000, k_bits=4, v_bits=3)
    prod = _filled_cache(1, 8, 64, 9000, k_bits=3, v_bits=2, key_mode="prod")
    assert fused.attend_path(q, long) == "tensor cores"
    assert fused.attend_path(q, short) == "simt"
    assert fused.attend_path(q, prod) == "simt"  # prod keys: prepared mode, SIMT splits
    assert fused.attend_path(q, long, mask=mx.ones((1, 9001), mx.bool_)) == "reference"
    assert fused.attend_path(mx.random.normal((1, 8, 1, 64)), _filled_cache(1, 8, 64, 20)) == (
        "reference"  # nothing packed yet
    )
    for cache in (long, short, prod):
        out = fused.fused_cache_attention(q, cache, 0.125)
        assert out is not None and out.shape == (1, 32, 1, 64) and out.dtype == q.dtype
    monkeypatch.setattr(plan, "MMA_ATTEND", False)
    assert fused.attend_path(q, long) == "simt"


def test_decode_steps_reuse_the_kept_launch_until_it_changes(monkeypatch):
    """Between flushes a decode step skips the routing (the launch kept on the cache), and
    hands the kernels the cache's current fp16 tail; a flush, a new query shape, another
    scale or a changed launch knob route afresh. Stubbed kernels on any device; the GPU test
    below checks values."""
    import tq_kernels.attention_plan as plan
    import tq_kvcache.fused_attention as fused

    seen = []

    def recording(inputs, **launch):
        seen.append(inputs)
        return zeros_kernel(inputs, **launch)

    _pretend_cuda(monkeypatch, lambda *_: recording)
    routes = []
    real_route = fused._route
    monkeypatch.setattr(fused, "_route", lambda *a: routes.append(1) or real_route(*a))
    cache = TurboQuantKVCache(k_bits=4, v_bits=3, sink_tokens=16, buffer=16, flush_batch=8)
    cache.update_and_fetch(mx.random.normal((1, 2, 200, 64)), mx.random.normal((1, 2, 200, 64)))
    q = mx.random.normal((1, 8, 1, 64))
    fresh = []
    for step in range(12):
        version = cache._packed_version
        kv = mx.random.normal((1, 2, 1, 64))
        cache.update_and_fetch(kv, kv)
        before = len(routes)
        assert fused.fused_cache_attention(q, cache, 0.125).shape == (1, 8, 1, 64)
        fresh.append(len(routes) > before)
        assert (cache._packed_version != version) <= fresh[-1]  # a flush routes afresh
        assert seen[-2][-1] is cache.segments()[5]  # the attend kernel got today's tail
    assert fresh[0] and fresh.count(False) >= 8  # most steps reused the kept launch
    before = len(routes)
    fused.fused_cache_attention(q, cache, 0.125)
    assert len(routes) == before
    fused.fused_cache_attention(q, cache, 0.25)  # another scale: a new launch
    fused.fused_cache_attention(mx.random.normal((1, 4, 1, 64)), cache, 0.25)
    assert len(routes) == before + 2
    monkeypatch.setattr(plan, "MMA_PREFETCH", 2)  # a launch knob: the kept launch is stale
    fused.fused_cache_attention(mx.random.normal((1, 4, 1, 64)), cache, 0.25)
    assert len(routes) == before + 3


def test_a_failing_kept_launch_falls_back_with_a_warning(monkeypatch):
    import tq_kvcache.fused_attention as fused

    fail = []

    def kernel(inputs, **launch):
        if fail:
            raise RuntimeError("launch failed")
        return zeros_kernel(inputs, **launch)

    _pretend_cuda(monkeypatch, lambda *_: kernel)
    monkeypatch.setattr(fused, "_failed", False)
    cache = _filled_cache(1, 2, 64, 300, k_bits=4, v_bits=3, sink_tokens=4, buffer=4)
    q = mx.random.normal((1, 4, 1, 64))
    assert fused.fused_cache_attention(q, cache, 0.125) is not None
    assert "_tq_launch" in cache.__dict__
    fail.append(1)
    with pytest.warns(RuntimeWarning, match="launch failed"):
        assert fused.fused_cache_attention(q, cache, 0.125) is None
    assert "_tq_launch" not in cache.__dict__


def test_cpu_uses_the_reference_path():
    if fused_attention_enabled():
        pytest.skip("a GPU backend is the default device")
    cache = _filled_cache(1, 2, 64, 80, k_bits=3, v_bits=2, sink_tokens=4, buffer=4)
    q = mx.random.normal((1, 4, 1, 64))
    assert fused_cache_attention(q, cache, 0.125) is None


CASES = [
    # b, hq, h, d, n, extra, L, knobs
    (1, 4, 2, 64, 100, 0, 1, dict(k_bits=4, v_bits=3, sink_tokens=4, buffer=8)),
    (2, 6, 3, 64, 77, 0, 1, dict(k_bits=3, v_bits=2, sink_tokens=0, buffer=0)),
    (1, 8, 8, 128, 300, 5, 3, dict(k_bits=2, v_bits=2, sink_tokens=16, buffer=5)),
    (1, 2, 1, 96, 65, 0, 1, dict(k_bits=8, v_bits=1, sink_tokens=1, buffer=0)),
    (1, 4, 2, 64, 90, 4, 2, dict(k_bits=3.5, v_bits=2.5, sink_tokens=3, buffer=4)),
    (1, 4, 1, 64, 90, 0, 1, dict(k_bits=3, v_bits=4, key_mode="prod", sink_tokens=0, buffer=3)),
    (
        1,
        4,
        2,
        128,
        70,
        0,
        1,
        dict(k_bits=2.5, v_bits=3.5, key_mode="prod", sink_tokens=2, buffer=0),
    ),
    (1, 32, 8, 128, 5000, 0, 1, dict(k_bits=4, v_bits=3)),  # many splits, GQA 4
    (2, 16, 2, 128, 3000, 8, 2, dict(k_bits=3, v_bits=2)),  # 16 rows, causal tail
    (1, 4, 4, 64, 600, 0, 1, dict(k_bits=1, v_bits=2, key_mode="prod", sink_tokens=0, buffer=0)),
    # 200 sinks + 150 tail + 3 new: the fp16 split spans two tiles, the second partial
    (1, 8, 2, 128, 2000, 3, 1, dict(k_bits=4, v_bits=3, sink_tokens=200, buffer=150)),
    # the same across two fp16 splits with prod keys (prepared mode, combine kernel) and
    # with two causal queries whose own tokens sit in the second fp16 split
    (1, 4, 2, 128, 1500, 2, 1, dict(k_bits=3, v_bits=3, key_mode="prod", sink_tokens=300)),
    (1, 8, 4, 64, 1200, 6, 2, dict(k_bits=4, v_bits=3, sink_tokens=130, buffer=260)),
]


# Every layout in float16; two of them also in bfloat16 and float32 (each dtype compiles
# its own kernel, so not every pair).
PARAMS = [(*c, mx.float16) for c in CASES] + [
    (*CASES[i], dt) for i in (4, 8) for dt in (mx.bfloat16, mx.float32)
]


@gpu
@pytest.mark.parametrize("b,hq,h,d,n,extra,L,knobs,dtype", PARAMS)
def test_fused_matches_reference(b, hq, h, d, n, extra, L, knobs, dtype):
    cache = _filled_cache(b, h, d, n, dtype, extra=extra, **knobs)
    q = mx.random.normal((b, hq, L, d)).astype(dtype)
    mask = "causal" if L > 1 else None
    got = fused_cache_attention(q, cache, d**-0.5, mask)
    assert got is not None, "the fused kernels did not run"
    want = reference_cache_attention(q, cache, d**-0.5, mask)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 2e-2 if dtype == mx.bfloat16 else 5e-3
    scale = max(float(mx.abs(want.astype(mx.float32)).max()), 1e-6)
    err = float(mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max()) / scale
    assert err < tol, f"relative error {err}"


@gpu
@pytest.mark.parametrize("case", [0, 2, 8, 12])
def test_queries_in_the_models_layout_are_read_through_their_strides(case):
    """mlx-lm's attention hands over queries as a transposed (B, L, Hq, D) projection; the
    raw-mode kernels read them in place (no contiguous copy)."""
    _check_case(case, transposed=True)


def _check_case(case: int, transposed: bool = False) -> None:
    """The fused output for ``CASES[case]`` (float16 queries, in the model's transposed
    layout with ``transposed``) against the reference."""
    b, hq, h, d, n, extra, L, knobs = CASES[case]
    cache = _filled_cache(b, h, d, n, extra=extra, **knobs)
    if transposed:
        q = mx.random.normal((b, L, hq, d)).astype(mx.float16).transpose(0, 2, 1, 3)
    else:
        q = mx.random.normal((b, hq, L, d)).astype(mx.float16)
    mask = "causal" if L > 1 else None
    got = fused_cache_attention(q, cache, d**-0.5, mask)
    assert got is not None, "the fused kernels did not run"
    want = reference_cache_attention(q, cache, d**-0.5, mask)
    scale = max(float(mx.abs(want.astype(mx.float32)).max()), 1e-6)
    assert float(mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max()) / scale < 5e-3


def _split_path(path: str, monkeypatch) -> None:
    """Packed splits on the tensor cores (``mma``: as shipped; ``mma-knobs``: the shipped
    knobs flipped, per-lookup value fields, the eager max and full-stride load addresses,
    with the off-by-default L2 prefetch) or the SIMT body (``simt``), at any cache length."""
    import tq_kernels.attention_mma_source as mma_source
    import tq_kernels.attention_plan as plan

    monkeypatch.setattr(plan, "MMA_ATTEND", path != "simt")
    monkeypatch.setattr(plan, "MMA_MIN_CHUNK", 0)
    if path == "mma-knobs":
        monkeypatch.setattr(plan, "MMA_PREFETCH", 4)
        monkeypatch.setattr(mma_source, "PAIRED_VALUE_FIELDS", not mma_source.PAIRED_VALUE_FIELDS)
        monkeypatch.setattr(mma_source, "LAZY_MAX", not mma_source.LAZY_MAX)
        monkeypatch.setattr(mma_source, "HEAD_OFFSETS", not mma_source.HEAD_OFFSETS)


#: Paths of the packed splits for ``_split_path`` (test ids without spaces: the device's
#: pytest_parallel.sh passes them on a command line).
SPLIT_PATHS = ["mma", "mma-knobs", "simt"]


@gpu
@pytest.mark.parametrize("path", SPLIT_PATHS)
def test_sinks_extreme_scores_and_non_finite(path, monkeypatch):
    _split_path(path, monkeypatch)
    cache = _filled_cache(1, 2, 64, 700, k_bits=4, v_bits=3, sink_tokens=8, buffer=8)
    sinks = mx.array([4.0, -2.0, 30.0, 0.0])
    q = mx.random.normal((1, 4, 1, 64)) * 40  # peaked softmax
    got = fused_cache_attention(q, cache, 0.125, None, sinks)
    want = reference_cache_attention(q, cache, 0.125, None, sinks)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-3, rtol=2e-3)
    bad = q.at[0, 1, 0, 3].add(mx.nan)
    out = fused_cache_attention(bad, cache, 0.125)
    assert bool(mx.isnan(out[0, 1]).all()) and bool(mx.isfinite(out[0, 0]).all())


@gpu
def test_array_masks_and_too_many_rows_fall_back():
    cache = _filled_cache(1, 2, 64, 300, k_bits=4, v_bits=3, sink_tokens=4, buffer=4)
    q = mx.random.normal((1, 4, 1, 64))
    window = mx.arange(cache.size()) >= cache.size() - 16
    assert fused_cache_attention(q, cache, 0.125, window) is None
    assert fused_cache_attention(mx.random.normal((1, 40, 1, 64)), cache, 0.125) is None
    unpacked = _filled_cache(1, 2, 64, 20, k_bits=4, v_bits=3, sink_tokens=4, buffer=32)
    assert not unpacked.packed_codes()[0]
    assert fused_cache_attention(q, unpacked, 0.125) is None


@gpu
def test_decode_through_the_cache_matches_reference():
    """Token by token through update_and_fetch: every step's fused output equals the
    reference while the cache flushes the tail into packed codes."""
    cache = TurboQuantKVCache(k_bits=3, v_bits=2, sink_tokens=16, buffer=16, flush_batch=8)
    cache.update_and_fetch(mx.random.normal((1, 2, 200, 64)), mx.random.normal((1, 2, 200, 64)))
    kept = 0
    for _ in range(20):
        k, v = mx.random.normal((1, 2, 1, 64)), mx.random.normal((1, 2, 1, 64))
        cache.update_and_fetch(k, v)
        q = mx.random.normal((1, 8, 1, 64))
        launch = cache.__dict__.get("_tq_launch")
        got = fused_cache_attention(q, cache, 0.125)
        kept += launch is not None and cache.__dict__.get("_tq_launch") is launch
        want = reference_cache_attention(q, cache, 0.125)
        scale = float(mx.abs(want).max())
        assert float(mx.abs(got - want).max()) / scale < 5e-3
    assert kept >= 10  # steps between flushes ran through the launch kept on the cache


@gpu
@pytest.mark.parametrize("path", SPLIT_PATHS)
@pytest.mark.parametrize("case", [0, 1, 2, 4, 7, 8, 10, 12])
def test_both_packed_split_paths_match_reference(case, path, monkeypatch):
    """The tensor-core packed splits (CUDA's default where they apply), the same with their
    knobs flipped, and the SIMT body (Metal's, and CUDA's for 16 query rows or
    ``TQ_ATTEND_MMA=0``) against the reference."""
    _split_path(path, monkeypatch)
    _check_case(case)
