"""Per-part kernel text of the packed-KV attend kernel (CUDA and Metal): the score of one key
part (thread per token), the value accumulation of one value part (warp per token), the
tile's value prefetch, and the packed-word reader they share. A part is one TurboQuant
instance of a codes layout (:mod:`tq_kernels.attention_layout`); the attend body that
strings them together is :mod:`tq_kernels.attention_source`.
"""

from __future__ import annotations

import math

from .attention_layout import AttendLayout, KeyPartLayout, ValuePartLayout

__all__ = ["PART_HELPERS", "key_part_code", "value_part_code", "value_prefetch", "value_words"]


def _code(words: str, index: str, bits: int) -> str:
    """C expression of value ``index`` (a constant or an int expression) of a packed stream
    read from ``words`` (an array or pointer): its block's ``bits`` words, then the bits."""
    return f"tq_code<{bits}>({words}, {index})"


PART_HELPERS = r"""
// Value v of a packed stream (32-value blocks of BITS words, value j of a block at bits
// [j*BITS, j*BITS + BITS) of the block, little-endian; tq_core.pack).
template <int BITS, typename W>
TQ_INLINE tq_uint tq_code(W w, const int v) {
  const int bitpos = (v & 31) * BITS;
  const int q = (v >> 5) * BITS + (bitpos >> 5);
  const int s = bitpos & 31;
  tq_uint code = w[q] >> s;
  if (s + BITS > 32) code |= w[q + 1] << ((32 - s) & 31);
  return code & ((1u << BITS) - 1u);
}
"""


def key_part_code(i: int, p: KeyPartLayout, cb_off: int, dq: int) -> str:
    """Thread-per-token score of key part ``i`` into ``s[r]``."""
    out = [f"    {{  // key part {i}: width {p.width}, {p.bits} mse bits, prod={p.prod}"]
    if p.bits:
        nw = p.width // 32 * p.bits
        out += [
            f"      const size_t kb = TQ_AT(k{i}_idx, t);",
            f"      tq_uint w[{nw}];",
            # Whole 16-byte loads where a token's words allow (one instruction per 4 words).
            f"      tq_load_words<{nw}>(w, k{i}_idx + kb);",
            "      float pa[R];",
            "      for (int r = 0; r < R; ++r) pa[r] = 0.0f;",
            "#pragma unroll",
            f"      for (int d = 0; d < {p.width}; d += 4) {{",
            "        float c[4];",
            "#pragma unroll",
            f"        for (int e = 0; e < 4; ++e) c[e] = cb_sh[{cb_off} + "
            f"{_code('w', 'd + e', p.bits)}];",
            "#pragma unroll",
            "        for (int r = 0; r < R; ++r) {",
            f"          const float4 qv = q_sh4[(r * {dq} + {p.qoff} + d) >> 2];",
            "          pa[r] += qv.x * c[0] + qv.y * c[1] + qv.z * c[2] + qv.w * c[3];",
            "        }",
            "      }",
            f"      const float nrm = tq_float(k{i}_norm[TQ_AT(k{i}_norm, t)]);",
            "      for (int r = 0; r < R; ++r) s[r] += nrm * pa[r];",
        ]
    if p.prod:
        scale = math.sqrt(math.pi / 2) / p.width
        out += [
            f"      const size_t sb = TQ_AT(k{i}_sgn, t);",
            "      float pz[R];",
            "      for (int r = 0; r < R; ++r) pz[r] = 0.0f;",
            f"      for (int blk = 0; blk < {p.width // 32}; ++blk) {{",
            f"        const tq_uint sw = k{i}_sgn[sb + blk];",
            "#pragma unroll",
            "        for (int e = 0; e < 32; e += 4) {",
            "          float z[4];",
            "#pragma unroll",
            "          for (int u = 0; u < 4; ++u) z[u] = ((sw >> (e + u)) & 1u) ? 1.0f : -1.0f;",
            "#pragma unroll",
            "          for (int r = 0; r < R; ++r) {",
            f"            const float4 qv = q_sh4[(r * {dq} + {p.soff} + blk * 32 + e) >> 2];",
            "            pz[r] += qv.x * z[0] + qv.y * z[1] + qv.z * z[2] + qv.w * z[3];",
            "          }",
            "        }",
            "      }",
            f"      const float rn = {scale!r}f * tq_float(k{i}_rnorm[TQ_AT(k{i}_rnorm, t)]);",
            "      for (int r = 0; r < R; ++r) s[r] += rn * pz[r];",
        ]
    out.append("    }")
    return "\n".join(out)


