"""Source text of the matvec kernels (dense, sibling segments, MoE gather), written once for
CUDA and Metal in :mod:`tq_kernels.prelude`'s vocabulary; :mod:`tq_kernels.sources` puts it
together per op and backend.

Layout of the matvec (see docs/kernels.md): a threadgroup of ``NWARPS`` warps; a warp owns
``RPW`` output rows over a ``1/KSPLIT`` slice of the input; a lane owns one 32-value block per
step, i.e. ``BITS`` consecutive packed words per row, so a warp reads ``32 * BITS``
contiguous words per row per step. The lane's 8-value slices of ``x`` sit in registers and
serve all ``RPW`` rows; the codebook sits in threadgroup memory (at most 16 floats for
bits <= 4, so distinct codes hit distinct banks); the next step's words are loaded before
the current step is computed, so each warp keeps ``RPW * BITS`` words per lane in flight.
A 32-value block never straddles a group (groups are 32, 64 or 128), so the scale multiplies
a block's partial sum once.
"""

from __future__ import annotations

__all__ = [
    "MATVEC_IMPL",
    "SHARED_DECLS",
    "ROTATED_DECL",
    "MATVEC_BODY",
    "GATHER_BODY",
    "segments_body",
    "rotated_args",
]

MATVEC_IMPL = r"""
// R x for one 32-value block ``blk`` of each of the M rows (DESIGN.md, weights): the signs,
// then Walsh-Hadamard butterflies in natural (Sylvester) order, as mx.hadamard_transform,
// within the lane and across the SPAN / 32 neighbouring lanes of a block, then the norm.
// Every lane of the warp must call it (shuffles); a dead lane (live false) holds zeros.
template <int M, int SPAN, typename XP, typename WP>
TQ_INLINE void tq_rotate_block(TQ_THREAD float (&xr)[M][32], XP x, WP rsigns,
                               const TQ_THREAD size_t* xrow,
                               const int blk, const bool live, const int lane) {
  const tq_uint sb = live ? rsigns[blk] : 0u;
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (live) {
        tq_load_x8(&xr[m][c * 8], x + xrow[m] + (size_t)blk * 32 + c * 8);
      } else {
#pragma unroll
        for (int t = 0; t < 8; ++t) xr[m][c * 8 + t] = 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < 32; ++j)
      if ((sb >> j) & 1u) xr[m][j] = -xr[m][j];
#pragma unroll
    for (int h = 1; h < 32; h <<= 1) {
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        if ((j & h) == 0) {
          const float a = xr[m][j];
          const float b = xr[m][j + h];
          xr[m][j] = a + b;
          xr[m][j + h] = a - b;
        }
      }
    }
#pragma unroll
    for (int h = 1; h < SPAN / 32; h <<= 1) {
      const bool hi = (lane & h) != 0;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const float p = tq_shuffle_xor(xr[m][j], h);
        xr[m][j] = hi ? p - xr[m][j] : xr[m][j] + p;
      }
    }
    const float norm = SPAN == 32 ? 0.17677669529663687f
                     : SPAN == 64 ? 0.125f : 0.08838834764831845f;
#pragma unroll
    for (int j = 0; j < 32; ++j) xr[m][j] *= norm;
  }
}
// out[m * out_stride + n] = sum_k x'[m, k] * s[n, k / GS] * C[code(n, k)]  (+ QJL term),
// where x' = x, or with ROT the rotation R x (signs, then blockwise Hadamard of SPAN) done
// here in registers: lane j of a warp holds 32 consecutive values, SPAN / 32 neighbouring
// lanes exchange the rest of each Hadamard block through shuffles (DESIGN.md, weights).
// With ROT and XSH > 0 the threadgroup rotates x once into x_sh (XSH >= M * K values of T)
// before its warps multiply, instead of every warp rotating every block it reads: NWARPS
// times less rotation work, and R x rounded to T as the unfused path rounds it.
// With RES the output is res + x W^T (res laid out as out): a decoder block's residual add
// folded into its o/down projection, one launch fewer; the sum is rounded to T once.
template <typename T, int BITS, int GS, int M, int RPW, int KSPLIT, int NWARPS, bool QJL,
          bool ROT, int SPAN, int XSH, bool RES, typename XP, typename WP, typename SP,
          typename CP, typename OP, typename SH, typename SX>
TQ_INLINE void tq_qmv(XP x, XP xs, WP w, SP scales, WP qsigns, SP qscales, CP codebook,
                      WP rsigns, OP out, const int rows, const int N, const int K,
                      const int out_stride, const int cta, const tq_uint tid, SH cb_sh,
                      SH red_sh, SX x_sh, XP res) {
  const int lane = (int)(tid & 31u);
  const int warp = (int)(tid >> 5);
  const int rg = warp / KSPLIT;
  const int ks = warp - rg * KSPLIT;
  for (int i = (int)tid; i < (1 << BITS); i += NWARPS * 32) cb_sh[i] = tq_float(codebook[i]);
  constexpr bool XSHARED = ROT && XSH > 0;  // rotate once per threadgroup, into x_sh

  const int nblk = K >> 5;         // 32-value blocks per row
  const int wpr = nblk * BITS;     // packed words per row
  const int gpr = K / GS;          // groups (scales) per row
  const int row0 = (cta * (NWARPS / KSPLIT) + rg) * RPW;
  size_t wrow[RPW];
  size_t srow[RPW];
  size_t qrow[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int r = min(row0 + i, N - 1);  // rows past N compute a duplicate, never stored
    wrow[i] = (size_t)r * wpr;
    srow[i] = (size_t)r * gpr;
    qrow[i] = (size_t)r * nblk;
  }
  size_t xrow[M];
#pragma unroll
  for (int m = 0; m < M; ++m) xrow[m] = (size_t)min(m, rows - 1) * K;

  float acc[M][RPW];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int i = 0; i < RPW; ++i) acc[m][i] = 0.0f;

  const int step = 32 * KSPLIT;
  int blk = ks * 32 + lane;
  tq_uint wd[RPW][BITS];
  // The first step's words are asked for before the barrier (and the shared rotation), so
  // their latency hides behind that work.
  if (blk < nblk) {
#pragma unroll
    for (int i = 0; i < RPW; ++i) tq_load_words<BITS>(wd[i], w + wrow[i] + (size_t)blk * BITS);
  }
  if (XSHARED) {
    // Warp w rotates blocks w*32 + lane, then every NWARPS*32 on; value j of block b lands
    // at x_sh[(m * 32 + j) * nblk + b], so lanes of a warp touch consecutive elements.
    for (int b0 = warp * 32; b0 < nblk; b0 += NWARPS * 32) {
      float xr[M][32];
      tq_rotate_block<M, SPAN>(xr, x, rsigns, xrow, b0 + lane, b0 + lane < nblk, lane);
      if (b0 + lane < nblk) {
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int j = 0; j < 32; ++j)
            x_sh[(m * 32 + j) * nblk + b0 + lane] = tq_cast<T>(xr[m][j]);
      }
    }
  }
  TQ_BARRIER();
  // Every lane runs every step (the rotation's shuffles need the whole warp); a lane past
  // the row's end loads and adds nothing. nblk is a multiple of SPAN / 32, so the lanes of
  // one Hadamard block are live together.
  for (int base = ks * 32; base < nblk; base += step, blk += step) {
    const bool live = blk < nblk;
    // Prefetch the next step's words so their latency hides behind this step's math.
    const int nxt = blk + step;
    tq_uint wn[RPW][BITS];
    if (nxt < nblk) {
#pragma unroll
      for (int i = 0; i < RPW; ++i) tq_load_words<BITS>(wn[i], w + wrow[i] + (size_t)nxt * BITS);
    }
    float xr[M][32];
    if (ROT && !XSHARED) tq_rotate_block<M, SPAN>(xr, x, rsigns, xrow, blk, live, lane);
    if (live) {
      const int g = (blk * 32) / GS;
      float sc[RPW];
      tq_uint sg[RPW];
      float qs[RPW];
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        sc[i] = tq_float(scales[srow[i] + g]);
        if (QJL) {
          sg[i] = qsigns[qrow[i] + blk];
          qs[i] = tq_float(qscales[srow[i] + g]);
        }
      }
      float part[M][RPW];
      float qpart[M][RPW];
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int i = 0; i < RPW; ++i) { part[m][i] = 0.0f; qpart[m][i] = 0.0f; }

#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float xv[M][8];
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (XSHARED) {
#pragma unroll
            for (int t = 0; t < 8; ++t)
              xv[m][t] = tq_float(x_sh[(m * 32 + c * 8 + t) * nblk + blk]);
          } else if (ROT) {
#pragma unroll
            for (int t = 0; t < 8; ++t) xv[m][t] = xr[m][c * 8 + t];
          } else {
            tq_load_x8(xv[m], x + xrow[m] + (size_t)blk * 32 + c * 8);
          }
        }
#pragma unroll
        for (int i = 0; i < RPW; ++i) {
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            // Value j of the block: bits [j*BITS, j*BITS + BITS) of the block's words.
            const int p = (c * 8 + t) * BITS;
            const int q = p >> 5;
            const int s = p & 31;
            tq_uint code = wd[i][q] >> s;
            if (s + BITS > 32) code |= wd[i][(q + 1 < BITS) ? q + 1 : q] << ((32 - s) & 31);
            const float wv = cb_sh[code & ((1u << BITS) - 1u)];
#pragma unroll
            for (int m = 0; m < M; ++m) part[m][i] += wv * xv[m][t];
          }
        }
        if (QJL) {
          float sv[M][8];
#pragma unroll
          for (int m = 0; m < M; ++m) tq_load_x8(sv[m], xs + xrow[m] + (size_t)blk * 32 + c * 8);
#pragma unroll
          for (int i = 0; i < RPW; ++i) {
#pragma unroll
            for (int t = 0; t < 8; ++t) {
              const bool plus = ((sg[i] >> (c * 8 + t)) & 1u) != 0u;
#pragma unroll
              for (int m = 0; m < M; ++m) qpart[m][i] += plus ? sv[m][t] : -sv[m][t];
            }
          }
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int i = 0; i < RPW; ++i) {
          acc[m][i] += sc[i] * part[m][i];
          if (QJL) acc[m][i] += qs[i] * qpart[m][i];
        }
    }
#pragma unroll
    for (int i = 0; i < RPW; ++i)
#pragma unroll
      for (int b = 0; b < BITS; ++b) wd[i][b] = wn[i][b];
  }

#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int i = 0; i < RPW; ++i) acc[m][i] = tq_simd_sum(acc[m][i]);

  if (KSPLIT == 1) {
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int i = 0; i < RPW; ++i)
          if (row0 + i < N && m < rows) {
            const size_t o = (size_t)m * out_stride + row0 + i;
            out[o] = tq_cast<T>(RES ? acc[m][i] + tq_float(res[o]) : acc[m][i]);
          }
    }
  } else {
    // Warps that split one row group's input meet in threadgroup memory.
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int i = 0; i < RPW; ++i) red_sh[(warp * M + m) * RPW + i] = acc[m][i];
    }
    TQ_BARRIER();
    for (int q = (int)tid; q < (NWARPS / KSPLIT) * M * RPW; q += NWARPS * 32) {
      const int grp = q / (M * RPW);
      const int mi = q - grp * (M * RPW);
      const int m = mi / RPW;
      const int i = mi - m * RPW;
      float s = 0.0f;
      for (int k = 0; k < KSPLIT; ++k) s += red_sh[((grp * KSPLIT + k) * M + m) * RPW + i];
      const int row = (cta * (NWARPS / KSPLIT) + grp) * RPW + i;
      if (row < N && m < rows) {
        const size_t o = (size_t)m * out_stride + row;
        out[o] = tq_cast<T>(RES ? s + tq_float(res[o]) : s);
      }
    }
  }
}
"""

