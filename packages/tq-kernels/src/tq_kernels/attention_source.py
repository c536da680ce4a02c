"""Kernel source of decode attention over packed TurboQuant keys and values (CUDA and Metal).

Two kernels, written once on top of :mod:`tq_kernels.prelude` (DESIGN.md, KV; the math of
arXiv 2504.19874 Sec. 3 applied to attention):

- ``attend``: one threadgroup per (split of the packed tokens, batch x KV head). Scores are
  ``|k| <R q, C[idx]>`` (+ the QJL term ``sqrt(pi/2)/d |r| <S q, z>`` for prod keys),
  computed one token per thread against the rotated query rows held in threadgroup memory;
  a tile of ``NT`` tokens updates an online softmax (running max per query row); values are
  accumulated one token per warp, each lane owning ``Dv / 32`` coordinates of the rotated
  basis, so a lane reads only its own slice of a token's packed value. The last split holds
  the fp16 sink and tail tokens (original basis, causal within the tail). Each split writes
  its unnormalized output, running max and sum.
- ``combine``: merges the splits of one (batch x head, row) into the normalized output of
  the packed tokens (still rotated) and of the fp16 tokens, with GPT-OSS sink logits in the
  denominator. The caller un-rotates the first once and adds the second.

The kernel text depends on the codes layout (parts, widths, bits, key mode), so it is
generated per layout from an :class:`AttendLayout`.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from .prelude import prelude, thread_ids

__all__ = ["KeyPartLayout", "ValuePartLayout", "AttendLayout", "attend_source", "combine_source"]

#: Threads per attend threadgroup, which is also the tokens per tile.
ATTEND_THREADS = 256
#: Query rows (GQA group x queries per head) buckets compiled.
ROW_BUCKETS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class KeyPartLayout:
    """A TurboQuant instance over ``width`` key channels: ``bits`` mse bits (0: QJL only),
    ``prod`` adds the 1-bit QJL sketch. The rotated query sits at ``qoff`` of the query row,
    the sketched one at ``soff``."""

    width: int
    bits: int
    prod: bool
    qoff: int
    soff: int


@dataclass(frozen=True)
class ValuePartLayout:
    """A TurboQuant_mse instance over ``width`` value channels at ``bits`` bits, written at
    ``off`` of the output row (rotated basis)."""

    width: int
    bits: int
    off: int


@dataclass(frozen=True)
class AttendLayout:
    keys: tuple[KeyPartLayout, ...]
    values: tuple[ValuePartLayout, ...]
    rows: int  # compiled query rows (a ROW_BUCKETS entry)
    dq: int  # length of a packed-query row (rotated parts, then sketched parts)
    dk: int  # head_dim of keys
    dv: int  # head_dim of values
    #: The kernels take the model's raw queries and rotate them (and un-rotate the output)
    #: themselves: mse keys only, every part one power-of-two Hadamard block.
    raw: bool = False
    kperm: bool = False  # raw mode: keys' outlier-channel permutation (fractional bits)
    vperm: bool = False

    def __post_init__(self):
        if self.rows not in ROW_BUCKETS:
            raise ValueError(f"rows must be one of {ROW_BUCKETS}, got {self.rows}")
        for p in (*self.keys, *self.values):
            if p.width % 32:
                raise ValueError(f"part widths must be multiples of 32, got {p.width}")
        if self.dv % 32 or self.dk % 32 or self.dv > ATTEND_THREADS:
            raise ValueError(
                f"head dims must be multiples of 32 up to 256, got {self.dk}/{self.dv}"
            )

        if self.raw and any(p.prod or p.width & (p.width - 1) for p in self.keys):
            raise ValueError("raw queries need mse keys in power-of-two parts")

    def input_names(self) -> tuple[str, ...]:
        names = ["q", "params", "counts"] if self.raw else ["q", "qf", "counts"]
        for i, p in enumerate(self.keys):
            if p.bits:
                names += [f"k{i}_idx", f"k{i}_norm", f"k{i}_cb"]
            if p.prod:
                names += [f"k{i}_sgn", f"k{i}_rnorm"]
            if self.raw:
                names += [f"k{i}_signs"]
        if self.kperm:
            names += ["kperm"]
        for j, p in enumerate(self.values):
            names += [f"v{j}_idx", f"v{j}_norm", f"v{j}_cb"]
        return (*names, "sink_k", "sink_v", "tail_k", "tail_v")

    def tag(self) -> str:
        return hashlib.sha1(repr(self).encode()).hexdigest()[:12]

    @property
    def codebook_floats(self) -> int:
        return sum(1 << p.bits for p in (*self.keys, *self.values) if p.bits) or 1


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


def _code(words: str, index: str, bits: int) -> str:
    """C expression of value ``index`` (a constant or an int expression) of a packed stream
    read from ``words`` (an array or pointer): its block's ``bits`` words, then the bits."""
    return f"tq_code<{bits}>({words}, {index})"


