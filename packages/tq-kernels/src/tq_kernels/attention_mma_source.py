"""Tensor-core text of the attend kernel's packed splits (CUDA ``mma.sync`` m16n8k16, fp16 in,
fp32 accumulate): scores and value sums as warp matrix products, operands built in registers.

Nsight Compute showed the SIMT body issue-bound on the H100 (115 M warp instructions for one
128K-token K4V3 step: codebook lookups, bit extraction, and one FMA per token, channel and
query row, twice). Here each warp takes 16 tokens a step and the matrix units do the FMAs:

- keys: ``S[16 x 8] += K[16 x 16] Q^T`` per 16 channels. The n side is 8 columns: the
  (up to 4) query rows as float16 ``hi`` in columns 0-3 and ``lo = q - hi`` in columns 4-7,
  held in registers for the whole split, so one product gives both halves and the query
  loses no precision (``score = S[:, r] + S[:, r + 4]``, one lane exchange);
- softmax: online, per warp, each thread keeping the rows of its fragment columns;
- values: ``O^T[16 x 8] += V^T[16 x 16] P^T`` per 16 channels, the probabilities times each
  token's value norm again split into ``hi``/``lo`` columns.

The A operands come straight from each thread's bits of the packed codes
(:mod:`tq_kernels.attention_mma_fragments`): no staging, no tiles, no ``ldmatrix``; the
next step's words are loaded while the current step computes. Dequantization is exact
because the sphere codebooks are float16-exact (:func:`tq_core.codebook.sphere_codebook`).
Metal has simdgroup matrices with another fragment layout, so this path is CUDA only
(:func:`mma_applies`). The warps' results meet in threadgroup memory and the split writes
the same ``o`` / ``ml`` as the SIMT path, so the merge kernels are shared.
"""

from __future__ import annotations

import os

from . import attention_mma_fragments
from .attention_layout import ATTEND_THREADS, AttendLayout
from .attention_mma_fragments import (
    field,
    lut_fill,
    lut_plan,
    paired_field,
    paired_words,
    pairs_apply,
    window_load,
    window_shift,
)
from .attention_mma_fragments import window_words as _ww
from .attention_mma_softmax import meet, softmax

__all__ = ["mma_applies", "mma_packed_code", "text_knobs", "MMA_MAX_BITS", "MMA_MAX_ROWS"]

#: Code widths the pair tables serve (a 4-bit pair table has 256 entries).
MMA_MAX_BITS = 4
#: Query rows: hi and lo halves of each row share the 8 columns of the n side.
MMA_MAX_ROWS = 4
#: Independent accumulator chains of a key part's score products: ``mma.sync`` into one
#: accumulator waits for the previous product, so alternate steps feed a second one.
KEY_CHAINS = 2
#: Value lookups from interleaved token pairs (:func:`paired_words`, 1, 2 and 4 bits), and
#: rows that keep their running max while no score passes it by more than a margin
#: (:func:`tq_kernels.attention_mma_softmax.softmax`). On: together they took the H100's
#: 128K K3V2 step from 133.7 to 122.5 us and 64K K4V3 from 92.7 to 79.5 us (medians of
#: three interleaved sweeps), and were within the sweeps' spread elsewhere (docs/kvcache.md).
PAIRED_VALUE_FIELDS = True
LAZY_MAX = True
#: Code and norm loads address tokens from a per-head base pointer and a 32-bit token
#: stride, worked out once per split, instead of the full 64-bit batch, head and token
#: stride product at every load (12 loads a warp step at K3V2).
HEAD_OFFSETS = os.environ.get("TQ_ATTEND_HEAD_OFFSETS", "1") != "0"
#: Static shared memory CUDA allows a kernel.
_CUDA_SHARED = 48 * 1024
_WARPS = ATTEND_THREADS // 32
#: Per warp: double-buffered probabilities [16 tokens][4 rows], and (max, sum) of 4 rows.
_WARP_FLOATS = 2 * 64 + 8


def text_knobs() -> tuple:
    """The module-level settings the tensor-core text is generated under (compiled kernels
    and kept launches are keyed on them)."""
    return (
        KEY_CHAINS,
        PAIRED_VALUE_FIELDS,
        LAZY_MAX,
        attention_mma_fragments.LUT_WORDS,
        HEAD_OFFSETS,
    )


def _budget_words(layout: AttendLayout) -> int:
    from .attention_source import shared_bytes  # the SIMT body's own share of the budget

    return (_CUDA_SHARED - shared_bytes(layout, False)) // 4 - _WARPS * _WARP_FLOATS


