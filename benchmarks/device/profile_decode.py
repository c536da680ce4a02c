"""Where a TurboQuant decode step spends its time: host graph building vs GPU, per variant,
and a cProfile of the graph building (device diagnostics, not a reported benchmark)."""

import cProfile
import io
import pstats
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_config

sys.path.insert(0, "benchmarks")
from decode_speed import make_model  # noqa: E402
from tq_kernels import register_all  # noqa: E402

register_all()
config = load_config(__import__("pathlib").Path(sys.argv[1]))
config.pop("quantization", None)
import tq_core.linear as tql  # noqa: E402
from tq_core import dispatch  # noqa: E402
from tq_core.weight_layer import TurboQuantWeights  # noqa: E402

real_rot, real_call = TurboQuantWeights.rotated_inputs, dispatch.call_kernel


def set_mode(mode):
    """norot: skip the activation rotation; nokernel: a zeros op instead of the matvec."""
    TurboQuantWeights.rotated_inputs = (
        (lambda self, x, dtype: (x.astype(dtype), None)) if mode == "norot" else real_rot
    )
    fake = lambda op, x, codes, *a: mx.zeros((*x.shape[:-1], codes.scales.shape[0]), x.dtype)  # noqa: E731
    tql.dispatch.call_kernel = fake if mode == "nokernel" else real_call


def layer_times(model, config, tok):
    """GPU time (chained) and graph-building time of one call of each layer kind."""
    layer = model.model.layers[0]
    x1 = mx.random.normal((1, 1, config["hidden_size"])).astype(mx.float16)
    xf = mx.random.normal((1, 1, config["intermediate_size"])).astype(mx.float16)
    head = getattr(model, "lm_head", None) or model.model.embed_tokens.as_linear
    parts = {
        "embed": lambda: model.model.embed_tokens(tok),
        "q_proj": lambda: layer.self_attn.q_proj(x1),
        "k_proj": lambda: layer.self_attn.k_proj(x1),
        "gate_proj": lambda: layer.mlp.gate_proj(x1),
        "down_proj": lambda: layer.mlp.down_proj(xf),
        "lm_head": lambda: head(x1),
        "layer": lambda: layer(x1, mask=None, cache=None),
    }
    for name, fn in parts.items():
        mx.eval(fn())
        times = []
        for _ in range(5):
            outs = [fn() for _ in range(50)]
            mx.synchronize()
            t0 = time.perf_counter()
            mx.eval(outs)
            mx.synchronize()
            times.append((time.perf_counter() - t0) / 50)
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t0) / 200
        print(
            f"   {name:10s} gpu+eval {statistics.median(times) * 1e6:8.1f} us   "
            f"build {host * 1e6:7.1f} us",
            flush=True,
        )


for spec in sys.argv[2].split(","):
    variant, _, mode = spec.partition(":")
    set_mode(mode)
    model = make_model(config, variant)
    cache = make_prompt_cache(model)
    prompt = mx.array([[1] * 64])
    mx.eval(model(prompt, cache=cache))
    tok = mx.array([[5]])
    build, total = [], []
    for _ in range(30):
        mx.synchronize()
        t0 = time.perf_counter()
        out = model(tok, cache=cache)
        t1 = time.perf_counter()
        mx.eval(out)
        mx.synchronize()
        t2 = time.perf_counter()
        build.append(t1 - t0)
        total.append(t2 - t0)
        for c in cache:
            c.trim(1)
    print(
        f"{spec:14s} build {statistics.median(build) * 1e3:7.2f} ms  "
        f"build+eval {statistics.median(total) * 1e3:7.2f} ms",
        flush=True,
    )
    if "--layers" in sys.argv:
        layer_times(model, config, tok)
    if variant.startswith("tq") and not mode and "--profile" in sys.argv:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(10):
            out = model(tok, cache=cache)
            for c in cache:
                c.trim(1)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        print(s.getvalue()[-3500:])
    del model, cache
    mx.clear_cache()
