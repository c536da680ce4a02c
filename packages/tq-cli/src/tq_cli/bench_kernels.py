"""`tq bench kernels`: fused TurboQuant matvec against fp16 and MLX affine, per call on a GPU.

One eval has a fixed cost (~110 us on the H100), so each timing chains ``calls`` products,
each on its own copy of the weight (enough copies that they do not fit in L2), into one eval
and divides; after a warmup, the median of ``repeats`` evals is reported. Speeds are given as
effective GB/s over the bytes a call must read (weights, scales, biases) and as the ratio of
TurboQuant's time to affine's at the same bits.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from .table import format_table

DENSE_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (2880, 2880))
MOE = {"experts": 32, "out": 2880, "in": 2880, "top_k": 4}
AFFINE_BITS = (3, 4)
TQ_BITS = (2, 3, 4)
GROUP = 64
_MIN_BYTES_IN_FLIGHT = 256 * 2**20  # several times the H100's 50 MB L2


def time_per_call(make_outputs, calls: int, repeats: int) -> float:
    """Median seconds per call of ``make_outputs(calls)`` (a list of lazy arrays)."""
    mx.eval(make_outputs(min(calls, 4)))  # compile kernels, warm allocators
    times = []
    for _ in range(repeats + 1):
        outs = make_outputs(calls)
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times[1:])  # the first of these still warms caches


def _copies(nbytes: int, calls: int) -> int:
    return max(2, min(calls, -(-_MIN_BYTES_IN_FLIGHT // max(nbytes, 1))))


def _nbytes(*arrays) -> int:
    return sum(a.nbytes for a in arrays)


def _random_tq(shape, bits: int, seed: int):
    from tq_core import QuantizedWeight, pack

    k1, k2 = mx.random.split(mx.random.key(seed))
    idx = mx.random.randint(0, 2**bits, shape, key=k1).astype(mx.uint32)
    groups = (*shape[:-1], shape[-1] // GROUP)
    scales = (0.02 * (0.5 + mx.random.uniform(shape=groups, key=k2))).astype(mx.float16)
    codes = QuantizedWeight(pack(idx, bits), scales, bits, GROUP)
    mx.eval(codes.indices, codes.scales)
    return codes


def _dense_rows(n: int, k: int, calls: int, repeats: int, rows: int) -> list[dict]:
    from tq_core.rotation import Rotation, make_rotation
    from tq_kernels import rotating_matmul_plan, weight_matmul

    x = mx.random.normal((rows, k)).astype(mx.float16)
    r = make_rotation(k, seed=0, block=GROUP)
    rot = Rotation(r.dim, r.block, r.seed, r.signs.astype(mx.float16))
    out = []

    def measure(name, bits, weights, fn, nbytes):
        sec = time_per_call(
            lambda c: [fn(weights[i % len(weights)]) for i in range(c)], calls, repeats
        )
        out.append(
            {
                "shape": f"{n}x{k}",
                "rows": rows,
                "kind": name,
                "bits": bits,
                "us_per_call": sec * 1e6,
                "bytes": nbytes,
                "gb_per_s": nbytes / sec / 1e9,
            }
        )

    w16 = (0.02 * mx.random.normal((n, k))).astype(mx.float16)
    mx.eval(w16)
    ws = [w16] + [mx.array(w16 + 0) for _ in range(_copies(w16.nbytes, calls) - 1)]
    mx.eval(ws)
    measure("fp16", 16, ws, lambda w: x @ w.T, w16.nbytes)
    del ws
    for b in AFFINE_BITS:
        q = mx.quantize(w16, group_size=GROUP, bits=b)
        mx.eval(q)
        nb = _nbytes(*q)
        qs = [q] + [tuple(mx.array(a + 0) for a in q) for _ in range(_copies(nb, calls) - 1)]
        mx.eval(qs)
        measure(
            "affine",
            b,
            qs,
            lambda t, b=b: mx.quantized_matmul(x, *t, transpose=True, group_size=GROUP, bits=b),
            nb,
        )
        del qs
    for b in TQ_BITS:
        codes = [_random_tq((n, k), b, seed=i) for i in range(1)]
        nb = _nbytes(codes[0].indices, codes[0].scales)
        codes += [_random_tq((n, k), b, seed=i) for i in range(1, _copies(nb, calls))]
        measure("turboquant", b, codes, lambda c: weight_matmul(x, c), nb)
        # The decode path, as a layer runs it: a plan per weight (built once, its launch
        # compiled) whose kernel rotates the raw activation itself (span 64).
        plans = [rotating_matmul_plan(x, [c], rot) for c in codes]
        measure("turboquant+rot", b, plans, lambda p: p(x)[0], nb)
        del codes
    return out


def _moe_rows(calls: int, repeats: int) -> list[dict]:
    from tq_kernels import weight_gather_matmul

    e, n, k, top = MOE["experts"], MOE["out"], MOE["in"], MOE["top_k"]
    x = mx.random.normal((1, 1, 1, 1, k)).astype(mx.float16)
    idx = [
        mx.random.permutation(e, key=mx.random.key(i))[:top].reshape(1, 1, top).astype(mx.uint32)
        for i in range(calls)
    ]
    mx.eval(idx)
    out = []
    shape = f"moe {e}x{n}x{k} top{top}"

    def measure(name, bits, weights, fn, nbytes_per_expert):
        sec = time_per_call(
            lambda c: [fn(weights[i % len(weights)], idx[i]) for i in range(c)], calls, repeats
        )
        nbytes = nbytes_per_expert * top
        out.append(
            {
                "shape": shape,
                "rows": 1,
                "kind": name,
                "bits": bits,
                "us_per_call": sec * 1e6,
                "bytes": nbytes,
                "gb_per_s": nbytes / sec / 1e9,
            }
        )

    w16 = (0.02 * mx.random.normal((e, n, k))).astype(mx.float16)
    mx.eval(w16)
    measure(
        "fp16",
        16,
        [w16],
        lambda w, i: mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=i),
        w16.nbytes // e,
    )
    for b in AFFINE_BITS:
        q = mx.quantize(w16, group_size=GROUP, bits=b)
        mx.eval(q)
        qs = [q] + [tuple(mx.array(a + 0) for a in q) for _ in range(_copies(_nbytes(*q), 8) - 1)]
        mx.eval(qs)
        measure(
            "affine",
            b,
            qs,
            lambda t, i, b=b: mx.gather_qmm(
                x, *t, rhs_indices=i, transpose=True, group_size=GROUP, bits=b
            ),
            _nbytes(*q) // e,
        )
        del qs
    del w16
    for b in TQ_BITS:
        first = _random_tq((e, n, k), b, seed=0)
        nb = _nbytes(first.indices, first.scales)
        codes = [first] + [_random_tq((e, n, k), b, seed=s) for s in range(1, _copies(nb, 8))]
        measure("turboquant", b, codes, lambda c, i: weight_gather_matmul(x, c, i), nb // e)
        del codes
    return out


def _prefill_rows(calls: int, repeats: int) -> list[dict]:
    """Many activation rows on 4096x4096 3-bit: chunked matvec, dequantize kernel + matmul,
    the reference path, and fp16 matmul, to place the crossover (CHUNKED_ROWS)."""
    from tq_core.weights import dequantize_weight_rotated
    from tq_kernels import dequantize, matvec

    n = k = 4096
    codes = _random_tq((n, k), 3, seed=0)
    w16 = (0.02 * mx.random.normal((n, k))).astype(mx.float16)
    out = []
    for rows in (1, 8, 16, 32, 64, 128, 512):
        x = mx.random.normal((rows, k)).astype(mx.float16)
        ways = {
            "fp16": lambda x=x: x @ w16.T,
            "tq_chunked_matvec": lambda x=x, r=rows: mx.concatenate(
                [matvec(x[i : i + 8], codes) for i in range(0, r, 8)], axis=0
            ),
            "tq_dequant_kernel_matmul": lambda x=x: x @ dequantize(codes, x.dtype).T,
            "tq_reference": lambda x=x: x @ dequantize_weight_rotated(codes, x.dtype).T,
        }
        for name, fn in ways.items():
            if name == "tq_chunked_matvec" and rows > 64:
                continue
            sec = time_per_call(lambda c, fn=fn: [fn() for _ in range(c)], calls // 4, repeats)
            out.append({"rows": rows, "kind": name, "us_per_call": sec * 1e6})
    return out


def _sweep_rows(calls: int, repeats: int, shapes=DENSE_SHAPES) -> list[dict]:
    """Launch geometries of the rotating dense matvec (the decode path) on ``shapes``."""
    from tq_core.rotation import make_rotation
    from tq_kernels import LaunchConfig, kernel_backend, launch_config, pack_sign_bits
    from tq_kernels.matvec import rotated_elements

    geometries = [
        (4, 1, 4),
        (4, 2, 4),
        (2, 1, 4),
        (8, 1, 4),
        (2, 1, 8),
        (4, 1, 8),
        (4, 2, 8),
        (8, 1, 8),
    ]
    # Each geometry with the activation rotated once per threadgroup (where it fits) and
    # in every warp's registers.
    configs = [LaunchConfig(*g, rotate_shared=s) for g in geometries for s in (True, False)]
    out = []
    for n, k in shapes:
        x = mx.random.normal((1, k)).astype(mx.float16)
        sign_bits = pack_sign_bits(make_rotation(k, seed=0, block=GROUP).signs)
        backend = kernel_backend()
        shared = rotated_elements(x.dtype, k, 1, LaunchConfig(), backend) > 0
        for b in (3, 4):
            first = _random_tq((n, k), b, seed=0)
            nb = _nbytes(first.indices, first.scales)
            codes = [first] + [_random_tq((n, k), b, seed=s) for s in range(1, _copies(nb, calls))]
            for cfg in configs:
                if (k // 32) < 32 * cfg.ksplit:
                    continue  # a K-split warp would get no block
                sec = _time_matvec(x, codes, sign_bits, cfg, calls, repeats)
                out.append(
                    {
                        "shape": f"{n}x{k}",
                        "bits": b,
                        "config": [cfg.rows_per_warp, cfg.ksplit, cfg.warps],
                        "rotate_shared": cfg.rotate_shared,
                        "default": cfg == launch_config(n, k, 1, rotated_shared=shared),
                        "us_per_call": sec * 1e6,
                        "gb_per_s": nb / sec / 1e9,
                    }
                )
            del codes
    return out


def _time_matvec(x, codes, sign_bits, cfg, calls: int, repeats: int) -> float:
    from tq_kernels import rotating_matvec

    return time_per_call(
        lambda c: [
            rotating_matvec(x, codes[i % len(codes)], sign_bits, GROUP, config=cfg)
            for i in range(c)
        ],
        calls,
        repeats,
    )


def add_ratios(rows: list[dict]) -> None:
    """``ratio_to_affine``: TurboQuant's time over affine's at the same bits and shape."""
    affine = {(r["shape"], r["bits"]): r["us_per_call"] for r in rows if r["kind"] == "affine"}
    fp16 = {r["shape"]: r["us_per_call"] for r in rows if r["kind"] == "fp16"}
    for r in rows:
        ref = affine.get((r["shape"], r["bits"]))
        if r["kind"].startswith("turboquant") and ref:
            r["time_ratio_to_affine"] = r["us_per_call"] / ref
        if r["shape"] in fp16:
            r["time_ratio_to_fp16"] = r["us_per_call"] / fp16[r["shape"]]


def run(
    calls: int = 100,
    repeats: int = 5,
    shapes=DENSE_SHAPES,
    moe: bool = True,
    prefill: bool = True,
    sweep: bool = False,
) -> dict:
    """All measurements as one JSON-ready dict (needs a GPU backend for the fused kernels)."""
    from tq_kernels import kernel_backend, register_all

    register_all()
    shapes = tuple(shapes)
    rows = []
    for n, k in shapes:
        rows += _dense_rows(n, k, calls, repeats, 1)
    if moe:
        rows += _moe_rows(calls, repeats)
    add_ratios(rows)
    result = {
        "benchmark": "kernels",
        "device": str(mx.default_device()),
        "kernel_backend": kernel_backend(),
        "mlx": mx.__version__,
        "calls_per_eval": calls,
        "repeats": repeats,
        "group_size": GROUP,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }
    if prefill:
        result["prefill"] = _prefill_rows(calls, repeats)
    if sweep:
        result["sweep"] = _sweep_rows(calls, repeats, shapes)
    return result


def render(result: dict) -> str:
    header = ["shape", "kind", "bits", "us/call", "GB/s", "x affine"]
    body = [
        [
            r["shape"],
            r["kind"],
            str(r["bits"]),
            f"{r['us_per_call']:.1f}",
            f"{r['gb_per_s']:.0f}",
            f"{r['time_ratio_to_affine']:.2f}" if "time_ratio_to_affine" in r else "",
        ]
        for r in result["rows"]
    ]
    return format_table(header, body)