SHARED_DECLS = "  TQ_SHARED float tq_cb[1 << BITS];\n  TQ_SHARED float tq_red[NWARPS * M * RPW];\n"
#: Rotating kernels' threadgroup copy of R x (template XSH values; 1 where unused).
ROTATED_DECL = "  TQ_SHARED T tq_xsh[XSH > 0 ? XSH : 1];\n"

MATVEC_BODY = r"""
  // x is (..., K): its leading dimensions are the rows, so callers need not reshape.
  int tq_rows = 1;
  for (int d = 0; d + 1 < x_ndim; ++d) tq_rows *= x_shape[d];
  tq_qmv<T, BITS, GS, M, RPW, KSPLIT, NWARPS, QJL, ROT, SPAN, {xsh}, {res_on}>(
      x, {xs}, w, scales, {qsigns}, {qscales}, codebook, {rsigns}, out,
      tq_rows, scales_shape[0], x_shape[x_ndim - 1], scales_shape[0], tq_bx, tq_tid,
      tq_cb, tq_red, {x_sh}, {res});
"""

# Sibling weights that read the same activation (q/k/v, gate/up) in one launch: segment s
# owns a contiguous range of threadgroups, so every branch below is threadgroup-uniform.
_SEGMENTS_HEAD = r"""
  int tq_rows = 1;
  for (int d = 0; d + 1 < x_ndim; ++d) tq_rows *= x_shape[d];
  const int tq_k = x_shape[x_ndim - 1];
  constexpr int tq_rpg = RPW * (NWARPS / KSPLIT);
  int tq_cta = tq_bx;
"""

