"""Kernel text that merges the splits of the packed-KV attend kernel (CUDA and Metal).

- ``combine`` (prepared mode): one thread per (batch x head, row, coordinate); writes the
  packed tokens' share (still rotated) and the fp16 tokens' share, each normalized, with
  GPT-OSS sink logits in the denominator; the caller un-rotates and adds.
- ``finish`` (raw-query mode): one threadgroup per (row, batch x head); merges (the splits
  spread over its threads), un-rotates the packed share once per value part, adds the fp16
  share and writes the model's output.
"""

from __future__ import annotations

import math

from .attention_layout import ATTEND_THREADS, AttendLayout
from .attention_rotation_source import fwht, part_channel
from .prelude import prelude, thread_ids

__all__ = ["combine_source", "finish_source"]


_MERGE_SPLITS = r"""
float packed = 0.0f;
float dense = 0.0f;
#pragma unroll 8
for (int s = 0; s < S; ++s) {
  const size_t slot = SLOT;
  const float ms = ml[slot * 2];
  const float a = ms == TQ_NEG_INF ? 0.0f : tq_exp(ms - m);
  l += a * ml[slot * 2 + 1];
  const float v = a * o[slot * DV + d];
  if (s < S - NFP) packed += v; else dense += v;
}
const float inv = l == 0.0f ? 0.0f : 1.0f / l;  // NaN scores stay NaN
"""


def _merge_splits(slot: str, indent: str) -> str:
    """The combine kernel's merge, given the running max ``m`` and the sink term in ``l``:
    rescale each split's (max, sum, output) to ``m``, sum the packed splits and the last
    ``NFP`` (fp16) splits apart, and ``inv`` = 1 / the softmax denominator. ``slot``: the
    (bh, split s, row r) index of the partials. Unrolled so that eight splits' loads are
    in flight at once (the finish kernel spreads its splits over threads instead)."""
    lines = _MERGE_SPLITS.strip("\n").replace("SLOT", slot).split("\n")
    return "\n".join(indent + line for line in lines)


_COMBINE_BODY = r"""
  // One thread per (batch x head, row, coordinate): merge the splits' partial softmaxes.
  const int S = ml_shape[1];                  // packed splits, then the fp splits
  const int NFP = counts[8];
  const int R = ml_shape[2];
  const int DV = o_shape[3];
  const size_t total = (size_t)ml_shape[0] * R * DV;
  if (tq_gid >= total) return;
  const int d = (int)(tq_gid % DV);
  const size_t br = tq_gid / DV;              // (bh, r)
  const int r = (int)(br % R);
  const size_t bh = br / R;
  const int h = (int)(bh % (size_t)sinks_shape[0]);
  float m = sinks[h * R + r];                 // -inf where the model has no sinks
#pragma unroll 8
  for (int s = 0; s < S; ++s) m = tq_fmax(m, ml[((bh * S + s) * R + r) * 2]);
  float l = m == TQ_NEG_INF ? 0.0f : tq_exp(sinks[h * R + r] - m);
MERGE_SPLITS
  rot[tq_gid] = packed * inv;
  fp[tq_gid] = dense * inv;
"""


def combine_source(backend: str):
    """(name, header, body, input names, output names) of the combine kernel."""
    return (
        f"tq_kv_combine_{backend}",
        prelude(backend),
        thread_ids(backend)
        + _COMBINE_BODY.replace("MERGE_SPLITS", _merge_splits("(bh * S + s) * R + r", "  ")),
        ("o", "ml", "sinks", "counts"),
        ("rot", "fp"),
    )


