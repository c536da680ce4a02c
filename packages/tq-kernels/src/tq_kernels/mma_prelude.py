"""CUDA tensor-core helper text for kernel headers: inline PTX for ``mma.sync`` m16n8k16
(fp16 in, fp32 accumulate), float16 pair packing and hi/lo splitting, funnel shifts,
L2 prefetches and warp syncs (sm_80+). Metal has simdgroup matrices with another fragment layout,
so nothing here has a Metal counterpart; kernels use it on CUDA only."""

from __future__ import annotations

__all__ = ["MMA_HELPERS"]

MMA_HELPERS = r"""
// Tensor-core helpers (CUDA sm_80+). The host-side branch only lets the kernel text be
// syntax-checked by a C++ compiler (tests/test_kernel_text.py); it never runs.
// c[16 x 8] += a[16 x 16] b[16 x 8], fp16 inputs, fp32 accumulators (PTX fragment layout).
TQ_INLINE void tq_mma16816(float* c, const unsigned* a, const unsigned* b) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  c[0] += (float)(a[0] + b[0]);
#endif
}
// Two floats as a float16 pair (x in the low half), and x's float16 rounding as a float.
TQ_INLINE unsigned tq_h2(float x, float y) {
#if defined(__CUDA_ARCH__)
  const __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const unsigned*>(&h);
#else
  return (unsigned)(x + y);
#endif
}
TQ_INLINE float tq_hround(float x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__float2half_rn(x));
#else
  return x;
#endif
}
// x split as float16 hi + lo: the hi half, or (with lo) what hi leaves out.
TQ_INLINE float tq_part(float x, bool lo) {
  const float hv = tq_hround(x);
  return lo ? x - hv : hv;
}
TQ_INLINE unsigned tq_funnel(unsigned lo, unsigned hi, int s) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, s);
#else
  return s ? (lo >> s) | (hi << (32 - s)) : lo;
#endif
}
// Lines i, i + 32, ... (128 bytes each) of the span [a, b) prefetched into L2: a hint that
// costs no register and no scoreboard slot, so a warp can have steps in flight far ahead.
template <typename P>
TQ_INLINE void tq_prefetch_span(int i, const P* a, const P* b) {
#if defined(__CUDA_ARCH__)
  const size_t last = ((size_t)b - 1) >> 7;
  for (size_t l = ((size_t)a >> 7) + i; l <= last; l += 32)
    asm volatile("prefetch.L2 [%0];" ::"l"(l << 7));  // generic address (PTX ISA: prefetch)
#endif
}
// Whether ``p`` holds in any lane of the warp (the same answer in every lane).
TQ_INLINE bool tq_any(bool p) {
#if defined(__CUDA_ARCH__)
  return __any_sync(0xffffffffu, p);
#else
  return p;
#endif
}
TQ_INLINE void tq_syncwarp() {
#if defined(__CUDA_ARCH__)
  __syncwarp();
#endif
}
"""
