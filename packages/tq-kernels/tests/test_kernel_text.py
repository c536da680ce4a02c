"""Every kernel's CUDA and Metal text compiles as C++ against host stand-ins (CI; needs g++):
the packed-KV attention kernels (every codes layout x query-row bucket x mode x dtype, plus
combine and finish) and the weight kernels (matvec with its QJL, rotation and sibling
variants over bits, group sizes, row buckets and launch shapes; MoE gather; dequantize).

Each body is wrapped in a function with the argument list MLX's ``cuda_kernel`` /
``metal_kernel`` gives it (typed inputs with ``_shape`` / ``_strides`` / ``_ndim``, typed
outputs, Metal's thread-position arguments, the template arguments as constants) and
compiled by the host's g++ with stand-ins for the builtins and types the preludes use
(Metal's address spaces become nothing, threadgroup arrays static). It catches what costs a
device run to find, or on Metal cannot be run here at all (a typo, an undeclared name, a
wrong type, a CUDA-only call in shared text), not what only a GPU shows (numerics, races,
speed, Metal's own rules): the GPU tests in tests/test_kernels_gpu.py and tq-kvcache's
test_fused_attention.py cover those on CUDA."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from tq_kernels.attention import KeyPart, ValuePart, _layout
from tq_kernels.attention_merge_source import combine_source, finish_source
from tq_kernels.attention_mma_source import mma_applies
from tq_kernels.attention_source import attend_source, prefetches_values
from tq_kernels.sources import kernel_source

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="no g++ to compile the kernel text with")

_COMMON = r"""
#include <cstddef>
#include <cstdint>
#include <algorithm>
struct float4 { float x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint3 { unsigned x, y, z; };
#define TQ_HALF_LIKE(name) struct name { \
  unsigned short v; name() {} name(float) {} operator float() const { return 0; } };
"""

_CUDA_STUBS = r"""
#define __device__
#define __forceinline__ inline
#define __shared__ static
TQ_HALF_LIKE(__half)
TQ_HALF_LIKE(__nv_bfloat16)
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline float __int_as_float(int) { return 0; }
inline float __uint_as_float(unsigned) { return 0; }
inline float __half2float(__half) { return 0; }
inline __half __ushort_as_half(unsigned short) { return __half(); }
inline float __expf(float v) { return v; }
inline float fmaxf(float a, float b) { return a > b ? a : b; }
inline void __syncthreads() {}
static uint3 threadIdx, blockIdx, blockDim;
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
using std::max;
using std::min;
"""

_METAL_STUBS = r"""
typedef unsigned int uint;
typedef unsigned short ushort;
TQ_HALF_LIKE(half)
TQ_HALF_LIKE(bfloat16_t)
#define INFINITY __builtin_inff()
namespace metal {
enum class mem_flags { mem_none, mem_threadgroup, mem_device };
inline void threadgroup_barrier(mem_flags) {}
inline float simd_sum(float v) { return v; }
inline float simd_max(float v) { return v; }
inline float simd_shuffle_xor(float v, ushort) { return v; }
template <typename A> inline A max(A a, A b) { return a > b ? a : b; }
template <typename A> inline A min(A a, A b) { return a < b ? a : b; }
namespace fast { inline float exp(float v) { return v; } }
}  // namespace metal
using namespace metal;
#define device
#define constant
#define thread
#define threadgroup
"""

#: C names of the model dtypes each backend's kernels are instantiated with.
DTYPES = {
    "cuda": {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"},
    "metal": {"float16": "half", "bfloat16": "bfloat16_t", "float32": "float"},
}
_HALF = {"cuda": "__half", "metal": "half"}


def _header(backend: str, header: str) -> str:
    if backend == "cuda":
        return _CUDA_STUBS + header
    header = header.replace("#include <metal_stdlib>", "").replace("using namespace metal;", "")
    # Threadgroup arrays are declared in the body; in C++ a static array is the stand-in.
    return _METAL_STUBS + header + "\n#undef TQ_SHARED\n#define TQ_SHARED static\n"


def _signature(backend: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    space = "device " if backend == "metal" else ""
    args = []
    for name, ctype in inputs.items():
        args += [f"const {space}{ctype}* {name}", f"const int* {name}_shape"]
        args += [f"const int64_t* {name}_strides", f"const int {name}_ndim"]
    args += [f"{space}{ctype}* {name}" for name, ctype in outputs.items()]
    if backend == "metal":
        args += [
            f"uint3 {p}"
            for p in (
                "thread_position_in_grid",
                "thread_position_in_threadgroup",
                "threadgroup_position_in_grid",
            )
        ]
    return ", ".join(args)


def _constants(template: list[tuple[str, object]]) -> str:
    """MLX's template arguments as the declarations the body sees in the stand-in."""
    out = []
    for name, value in template:
        if isinstance(value, bool):
            out.append(f"  constexpr bool {name} = {str(value).lower()};")
        elif isinstance(value, int):
            out.append(f"  constexpr int {name} = {value};")
        else:
            out.append(f"  using {name} = {value};")
    return "\n".join(out) + "\n"


