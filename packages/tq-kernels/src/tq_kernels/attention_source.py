"""Kernel source of the attend kernel: decode attention over packed TurboQuant keys and values
(CUDA and Metal), written once on top of :mod:`tq_kernels.prelude` (DESIGN.md, KV; the math
of arXiv 2504.19874 Sec. 3 applied to attention).

One threadgroup per (split of the packed tokens, batch x KV head). Scores are
``|k| <R q, C[idx]>`` (+ the QJL term ``sqrt(pi/2)/d |r| <S q, z>`` for prod keys), computed
one token per thread against the rotated query rows held in threadgroup memory; a tile of
``NT`` tokens updates an online softmax (running max per query row); values are accumulated
one token per warp, each lane owning ``Dv / 32`` coordinates of the rotated basis, so a lane
reads only its own slice of a token's packed value; a tile's value codes are staged in
threadgroup memory with its key loads (:func:`prefetches_values`). The splits after the
packed ones hold the fp16 sink and tail tokens, one tile each (original basis, causal within
the tail). Each split writes its unnormalized output, running max and sum.

This module holds the body and its threadgroup-memory budget; the per-part score and value
text comes from :mod:`tq_kernels.attention_part_source`, the raw-query prologue from
:mod:`tq_kernels.attention_rotation_source`, and the kernels that merge the splits are in
:mod:`tq_kernels.attention_merge_source`. The text depends on the codes layout (parts,
widths, bits, key mode), so it is generated per
:class:`~tq_kernels.attention_layout.AttendLayout`.
"""

from __future__ import annotations

import hashlib
import re

from .attention_layout import (
    ATTEND_THREADS,
    AttendLayout,
    value_positions,
)
from .attention_mma_source import mma_applies, mma_packed_code
from .attention_part_source import (
    PART_HELPERS,
    key_part_code,
    value_part_code,
    value_prefetch,
    value_words,
)
from .attention_rotation_source import q_load_prepared, q_load_raw
from .mma_prelude import MMA_HELPERS
from .prelude import prelude, thread_ids

__all__ = ["attend_source", "prefetches_values", "shared_bytes", "SHARED_BUDGET"]


_AT = re.compile(r"TQ_AT\((\w+), (\w+)\)")


def _expand_offsets(text: str) -> str:
    """``TQ_AT(a, j)``: the element offset of token j of (batch b, head h) in a (B, H, N, ...)
    input read through its strides (the caches' code arrays are views sliced to the tokens
    held, never copied). Spelled out, because MLX passes ``a_strides`` only to a kernel whose
    text names it."""
    return _AT.sub(
        lambda m: (
            f"((size_t)b * {m[1]}_strides[0] + (size_t)h * {m[1]}_strides[1] + "
            f"(size_t)({m[2]}) * {m[1]}_strides[2])"
        ),
        text,
    )


