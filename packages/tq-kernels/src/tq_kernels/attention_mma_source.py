"""Tensor-core text of the attend kernel's packed splits (CUDA ``mma.sync``, fp16 in, fp32
accumulate): scores and value sums as warp matrix products over codes dequantized to fp16.

The SIMT body (:mod:`tq_kernels.attention_source`) spends most of its instructions on
codebook lookups and one fused multiply-add per (token, coordinate, query row), twice (keys
and values). Here each warp takes 16 tokens at a time and the matrix units do the
multiply-adds. It is correct but measured slower than the SIMT body on the H100 (that one
is latency-bound at low occupancy, not issue-bound: docs/kvcache.md), so it runs only when
:data:`tq_kernels.attention.MMA_ATTEND` is set:

- keys: the 16 tokens' codes of a 32-channel block are dequantized into a per-warp fp16
  tile (a pair table gives two channels per lookup), then ``S[16 x 8] += K[16 x 16] Q^T``
  (m16n8k16) per 16 channels, the query rows as the n side (up to 8 rows) held in
  registers as a float16 pair ``hi + lo`` so the query loses no precision;
- softmax: online, per warp, for the rows each thread's fragment holds (2 of them);
- values: ``O^T[16 x 8] += V^T[16 x 16] P^T`` per 16 channels, the tile read transposed
  (``ldmatrix.trans``), the probabilities times each token's value norm as fp16.

Dequantization is exact because the sphere codebooks are float16-exact
(:func:`tq_core.codebook.sphere_codebook`). Metal has simdgroup matrices but another
fragment layout, so this path is generated for CUDA only (:func:`mma_applies`); Metal runs the
SIMT body for every split. The warps' partial results meet in threadgroup memory and the
split writes the same ``o`` / ``ml`` as the SIMT path, so the merge kernels are shared.
"""

from __future__ import annotations

from .attention_layout import ATTEND_THREADS, AttendLayout
from .attention_mma_tiles import (
    TILE_STRIDE,
    lut_offsets,
    staged_words,
    staging,
    staging_regs,
    streams,
    tile_products,
)

__all__ = ["mma_applies", "mma_packed_code", "mma_shared_bytes", "MMA_MAX_BITS"]

#: Code widths the pair tables serve (a 4-bit pair table has 256 entries).
MMA_MAX_BITS = 4
#: Static shared memory CUDA allows a kernel.
_CUDA_SHARED = 48 * 1024


def mma_applies(layout: AttendLayout, backend: str) -> bool:
    """Whether the packed splits of ``layout`` run on the tensor cores: CUDA, mse keys and
    values of at most 4 bits, up to 8 query rows, and the threadgroup memory fits."""
    if backend != "cuda" or layout.rows > 8:
        return False
    parts = (*layout.keys, *layout.values)
    if any(getattr(p, "prod", False) or not 1 <= p.bits <= MMA_MAX_BITS for p in parts):
        return False
    # attention_source builds its text from this module: import its budget here, not above.
    from .attention_source import shared_bytes

    return shared_bytes(layout, False) + mma_shared_bytes(layout) <= _CUDA_SHARED


def mma_shared_bytes(layout: AttendLayout) -> int:
    """Threadgroup memory the tensor-core path adds: pair tables, and per warp a 16-token
    fp16 tile, a probability transpose, its (max, sum) rows and its staged code words."""
    warps = ATTEND_THREADS // 32
    lut = lut_offsets(layout)[2] * 4
    staged = staged_words(layout) * 4
    return lut + warps * (16 * TILE_STRIDE * 2 + 16 * 8 * 4 + 8 * 2 * 4 + staged)


