"""Per-warp softmax and the warps' meet of the attend kernel's tensor-core packed splits
(CUDA kernel text; :mod:`tq_kernels.attention_mma_source` strings them in).

Each thread of a warp holds the scores of tokens g and g + 8 for fragment columns 2t4 and
2t4 + 1: float16 ``hi`` query halves in columns 0-3, ``lo`` in 4-7. After one lane exchange
lanes t4 and t4 ^ 2 hold the same full scores of rows 2(t4 & 1) and + 1, and keep those
rows' running max and sum (online softmax, Milakov & Gimelshein). The probabilities pass
through threadgroup memory to become the n side of the value product, and at the end the
warps' partial outputs are rescaled to one max and summed into the split's ``o`` / ``ml``.
"""

from __future__ import annotations

from .attention_layout import AttendLayout

__all__ = ["LAZY_MARGIN", "meet", "softmax"]


def meet(layout: AttendLayout) -> list[str]:
    """Row sums over the lanes of a row, hi + lo columns joined, then the warps in turn add
    their rescaled sums into ``p_sh`` (o[R][DV], rotated basis); one split's ``o``/``ml``."""
    lines = [
        "    // Meet: hi + lo columns, row sums over the lanes of a row, then the warps.",
        "#pragma unroll",
        f"    for (int i = 0; i < {layout.dv // 16}; ++i)",
        "#pragma unroll",
        "      for (int e = 0; e < 4; ++e) acc[i][e] += tq_shuffle_xor(acc[i][e], 2);",
        "#pragma unroll",
        "    for (int j = 0; j < 2; ++j) {",
        "      l2[j] += tq_shuffle_xor(l2[j], 4);",
        "      l2[j] += tq_shuffle_xor(l2[j], 8);",
        "      l2[j] += tq_shuffle_xor(l2[j], 16);",
        "      if (g == 0 && t4 < 2) {",
        "        mma_ml[warp * 8 + (2 * t4 + j) * 2] = m2[j];",
        "        mma_ml[warp * 8 + (2 * t4 + j) * 2 + 1] = l2[j];",
        "      }",
        "    }",
        "    for (int i = (int)tq_tid; i < R * DV; i += NT) p_sh[i] = 0.0f;",
        "    TQ_BARRIER();",
        "    float f[2];",
        "#pragma unroll",
        "    for (int j = 0; j < 2; ++j) {",
        "      const int r = 2 * (t4 & 1) + j;",
        "      float mm = TQ_NEG_INF;",
        "      for (int w = 0; w < NWARPS; ++w) mm = tq_fmax(mm, mma_ml[w * 8 + r * 2]);",
        "      f[j] = (m2[j] == TQ_NEG_INF) ? 0.0f : tq_exp(m2[j] - mm);",
        "    }",
        "    for (int w = 0; w < NWARPS; ++w) {",
        "      if (warp == w && t4 < 2) {",
    ]
    for p in layout.values:
        lines += [
            "#pragma unroll",
            f"        for (int m = 0; m < {p.width // 16}; ++m) {{",
            f"          const int d = {p.off} + g * {p.width // 8} + 2 * m;",
            "#pragma unroll",
            "          for (int j = 0; j < 2; ++j) {",
            "            const int r = 2 * t4 + j;",
            "            if (r < R) {",
            f"              p_sh[r * DV + d] += f[j] * acc[{p.off // 16} + m][j];",
            f"              p_sh[r * DV + d + 1] += f[j] * acc[{p.off // 16} + m][j + 2];",
            "            }",
            "          }",
            "        }",
        ]
    lines += [
        "      }",
        "      TQ_BARRIER();",
        "    }",
        "    const size_t slot = (size_t)bh * (nsplit + nfp) + split;",
        "    for (int i = (int)tq_tid; i < R * DV; i += NT) o[slot * R * DV + i] = p_sh[i];",
        "    if ((int)tq_tid < R) {",
        "      const int r = (int)tq_tid;",
        "      float mm = TQ_NEG_INF, ll = 0.0f;",
        "      for (int w = 0; w < NWARPS; ++w) mm = tq_fmax(mm, mma_ml[w * 8 + r * 2]);",
        "      for (int w = 0; w < NWARPS; ++w) {",
        "        const float mw = mma_ml[w * 8 + r * 2];",
        "        if (mw != TQ_NEG_INF) ll += mma_ml[w * 8 + r * 2 + 1] * tq_exp(mw - mm);",
        "      }",
        "      ml[(slot * R + r) * 2] = mm;",
        "      ml[(slot * R + r) * 2 + 1] = ll;",
        "    }",
        "    return;",
        "  }",
    ]
    return lines