def mma_applies(layout: AttendLayout, backend: str) -> bool:
    """Whether the packed splits of ``layout`` run on the tensor cores: CUDA, mse keys and
    values of 1-4 bits in parts of whole 16-channel steps, at most 4 query rows, and the
    pair tables fit threadgroup memory."""
    if backend != "cuda" or layout.rows > MMA_MAX_ROWS:
        return False
    parts = (*layout.keys, *layout.values)
    if any(getattr(p, "prod", False) or not 1 <= p.bits <= MMA_MAX_BITS for p in parts):
        return False
    if any(p.width % 16 or p.width > 256 for p in parts):
        return False
    budget = _budget_words(layout)
    return budget > 0 and lut_plan(layout, budget)[2] <= budget


def _key_windows(layout):
    """(name, part, words per token, window bits) per key part."""
    return [
        (f"k{i}", p, p.width * p.bits // 32, p.width * p.bits // 4)
        for i, p in enumerate(layout.keys)
    ]


def _value_windows(layout):
    return [
        (f"v{j}", p, p.width * p.bits // 32, p.width * p.bits // 8)
        for j, p in enumerate(layout.values)
    ]


def _loads(layout, side: str) -> list[str]:
    """Load the step at token ``ld0`` into the window and norm registers of ``side``
    ("k": per key part tokens g, g + 8; "v": per value part 2t4, 2t4+1, 2t4+8, 2t4+9)."""
    if side == "k":
        windows, offsets, start = _key_windows(layout), ("g", "g + 8"), "t4"
    else:
        offsets = ("2 * t4", "2 * t4 + 1", "2 * t4 + 8", "2 * t4 + 9")
        windows, start = _value_windows(layout), "g"
    lines = []
    for name, _, sw, nb in windows:
        for u, off in enumerate(offsets):
            tok, live, norm = f"lt{u}", f"lt{u} < end", f"{name}_norm"
            src, row, at = f"{name}_idx", None, f"{norm}[TQ_AT({norm}, {tok})]"
            if HEAD_OFFSETS:
                src, row = f"{name}_idx_h", f"{tok} * {name}_idx_t"
                at = f"{norm}_h[{tok} * {norm}_t]"
            lines += [
                "      {",
                f"      const int {tok} = ld0 + {off};",
                *window_load(f"{name}w{u}", src, tok, live, f"{start} * {nb}", nb, sw, row),
                f"      {name}n{u} = {live} ? tq_float({at}) : 0.0f;",
                "      }",
            ]
    return lines


def _head_offsets(layout) -> list[str]:
    """Per key and value part: its codes' and norms' base pointers at (batch b, head h) and
    32-bit token strides (a split's tokens lie within one head's rows; a head holds far
    fewer than 2**31 words of codes)."""
    if not HEAD_OFFSETS:
        return []
    lines = []
    for name, *_ in (*_key_windows(layout), *_value_windows(layout)):
        for arr in (f"{name}_idx", f"{name}_norm"):
            lines += [
                f"    const auto* {arr}_h = {arr} + ((size_t)b * {arr}_strides[0] + "
                f"(size_t)h * {arr}_strides[1]);",
                f"    const int {arr}_t = (int){arr}_strides[2];",
            ]
    return lines


def _registers(layout) -> list[str]:
    out = []
    for name, _, _, nb in _key_windows(layout):
        extra = 0 if nb % 32 == 0 else 1
        out += [f"    tq_uint {name}w{u}[{_ww(nb) + extra}];" for u in range(2)]
        out.append(f"    float {name}n0 = 0.0f, {name}n1 = 0.0f;")
    for name, _, _, nb in _value_windows(layout):
        extra = 0 if nb % 32 == 0 else 1
        out += [f"    tq_uint {name}w{u}[{_ww(nb) + extra}];" for u in range(4)]
        out.append(f"    float {name}n0 = 0.0f, {name}n1 = 0.0f, {name}n2 = 0.0f, {name}n3 = 0.0f;")
    return out


def _q_fragments(layout) -> list[str]:
    """The n side of every key step: thread (g, t4) holds column g (row g & 3, ``hi`` below
    4, ``lo`` from 4) at its channels ``t4 * W/4 + 4s .. + 3`` of each key part."""
    lines = [
        f"    unsigned qb[{layout.dq // 16}][2];",
        "    {",
        "      const TQ_TGPTR float* qs = (const TQ_TGPTR float*)q_sh4;",
        "      const int qr = g & 3;",
        "      const bool qlo = g >= 4;",
    ]
    step = 0
    for p in layout.keys:
        lines += [
            "#pragma unroll",
            f"      for (int s = 0; s < {p.width // 16}; ++s) {{",
            f"        const int ch = {p.qoff} + t4 * {p.width // 4} + 4 * s;",
            "        float x[4];",
            "#pragma unroll",
            "        for (int e = 0; e < 4; ++e)",
            "          x[e] = tq_part(qr < R ? qs[qr * DQ + ch + e] : 0.0f, qlo);",
            f"        qb[{step} + s][0] = tq_h2(x[0], x[1]);",
            f"        qb[{step} + s][1] = tq_h2(x[2], x[3]);",
            "      }",
        ]
        step += p.width // 16
    return lines + ["    }"]


def _key_products(layout, kplan) -> list[str]:
    lines, step = [], 0
    for (name, p, _, nb), (loff, copies) in zip(_key_windows(layout), kplan):
        lc = copies.bit_length() - 1
        shift0, x0 = window_shift(f"x0_{name}", f"{name}w0", f"t4 * {nb}", nb)
        shift1, x1 = window_shift(f"x1_{name}", f"{name}w1", f"t4 * {nb}", nb)
        lines += [
            f"      {{  // key part {name}: width {p.width}, {p.bits} bits",
            *shift0,
            *shift1,
            f"        const int lb = {loff} + (lane & {copies - 1});",
            "        float ci[4] = {0.0f, 0.0f, 0.0f, 0.0f};",
            "        float cj[4] = {0.0f, 0.0f, 0.0f, 0.0f};",
        ]
        for s in range(p.width // 16):
            b0, b1 = 4 * s * p.bits, (4 * s + 2) * p.bits
            chain = "cj" if s % 2 and KEY_CHAINS > 1 else "ci"
            f = 2 * p.bits
            lines += [
                "        {",
                "          unsigned a[4];",
                f"          a[0] = mma_lut[lb + ({field(x0, b0, f)} << {lc})];",
                f"          a[1] = mma_lut[lb + ({field(x1, b0, f)} << {lc})];",
                f"          a[2] = mma_lut[lb + ({field(x0, b1, f)} << {lc})];",
                f"          a[3] = mma_lut[lb + ({field(x1, b1, f)} << {lc})];",
                f"          tq_mma16816({chain}, a, qb[{step}]);",
                "        }",
            ]
            step += 1
        lines += [
            f"        sc[0] += {name}n0 * (ci[0] + cj[0]);",
            f"        sc[1] += {name}n0 * (ci[1] + cj[1]);",
            f"        sc[2] += {name}n1 * (ci[2] + cj[2]);",
            f"        sc[3] += {name}n1 * (ci[3] + cj[3]);",
            "      }",
        ]
    return lines


def _value_products(layout, vplan) -> list[str]:
    lines = []
    for (name, p, _, nb), (loff, copies) in zip(_value_windows(layout), vplan):
        lc, bits = copies.bit_length() - 1, p.bits
        lines += [
            f"      {{  // value part {name}: width {p.width}, {bits} bits",
            f"        const int lb = {loff} + (lane & {copies - 1});",
            "        unsigned pb[2];",
            *(
                f"        pb[{i}] = tq_h2(tq_part(pt[{2 * i}] * {name}n{2 * i}, plo), "
                f"tq_part(pt[{2 * i + 1}] * {name}n{2 * i + 1}, plo));"
                for i in range(2)
            ),
        ]
        xs = []
        for u in range(4):
            shift, x = window_shift(f"x{u}_{name}", f"{name}w{u}", f"g * {nb}", nb)
            lines += shift
            xs.append(x)

        paired = PAIRED_VALUE_FIELDS and pairs_apply(bits)
        if paired:  # tokens (2t4, 2t4+1) and (2t4+8, 2t4+9) interleaved once per step
            lines += paired_words(f"y01_{name}", xs[0], xs[1], nb, bits)
            lines += paired_words(f"y23_{name}", xs[2], xs[3], nb, bits)

        def pair(a, b_, bit, xs=xs, bits=bits, lc=lc, name=name, paired=paired):
            if paired:
                return f"mma_lut[lb + ({paired_field(f'y{a}{b_}_{name}', bit, bits)} << {lc})]"
            lo, hi = field(xs[a], bit, bits), field(xs[b_], bit, bits)
            return f"mma_lut[lb + (({lo} | ({hi} << {bits})) << {lc})]"

        for m in range(p.width // 16):
            d0, d1 = 2 * m * bits, (2 * m + 1) * bits
            lines += [
                "        {",
                "          unsigned a[4];",
                f"          a[0] = {pair(0, 1, d0)};",
                f"          a[1] = {pair(0, 1, d1)};",
                f"          a[2] = {pair(2, 3, d0)};",
                f"          a[3] = {pair(2, 3, d1)};",
                f"          tq_mma16816(acc[{p.off // 16 + m}], a, pb);",
                "        }",
            ]
        lines.append("      }")
    return lines


def _prefetch_step(layout, tok: str) -> list[str]:
    """Lines that prefetch into L2 every line of the warp's 16-token step at ``tok`` (codes
    and norms of each key and value part), when it starts before the split's end."""
    spans = []
    for name, _, sw, _ in (*_key_windows(layout), *_value_windows(layout)):
        spans += [(f"{name}_idx", sw), (f"{name}_norm", 1)]
    lines = ["      {", f"      const int tp = {tok};", "      if (tp < end) {"]
    lines.append("        const int tl = min(tp + 15, end - 1);")
    for arr, row in spans:
        lines.append(
            f"        tq_prefetch_span(lane, {arr} + TQ_AT({arr}, tp), "
            f"{arr} + TQ_AT({arr}, tl) + {row});"
        )
    return lines + ["      }", "      }"]


def mma_packed_code(
    layout: AttendLayout, key_cb: list[int], value_cb: list[int], prefetch: int = 0
) -> str:
    """The packed-split branch of the attend body (returns after writing its split);
    ``key_cb`` / ``value_cb``: each part's codebook offset in ``cb_sh``; ``prefetch``: how
    many of its steps ahead a warp prefetches into L2 (0: none)."""
    kplan, vplan, nlut = lut_plan(layout, _budget_words(layout))
    ahead = []
    if prefetch:
        # The first steps are prefetched before the pair tables are filled, so their
        # loads overlap that work; then each step asks for the one ``prefetch`` ahead.
        ahead = [
            "#pragma unroll 1",
            f"    for (int s = 0; s < {prefetch}; ++s) {{",
            *_prefetch_step(layout, "begin + warp * 16 + s * NWARPS * 16"),
            "    }",
        ]
    lines = [
        "  if (!fp) {",
        "    // Tensor-core packed split (attention_mma_source).",
        *ahead,
        f"    TQ_SHARED tq_uint mma_lut[{nlut}];",
        "    TQ_SHARED float mma_p[NWARPS * 128];",
        "    TQ_SHARED float mma_ml[NWARPS * 8];",
    ]
    for p, (off, copies), cb in zip(layout.keys, kplan, key_cb):
        lines.append(lut_fill(off, copies, p.bits, cb))
    for p, (off, copies), cb in zip(layout.values, vplan, value_cb):
        lines.append(lut_fill(off, copies, p.bits, cb))
    lines += [
        "    TQ_BARRIER();",
        "    const int g = lane >> 2;",
        "    const int t4 = lane & 3;",
        *_q_fragments(layout),
        *_head_offsets(layout),
        "    float m2[2] = {TQ_NEG_INF, TQ_NEG_INF};",
        "    float l2[2] = {0.0f, 0.0f};",
        f"    float acc[{layout.dv // 16}][4];",
        "#pragma unroll",
        f"    for (int i = 0; i < {layout.dv // 16}; ++i)",
        "      acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;",
        *_registers(layout),
        "    if (begin + warp * 16 < end) {",
        "      const int ld0 = begin + warp * 16;",
        *_loads(layout, "k"),
        *_loads(layout, "v"),
        "    }",
        "    // Each side's registers are reloaded with the next step's words as soon as this",
        "    // step has used them, so the loads are in flight through half a step.",
        "    for (int tok0 = begin + warp * 16; tok0 < end; tok0 += NWARPS * 16) {",
        "      const int ld0 = tok0 + NWARPS * 16;",
        *(_prefetch_step(layout, f"tok0 + {prefetch} * NWARPS * 16") if prefetch else []),
        "      float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // (token g | g + 8) x (col 2t4 | +1)",
        *_key_products(layout, kplan),
        "      if (ld0 < end) {",
        *_loads(layout, "k"),
        "      }",
        softmax(LAZY_MAX),
        *_value_products(layout, vplan),
        "      if (ld0 < end) {",
        *_loads(layout, "v"),
        "      }",
        "    }",
        *meet(layout),
    ]
    return "\n".join(lines)