def compile_errors(backend: str, header: str, kernels: list[tuple[str, str, dict, dict]]) -> str:
    """g++ diagnostics ('' when clean) for ``kernels`` = [(name, body, inputs, outputs)] of
    ``backend``, each argument dict mapping a name to its C type, all under ``header``."""
    parts = [_COMMON, _header(backend, header)]
    for name, body, inputs, outputs in kernels:
        parts.append(f"void {name}({_signature(backend, inputs, outputs)}) {{\n{body}\n}}\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.cpp"
        path.write_text("\n".join(parts))
        done = subprocess.run(
            [GXX, "-std=c++17", "-fsyntax-only", "-w", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    return "" if done.returncode == 0 else done.stderr[:4000]


LAYOUTS = {
    "k4v3": ((KeyPart(128, 4),), (ValuePart(128, 3, None, None, None),)),
    "k3v2": ((KeyPart(128, 3),), (ValuePart(128, 2, None, None, None),)),
    "k8v8": ((KeyPart(128, 8),), (ValuePart(128, 8, None, None, None),)),
    "k2v1-d64": ((KeyPart(64, 2),), (ValuePart(64, 1, None, None, None),)),
    "k3v2-prod": ((KeyPart(128, 2, sgn=object()),), (ValuePart(128, 2, None, None, None),)),
    "k1-prod": ((KeyPart(64, 0, sgn=object()),), (ValuePart(64, 1, None, None, None),)),
    "k3.5v2.5": (
        (KeyPart(64, 4), KeyPart(64, 3)),
        (ValuePart(64, 3, None, None, None), ValuePart(64, 2, None, None, None)),
    ),
    "k1.5v1.5": (
        (KeyPart(32, 2), KeyPart(32, 1)),
        (ValuePart(32, 2, None, None, None), ValuePart(32, 1, None, None, None)),
    ),
}


def _ctype(backend: str, name: str, model: str, raw: bool) -> str:
    """The C type MLX gives input ``name`` of the attend kernel."""
    if name.endswith(("_idx", "_sgn")):
        return "unsigned int"
    if name.endswith(("_norm", "_rnorm")):
        return _HALF[backend]  # the cache stores norms in float16
    if name in ("counts", "kperm", "vperm"):
        return "int"
    if name.startswith(("sink_", "tail_")) or (name == "q" and raw):
        return model
    return "float"  # qf, prepared q, params, codebooks, signs


def _layouts():
    for keys, values in LAYOUTS.values():
        dk, dv = sum(p.width for p in keys), sum(p.width for p in values)
        perm = len(keys) > 1
        for rows in (1, 4, 16):
            for raw in (False,) if any(p.prod for p in keys) else (False, True):
                yield _layout(keys, values, rows, dk, dv, raw, perm and raw, perm and raw)[0]


def _attend_kernels(backend: str):
    header, kernels, paths = None, [], set()
    for layout in _layouts():
        for dtype, ctype in DTYPES[backend].items():
            if dtype != "float16" and layout.rows != 4:
                continue  # each dtype once per layout is enough
            # CUDA: the tensor-core packed splits where they apply (with L2 prefetches),
            # and the SIMT body.
            for mma in (True, False) if mma_applies(layout, backend) else (True,):
                source = attend_source(layout, backend, mma, prefetch=4 if mma else 0)
                name, kheader, body, inputs, outputs = source
                assert header in (None, kheader)  # one header for every layout
                header = kheader
                args = {n: _ctype(backend, n, ctype, layout.raw) for n in inputs}
                kernels.append((f"{name}_{dtype}", body, args, {o: "float" for o in outputs}))
                paths.add(prefetches_values(layout))
    return header, kernels, paths


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_every_attend_kernel_compiles(backend):
    header, kernels, paths = _attend_kernels(backend)
    assert paths == {True, False}  # both value paths (staged and direct) were compiled
    assert compile_errors(backend, header, kernels) == ""


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_merge_kernels_compile(backend):
    name, header, body, inputs, outputs = combine_source(backend)
    kernels = [
        (
            name,
            body,
            {n: "int" if n == "counts" else "float" for n in inputs},
            {o: "float" for o in outputs},
        )
    ]
    for layout in _layouts():
        if not layout.raw:
            continue
        fname, fheader, fbody, finputs, foutputs = finish_source(layout, backend)
        assert fheader == header
        for dtype, ctype in DTYPES[backend].items():
            args = {n: "int" if n in ("counts", "vperm") else "float" for n in finputs}
            body = f"  using T = {ctype};\n" + fbody  # MLX's template argument T
            kernels.append((f"{fname}_{dtype}", body, args, {foutputs[0]: ctype}))
    assert compile_errors(backend, header, kernels) == ""


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_a_broken_kernel_text_is_caught(backend):
    """The check itself: a missing semicolon, or a CUDA-only call in the shared text."""
    header, kernels, _ = _attend_kernels(backend)
    name, body, inputs, outputs = kernels[0]
    for bad in (
        body.replace("const int chunk = counts[0];", "const int chunk = counts[0]"),
        body.replace("TQ_BARRIER();", "__syncthreads(); __threadfence();", 1),
    ):
        assert bad != body
        assert compile_errors(backend, header, [(name, bad, inputs, outputs)])


def _weight_kernels(backend: str):
    """(header, kernels) of every matvec variant, and of dequantize, in ``backend``'s text."""
    half = _HALF[backend]
    groups = {}
    for dtype, ctype in DTYPES[backend].items():
        for op, qjl, span, segments, residual in (
            ("matvec", False, 0, 1, False),
            ("matvec", True, 0, 1, False),
            ("matvec", False, 32, 1, False),
            ("matvec", False, 64, 1, True),
            ("matvec", False, 0, 1, True),
            ("matvec", False, 128, 2, False),
            ("matvec", False, 0, 3, False),
            ("gather_matvec", False, 0, 1, False),
            ("gather_matvec", True, 0, 1, False),
        ):
            src = kernel_source(
                op, backend, qjl=qjl, rotate=span > 0, segments=segments, residual=residual
            )
            types = {
                "x": ctype,
                "xs": ctype,
                "res": ctype,
                "codebook": "float",
                "ei": "unsigned int",
            }
            args = {
                n: types.get(n, "unsigned int" if n.startswith(("w", "qsigns", "rsigns")) else half)
                for n in src.input_names
            }
            for bits, gs, m, launch in (
                (2, 32, 1, (4, 1, 4)),
                (3, 64, 8, (1, 2, 4)),
                (4, 128, 2, (2, 4, 8)),
            ):
                template = [("T", ctype), ("BITS", bits), ("GS", gs), ("M", m)]
                template += [("RPW", launch[0]), ("KSPLIT", launch[1]), ("NWARPS", launch[2])]
                template += [("QJL", qjl), ("ROT", span > 0), ("SPAN", span or 32)]
                if span:  # rotation in registers (XSH 0) and once per threadgroup
                    template.append(("XSH", 0 if bits == 2 else m * 4096))
                name = f"{src.name}_{dtype}_{bits}_{gs}_{m}_{launch[1]}"
                body = _constants(template) + src.body
                outs = {o: ctype for o in src.output_names}
                groups.setdefault(src.header, []).append((name, body, args, outs))
        src = kernel_source("dequantize", backend)
        args = {"w": "unsigned int", "scales": half, "codebook": "float"}
        for bits, gs in ((2, 32), (3, 64), (4, 128)):
            template = [("T", ctype), ("BITS", bits), ("GS", gs), ("NTHREADS", 256)]
            name = f"{src.name}_{dtype}_{bits}_{gs}"
            groups.setdefault(src.header, []).append(
                (name, _constants(template) + src.body, args, {"out": ctype})
            )
    return groups


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_every_weight_kernel_compiles(backend):
    groups = _weight_kernels(backend)
    assert len(groups) == 2  # the matvec header, the dequantize header
    for header, kernels in groups.items():
        assert compile_errors(backend, header, kernels) == ""


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_paired_value_fields_compute_the_per_lookup_indices(bits, tmp_path):
    """The interleaved value words (``PAIRED_VALUE_FIELDS``), executed on the host: for random
    windows, every code's paired field equals ``lo | hi << bits`` read field by field."""
    from tq_kernels.attention_mma_fragments import field, paired_field, paired_words, window_words

    body = []
    for width in (32, 64, 128):
        nb = width * bits // 8  # a value window: the part's channels g * W/8 .. + W/8 - 1
        n = window_words(nb)
        checks = [
            f"      if ({paired_field('y', c * bits, bits)} != ({field('lo', c * bits, bits)} | "
            f"({field('hi', c * bits, bits)} << {bits}))) return {width};"
            for c in range(nb // bits)
        ]
        body += [
            "    {",
            f"      tq_uint lo[{n}], hi[{n}];",
            f"      for (int k = 0; k < {n}; ++k) {{ lo[k] = rng(); hi[k] = rng(); }}",
            *paired_words("y", "lo", "hi", nb, bits),
            *checks,
            "    }",
        ]
    source = tmp_path / "paired.cpp"
    source.write_text(
        "#include <random>\ntypedef unsigned int tq_uint;\n"
        "static unsigned tq_funnel(unsigned lo, unsigned hi, int s) {\n"
        "  return s ? (lo >> s) | (hi << (32 - s)) : lo;\n}\n"
        "int main() {\n  std::mt19937 rng(7);\n  for (int t = 0; t < 500; ++t) {\n"
        + "\n".join(body)
        + "\n  }\n  return 0;\n}\n"
    )
    exe = tmp_path / "paired"
    subprocess.run([GXX, "-O1", "-o", str(exe), str(source)], check=True, timeout=120)
    assert subprocess.run([str(exe)], timeout=60).returncode == 0


@pytest.mark.parametrize("knobs", ["shipped", "flipped"])
def test_tensor_core_knobs_compile(knobs, monkeypatch):
    """Paired value fields, the lazy max and per-head load offsets as shipped and flipped,
    each with the off-by-default L2 prefetch, in every layout the tensor cores take."""
    import tq_kernels.attention_mma_source as mma_source

    paired, lazy = mma_source.PAIRED_VALUE_FIELDS, mma_source.LAZY_MAX
    heads = mma_source.HEAD_OFFSETS
    if knobs == "flipped":
        paired, lazy, heads = not paired, not lazy, not heads
        monkeypatch.setattr(mma_source, "PAIRED_VALUE_FIELDS", paired)
        monkeypatch.setattr(mma_source, "LAZY_MAX", lazy)
        monkeypatch.setattr(mma_source, "HEAD_OFFSETS", heads)
    kernels, header = [], None
    for name, (keys, values) in LAYOUTS.items():
        dk, dv = sum(p.width for p in keys), sum(p.width for p in values)
        layout = _layout(keys, values, 4, dk, dv)[0]
        if not mma_applies(layout, "cuda"):
            continue
        kname, header, body, inputs, outputs = attend_source(layout, "cuda", True, prefetch=4)
        assert ("tq_any(grow)" in body) == lazy and "tq_prefetch_span(lane" in body
        assert ("k0_idx_h + lt0 * k0_idx_t" in body) == heads, name
        for j, v in enumerate(values):
            assert (f"y01_v{j}e" in body) == (paired and v.bits in (1, 2, 4)), name
        args = {n: _ctype("cuda", n, "__half", layout.raw) for n in inputs}
        kernels.append((kname, body, args, {o: "float" for o in outputs}))
    assert kernels and compile_errors("cuda", header, kernels) == ""
