"""Query rotation and output un-rotation inside the packed-KV attention kernels (kernel text).

``R = H diag(signs)`` per part (DESIGN.md): Walsh-Hadamard butterflies in threadgroup memory,
natural order as ``mx.hadamard_transform``; used by the attend kernel's raw-query prologue
and the finish kernel's un-rotation.
"""

from __future__ import annotations

import math

from .attention_layout import AttendLayout

__all__ = ["fwht", "part_channel", "q_load_prepared", "q_load_raw"]

q_load_prepared = r"""
  {
    const int qw = fp ? DK : DQ;
    TQ_TGPTR float* qs = (TQ_TGPTR float*)q_sh4;
    for (int i = (int)tq_tid; i < R * qw; i += NT)
      qs[i] = fp ? qf[(size_t)bh * R * DK + i] : q[(size_t)bh * R * DQ + i];
  }
"""


def part_channel(perm: str | None, dim: str, off: int) -> str:
    """C expression of the channel that coordinate ``j`` of a part starting at ``off`` holds:
    through the outlier permutation input ``perm`` (row ``h``, ``dim`` wide) when there is
    one (fractional bits), else ``off + j``."""
    return f"{perm}[h * {dim} + {off} + j]" if perm else f"{off} + j"


def fwht(buf: str, base: str, width: int, rows: str, stride: str, threads: str) -> str:
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


def q_load_raw(layout: AttendLayout) -> str:
    """The queries of this (batch, KV head), scaled; in packed splits also permuted, signed
    and Hadamard-transformed per key part (R = H diag(signs), DESIGN.md), in shared memory.
    Row r of the head is query head h * rep + r / L, query r % L: with the model's
    (B, Hq, L, D) layout that is row bh * RR + r of a (B * Hq * L, D) view. The queries are
    read through their strides (``TQ_Q``), so the model's transposed ones need no copy."""
    lines = [
        "  {",
        "#define TQ_Q(g, d) tq_float(q[(size_t)((g) / q_shape[2] / q_shape[1]) * q_strides[0] + "
        "(size_t)((g) / q_shape[2] % q_shape[1]) * q_strides[1] + "
        "(size_t)((g) % q_shape[2]) * q_strides[2] + (size_t)(d) * q_strides[3]])",
        "    TQ_TGPTR float* qs = (TQ_TGPTR float*)q_sh4;",
        "    const float qscale = params[0];",
        "    const int RR = counts[5];",
        "    if (fp) {",
        "      for (int i = (int)tq_tid; i < R * DK; i += NT) {",
        "        const int r = i / DK;",
        "        const int d = i - r * DK;",
        "        qs[i] = r < RR ? qscale * TQ_Q(bh * RR + r, d) : 0.0f;",
        "      }",
        "    } else {",
    ]
    for i, p in enumerate(layout.keys):
        chan = part_channel("kperm" if layout.kperm else None, "DK", p.qoff)
        norm = 1.0 / math.sqrt(p.width)
        lines += [
            f"      for (int i = (int)tq_tid; i < R * {p.width}; i += NT) {{",
            f"        const int r = i / {p.width};",
            f"        const int j = i - r * {p.width};",
            f"        const int c = {chan};",
            f"        qs[r * DQ + {p.qoff} + j] = r < RR ? qscale * {norm!r}f * k{i}_signs[j] *",
            "            TQ_Q(bh * RR + r, c) : 0.0f;",
            "      }",
        ]
    lines.append("      TQ_BARRIER();")
    for p in layout.keys:
        lines.append(fwht("qs", str(p.qoff), p.width, "R", "DQ", "NT"))
    lines += ["    }", "#undef TQ_Q", "  }"]
    return "\n".join(lines)
