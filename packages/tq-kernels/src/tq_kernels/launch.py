"""Launch geometry of the matvec kernels: rows per warp, input split, warps per threadgroup."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LaunchConfig", "launch_config", "row_bucket", "MAX_ROWS"]

#: The matvec kernels take up to this many activation rows (decode, speculative drafts).
MAX_ROWS = 8
_ROW_BUCKETS = (1, 2, 4, 8)
# Aim for this many warps in flight over the whole GPU (H100: 132 SMs x 16): fewer leaves
# HBM idle between loads, more only shortens each warp's input slice.
_TARGET_WARPS = 2048


@dataclass(frozen=True)
class LaunchConfig:
    """``rows_per_warp`` output rows per warp; ``ksplit`` warps share one row group's input
    (reduced through threadgroup memory); ``warps`` per threadgroup (a multiple of ksplit);
    ``rotate_shared``: a rotating launch rotates the activation once per threadgroup into
    threadgroup memory where it fits, rather than in every warp's registers."""

    rows_per_warp: int = 4
    ksplit: int = 1
    warps: int = 4
    rotate_shared: bool = True

    def __post_init__(self):
        if self.rows_per_warp not in (1, 2, 4, 8):
            raise ValueError(f"rows_per_warp must be 1, 2, 4 or 8, got {self.rows_per_warp}")
        if self.ksplit < 1 or self.warps % self.ksplit:
            raise ValueError(f"ksplit={self.ksplit} must divide warps={self.warps}")

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def rows_per_group(self) -> int:
        return self.rows_per_warp * self.warps // self.ksplit

    def template(self) -> list[tuple[str, int]]:
        return [("RPW", self.rows_per_warp), ("KSPLIT", self.ksplit), ("NWARPS", self.warps)]


def row_bucket(rows: int) -> int:
    """The compiled row count (1, 2, 4 or 8) that serves ``rows`` activation rows."""
    for b in _ROW_BUCKETS:
        if rows <= b:
            return b
    raise ValueError(f"the matvec kernel takes at most {MAX_ROWS} rows, got {rows}")


def launch_config(
    n: int, k: int, rows: int, batch: int = 1, rotated_shared: bool = False
) -> LaunchConfig:
    """Geometry for an (n, k) weight, ``rows`` activation rows and ``batch`` weights (MoE
    entries): 4 rows per warp (2 from 4 activation rows up, to bound registers), then split
    the input over up to 4 warps until enough warps are in flight. ``rotated_shared``: the
    launch rotates the activation once per threadgroup; then 8 warps share that work and
    none splits the input: the lowest total time over the H100 sweep's shapes, at most
    16% off the best geometry of any one (`tq bench kernels --sweep`, docs/kernels.md)."""
    rpw = 4 if rows <= 2 else 2
    if rotated_shared:
        return LaunchConfig(rpw, 1, 8)
    groups = -(-n // rpw) * batch
    blocks = k // 32
    ksplit = 1
    while ksplit < 4 and groups * ksplit < _TARGET_WARPS and blocks >= 64 * ksplit:
        ksplit *= 2
    return LaunchConfig(rpw, ksplit, 4)
