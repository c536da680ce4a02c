"""Register-direct operand text of the attend kernel's tensor-core packed splits (CUDA): each
thread loads just the bits of the packed codes its ``mma`` fragments need, straight from
device memory into registers, and turns them into float16 pairs through a pair table; no
code or dequantized tile passes through threadgroup memory.

The packed stream of a token is a plain little-endian bit array (value v at bits
``[v * bits, v * bits + bits)``, :mod:`tq_core.pack`), and both matrix products may order
their contraction and output indices freely, so the generator picks orders that give every
thread one contiguous window of bits per token:

- keys, ``S = K Q^T`` (m16n8k16, tokens x channels): thread ``(g, t4)`` holds tokens
  ``g`` and ``g + 8`` of the step and, at step ``s`` of a part of width W, channels
  ``t4 * W/4 + 4s .. + 3`` (its logical columns ``2t4, 2t4+1, 2t4+8, 2t4+9``): a window of
  ``W * bits / 4`` bits per token, two consecutive codes per table lookup;
- values, ``O^T = V^T P^T`` (channels x tokens): thread ``(g, t4)`` holds tokens ``2t4,
  2t4+1, 2t4+8, 2t4+9`` and, at tile ``m``, channels ``g * W/8 + 2m`` and ``+ 1``: a window
  of ``W * bits / 8`` bits per token; a lookup pairs one channel of two tokens.

Pair tables hold ``(C[i & mask], C[i >> bits])`` as float16 pairs, one copy per lane where
they fit (a lane reads its own bank: scattered lookups would otherwise conflict).
"""

from __future__ import annotations

from .attention_layout import AttendLayout

__all__ = [
    "LUT_WORDS",
    "lut_plan",
    "lut_fill",
    "window_load",
    "window_shift",
    "window_words",
    "field",
    "pairs_apply",
    "paired_words",
    "paired_field",
]

#: Words of pair table a part may take (8 KiB): 32 copies up to 3 bits, 8 copies at 4 bits.
LUT_WORDS = 2048


