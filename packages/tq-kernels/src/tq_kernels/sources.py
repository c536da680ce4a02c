"""Kernel source text, written once for CUDA and Metal on top of :mod:`tq_kernels.prelude`.

Three ops:

- ``"matvec"``: ``out (rows, N) = x (rows, K) @ (s ⊙ C[idx]).T`` for 1 to 8 rows, with the
  optional QJL term ``xs @ (gamma ⊙ z).T``;
- ``"gather_matvec"``: the same per batch entry ``b`` with the weight of expert ``ei[b]``
  (MoE decode: ``mx.gather_mm`` semantics);
- ``"dequantize"``: ``s ⊙ C[idx]`` as a dense (N, K) matrix for prefill (then ``matmul``).

The matvec text and its layout live in :mod:`tq_kernels.matvec_source`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .matvec_source import (
    GATHER_BODY,
    MATVEC_BODY,
    MATVEC_IMPL,
    ROTATED_DECL,
    SHARED_DECLS,
    rotated_args,
    segments_body,
)
from .prelude import prelude, thread_ids

__all__ = ["MAX_SEGMENTS", "OPS", "KernelSource", "kernel_source"]

OPS = ("matvec", "gather_matvec", "dequantize")

_DEQUANT_IMPL = r"""
// out[n, k] = s[n, k / GS] * C[code(n, k)]: one value per thread, so a warp writes 32
// consecutive outputs and reads its block's words once (broadcast).
template <typename T, int BITS, int GS, typename WP, typename SP, typename CP, typename OP,
          typename SH>
TQ_INLINE void tq_dequant(WP w, SP scales, CP codebook, OP out, const int N, const int K,
                          const size_t gid, const tq_uint tid, const int nthreads, SH cb_sh) {
  for (int i = (int)tid; i < (1 << BITS); i += nthreads) cb_sh[i] = tq_float(codebook[i]);
  TQ_BARRIER();
  if (gid >= (size_t)N * K) return;
  const size_t row = gid / K;
  const int k = (int)(gid - row * K);
  const int j = k & 31;
  const size_t base = row * (size_t)((K >> 5) * BITS) + (size_t)(k >> 5) * BITS;
  const int p = j * BITS;
  const int q = p >> 5;
  const int s = p & 31;
  tq_uint code = w[base + q] >> s;
  if (s + BITS > 32) code |= w[base + q + 1] << (32 - s);
  code &= (1u << BITS) - 1u;
  out[gid] = tq_cast<T>(tq_float(scales[row * (K / GS) + k / GS]) * cb_sh[code]);
}
"""

_DEQUANT_BODY = r"""
  TQ_SHARED float tq_cb[1 << BITS];
  tq_dequant<T, BITS, GS>(w, scales, codebook, out, scales_shape[0],
                          scales_shape[1] * GS, tq_gid, tq_tid, NTHREADS, tq_cb);
"""


@dataclass(frozen=True)
class KernelSource:
    """What ``mx.fast.{cuda,metal}_kernel`` takes: header, body and argument names."""

    name: str
    header: str
    body: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


#: Sibling weights one matvec launch can serve (q/k/v is the largest such set).
MAX_SEGMENTS = 3


def kernel_source(
    op: str,
    backend: str,
    qjl: bool = False,
    rotate: bool = False,
    segments: int = 1,
    residual: bool = False,
) -> KernelSource:
    """The source of ``op`` for ``backend`` ("cuda" or "metal"), with or without QJL; with
    ``rotate`` (matvec without QJL only) the kernel takes the unrotated activation and the
    rotation's packed sign bits ``rsigns``, and rotates in registers (template ROT, SPAN).
    ``segments`` > 1 (matvec without QJL): one launch multiplies the same activation by
    that many weights (inputs ``w, scales, w1, scales1, ...``; outputs ``out, out1, ...``).
    ``residual`` (matvec of one weight without QJL): a last input ``res`` of the output's
    shape is added to the product (a decoder block's residual, folded in)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    if rotate and (op != "matvec" or qjl):
        raise ValueError("rotate=True is for the matvec op without QJL")
    if not 1 <= segments <= MAX_SEGMENTS or (segments > 1 and (op != "matvec" or qjl)):
        raise ValueError(
            f"segments={segments}: the matvec without QJL takes 1 to {MAX_SEGMENTS} weights"
        )
    if residual and (op != "matvec" or qjl or segments > 1):
        raise ValueError("residual=True is for the matvec op of one weight without QJL")
    header = prelude(backend)
    ids = thread_ids(backend)
    tag = ("_qjl" if qjl else "") + ("_rot" if rotate else "")
    tag += f"_seg{segments}" if segments > 1 else ""
    tag += "_res" if residual else ""
    if op == "dequantize":
        return KernelSource(
            f"tq_dequant_{backend}",
            header + _DEQUANT_IMPL,
            ids + _DEQUANT_BODY,
            ("w", "scales", "codebook"),
            ("out",),
        )
    gather = op == "gather_matvec"
    names = ["x", "w", "scales", "codebook"] + (["ei"] if gather else [])
    if qjl:
        names += ["xs", "qsigns", "qscales"]
        fill = {"xs": "xs", "qsigns": "qsigns", "qscales": "qscales"}
        if gather:
            fill = {
                "xs": "xs + xo",
                "qsigns": "qsigns + e * ((size_t)N * (K >> 5))",
                "qscales": "qscales + e * spe",
            }
    else:
        # Without QJL the unused pointers alias real ones; QJL=false compiles them out.
        fill = {"xs": "x + xo" if gather else "x", "qsigns": "w", "qscales": "scales"}
    fill["rsigns"] = "rsigns" if rotate else "w"  # likewise with ROT=false
    if rotate:
        names += ["rsigns"]
    outputs = ["out"]
    rotated = rotated_args(rotate)
    if segments > 1:
        body = segments_body(segments, fill["rsigns"], rotated)
        for i in range(1, segments):
            names += [f"w{i}", f"scales{i}"]
            outputs += [f"out{i}"]
    else:
        res = {"res": "res", "res_on": "true"} if residual else {"res": "x", "res_on": "false"}
        body = (
            GATHER_BODY.format(**fill) if gather else MATVEC_BODY.format(**fill, **rotated, **res)
        )
        if residual:
            names += ["res"]
    return KernelSource(
        f"tq_{op}{tag}_{backend}",
        header + MATVEC_IMPL,
        ids + SHARED_DECLS + (ROTATED_DECL if rotate else "") + body,
        tuple(names),
        tuple(outputs),
    )