_SEGMENT_CALL = r"""tq_qmv<T, BITS, GS, M, RPW, KSPLIT, NWARPS, false, ROT, SPAN, {xsh}, false>(
      x, x, w{s}, scales{s}, w{s}, scales{s}, codebook, {rsigns}, out{s},
      tq_rows, scales{s}_shape[0], tq_k, scales{s}_shape[0], tq_cta, tq_tid, tq_cb, tq_red,
      {x_sh}, x);"""


def segments_body(segments: int, rsigns: str, rotated: dict) -> str:
    """The matvec body over ``segments`` weights ``w, w1, w2`` writing ``out, out1, out2``;
    ``rotated``: the ``xsh`` / ``x_sh`` arguments (:func:`rotated_args`)."""
    text = _SEGMENTS_HEAD
    for i in range(segments):
        s = str(i) if i else ""
        call = _SEGMENT_CALL.format(s=s, rsigns=rsigns, **rotated)
        if i == segments - 1:
            text += "  {\n    " + call + "\n  }\n"
            break
        text += (
            f"  const int tq_g{i} = (scales{s}_shape[0] + tq_rpg - 1) / tq_rpg;\n"
            f"  if (tq_cta < tq_g{i}) {{\n    {call}\n  }} else {{\n"
            f"  tq_cta -= tq_g{i};\n"
        )
    return text + "  }\n" * (segments - 1)


