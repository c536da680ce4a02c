"""Host cost of building one decode step's graph, with the GPU kernels stubbed (runs on the CPU).

A decode step on the H100 is bound by host work, so this separates the Python and MLX
graph-building share of a step from kernel launches and GPU time: every fused kernel is
replaced by an op that returns zeros of its output shapes, the CUDA backend is pretended,
and each step's graph is built (timed) and then evaluated (not timed). Variants: fp16,
mlx affine 3-bit weights, TurboQuant 3-bit weights (decode plans, sibling launches), and
the fp16 model with a TurboQuant K4V3 KV cache (attention from the codes through the
hook). A diagnostic, not a reported benchmark: only the build share is measured, and the
CPU is not the H100's host.

usage: python benchmarks/host_build.py [--variants fp16,affine3,tq3,kv-K4V3]
           [--layers 4] [--steps 40] [--profile VARIANT]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache


def _stub_kernels() -> None:
    """Pretend CUDA and make every custom kernel return zeros of its output shapes."""
    import tq_kernels.attention as attention
    import tq_kernels.build as build
    import tq_kernels.ops as ops
    import tq_kvcache.fused_attention as fused
    from tq_kernels import zeros_kernel_factory

    mx.fast.cuda_kernel = zeros_kernel_factory
    for module in (build, attention, fused):
        module.kernel_backend = lambda: "cuda"
    ops._backend = lambda: "cuda"
    real_applies = ops._applies

    def applies(x, codes, qjl, x_sketch):
        device = mx.default_device
        mx.default_device = lambda: mx.gpu  # the device check only
        try:
            return real_applies(x, codes, qjl, x_sketch)
        finally:
            mx.default_device = device

    ops._applies = applies
    fused.fused_attention_enabled = lambda: True


def _model(variant: str, layers: int) -> tuple[nn.Module, list]:
    from tq_core import QuantRecipe, quantize_model
    from tq_kvcache import install_attention_hook, make_turboquant_cache

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=1024,
        num_hidden_layers=layers,
        intermediate_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        vocab_size=8000,
        tie_word_embeddings=True,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    model.update(tree_map(lambda p: 0.02 * mx.random.normal(p.shape), model.parameters()))
    if variant == "affine3":
        nn.quantize(model, group_size=64, bits=3)
    elif variant == "tq3":
        quantize_model(model, QuantRecipe(bits=3, group_size=64))
    mx.eval(model.parameters())
    if variant.startswith("kv-"):
        install_attention_hook(model)
        setting = variant[3:]
        k, v = int(setting[1]), int(setting[3])
        return model, make_turboquant_cache(model, k_bits=k, v_bits=v, sink_tokens=4, buffer=4)
    return model, make_prompt_cache(model)


def build_us(model, cache, steps: int, profile: bool = False) -> float:
    """Median graph-build time of one decode step, in microseconds."""
    model(mx.array([[1] * 200]), cache=cache)
    tok = mx.array([[2]])
    for _ in range(3):
        mx.eval(model(tok, cache=cache))
    prof = cProfile.Profile() if profile else None
    times = []
    for _ in range(steps):
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        out = model(tok, cache=cache)
        times.append(time.perf_counter() - t0)
        if prof:
            prof.disable()
        mx.eval(out)
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return statistics.median(times) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="fp16,affine3,tq3,kv-K4V3")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile")
    a = ap.parse_args()
    _stub_kernels()
    built = {v: _model(v, a.layers) for v in a.variants.split(",")}
    for rnd in range(3):
        row = {v: round(build_us(m, c, a.steps) / a.layers, 1) for v, (m, c) in built.items()}
        print(f"round {rnd}: us per layer and step (build only)", row, flush=True)
    if a.profile:
        build_us(*built[a.profile], a.steps, profile=True)


if __name__ == "__main__":
    main()