_ATTEND_BODY = r"""
  // Grid: x = splits (packed, then fp16 sinks and tail), y = batch x KV head.
  const int NWARPS = NT / 32;
  const int VC = DV / 32;                     // value coordinates per lane
  const int QW = DQ > DK ? DQ : DK;
  TQ_SHARED float4 q_sh4[R * QW / 4];
  TQ_SHARED float p_sh[NT * R];               // tile probabilities [token][row]; then o
  TQ_SHARED float red_sh[NWARPS * R];
  TQ_SHARED float cb_sh[CBN];
PREFETCH_DECL
  const int lane = (int)(tq_tid & 31u);
  const int warp = (int)(tq_tid >> 5);
  const int split = tq_bx;
  const int bh = tq_by;
  const int H = HEADS_OF;
  const int b = bh / H;
  const int h = bh - b * H;
  const int chunk = counts[0];
  // Sink and tail lengths come from the arrays (absent ones are flagged 0 in counts), so
  // counts stays the same array from one decode step to the next.
  const int n_sink = counts[1] ? (int)sink_k_shape[2] : 0;
  const int n_tail = counts[2] ? (int)tail_k_shape[2] : 0;
  const int L = counts[3];
  const int causal = counts[4];
  const int n_packed = NPACKED_OF;
  const int nsplit = (n_packed + chunk - 1) / chunk;
  // The fp16 sinks and tail take one split per tile after the packed splits (at least
  // one, counts[8]): at short contexts one threadgroup over all of them was the slowest.
  const int nfp = counts[8];
  const bool fp = split >= nsplit;

Q_LOAD
CB_LOADS
  TQ_BARRIER();

  const int begin = fp ? (split - nsplit) * NT : split * chunk;
  const int end = fp ? min(n_sink + n_tail, begin + NT) : min(n_packed, begin + chunk);
MMA_PACKED
  float m_run[R];
  float l_th[R];
  float acc[R][VC];
  for (int r = 0; r < R; ++r) {
    m_run[r] = TQ_NEG_INF;
    l_th[r] = 0.0f;
    for (int e = 0; e < VC; ++e) acc[r][e] = 0.0f;
  }

  for (int tile = begin; tile < end; tile += NT) {
    const int t = tile + (int)tq_tid;
    const int ntile = min(NT, end - tile);
    float s[R];
    for (int r = 0; r < R; ++r) s[r] = TQ_NEG_INF;
    if (t < end && !fp) {
      for (int r = 0; r < R; ++r) s[r] = 0.0f;
VALUE_LOAD
KEY_PARTS
VALUE_STORE
    } else if (t < end) {
      // An fp16 sink or tail key, original basis: the token's row in 16-byte loads, 32
      // coordinates at a time (all issued before the arithmetic), dotted with the rows.
      const bool sink = t < n_sink;
      const int j = sink ? t : t - n_sink;
      const size_t kb = sink ? TQ_AT(sink_k, j) : TQ_AT(tail_k, j);
      for (int r = 0; r < R; ++r) s[r] = 0.0f;
#pragma unroll
      for (int d0 = 0; d0 < DK; d0 += 32) {
        float kv[32];
#pragma unroll
        for (int u = 0; u < 32; u += 8) {
          if (sink) tq_load_x8(kv + u, sink_k + kb + d0 + u);
          else tq_load_x8(kv + u, tail_k + kb + d0 + u);
        }
#pragma unroll
        for (int e = 0; e < 32; e += 4) {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const float4 qv = q_sh4[(r * DK + d0 + e) >> 2];
            s[r] += qv.x * kv[e] + qv.y * kv[e + 1] + qv.z * kv[e + 2] + qv.w * kv[e + 3];
          }
        }
      }
      if (!sink && causal) {
        // Row r is query r % L of its head; the last L tail tokens are the queries'.
        for (int r = 0; r < R; ++r)
          if (j > n_tail - L + (r % L)) s[r] = TQ_NEG_INF;
      }
    }

    // Online softmax over the tile (Milakov & Gimelshein): one running max per row,
    // identical in every thread, and a per-thread partial sum.
    for (int r = 0; r < R; ++r) {
      const float wm = tq_simd_max(s[r]);
      if (lane == 0) red_sh[warp * R + r] = wm;
    }
    TQ_BARRIER();
    for (int r = 0; r < R; ++r) {
      float tm = red_sh[r];
      for (int w = 1; w < NWARPS; ++w) tm = tq_fmax(tm, red_sh[w * R + r]);
      const float mn = tq_fmax(m_run[r], tm);
      float alpha = 1.0f;
      float p = 0.0f;
      if (mn != TQ_NEG_INF) {
        alpha = tq_exp(m_run[r] - mn);
        p = tq_exp(s[r] - mn);
      } else if (s[r] != s[r]) {
        p = s[r];  // the max drops NaN scores; the sum keeps them, so the output is NaN
      }
      m_run[r] = mn;
      l_th[r] = l_th[r] * alpha + p;
      p_sh[(int)tq_tid * R + r] = p;
      for (int e = 0; e < VC; ++e) acc[r][e] *= alpha;
    }
    TQ_BARRIER();

    if (!fp) {
      // Values: warp w takes tokens w, w + NWARPS, ... of the tile.
      for (int jt = warp; jt < ntile; jt += NWARPS) {
        const int tt = tile + jt;
        float pr[R];
        for (int r = 0; r < R; ++r) pr[r] = p_sh[jt * R + r];
VALUE_PARTS
      }
    } else {
      // fp16 values, original basis: warp w takes FU consecutive tokens at a time and
      // issues their loads together (one dependent load per token bounded this loop).
      for (int j0 = warp * FU; j0 < ntile; j0 += NWARPS * FU) {
        float vv[FU][VC];
#pragma unroll
        for (int u = 0; u < FU; ++u) {
          const int tt = tile + j0 + u;
          const bool sink = tt < n_sink;
          const int j = sink ? tt : tt - n_sink;
          const bool live = j0 + u < ntile;
          const size_t vb = !live ? 0 : sink ? TQ_AT(sink_v, j) : TQ_AT(tail_v, j);
#pragma unroll
          for (int e = 0; e < VC; ++e) {
            const int d = lane * VC + e;
            vv[u][e] = !live ? 0.0f : sink ? tq_float(sink_v[vb + d]) : tq_float(tail_v[vb + d]);
          }
        }
#pragma unroll
        for (int u = 0; u < FU; ++u) {
          if (j0 + u < ntile) {
            for (int r = 0; r < R; ++r) {
              const float pr = p_sh[(j0 + u) * R + r];
#pragma unroll
              for (int e = 0; e < VC; ++e) acc[r][e] += pr * vv[u][e];
            }
          }
        }
      }
    }
    TQ_BARRIER();
  }

  // Meet: the row sums over all threads, the outputs over the warps (p_sh as o[R][DV]).
  for (int r = 0; r < R; ++r) {
    const float ws = tq_simd_sum(l_th[r]);
    if (lane == 0) red_sh[warp * R + r] = ws;
  }
  for (int i = (int)tq_tid; i < R * DV; i += NT) p_sh[i] = 0.0f;
  TQ_BARRIER();
  for (int w = 0; w < NWARPS; ++w) {
    if (warp == w) {
      for (int r = 0; r < R; ++r)
        for (int e = 0; e < VC; ++e) p_sh[r * DV + OUT_POS] += acc[r][e];
    }
    TQ_BARRIER();
  }
  const size_t slot = (size_t)bh * (nsplit + nfp) + split;
  for (int i = (int)tq_tid; i < R * DV; i += NT) o[slot * R * DV + i] = p_sh[i];
  if ((int)tq_tid < R) {
    float l = 0.0f;
    for (int w = 0; w < NWARPS; ++w) l += red_sh[w * R + (int)tq_tid];
    ml[(slot * R + tq_tid) * 2] = m_run[tq_tid];
    ml[(slot * R + tq_tid) * 2 + 1] = l;
  }
"""


