"""Per-backend preludes: the few lines that differ between CUDA and Metal kernel source.

Every kernel body and helper in :mod:`tq_kernels.sources` is written once against this small
vocabulary, so one text compiles with ``mx.fast.cuda_kernel`` and ``mx.fast.metal_kernel``:

- ``TQ_INLINE`` (device function), ``TQ_SHARED`` (threadgroup/shared array),
  ``TQ_BARRIER()`` (threadgroup barrier), ``TQ_THREAD`` (address space of a thread's own
  arrays), ``tq_uint``;
- ``tq_simd_sum(v)``: sum over the 32 lanes of a warp / SIMD group (both are 32 wide);
  ``tq_shuffle_xor(v, mask)``: the value of lane ``lane ^ mask``;
- ``tq_simd_max(v)``, ``tq_fmax(a, b)``, ``tq_exp(v)`` (fast exp), ``TQ_NEG_INF``, and
  ``TQ_TGPTR``, the address space of a pointer into threadgroup memory (empty on CUDA);
- ``tq_float(v)`` / ``tq_cast<T>(v)``: conversions to and from float;
- ``tq_load_x8(dst, p)``: 8 activations as floats; ``tq_load_words<NB>(dst, p)``: NB packed
  words. CUDA uses 16-byte vector loads (rows are multiples of 32 values, so these are
  aligned); Metal reads element by element and lets its compiler vectorize.
- the body's first lines (:func:`thread_ids`) name the thread/threadgroup ids ``tq_tid``,
  ``tq_bx``, ``tq_by`` and the global thread id ``tq_gid``.
"""

from __future__ import annotations

__all__ = ["BACKENDS", "prelude", "thread_ids"]

BACKENDS = ("cuda", "metal")

_CUDA = r"""
#define TQ_CUDA 1
#define TQ_INLINE __device__ __forceinline__
#define TQ_SHARED __shared__
#define TQ_BARRIER() __syncthreads()
#define TQ_THREAD
typedef unsigned int tq_uint;

TQ_INLINE float tq_simd_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 16);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v;
}

TQ_INLINE float tq_shuffle_xor(float v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

#define TQ_TGPTR
#define TQ_NEG_INF (-__int_as_float(0x7f800000))
TQ_INLINE float tq_fmax(float a, float b) { return fmaxf(a, b); }
TQ_INLINE float tq_exp(float v) { return __expf(v); }
TQ_INLINE float tq_simd_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return v;
}

template <typename V> TQ_INLINE float tq_float(V v) { return static_cast<float>(v); }
template <typename T> TQ_INLINE T tq_cast(float v) { return static_cast<T>(v); }

TQ_INLINE void tq_load_x8(float* d, const float* p) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  d[0] = a.x; d[1] = a.y; d[2] = a.z; d[3] = a.w;
  d[4] = b.x; d[5] = b.y; d[6] = b.z; d[7] = b.w;
}

TQ_INLINE void tq_load_x8(float* d, const __half* p) {
  const uint4 q = *reinterpret_cast<const uint4*>(p);
  const unsigned int u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    d[2 * i] = __half2float(__ushort_as_half((unsigned short)(u[i] & 0xffffu)));
    d[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(u[i] >> 16)));
  }
}

TQ_INLINE void tq_load_x8(float* d, const __nv_bfloat16* p) {
  // bfloat16 is the high half of a float32: a shift converts it exactly.
  const uint4 q = *reinterpret_cast<const uint4*>(p);
  const unsigned int u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    d[2 * i] = __uint_as_float(u[i] << 16);
    d[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

template <int NB>
TQ_INLINE void tq_load_words(tq_uint* d, const unsigned int* p) {
  if (NB % 4 == 0) {
#pragma unroll
    for (int v = 0; v < NB / 4; ++v) {
      const uint4 q = reinterpret_cast<const uint4*>(p)[v];
      d[4 * v] = q.x; d[4 * v + 1] = q.y; d[4 * v + 2] = q.z; d[4 * v + 3] = q.w;
    }
  } else if (NB == 2) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    d[0] = q.x; d[1] = q.y;
  } else {
#pragma unroll
    for (int v = 0; v < NB; ++v) d[v] = p[v];
  }
}
"""

_METAL = r"""
#include <metal_stdlib>
using namespace metal;
#define TQ_METAL 1
#define TQ_INLINE inline
#define TQ_SHARED threadgroup
#define TQ_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define TQ_THREAD thread
typedef uint tq_uint;

inline float tq_simd_sum(float v) { return simd_sum(v); }
inline float tq_shuffle_xor(float v, int mask) { return simd_shuffle_xor(v, (ushort)mask); }

#define TQ_TGPTR threadgroup
#define TQ_NEG_INF (-INFINITY)
inline float tq_fmax(float a, float b) { return metal::max(a, b); }
inline float tq_exp(float v) { return metal::fast::exp(v); }
inline float tq_simd_max(float v) { return simd_max(v); }

template <typename V> inline float tq_float(V v) { return static_cast<float>(v); }
template <typename T> inline T tq_cast(float v) { return static_cast<T>(v); }

template <typename P>
inline void tq_load_x8(thread float* d, P p) {
  for (int i = 0; i < 8; ++i) d[i] = static_cast<float>(p[i]);
}

template <int NB, typename P>
inline void tq_load_words(thread tq_uint* d, P p) {
  for (int v = 0; v < NB; ++v) d[v] = p[v];
}
"""

_IDS = {
    "cuda": (
        "  const unsigned int tq_tid = threadIdx.x;\n"
        "  const int tq_bx = (int)blockIdx.x;\n"
        "  const int tq_by = (int)blockIdx.y;\n"
        "  const size_t tq_gid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;\n"
    ),
    "metal": (
        "  const uint tq_tid = thread_position_in_threadgroup.x;\n"
        "  const int tq_bx = (int)threadgroup_position_in_grid.x;\n"
        "  const int tq_by = (int)threadgroup_position_in_grid.y;\n"
        "  const size_t tq_gid = (size_t)thread_position_in_grid.x;\n"
    ),
}


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def prelude(backend: str) -> str:
    """The header text that maps the shared vocabulary onto ``backend``."""
    _check(backend)
    return _CUDA if backend == "cuda" else _METAL


def thread_ids(backend: str) -> str:
    """The first lines of every kernel body: ``tq_tid``, ``tq_bx``, ``tq_by``, ``tq_gid``."""
    _check(backend)
    return _IDS[backend]