_SCORES = r"""
      // Scores: hi + lo columns (lanes t4 and t4 ^ 2 then hold the same rows), masked
      // past the split's end.
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[e] += tq_shuffle_xor(sc[e], 2);
      if (tok0 + g >= end) sc[0] = sc[1] = TQ_NEG_INF;
      if (tok0 + g + 8 >= end) sc[2] = sc[3] = TQ_NEG_INF;
      TQ_TGPTR float* ps = mma_p + warp * 128 + (((tok0 - begin) / (NWARPS * 16)) & 1) * 64;
"""

#: The exact path: each row's max over the step's tokens (three lane exchanges), then exp,
#: the accumulators rescaled where the max moved.
_EXACT_ROWS = r"""#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float tm = tq_fmax(sc[j], sc[j + 2]);
        tm = tq_fmax(tm, tq_shuffle_xor(tm, 4));
        tm = tq_fmax(tm, tq_shuffle_xor(tm, 8));
        tm = tq_fmax(tm, tq_shuffle_xor(tm, 16));
        const float mn = tq_fmax(m2[j], tm);
        float alpha = 1.0f, p0 = 0.0f, p1 = 0.0f;
        if (mn != TQ_NEG_INF) {
          alpha = tq_exp(m2[j] - mn);
          p0 = tq_exp(sc[j] - mn);
          p1 = tq_exp(sc[j + 2] - mn);
        } else {
          if (sc[j] != sc[j]) p0 = sc[j];  // NaN scores stay NaN, as in the SIMT path
          if (sc[j + 2] != sc[j + 2]) p1 = sc[j + 2];
        }
        // Once the running max settles it rarely moves: skip the rescale when it did not
        // (alpha is exactly 1 then).
        if (mn != m2[j]) {
#pragma unroll
          for (int i = 0; i < DV / 16; ++i) {
            acc[i][j] *= alpha;
            acc[i][j + 2] *= alpha;
          }
        }
        m2[j] = mn;
        l2[j] = l2[j] * alpha + p0 + p1;
        if (t4 < 2) {
          ps[g * 4 + 2 * t4 + j] = p0;
          ps[(g + 8) * 4 + 2 * t4 + j] = p1;
        }
      }
"""

_P_OPERAND = r"""      tq_syncwarp();
      // P^T as the n side: tokens 2t4 (+1, +8, +9), column g (row g & 3, hi | lo).
      const bool plo = g >= 4;
      float pt[4];
      {
        const int r = g & 3;
        pt[0] = r < R ? ps[(2 * t4) * 4 + r] : 0.0f;
        pt[1] = r < R ? ps[(2 * t4 + 1) * 4 + r] : 0.0f;
        pt[2] = r < R ? ps[(2 * t4 + 8) * 4 + r] : 0.0f;
        pt[3] = r < R ? ps[(2 * t4 + 9) * 4 + r] : 0.0f;
      }
"""

#: How far (natural log) a score may pass its row's kept max before the lazy path takes the
#: exact one: p <= e^2 keeps p times a value norm inside float16 for the hi/lo operand.
LAZY_MARGIN = 2.0


def softmax(lazy: bool = False) -> str:
    """The per-step softmax text. With ``lazy`` a row keeps its running max while no score
    of the step passes it by more than :data:`LAZY_MARGIN` (one warp vote, no lane
    exchanges, no rescale; FlashAttention-4's conditional rescaling): any reference max
    gives the same softmax once the split's (max, sum) pair is merged, as long as exp stays
    in range. A row without a finite max yet, a NaN max, or a score past the margin in any
    lane sends the whole warp down the exact path."""
    if not lazy:
        return _SCORES + _EXACT_ROWS + _P_OPERAND
    return (
        _SCORES
        + f"""
      bool grow = false;
#pragma unroll
      for (int j = 0; j < 2; ++j)
        grow |= m2[j] == TQ_NEG_INF || !(tq_fmax(sc[j], sc[j + 2]) <= m2[j] + {LAZY_MARGIN!r}f);
      if (tq_any(grow)) {{
"""
        + _EXACT_ROWS
        + """
      } else {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float p0 = tq_exp(sc[j] - m2[j]);
          const float p1 = tq_exp(sc[j + 2] - m2[j]);
          l2[j] += p0 + p1;
          if (t4 < 2) {
            ps[g * 4 + 2 * t4 + j] = p0;
            ps[(g + 8) * 4 + 2 * t4 + j] = p1;
          }
        }
      }
"""
        + _P_OPERAND
    )