def _out_pos(layout: AttendLayout) -> tuple[str, str]:
    """(expression, declarations) of the output coordinate of accumulator ``e``: the fp split
    holds coordinates lane*VC + e (original basis), packed splits their parts' slices."""
    if len(layout.values) == 1:
        return "(lane * VC + e)", ""
    pos = value_positions(layout)
    decl = (
        f"  const int tq_vmul[{len(pos)}] = {{{', '.join(str(m) for m, _ in pos)}}};\n"
        f"  const int tq_vadd[{len(pos)}] = {{{', '.join(str(a) for _, a in pos)}}};\n"
    )
    return "(fp ? (lane * VC + e) : (lane * tq_vmul[e] + tq_vadd[e]))", decl


#: Threadgroup memory the attend kernel may use: Metal's limit (CUDA allows 48 KiB static),
#: so that one kernel text serves both backends.
SHARED_BUDGET = 32 * 1024


def _value_stride(layout: AttendLayout) -> int:
    """Words per token in the value prefetch: odd, so that the threads' stores of one word
    index fall in distinct banks."""
    return sum(value_words(p) for j, p in enumerate(layout.values)) | 1


def _fp_unroll(layout: AttendLayout) -> int:
    """fp16 value tokens whose loads a warp issues together (registers: FU * Dv/32)."""
    return min(8, max(2, 32 // layout.rows))


def shared_bytes(layout: AttendLayout, prefetch: bool) -> int:
    """Threadgroup memory of the attend kernel for ``layout``."""
    qw = max(layout.dq, layout.dk)
    floats = layout.rows * qw + ATTEND_THREADS * layout.rows
    floats += ATTEND_THREADS // 32 * layout.rows + layout.codebook_floats
    if prefetch:
        floats += ATTEND_THREADS * (_value_stride(layout) + len(layout.values))
    return 4 * floats


def prefetches_values(layout: AttendLayout) -> bool:
    """Whether the attend kernel stages each tile's value codes in threadgroup memory (where
    it fits :data:`SHARED_BUDGET`; else the value loop reads device memory)."""
    return shared_bytes(layout, True) <= SHARED_BUDGET


def _launch_bounds(backend: str, min_blocks: int) -> str:
    """CUDA header lines that give the kernel MLX defines after the header
    ``__launch_bounds__(NT, min_blocks)``: the compiler then caps registers so that
    ``min_blocks`` threadgroups fit one SM (MLX's ``cuda_kernel`` has no option for it; its
    generated definition begins with ``__global__``, redefined here for this module only)."""
    if backend != "cuda" or min_blocks <= 0:
        return ""
    return (
        "\n#undef __global__\n"
        f"#define __global__ __attribute__((global)) "
        f"__launch_bounds__({ATTEND_THREADS}, {min_blocks})\n"
    )


def attend_source(
    layout: AttendLayout, backend: str, mma: bool = True, min_blocks: int = 0, prefetch: int = 0
):
    """(name, header, body, input names, output names) of the attend kernel for ``layout``;
    with ``mma`` its packed splits run on the tensor cores where :func:`mma_applies`, each
    warp prefetching ``prefetch`` of its steps ahead into L2; with ``min_blocks`` (CUDA) the
    compiler keeps registers low enough for that many threadgroups per SM."""
    use_mma = mma and mma_applies(layout, backend)
    cb_off, key_code, cb_loads, key_cb, value_cb = 0, [], [], [], []
    for i, p in enumerate(layout.keys):
        key_cb.append(cb_off)
        if p.bits:
            key_code.append(key_part_code(i, p, cb_off, layout.dq))
            cb_loads.append(
                f"  for (int i = (int)tq_tid; i < {1 << p.bits}; i += NT) "
                f"cb_sh[{cb_off} + i] = k{i}_cb[i];"
            )
            cb_off += 1 << p.bits
        else:
            key_code.append(key_part_code(i, p, 0, layout.dq))
    # The tensor-core path reads its own tiles: no value staging for the SIMT packed loop.
    # (Its own name: this flag once shadowed the ``prefetch`` argument, so the L2 prefetch
    # never reached the tensor-core text.)
    stage_values = prefetches_values(layout) and not use_mma
    value_code, acc_off, woff = [], 0, 0
    for j, p in enumerate(layout.values):
        value_cb.append(cb_off)
        value_code.append(value_part_code(j, p, cb_off, acc_off, woff if stage_values else None))
        cb_loads.append(
            f"  for (int i = (int)tq_tid; i < {1 << p.bits}; i += NT) "
            f"cb_sh[{cb_off} + i] = v{j}_cb[i];"
        )
        cb_off += 1 << p.bits
        acc_off += p.width // 32
        woff += value_words(p)
    load, store = value_prefetch(layout) if stage_values else ("", "")
    decl = (
        "  TQ_SHARED tq_uint vw_sh[NT * VS];         // the tile's value words, by token\n"
        "  TQ_SHARED float vn_sh[NT * NVP];          // and their norms\n"
        if stage_values
        else ""
    )
    first = next(i for i, p in enumerate(layout.keys) if p.bits or p.prod)
    probe = f"k{first}_idx" if layout.keys[first].bits else f"k{first}_sgn"
    body = (
        _ATTEND_BODY.replace("KEY_PARTS", "\n".join(key_code))
        .replace("VALUE_PARTS", "\n".join(value_code))
        .replace("VALUE_LOAD", load)
        .replace("VALUE_STORE", store)
        .replace("PREFETCH_DECL", decl)
        .replace("CB_LOADS", "\n".join(cb_loads))
        .replace("Q_LOAD", q_load_raw(layout) if layout.raw else q_load_prepared)
        .replace("OUT_POS", _out_pos(layout)[0])
        .replace("HEADS_OF", f"{probe}_shape[1]")
        .replace("NPACKED_OF", f"{probe}_shape[2]")
        .replace(
            "MMA_PACKED", mma_packed_code(layout, key_cb, value_cb, prefetch) if use_mma else ""
        )
    )
    consts = (
        f"  const int NT = {ATTEND_THREADS};\n  const int R = {layout.rows};\n"
        f"  const int DQ = {layout.dq};\n  const int DK = {layout.dk};\n"
        f"  const int DV = {layout.dv};\n  const int CBN = {layout.codebook_floats};\n"
        f"  const int FU = {_fp_unroll(layout)};\n"
        f"  const int VS = {_value_stride(layout)};\n  const int NVP = {len(layout.values)};\n"
        + _out_pos(layout)[1]
    )
    header = prelude(backend) + PART_HELPERS + (MMA_HELPERS if backend == "cuda" else "")
    text = thread_ids(backend) + consts + _expand_offsets(body)
    # MLX keeps one compiled module per kernel name: the name carries what the text
    # depends on beyond the layout (path, register cap, and a digest of the helpers and
    # text, so that module-level knobs such as the pair-table size cannot reuse a stale
    # module).
    digest = hashlib.sha1((header + text).encode()).hexdigest()[:8]
    header += _launch_bounds(backend, min_blocks)
    name = f"tq_kv_attend_{layout.tag()}_{backend}{'_mma' if use_mma else ''}_{digest}"
    if backend == "cuda" and min_blocks > 0:
        name += f"_lb{min_blocks}"
    return (
        name,
        header,
        text,
        layout.input_names(),
        ("o", "ml"),
    )
