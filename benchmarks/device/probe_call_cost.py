"""Host cost of one custom-kernel call on MLX-CUDA, against MLX's own ops: what a decode step
pays per op before the GPU does anything (decode of 1B-3B models is host-bound there,
docs/kvcache.md).

For each kind, N calls on the same small inputs are recorded (``build``: the Python call
that makes the graph node) and then evaluated in one ``mx.eval`` (``eval``: MLX's
``eval_gpu`` of each node, the CUDA graph work, and a GPU time that is tiny here): us per
call, medians of 5 rounds after a warmup. Kinds: ``mx.add``; fp16 SDPA over 4K tokens; a
trivial ``mx.fast.cuda_kernel`` with a short source, the same with its source padded by a
comment to the attend kernel's size (inline, and handed over as a file the way tq-kernels
hands its kernels to NVRTC: tq_kernels.kernel_file), and the same with 16 inputs read
through their shapes (MLX passes a shape and strides per input that names them); and the
kept TurboQuant attend +
finish launch of a K4V3 cache at 4K and at 32K tokens (SIMT and tensor-core text).

usage: python benchmarks/device/probe_call_cost.py [--calls 200] [--json F]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
from probe_rows import ProbeRows, host_cost_us
from tq_cli.bench_kv import _tq_cache, parse_settings
from tq_kernels.kernel_file import by_file
from tq_kvcache.attention import cache_attention

_TRIVIAL = "if (threadIdx.x == 0) o[0] = a[0];"


def _kernel(source: str, inputs: int, arrays: list, file: bool = False):
    """A zero-argument call of a trivial kernel over the first ``inputs`` of ``arrays``; with
    ``file``, its text handed over as a file (tq_kernels.kernel_file)."""
    names = [f"a{i}" if i else "a" for i in range(inputs)]
    if inputs > 1:  # every input named with its shape, as the attend kernel's are
        source = source + "".join(f"\n(void){n}_shape[0];" for n in names[1:])
    header = ""
    if file:
        header, source = by_file(header, source, names)
    k = mx.fast.cuda_kernel(name=f"probe_{len(source)}_{inputs}_{file:d}", input_names=names,
                            output_names=["o"], source=source, header=header)  # fmt: skip

    def call():
        return k(inputs=arrays[:inputs], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                 output_shapes=[(1,)], output_dtypes=[mx.float32])[0]  # fmt: skip

    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = ProbeRows("probe_call_cost", a.json)
    small = [mx.ones((4,)) for _ in range(16)]
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    k = mx.random.normal((1, 8, 4096, 128)).astype(mx.float16)
    mx.eval(small, q, k)
    pad = "\n//" + "x" * 30000 + "\n"
    kinds = {
        "mx.add": lambda: small[0] + small[1],
        "fp16 sdpa 4K": lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.088),
        "custom kernel, short source": _kernel(_TRIVIAL, 1, small),
        "custom kernel, 30 KB source": _kernel(_TRIVIAL + pad, 1, small),
        "custom kernel, 30 KB source by file": _kernel(_TRIVIAL + pad, 1, small, file=True),
        "custom kernel, 16 inputs": _kernel(_TRIVIAL, 16, small),
    }
    (s,) = parse_settings("K4V3")
    for T in (4096, 32768):
        kk = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
        cache = _tq_cache(kk, kk, s["knobs"])
        mx.eval(cache_attention(q, cache, 0.088))  # routes once; later calls reuse the launch
        kinds[f"TurboQuant K4V3 attend+finish {T // 1024}K"] = lambda c=cache: cache_attention(
            q, c, 0.088
        )
    for kind, make in kinds.items():
        build, evaluate = host_cost_us(make, a.calls)
        rows.emit(kind=kind, build_us=round(build, 2), eval_us=round(evaluate, 2))
    rows.save()


if __name__ == "__main__":
    main()