_FINISH_BODY = r"""
  // One threadgroup per (row r, batch x head bh): merge the splits, un-rotate the packed
  // tokens' share once (Hadamard per value part, signs, outlier permutation), add the fp16
  // tokens' share and write the model's (B, Hq, L, Dv) output. The splits are spread over
  // the threads (a loop over them per thread, one dependent load each, took 23 us at 128K).
  TQ_SHARED float rot_sh[DV];
  TQ_SHARED float out_sh[DV];
  TQ_SHARED float w_sh[WMAX];                 // each split's weight exp(max_s - max)
  TQ_SHARED float red_sh[2 * NTF];
  const int r = tq_bx;
  const int bh = tq_by;
  const int L = counts[3];
  const int RR = counts[5];
  const int H = counts[6];
  const int h = bh % H;
  const int S = ml_shape[1];                  // packed splits, then the fp splits
  const int NFP = counts[8];
  const int RB = ml_shape[2];
  const int d = (int)tq_tid;
  const int lane = (int)(tq_tid & 31u);
  const int warp = (int)(tq_tid >> 5);
  float sink = TQ_NEG_INF;
  if (counts[7]) sink = sinks[h * (RR / L) + r / L];
  // The running max over every split (and the sink), then each split's weight and the
  // softmax denominator, each a block reduction.
  float m = TQ_NEG_INF;
  for (int s = d; s < S; s += NTF) m = tq_fmax(m, ml[(((size_t)bh * S + s) * RB + r) * 2]);
  m = tq_simd_max(m);
  if (lane == 0) red_sh[warp] = m;
  TQ_BARRIER();
  m = sink;
  for (int w = 0; w < NTF / 32; ++w) m = tq_fmax(m, red_sh[w]);
  TQ_BARRIER();
  float l = 0.0f;
  for (int s = d; s < S; s += NTF) {
    const size_t slot = ((size_t)bh * S + s) * RB + r;
    const float ms = ml[slot * 2];
    const float a = ms == TQ_NEG_INF ? 0.0f : tq_exp(ms - m);
    if (s < WMAX) w_sh[s] = a;
    l += a * ml[slot * 2 + 1];
  }
  l = tq_simd_sum(l);
  if (lane == 0) red_sh[warp] = l;
  TQ_BARRIER();
  l = (m == TQ_NEG_INF || sink == TQ_NEG_INF) ? 0.0f : tq_exp(sink - m);
  for (int w = 0; w < NTF / 32; ++w) l += red_sh[w];
  TQ_BARRIER();
  // Outputs: G groups of DV threads take every G-th split, eight loads in flight each.
  const int G = NTF / DV;
  const int grp = d / DV;
  const int dd = d - grp * DV;
  if (grp < G) {
    float packed = 0.0f;
    float dense = 0.0f;
#pragma unroll 8
    for (int s = grp; s < S; s += G) {
      const size_t slot = ((size_t)bh * S + s) * RB + r;
      float a;
      if (s < WMAX) {
        a = w_sh[s];
      } else {
        const float ms = ml[slot * 2];
        a = ms == TQ_NEG_INF ? 0.0f : tq_exp(ms - m);
      }
      const float v = a * o[slot * DV + dd];
      if (s < S - NFP) packed += v; else dense += v;
    }
    red_sh[d] = packed;
    red_sh[NTF + d] = dense;
  }
  TQ_BARRIER();
  float fpv = 0.0f;
  if (d < DV) {
    float packed = 0.0f;
    float dense = 0.0f;
    for (int g = 0; g < G; ++g) {
      packed += red_sh[g * DV + d];
      dense += red_sh[NTF + g * DV + d];
    }
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;  // NaN scores stay NaN
    rot_sh[d] = packed * inv;
    fpv = dense * inv;
  }
  TQ_BARRIER();
VALUE_FWHT
  if (d < DV) {
UNROTATE
  }
  TQ_BARRIER();
  if (d < DV) out[((size_t)bh * RR + r) * DV + d] = tq_cast<T>(out_sh[d] + fpv);
"""


def finish_source(layout: AttendLayout, backend: str):
    """(name, header, body, input names, output names) of the raw-mode finishing kernel."""
    butterflies = [fwht("rot_sh", str(p.off), p.width, "1", "0", "NTF") for p in layout.values]
    unrot = []
    for j, p in enumerate(layout.values):
        chan = part_channel("vperm" if layout.vperm else None, "DV", p.off)
        norm = 1.0 / math.sqrt(p.width)
        unrot += [
            f"    if (d >= {p.off} && d < {p.off + p.width}) {{",
            f"      const int j = d - {p.off};",
            f"      out_sh[{chan}] = {norm!r}f * v{j}_signs[j] * rot_sh[d];",
            "    }",
        ]
    body = _FINISH_BODY.replace("VALUE_FWHT", "\n".join(butterflies)).replace(
        "UNROTATE", "\n".join(unrot)
    )
    consts = (
        f"  const int DV = {layout.dv};\n  const int NTF = {ATTEND_THREADS};\n"
        "  const int WMAX = 1024;\n"
    )
    names = ["o", "ml", "sinks", "counts"] + [f"v{j}_signs" for j in range(len(layout.values))]
    if layout.vperm:
        names.append("vperm")
    return (
        f"tq_kv_finish_{layout.tag()}_{backend}",
        prelude(backend),
        thread_ids(backend) + consts + body,
        tuple(names),
        ("out",),
    )