def mma_packed_code(layout: AttendLayout, key_cb: list[int], value_cb: list[int]) -> str:
    """The packed-split branch of the attend body (returns after writing its split);
    ``key_cb`` / ``value_cb``: each part's codebook offset in ``cb_sh``."""
    klut, vlut, nlut = lut_offsets(layout)
    words = streams(layout)
    staged = staged_words(layout)
    load, store = staging(layout)
    ks = layout.dq // 16
    dv16 = layout.dv // 16
    lines = [
        "  if (!fp) {",
        "    // Tensor-core packed split (attention_mma_source).",
        f"    TQ_SHARED tq_uint mma_lut[{nlut}];",
        f"    TQ_SHARED uint4 mma_tile[NWARPS * {16 * TILE_STRIDE // 8}];",
        "    TQ_SHARED float mma_p[NWARPS * 128];",
        "    TQ_SHARED float mma_ml[NWARPS * 16];",
        f"    TQ_SHARED tq_uint mma_w[NWARPS * {staged}];",
    ]
    for parts, luts, cbs in ((layout.keys, klut, key_cb), (layout.values, vlut, value_cb)):
        for p, lut, cb in zip(parts, luts, cbs):
            n, m = 1 << (2 * p.bits), (1 << p.bits) - 1
            lines.append(
                f"    for (int i = (int)tq_tid; i < {n}; i += NT) mma_lut[{lut} + i] = "
                f"tq_h2(cb_sh[{cb} + (i & {m})], cb_sh[{cb} + (i >> {p.bits})]);"
            )
    lines += [
        "    TQ_BARRIER();",
        "    const int g = lane >> 2;",
        "    const int t4 = lane & 3;",
        "    TQ_TGPTR uint4* tile4 = mma_tile + warp * " + str(16 * TILE_STRIDE // 8) + ";",
        "    const unsigned tile_s = tq_smem(tile4);",
        "    TQ_TGPTR float* ps = mma_p + warp * 128;",
        "    // Query rows as the n side of S = K Q^T: thread (g, t4) holds row g, channels",
        "    // 16k + 2t4 (+1, +8, +9), as float16 hi + lo pairs.",
        f"    unsigned qh[{ks}][2], ql[{ks}][2];",
        "    {",
        "      const TQ_TGPTR float* qs = (const TQ_TGPTR float*)q_sh4;",
        "#pragma unroll",
        f"      for (int k = 0; k < {ks}; ++k) {{",
        "#pragma unroll",
        "        for (int e = 0; e < 2; ++e) {",
        "          const int d = 16 * k + 2 * t4 + 8 * e;",
        "          const float x0 = g < R ? qs[g * DQ + d] : 0.0f;",
        "          const float x1 = g < R ? qs[g * DQ + d + 1] : 0.0f;",
        "          const float h0 = tq_hround(x0), h1 = tq_hround(x1);",
        "          qh[k][e] = tq_h2(h0, h1);",
        "          ql[k][e] = tq_h2(x0 - h0, x1 - h1);",
        "        }",
        "      }",
        "    }",
        "    float m2[2] = {TQ_NEG_INF, TQ_NEG_INF};",
        "    float l2[2] = {0.0f, 0.0f};",
        f"    float acc[{dv16}][4];",
        "#pragma unroll",
        f"    for (int i = 0; i < {dv16}; ++i)",
        "      acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;",
        "    // ldmatrix row addresses: keys as A (tokens x channels), values transposed.",
        "    const int mi = lane >> 3;",
        f"    const unsigned ka = tile_s + (((lane & 7) + 8 * (mi & 1)) * {TILE_STRIDE} + "
        "8 * (mi >> 1)) * 2;",
        f"    const unsigned va = tile_s + (((lane & 7) + 8 * (mi >> 1)) * {TILE_STRIDE} + "
        "8 * (mi & 1)) * 2;",
        f"    TQ_TGPTR tq_uint* wsh = mma_w + warp * {staged};",
        staging_regs(layout),
        "    if (begin + warp * 16 < end) {",
        "      const int tq_ld = begin + warp * 16;",
        load,
        "    }",
        "    for (int tok0 = begin + warp * 16; tok0 < end; tok0 += NWARPS * 16) {",
        store,
        "      tq_syncwarp();",
        "      if (tok0 + NWARPS * 16 < end) {  // the next step's words, in flight meanwhile",
        "        const int tq_ld = tok0 + NWARPS * 16;",
        load,
        "      }",
        "      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // (token g | g + 8) x (row 2t4 | 2t4 + 1)",
        "      const int tg0 = tok0 + g, tg1 = tok0 + g + 8;",
    ]
    for i, p in enumerate(layout.keys):
        norm = f"k{i}_norm"
        lines += [
            f"      {{  // key part {i}: width {p.width}, {p.bits} bits",
            "        float ci[4] = {0.0f, 0.0f, 0.0f, 0.0f};",
        ]
        lines += tile_products(
            words[i],
            p,
            klut[i],
            lambda c, q0=p.qoff // 16: (
                f"          tq_ldsm_x4(a, ka + {32 * (c % 2)});",
                f"          tq_mma16816(ci, a, qh[{q0 + c}]);",
                f"          tq_mma16816(ci, a, ql[{q0 + c}]);",
            ),
        )
        lines += [
            f"        const float n0 = tg0 < end ? tq_float({norm}[TQ_AT({norm}, tg0)]) : 0.0f;",
            f"        const float n1 = tg1 < end ? tq_float({norm}[TQ_AT({norm}, tg1)]) : 0.0f;",
            "        c[0] += n0 * ci[0];",
            "        c[1] += n0 * ci[1];",
            "        c[2] += n1 * ci[2];",
            "        c[3] += n1 * ci[3];",
            "      }",
        ]
    lines += [
        "      if (tg0 >= end) c[0] = c[1] = TQ_NEG_INF;",
        "      if (tg1 >= end) c[2] = c[3] = TQ_NEG_INF;",
        "#pragma unroll",
        "      for (int j = 0; j < 2; ++j) {",
        "        float tm = tq_fmax(c[j], c[j + 2]);",
        "        tm = tq_fmax(tm, tq_shuffle_xor(tm, 4));",
        "        tm = tq_fmax(tm, tq_shuffle_xor(tm, 8));",
        "        tm = tq_fmax(tm, tq_shuffle_xor(tm, 16));",
        "        const float mn = tq_fmax(m2[j], tm);",
        "        float alpha = 1.0f, p0 = 0.0f, p1 = 0.0f;",
        "        if (mn != TQ_NEG_INF) {",
        "          alpha = tq_exp(m2[j] - mn);",
        "          p0 = tq_exp(c[j] - mn);",
        "          p1 = tq_exp(c[j + 2] - mn);",
        "        } else {",
        "          if (c[j] != c[j]) p0 = c[j];  // NaN scores stay NaN, as in the SIMT path",
        "          if (c[j + 2] != c[j + 2]) p1 = c[j + 2];",
        "        }",
        "        m2[j] = mn;",
        "        l2[j] = l2[j] * alpha + p0 + p1;",
        "#pragma unroll",
        f"        for (int i = 0; i < {dv16}; ++i) {{",
        "          acc[i][j] *= alpha;",
        "          acc[i][j + 2] *= alpha;",
        "        }",
        "        ps[g * 8 + 2 * t4 + j] = p0;",
        "        ps[(g + 8) * 8 + 2 * t4 + j] = p1;",
        "      }",
        "      tq_syncwarp();",
        "      // P^T as the n side of O^T = V^T P^T: tokens 2t4 (+1, +8, +9), row g.",
        "      const float pt0 = ps[(2 * t4) * 8 + g], pt1 = ps[(2 * t4 + 1) * 8 + g];",
        "      const float pt2 = ps[(2 * t4 + 8) * 8 + g], pt3 = ps[(2 * t4 + 9) * 8 + g];",
        "      const int v0 = tok0 + 2 * t4, v1 = v0 + 1, v8 = v0 + 8, v9 = v0 + 9;",
    ]
    for j, p in enumerate(layout.values):
        norm = f"v{j}_norm"
        lines += [
            f"      {{  // value part {j}: width {p.width}, {p.bits} bits",
            "        unsigned pb[2];",
            f"        pb[0] = tq_h2(v0 < end ? pt0 * tq_float({norm}[TQ_AT({norm}, v0)]) : 0.0f,",
            f"                      v1 < end ? pt1 * tq_float({norm}[TQ_AT({norm}, v1)]) : 0.0f);",
            f"        pb[1] = tq_h2(v8 < end ? pt2 * tq_float({norm}[TQ_AT({norm}, v8)]) : 0.0f,",
            f"                      v9 < end ? pt3 * tq_float({norm}[TQ_AT({norm}, v9)]) : 0.0f);",
        ]
        lines += tile_products(
            words[len(layout.keys) + j],
            p,
            vlut[j],
            lambda c, m0=p.off // 16: (
                f"          tq_ldsm_x4_t(a, va + {32 * (c % 2)});",
                f"          tq_mma16816(acc[{m0 + c}], a, pb);",
            ),
        )
        lines.append("      }")
    lines += [
        "    }",
        "    // Meet: row sums over the lanes of a row, then the warps in threadgroup memory.",
        "#pragma unroll",
        "    for (int j = 0; j < 2; ++j) {",
        "      l2[j] += tq_shuffle_xor(l2[j], 4);",
        "      l2[j] += tq_shuffle_xor(l2[j], 8);",
        "      l2[j] += tq_shuffle_xor(l2[j], 16);",
        "      if (g == 0) {",
        "        mma_ml[warp * 16 + (2 * t4 + j) * 2] = m2[j];",
        "        mma_ml[warp * 16 + (2 * t4 + j) * 2 + 1] = l2[j];",
        "      }",
        "    }",
        "    for (int i = (int)tq_tid; i < R * DV; i += NT) p_sh[i] = 0.0f;",
        "    TQ_BARRIER();",
        "    float f[2];",
        "#pragma unroll",
        "    for (int j = 0; j < 2; ++j) {",
        "      const int r = 2 * t4 + j;",
        "      float mm = TQ_NEG_INF;",
        "      for (int w = 0; w < NWARPS; ++w) mm = tq_fmax(mm, mma_ml[w * 16 + r * 2]);",
        "      f[j] = (m2[j] == TQ_NEG_INF) ? 0.0f : tq_exp(m2[j] - mm);",
        "    }",
        "    for (int w = 0; w < NWARPS; ++w) {",
        "      if (warp == w) {",
        "#pragma unroll",
        f"        for (int i = 0; i < {dv16}; ++i) {{",
        "#pragma unroll",
        "          for (int j = 0; j < 2; ++j) {",
        "            const int r = 2 * t4 + j;",
        "            if (r < R) {",
        "              p_sh[r * DV + 16 * i + g] += f[j] * acc[i][j];",
        "              p_sh[r * DV + 16 * i + g + 8] += f[j] * acc[i][j + 2];",
        "            }",
        "          }",
        "        }",
        "      }",
        "      TQ_BARRIER();",
        "    }",
        "    const size_t slot = (size_t)bh * (nsplit + nfp) + split;",
        "    for (int i = (int)tq_tid; i < R * DV; i += NT) o[slot * R * DV + i] = p_sh[i];",
        "    if ((int)tq_tid < R) {",
        "      const int r = (int)tq_tid;",
        "      float mm = TQ_NEG_INF, ll = 0.0f;",
        "      for (int w = 0; w < NWARPS; ++w) mm = tq_fmax(mm, mma_ml[w * 16 + r * 2]);",
        "      for (int w = 0; w < NWARPS; ++w) {",
        "        const float mw = mma_ml[w * 16 + r * 2];",
        "        if (mw != TQ_NEG_INF) ll += mma_ml[w * 16 + r * 2 + 1] * tq_exp(mw - mm);",
        "      }",
        "      ml[(slot * R + r) * 2] = mm;",
        "      ml[(slot * R + r) * 2 + 1] = ll;",
        "    }",
        "    return;",
        "  }",
    ]
    return "\n".join(lines)