_HELPERS = r"""
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


def _key_part_code(i: int, p: KeyPartLayout, cb_off: int, dq: int) -> str:
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


def _value_part_code(j: int, p: ValuePartLayout, cb_off: int, acc_off: int) -> str:
    """Warp-per-token accumulation of value part ``j``: lane owns width/32 coordinates, read
    with one or two word loads (its codes are consecutive bits of the token's stream)."""
    c = p.width // 32
    head = [
        f"        {{  // value part {j}: width {p.width}, {p.bits} bits",
        f"          const size_t vb = TQ_AT(v{j}_idx, tt);",
        f"          const float vn = tq_float(v{j}_norm[TQ_AT(v{j}_norm, tt)]);",
    ]
    if 32 % c == 0 and c * p.bits <= 32:
        # Coordinates lane*c .. lane*c + c - 1 sit in one 32-value block, at consecutive
        # bits: start = block * 32 * BITS + position * BITS.
        extract = [
            f"          const int bit0 = ((lane * {c}) >> 5) * {32 * p.bits} + "
            f"((lane * {c}) & 31) * {p.bits};",
            f"          const tq_uint lo = v{j}_idx[vb + (bit0 >> 5)];",
            f"          const tq_uint hi = ((bit0 & 31) + {c * p.bits} > 32) ? "
            f"v{j}_idx[vb + (bit0 >> 5) + 1] : 0u;",
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
            f"{_code(f'(v{j}_idx + vb)', f'lane * {c} + e', p.bits)}];",
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


_ATTEND_BODY = r"""
  // Grid: x = splits (the last one: fp16 sinks and tail), y = batch x KV head.
  const int NWARPS = NT / 32;
  const int VC = DV / 32;                     // value coordinates per lane
  const int QW = DQ > DK ? DQ : DK;
  TQ_SHARED float4 q_sh4[R * QW / 4];
  TQ_SHARED float p_sh[NT * R];               // tile probabilities [token][row]; then o
  TQ_SHARED float red_sh[NWARPS * R];
  TQ_SHARED float cb_sh[CBN];

  const int lane = (int)(tq_tid & 31u);
  const int warp = (int)(tq_tid >> 5);
  const int split = tq_bx;
  const int bh = tq_by;
  const int H = HEADS_OF;
  const int b = bh / H;
  const int h = bh - b * H;
  const int chunk = counts[0];
  const int n_sink = counts[1];
  const int n_tail = counts[2];
  const int L = counts[3];
  const int causal = counts[4];
  const int n_packed = NPACKED_OF;
  const int nsplit = (n_packed + chunk - 1) / chunk;
  const bool fp = split == nsplit;

Q_LOAD
CB_LOADS
  TQ_BARRIER();

  const int begin = fp ? 0 : split * chunk;
  const int end = fp ? n_sink + n_tail : min(n_packed, begin + chunk);
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
    float s[R];
    for (int r = 0; r < R; ++r) s[r] = 0.0f;
    if (t < end) {
      if (!fp) {
KEY_PARTS
      } else {
        // An fp16 sink or tail key, original basis: a plain dot product.
        const bool sink = t < n_sink;
        const int j = sink ? t : t - n_sink;
        const size_t kb = sink
            ? TQ_AT(sink_k, j)
            : TQ_AT(tail_k, j);
        TQ_TGPTR float* qs = (TQ_TGPTR float*)q_sh4;
        for (int d = 0; d < DK; ++d) {
          const float kv = sink ? tq_float(sink_k[kb + d]) : tq_float(tail_k[kb + d]);
          for (int r = 0; r < R; ++r) s[r] += qs[r * DK + d] * kv;
        }
        if (!sink && causal) {
          // Row r is query r % L of its head; the last L tail tokens are the queries'.
          for (int r = 0; r < R; ++r)
            if (j > n_tail - L + (r % L)) s[r] = TQ_NEG_INF;
        }
      }
    } else {
      for (int r = 0; r < R; ++r) s[r] = TQ_NEG_INF;
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

    // Values: warp w takes tokens w, w + NWARPS, ... of the tile.
    const int ntile = min(NT, end - tile);
    for (int jt = warp; jt < ntile; jt += NWARPS) {
      const int tt = tile + jt;
      float pr[R];
      for (int r = 0; r < R; ++r) pr[r] = p_sh[jt * R + r];
      if (!fp) {
VALUE_PARTS
      } else {
        const bool sink = tt < n_sink;
        const int j = sink ? tt : tt - n_sink;
        const size_t vb = sink
            ? TQ_AT(sink_v, j)
            : TQ_AT(tail_v, j);
        for (int e = 0; e < VC; ++e) {
          const int d = lane * VC + e;
          const float vv = sink ? tq_float(sink_v[vb + d]) : tq_float(tail_v[vb + d]);
          for (int r = 0; r < R; ++r) acc[r][e] += pr[r] * vv;
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
  const size_t slot = (size_t)bh * (nsplit + 1) + split;
  for (int i = (int)tq_tid; i < R * DV; i += NT) o[slot * R * DV + i] = p_sh[i];
  if ((int)tq_tid < R) {
    float l = 0.0f;
    for (int w = 0; w < NWARPS; ++w) l += red_sh[w * R + (int)tq_tid];
    ml[(slot * R + tq_tid) * 2] = m_run[tq_tid];
    ml[(slot * R + tq_tid) * 2 + 1] = l;
  }
"""


def value_positions(layout: AttendLayout) -> list[tuple[int, int]]:
    """(mul, add) per value accumulator e of a lane: in a packed split, accumulator e of lane
    ``lane`` holds output coordinate ``lane * mul + add`` of the rotated basis (part p's
    ``width/32`` coordinates of that lane, parts in order)."""
    out = []
    for p in layout.values:
        c = p.width // 32
        out += [(c, p.off + e) for e in range(c)]
    return out


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


_Q_LOAD_PREPARED = r"""
  {
    const int qw = fp ? DK : DQ;
    TQ_TGPTR float* qs = (TQ_TGPTR float*)q_sh4;
    for (int i = (int)tq_tid; i < R * qw; i += NT)
      qs[i] = fp ? qf[(size_t)bh * R * DK + i] : q[(size_t)bh * R * DQ + i];
  }
"""


def _fwht(buf: str, base: str, width: int, rows: str, stride: str, threads: str) -> str:
    """In-place orthonormal-free Walsh-Hadamard butterflies (natural order, as
    ``mx.hadamard_transform``) over ``rows`` segments ``buf[r * stride + base + 0..width)``."""
    half = width // 2
    return f"""
      for (int hh = 1; hh < {width}; hh <<= 1) {{
        for (int i = (int)tq_tid; i < {rows} * {half}; i += {threads}) {{
          const int r = i / {half};
          const int k = i - r * {half};
          const int j = (k / hh) * 2 * hh + (k % hh);
          const int at = r * {stride} + {base} + j;
          const float a = {buf}[at];
          const float c = {buf}[at + hh];
          {buf}[at] = a + c;
          {buf}[at + hh] = a - c;
        }}
        TQ_BARRIER();
      }}"""


def _q_load_raw(layout: AttendLayout) -> str:
    """The queries of this (batch, KV head), scaled; in packed splits also permuted, signed
    and Hadamard-transformed per key part (R = H diag(signs), DESIGN.md), in shared memory.
    Row r of the head is query head h * rep + r / L, query r % L: with the model's
    (B, Hq, L, D) layout that is row bh * RR + r of a (B * H * RR, D) view."""
    lines = [
        "  {",
        "    TQ_TGPTR float* qs = (TQ_TGPTR float*)q_sh4;",
        "    const float qscale = params[0];",
        "    const int RR = counts[5];",
        "    if (fp) {",
        "      for (int i = (int)tq_tid; i < R * DK; i += NT) {",
        "        const int r = i / DK;",
        "        const int d = i - r * DK;",
        "        qs[i] = r < RR ? qscale * tq_float(q[((size_t)bh * RR + r) * DK + d]) : 0.0f;",
        "      }",
        "    } else {",
    ]
    for i, p in enumerate(layout.keys):
        chan = f"kperm[h * DK + {p.qoff} + j]" if layout.kperm else f"{p.qoff} + j"
        norm = 1.0 / math.sqrt(p.width)
        lines += [
            f"      for (int i = (int)tq_tid; i < R * {p.width}; i += NT) {{",
            f"        const int r = i / {p.width};",
            f"        const int j = i - r * {p.width};",
            f"        const int c = {chan};",
            f"        qs[r * DQ + {p.qoff} + j] = r < RR ? qscale * {norm!r}f * k{i}_signs[j] *",
            "            tq_float(q[((size_t)bh * RR + r) * DK + c]) : 0.0f;",
            "      }",
        ]
    lines.append("      TQ_BARRIER();")
    for p in layout.keys:
        lines.append(_fwht("qs", str(p.qoff), p.width, "R", "DQ", "NT"))
    lines += ["    }", "  }"]
    return "\n".join(lines)


def attend_source(layout: AttendLayout, backend: str):
    """(name, header, body, input names, output names) of the attend kernel for ``layout``."""
    cb_off, key_code, cb_loads = 0, [], []
    for i, p in enumerate(layout.keys):
        if p.bits:
            key_code.append(_key_part_code(i, p, cb_off, layout.dq))
            cb_loads.append(
                f"  for (int i = (int)tq_tid; i < {1 << p.bits}; i += NT) "
                f"cb_sh[{cb_off} + i] = k{i}_cb[i];"
            )
            cb_off += 1 << p.bits
        else:
            key_code.append(_key_part_code(i, p, 0, layout.dq))
    value_code, acc_off = [], 0
    for j, p in enumerate(layout.values):
        value_code.append(_value_part_code(j, p, cb_off, acc_off))
        cb_loads.append(
            f"  for (int i = (int)tq_tid; i < {1 << p.bits}; i += NT) "
            f"cb_sh[{cb_off} + i] = v{j}_cb[i];"
        )
        cb_off += 1 << p.bits
        acc_off += p.width // 32
    first = next(i for i, p in enumerate(layout.keys) if p.bits or p.prod)
    probe = f"k{first}_idx" if layout.keys[first].bits else f"k{first}_sgn"
    body = (
        _ATTEND_BODY.replace("KEY_PARTS", "\n".join(key_code))
        .replace("VALUE_PARTS", "\n".join(value_code))
        .replace("CB_LOADS", "\n".join(cb_loads))
        .replace("Q_LOAD", _q_load_raw(layout) if layout.raw else _Q_LOAD_PREPARED)
        .replace("OUT_POS", _out_pos(layout)[0])
        .replace("HEADS_OF", f"{probe}_shape[1]")
        .replace("NPACKED_OF", f"{probe}_shape[2]")
    )
    consts = (
        f"  const int NT = {ATTEND_THREADS};\n  const int R = {layout.rows};\n"
        f"  const int DQ = {layout.dq};\n  const int DK = {layout.dk};\n"
        f"  const int DV = {layout.dv};\n  const int CBN = {layout.codebook_floats};\n"
        + _out_pos(layout)[1]
    )
    header = prelude(backend) + _HELPERS
    name = f"tq_kv_attend_{layout.tag()}_{backend}"
    return (
        name,
        header,
        thread_ids(backend) + consts + _expand_offsets(body),
        layout.input_names(),
        ("o", "ml"),
    )


_COMBINE_BODY = r"""
  // One thread per (batch x head, row, coordinate): merge the splits' partial softmaxes.
  const int S = ml_shape[1];                  // packed splits + the fp split
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
  for (int s = 0; s < S; ++s) m = tq_fmax(m, ml[((bh * S + s) * R + r) * 2]);
  float l = m == TQ_NEG_INF ? 0.0f : tq_exp(sinks[h * R + r] - m);
  float packed = 0.0f;
  float dense = 0.0f;
  for (int s = 0; s < S; ++s) {
    const size_t slot = (bh * S + s) * R + r;
    const float ms = ml[slot * 2];
    const float a = ms == TQ_NEG_INF ? 0.0f : tq_exp(ms - m);
    l += a * ml[slot * 2 + 1];
    const float v = a * o[slot * DV + d];
    if (s + 1 < S) packed += v; else dense += v;
  }
  const float inv = l == 0.0f ? 0.0f : 1.0f / l;  // NaN scores stay NaN
  rot[tq_gid] = packed * inv;
  fp[tq_gid] = dense * inv;
"""


def combine_source(backend: str):
    """(name, header, body, input names, output names) of the combine kernel."""
    return (
        f"tq_kv_combine_{backend}",
        prelude(backend),
        thread_ids(backend) + _COMBINE_BODY,
        ("o", "ml", "sinks"),
        ("rot", "fp"),
    )


_FINISH_BODY = r"""
  // One threadgroup per (row r, batch x head bh): merge the splits, un-rotate the packed
  // tokens' share once (Hadamard per value part, signs, outlier permutation), add the fp16
  // tokens' share and write the model's (B, Hq, L, Dv) output.
  TQ_SHARED float rot_sh[DV];
  TQ_SHARED float out_sh[DV];
  const int r = tq_bx;
  const int bh = tq_by;
  const int L = counts[3];
  const int RR = counts[5];
  const int H = counts[6];
  const int h = bh % H;
  const int S = ml_shape[1];
  const int RB = ml_shape[2];
  const int d = (int)tq_tid;
  float m = TQ_NEG_INF;
  float sink = TQ_NEG_INF;
  if (counts[7]) sink = sinks[h * (RR / L) + r / L];
  float fpv = 0.0f;
  if (d < DV) {
    m = sink;
    for (int s = 0; s < S; ++s) m = tq_fmax(m, ml[(((size_t)bh * S + s) * RB + r) * 2]);
    float l = (m == TQ_NEG_INF || sink == TQ_NEG_INF) ? 0.0f : tq_exp(sink - m);
    float packed = 0.0f;
    float dense = 0.0f;
    for (int s = 0; s < S; ++s) {
      const size_t slot = ((size_t)bh * S + s) * RB + r;
      const float ms = ml[slot * 2];
      const float a = ms == TQ_NEG_INF ? 0.0f : tq_exp(ms - m);
      l += a * ml[slot * 2 + 1];
      const float v = a * o[slot * DV + d];
      if (s + 1 < S) packed += v; else dense += v;
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
    fwht = [_fwht("rot_sh", str(p.off), p.width, "1", "0", "NTF") for p in layout.values]
    unrot = []
    for j, p in enumerate(layout.values):
        chan = f"vperm[h * DV + {p.off} + j]" if layout.vperm else f"{p.off} + j"
        norm = 1.0 / math.sqrt(p.width)
        unrot += [
            f"    if (d >= {p.off} && d < {p.off + p.width}) {{",
            f"      const int j = d - {p.off};",
            f"      out_sh[{chan}] = {norm!r}f * v{j}_signs[j] * rot_sh[d];",
            "    }",
        ]
    body = _FINISH_BODY.replace("VALUE_FWHT", "\n".join(fwht)).replace("UNROTATE", "\n".join(unrot))
    consts = f"  const int DV = {layout.dv};\n  const int NTF = {ATTEND_THREADS};\n"
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