def value_words(p: ValuePartLayout) -> int:
    """Packed words per token of value part ``p``."""
    return p.width // 32 * p.bits


def value_part_code(j: int, p: ValuePartLayout, cb_off: int, acc_off: int, woff) -> str:
    """Warp-per-token accumulation of value part ``j``: lane owns width/32 coordinates, read
    with one or two word loads (its codes are consecutive bits of the token's stream). With
    ``woff`` (an int) the token's words and norm come from the tile's prefetch in
    threadgroup memory (``vw_sh`` at word ``woff``, ``vn_sh``), else from device memory."""
    c = p.width // 32
    if woff is None:
        words = f"(v{j}_idx + TQ_AT(v{j}_idx, tt))"
        norm = f"tq_float(v{j}_norm[TQ_AT(v{j}_norm, tt)])"
    else:
        words = f"(vw_sh + jt * VS + {woff})"
        norm = f"vn_sh[jt * NVP + {j}]"
    head = [
        f"        {{  // value part {j}: width {p.width}, {p.bits} bits",
        f"          const float vn = {norm};",
    ]
    if 32 % c == 0 and c * p.bits <= 32:
        # Coordinates lane*c .. lane*c + c - 1 sit in one 32-value block, at consecutive
        # bits: start = block * 32 * BITS + position * BITS.
        extract = [
            f"          const int bit0 = ((lane * {c}) >> 5) * {32 * p.bits} + "
            f"((lane * {c}) & 31) * {p.bits};",
            f"          const tq_uint lo = {words}[bit0 >> 5];",
            f"          const tq_uint hi = ((bit0 & 31) + {c * p.bits} > 32) ? "
            f"{words}[(bit0 >> 5) + 1] : 0u;",
            "          const int sh = bit0 & 31;",
            "          const tq_uint bits = sh ? ((lo >> sh) | (hi << (32 - sh))) : lo;",
            "#pragma unroll",
            f"          for (int e = 0; e < {c}; ++e) {{",
            f"            const float cv = vn * cb_sh[{cb_off} + "
            f"((bits >> (e * {p.bits})) & {(1 << p.bits) - 1}u)];",
        ]
    else:
        extract = [
            "#pragma unroll",
            f"          for (int e = 0; e < {c}; ++e) {{",
            f"            const float cv = vn * cb_sh[{cb_off} + "
            f"{_code(words, f'lane * {c} + e', p.bits)}];",
        ]
    return "\n".join(
        [
            *head,
            *extract,
            "#pragma unroll",
            f"            for (int r = 0; r < R; ++r) acc[r][{acc_off} + e] += pr[r] * cv;",
            "          }",
            "        }",
        ]
    )


def value_prefetch(layout: AttendLayout) -> tuple[str, str]:
    """(load, store) text of the tile's value prefetch: each thread loads its token's value
    words and norms with the key loads (both in flight during the scoring) and stores them
    to threadgroup memory after it, so the warp-per-token value loop reads no device memory:
    that loop's one dependent load per token bounded the kernel by latency."""
    load, store, woff = [], [], 0
    for j, p in enumerate(layout.values):
        nw = value_words(p)
        load += [
            f"        tq_uint vw{j}[{nw}];",
            f"        tq_load_words<{nw}>(vw{j}, v{j}_idx + TQ_AT(v{j}_idx, t));",
            f"        const float vn{j} = tq_float(v{j}_norm[TQ_AT(v{j}_norm, t)]);",
        ]
        store += [
            "#pragma unroll",
            f"        for (int k = 0; k < {nw}; ++k) "
            f"vw_sh[(int)tq_tid * VS + {woff} + k] = vw{j}[k];",
            f"        vn_sh[(int)tq_tid * NVP + {j}] = vn{j};",
        ]
        woff += nw
    return "\n".join(load), "\n".join(store)
