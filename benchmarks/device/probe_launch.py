"""Per-call cost of MLX custom kernels on CUDA: host graph building and chained eval, against
the size of the kernel's source text and MLX's built-in quantized matmul (a device diagnostic
for docs/kernels.md, not a reported benchmark)."""

# ruff: noqa: B023  (each lambda is timed at once, inside its loop step)
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, "benchmarks")
from tq_kernels import register_all  # noqa: E402

register_all()
from tq_core import group_siblings  # noqa: E402
from tq_core.linear import TurboQuantLinear  # noqa: E402

BODY = """
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < (size_t)x_shape[0]) out[i] = x[i] + (T)1;
"""
PAD = "// " + "x" * 76 + "\n"


def trivial(header_bytes):
    k = mx.fast.cuda_kernel(
        name=f"probe_{header_bytes}",
        input_names=["x"],
        output_names=["out"],
        source=BODY,
        header=PAD * (header_bytes // len(PAD)),
    )
    return lambda x: k(
        inputs=[x],
        template=[("T", x.dtype)],
        grid=(x.size, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )[0]


def timed(name, fn, args_list):
    """host build us per call, chained eval us per call (median of 5, 100 calls per eval)."""
    mx.eval(fn(args_list[0]))
    t0 = time.perf_counter()
    for i in range(400):
        fn(args_list[i % len(args_list)])
    build = (time.perf_counter() - t0) / 400 * 1e6
    times = []
    for _ in range(5):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [fn(args_list[i % len(args_list)]) for i in range(100)]
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - t0) / 100 * 1e6)
    print(f"{name:40s} build {build:6.1f} us   build+eval {statistics.median(times):6.1f} us")


xs = [mx.random.normal((4096,)).astype(mx.float16) for _ in range(8)]
mx.eval(xs)
for hb in (0, 2000, 10000, 40000):
    timed(f"trivial kernel, header {hb} B", trivial(hb), xs)
timed("mx.add", lambda x: x + 1, xs)

n, k = 512, 2048
x1 = [mx.random.normal((1, 1, k)).astype(mx.float16) for _ in range(8)]
mx.eval(x1)
for bits in (3, 4):
    ql = nn.QuantizedLinear(k, n, bias=False, group_size=64, bits=bits)
    ql.weight = ql.weight + 0  # own buffers
    timed(f"nn.QuantizedLinear {n}x{k} {bits}-bit", ql, x1)
    tl = TurboQuantLinear(k, n, bits=bits, group_size=64)
    timed(f"TurboQuantLinear {n}x{k} {bits}-bit", tl, x1)
    mx.eval(tl.indices)
    mv = sys.modules["tq_kernels.matvec"]
    ops = sys.modules["tq_kernels.ops"]
    codes, rot = tl.codes(), tl._rotation_as(mx.float16)
    sb = ops._sign_bits.get(rot.signs)
    timed(f"rotating_matvec direct {bits}-bit", lambda x: mv.rotating_matvec(x, codes, sb, 64), x1)

# q/k/v of a 1B-class llama (2048 -> 2048, 512, 512): three calls on one input.
outs = (2048, 512, 512)
for bits in (3, 4):
    qls = [nn.QuantizedLinear(k, o, bias=False, group_size=64, bits=bits) for o in outs]
    timed(f"q/k/v nn.QuantizedLinear {bits}-bit", lambda x: [la(x) for la in qls], x1)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = (
        TurboQuantLinear(k, o, bits=bits, group_size=64) for o in outs
    )
    tls = [parent.q_proj, parent.k_proj, parent.v_proj]
    timed(f"q/k/v TurboQuantLinear {bits}-bit", lambda x: [la(x) for la in tls], x1)
    assert group_siblings(parent) == 1
    timed(f"q/k/v grouped TurboQuantLinear {bits}-bit", lambda x: [la(x) for la in tls], x1)

# One q/k/v launch three ways: the layer's plan (mx.compile'd launch), the same kernel
# called directly with its prepared arguments, and the plan's compiled function alone.
mvm = sys.modules["tq_kernels.matvec"]
for bits in (3,):
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = (
        TurboQuantLinear(k, o, bits=bits, group_size=64) for o in outs
    )
    tls = [parent.q_proj, parent.k_proj, parent.v_proj]
    codes = [la.codes() for la in tls]
    rot = tls[0]._rotation_as(mx.float16)
    sb = ops._sign_bits.get(rot.signs)
    plan = mvm.rotating_matvec_plan(x1[0], codes, sb, 64)
    timed("q/k/v plan (compiled launch)", plan, x1)
    kernel, codebook, launch = mvm._rotating_plan(x1[0], tuple(codes), 64, None)
    ins = [None, codes[0].indices, codes[0].scales, codebook, sb]
    for c in codes[1:]:
        ins += [c.indices, c.scales]
    timed("q/k/v direct kernel call", lambda x: kernel(inputs=[x, *ins[1:]], **launch), x1)
