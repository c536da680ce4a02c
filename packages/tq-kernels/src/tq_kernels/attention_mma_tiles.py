"""Per-warp tiles of the attend kernel's tensor-core packed splits (CUDA kernel text): the
pair tables, the staging of a 16-token step's code words (loaded one step ahead), their
dequantization into fp16 tiles, and the matrix products each 32-channel tile feeds.
:mod:`tq_kernels.attention_mma_source` strings these into the packed-split branch."""

from __future__ import annotations

from .attention_layout import AttendLayout

__all__ = [
    "TILE_STRIDE",
    "lut_offsets",
    "streams",
    "staged_words",
    "staging",
    "staging_regs",
    "tile_products",
]

TILE_STRIDE = 40  # halves per token row of a 32-channel tile: 80 bytes, conflict-free rows


def lut_offsets(layout: AttendLayout) -> tuple[list[int], list[int], int]:
    """Offsets of each key part's and value part's pair table, and their total size."""
    off, keys, values = 0, [], []
    for p in layout.keys:
        keys.append(off)
        off += 1 << (2 * p.bits)
    for p in layout.values:
        values.append(off)
        off += 1 << (2 * p.bits)
    return keys, values, off


def _dequant(words: int, stride: int, bits: int, blk: int, lut: int) -> str:
    """Dequantize channels ``32*blk .. 32*blk+31`` of the warp's 16 tokens into the warp's
    fp16 tile (token rows of 40 halves), from their words staged at ``mma_w`` offset
    ``words`` (:func:`staging`): lane takes (token, 8-channel group) units ``lane`` and
    ``lane + 32``, one 8*bits-bit window each, four pair lookups, one 16-byte store."""
    mask = (1 << (2 * bits)) - 1
    return f"""
        for (int uu = lane; uu < 64; uu += 32) {{
          const int tk = uu >> 2;
          const int u = uu & 3;
          const int bit = {blk * 32 * bits} + u * {8 * bits};
          const TQ_TGPTR tq_uint* row = wsh + {words} + tk * {stride};
          const tq_uint lo = row[bit >> 5];
          const tq_uint hi = ((bit & 31) + {8 * bits} > 32) ? row[(bit >> 5) + 1] : 0u;
          const tq_uint w = tq_funnel(lo, hi, bit & 31);
          uint4 hv;
          hv.x = mma_lut[{lut} + (w & {mask}u)];
          hv.y = mma_lut[{lut} + ((w >> {2 * bits}) & {mask}u)];
          hv.z = mma_lut[{lut} + ((w >> {4 * bits}) & {mask}u)];
          hv.w = mma_lut[{lut} + ((w >> {6 * bits}) & {mask}u)];
          tile4[tk * {TILE_STRIDE // 8} + u] = hv;
        }}
        tq_syncwarp();"""


def streams(layout: AttendLayout) -> list[tuple[str, int, int]]:
    """(input, words per token, offset in a warp's staging area) of every packed stream a
    step reads: key parts, then value parts; each token row padded to an odd stride."""
    out, off = [], 0
    for name, parts in (("k", layout.keys), ("v", layout.values)):
        for i, p in enumerate(parts):
            w = p.width // 32 * p.bits
            out.append((f"{name}{i}_idx", w, off))
            off += 16 * (w + 1)
    return out


def staged_words(layout: AttendLayout) -> int:
    """Words of one warp's staging area: every stream's 16 token rows at their padded stride."""
    return sum(16 * (w + 1) for _, w, _ in streams(layout))


def staging(layout: AttendLayout) -> tuple[str, str]:
    """(load, store) text of a step's code words: ``load`` issues the 16 tokens' rows of
    every stream at token ``tq_ld`` into registers (16-byte loads where a row allows;
    consecutive tokens' rows are contiguous), ``store`` puts them in the warp's staging
    area. The loop issues the next step's loads before computing the current one, so one
    memory round trip per step is hidden behind the arithmetic."""
    load, store = [], []
    for n, (src, w, off) in enumerate(streams(layout)):
        vec = 4 if w % 4 == 0 else 1
        chunks = 16 * w // vec
        for r in range(-(-chunks // 32)):
            reg = f"st{n}_{r}"
            cond = f"c < {chunks} && c * {vec} < nv * {w}"
            fetch = (
                f"*reinterpret_cast<const uint4*>({src} + rb{n} + c * 4)"
                if vec == 4
                else f"{src}[rb{n} + c]"
            )
            load += [
                "      {",
                f"        const int c = lane + {32 * r};",
                f"        if ({cond}) {reg} = {fetch};",
                "      }",
            ]
            comps = ("x", "y", "z", "w") if vec == 4 else ("",)
            store += [
                "      {",
                f"        const int c = lane + {32 * r};",
                f"        if (c < {chunks}) {{",
            ]
            for e, comp in enumerate(comps):
                val = f"{reg}.{comp}" if comp else reg
                store += [
                    f"          const int i{e} = c * {vec} + {e};",
                    f"          const int t{e} = i{e} / {w};",
                    f"          wsh[{off} + t{e} * {w + 1} + i{e} - t{e} * {w}] = {val};",
                ]
            store += ["        }", "      }"]
    heads = [
        f"      const size_t rb{n} = TQ_AT({src}, tq_ld);"
        for n, (src, _, _) in enumerate(streams(layout))
    ]
    load = ["      const int nv = min(16, end - tq_ld);", *heads, *load]
    return "\n".join(load), "\n".join(store)


def staging_regs(layout: AttendLayout) -> str:
    out = []
    for n, (_, w, _) in enumerate(streams(layout)):
        vec = 4 if w % 4 == 0 else 1
        for r in range(-(-(16 * w // vec) // 32)):
            zero = "make_uint4(0u, 0u, 0u, 0u)" if vec == 4 else "0u"
            out.append(f"    {'uint4' if vec == 4 else 'tq_uint'} st{n}_{r} = {zero};")
    return "\n".join(out)


def tile_products(stream: tuple, part, lut: int, products) -> list[str]:
    """A part's 32-channel blocks in turn: dequantize the block into the warp's tile, then
    ``products(c)`` (the matrix products of the part's 16-channel column ``c``, two per
    block) read it; the tile is free again after the last."""
    _, w, off = stream
    lines = []
    for blk in range(part.width // 32):
        lines.append(_dequant(off, w + 1, part.bits, blk, lut))
        for c in (2 * blk, 2 * blk + 1):
            lines += ["        {", "          unsigned a[4];", *products(c), "        }"]
        lines.append("        tq_syncwarp();")
    return lines