def lut_plan(layout: AttendLayout, budget_words: int) -> tuple[list, list, int]:
    """((offset, copies) per key part, per value part, total words) of the pair tables:
    as many copies as fit :data:`LUT_WORDS` a part, halved together until ``budget_words``."""
    parts = [*layout.keys, *layout.values]
    copies = [max(1, min(32, LUT_WORDS >> (2 * p.bits))) for p in parts]
    while sum(c << (2 * p.bits) for c, p in zip(copies, parts)) > budget_words and max(copies) > 1:
        copies = [max(1, c // 2) for c in copies]
    plan, off = [], 0
    for c, p in zip(copies, parts):
        plan.append((off, c))
        off += c << (2 * p.bits)
    n = len(layout.keys)
    return plan[:n], plan[n:], off


def lut_fill(off: int, copies: int, bits: int, cb_off: int) -> str:
    """Threadgroup-wide fill of one pair table (entry i, copy c at word ``off + i*copies + c``)."""
    n, mask = (copies << (2 * bits)), (1 << bits) - 1
    shift = copies.bit_length() - 1
    return (
        f"    for (int i = (int)tq_tid; i < {n}; i += NT) {{\n"
        f"      const int e = i >> {shift};\n"
        f"      mma_lut[{off} + i] = tq_h2(cb_sh[{cb_off} + (e & {mask})], "
        f"cb_sh[{cb_off} + (e >> {bits})]);\n"
        "    }"
    )


def window_words(nbits: int) -> int:
    """Registers of a window of ``nbits`` bits once shifted to start at bit 0."""
    return -(-nbits // 32)


def window_load(
    dst: str,
    src: str,
    token: str,
    live: str,
    start: str,
    nbits: int,
    stream_words: int,
    row: str | None = None,
) -> list[str]:
    """Lines that load the window of ``nbits`` bits at bit ``start`` (a runtime expression,
    the same for every token) of ``token``'s stream of ``src`` into ``dst[]`` (declared by
    the caller, ``window_words(nbits) + 1`` words), zeros where ``live`` is false. Windows
    that start on a word boundary in every thread use 8- or 16-byte loads where the stream
    allows; others load the words they touch and are shifted with :func:`window_shift`.
    ``row``: the token's element offset from ``src`` (default: ``TQ_AT(src, token)``, the
    full batch, head and token strides)."""
    n = window_words(nbits)
    base = f"{src} + {row}" if row else f"{src} + TQ_AT({src}, {token})"
    if nbits % 32 == 0:
        vec = (
            4
            if n % 4 == 0 and stream_words % 4 == 0
            else 2
            if n % 2 == 0 and stream_words % 2 == 0
            else 1
        )
        lines = [f"      if ({live}) {{", f"        const tq_uint* wp = {base} + ({start} >> 5);"]
        if vec == 1:
            lines += [f"        {dst}[{k}] = wp[{k}];" for k in range(n)]
        else:
            typ = "uint4" if vec == 4 else "uint2"
            comps = ("x", "y", "z", "w")[:vec]
            for v in range(n // vec):
                lines.append(f"        {{ const {typ} u = reinterpret_cast<const {typ}*>(wp)[{v}];")
                lines += [f"          {dst}[{v * vec + e}] = u.{c};" for e, c in enumerate(comps)]
                lines.append("        }")
        lines += [
            "      } else {",
            *[f"        {dst}[{k}] = 0u;" for k in range(n)],
            "      }",
        ]
        return lines
    return [
        f"      if ({live}) {{",
        f"        const tq_uint* wp = {base} + ({start} >> 5);",
        f"        const int first = ({start}) >> 5;",
        f"        const int last = (({start}) + {nbits - 1}) >> 5;",
        *[f"        {dst}[{k}] = first + {k} <= last ? wp[{k}] : 0u;" for k in range(n + 1)],
        "      } else {",
        *[f"        {dst}[{k}] = 0u;" for k in range(n + 1)],
        "      }",
    ]


def window_shift(dst: str, src: str, start: str, nbits: int) -> tuple[list[str], str]:
    """(lines, name): lines declaring ``dst[]``, the window ``src[]`` shifted down to start
    at bit 0, and the name to read it by (``src`` itself, and no lines, when every window
    starts on a word boundary)."""
    n = window_words(nbits)
    if nbits % 32 == 0:
        return [], src
    lines = [f"        tq_uint {dst}[{n}];"] + [
        f"        {dst}[{k}] = tq_funnel({src}[{k}], {src}[{k + 1}], ({start}) & 31);"
        for k in range(n)
    ]
    return lines, dst


def field(words: str, bit: int, nbits: int) -> str:
    """C expression of bits ``[bit, bit + nbits)`` of the shifted window ``words[]``."""
    k, off, mask = bit >> 5, bit & 31, (1 << nbits) - 1
    if off + nbits <= 32:
        return f"(({words}[{k}] >> {off}) & {mask}u)"
    return f"(tq_funnel({words}[{k}], {words}[{k + 1}], {off}) & {mask}u)"


def pairs_apply(bits: int) -> bool:
    """Whether :func:`paired_words` serves ``bits``: two codes' fields tile a word (1, 2, 4)."""
    return 32 % (2 * bits) == 0


def _even_codes_mask(bits: int) -> int:
    """The word mask of codes 0, 2, 4, ... of ``bits`` bits each."""
    return sum(((1 << bits) - 1) << (2 * bits * j) for j in range(32 // (2 * bits)))


def paired_words(dst: str, lo: str, hi: str, nbits: int, bits: int) -> list[str]:
    """Lines declaring ``{dst}e[]`` and ``{dst}o[]``: the shifted windows ``lo[]`` and ``hi[]``
    (the same channels of two tokens) interleaved so that each code of ``lo`` and the same
    code of ``hi`` share one field of ``2 * bits`` bits, ``lo`` low: the value pair-table
    index, ready for :func:`paired_field`. Four or five operations a word take the place of
    a shift, a mask and an or for every lookup (bits 1, 2 and 4, :func:`pairs_apply`)."""
    n, m = window_words(nbits), _even_codes_mask(bits)
    even, odd = f"{m:#x}u", f"{m << bits:#x}u"
    lines = [f"        tq_uint {dst}e[{n}], {dst}o[{n}];"]
    for w in range(n):
        lo_w, hi_w = f"{lo}[{w}]", f"{hi}[{w}]"
        lines += [
            f"        {dst}e[{w}] = ({lo_w} & {even}) | (({hi_w} & {even}) << {bits});",
            f"        {dst}o[{w}] = (({lo_w} >> {bits}) & {even}) | ({hi_w} & {odd});",
        ]
    return lines


def paired_field(dst: str, bit: int, bits: int) -> str:
    """C expression of ``lo`` code | ``hi`` code << ``bits`` for the code at window bit
    ``bit``, from the words :func:`paired_words` declared as ``dst``: an even code sits at
    its own bit of ``{dst}e``, an odd one ``bits`` lower in ``{dst}o``."""
    code, word, at = bit // bits, bit >> 5, bit & 31
    src, shift = (f"{dst}e", at) if code % 2 == 0 else (f"{dst}o", at - bits)
    return f"(({src}[{word}] >> {shift}) & {(1 << 2 * bits) - 1}u)"
