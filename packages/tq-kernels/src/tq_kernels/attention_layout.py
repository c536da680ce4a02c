"""Codes layout of the packed-KV attention kernels: the parts, widths and bits they are
generated for, and the inputs a layout's kernel takes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

__all__ = [
    "ATTEND_THREADS",
    "ROW_BUCKETS",
    "KeyPartLayout",
    "ValuePartLayout",
    "AttendLayout",
    "value_positions",
]

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

    def __hash__(self) -> int:
        # Kernel caches look a layout up several times per decode step and layer: hash the
        # nested fields once.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", h)
        return h

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


def value_positions(layout: AttendLayout) -> list[tuple[int, int]]:
    """(mul, add) per value accumulator e of a lane: in a packed split, accumulator e of lane
    ``lane`` holds output coordinate ``lane * mul + add`` of the rotated basis (part p's
    ``width/32`` coordinates of that lane, parts in order)."""
    out = []
    for p in layout.values:
        c = p.width // 32
        out += [(c, p.off + e) for e in range(c)]
    return out