GATHER_BODY = r"""
  // Batch entry tq_by multiplies its rows of x by expert ei[tq_by].
  const size_t e = (size_t)ei[tq_by];
  const int R = x_shape[1];
  const int K = x_shape[2];
  const int N = scales_shape[1];
  const size_t wpe = (size_t)N * ((K >> 5) * BITS);
  const size_t spe = (size_t)N * (K / GS);
  const size_t xo = (size_t)tq_by * R * K;
  tq_qmv<T, BITS, GS, M, RPW, KSPLIT, NWARPS, QJL, false, 32, 0, false>(
      x + xo, {xs}, w + e * wpe, scales + e * spe, {qsigns}, {qscales}, codebook, w,
      out + (size_t)tq_by * R * N, R, N, K, N, tq_bx, tq_tid, tq_cb, tq_red, tq_cb, x);
"""


def rotated_args(rotate: bool) -> dict:
    """The ``xsh`` template value and ``x_sh`` pointer a body passes ``tq_qmv``: the
    rotating kernels' template XSH and their threadgroup copy of R x; otherwise 0 (the
    pointer is then never read, and the codebook's array stands in for it)."""
    return {"xsh": "XSH", "x_sh": "tq_xsh"} if rotate else {"xsh": "0", "x_sh": "tq_cb"}
