"""How one packed-KV attend launch is laid out: how many splits over the sequence, whether
the packed splits run on the tensor cores or the SIMT body, and the register cap the attend
kernel is compiled for; the knobs that steer these (module attributes, some from the
environment), measured on the H100 (docs/kvcache.md)."""

from __future__ import annotations

import os
from functools import cache, lru_cache

from .attention_layout import ATTEND_THREADS, AttendLayout
from .attention_mma_source import mma_applies, text_knobs
from .backend import kernel_backend

__all__ = [
    "MMA_ATTEND",
    "MMA_MIN_CHUNK",
    "ATTEND_MIN_BLOCKS",
    "MMA_PREFETCH",
    "knobs",
    "split_plan",
    "fp_splits",
    "counts_values",
    "launch_plan",
    "min_blocks",
    "tensor_core_splits",
]

#: Threadgroups to aim for over the whole GPU (H100: 132 SMs, 4 per SM): fewer leave SMs
#: idle on short contexts, more only add partial results to merge.
_TARGET_GROUPS = 528
#: The same for the tensor-core packed splits (2 threadgroups per SM): each split pays for
#: its pair tables and query fragments, and on the H100 264 splits beat 528 by 13-24% at
#: 32K-128K (docs/kvcache.md).
_MMA_TARGET_GROUPS = 264


def split_plan(n_packed: int, heads: int, groups: int | None = None) -> tuple[int, int]:
    """(tokens per split, number of splits) for ``n_packed`` tokens over ``heads`` (batch x
    KV heads) threadgroup columns: whole tiles, enough splits to fill the GPU (``groups``
    threadgroups in all, :data:`_TARGET_GROUPS` by default)."""
    want = max(1, (groups or _TARGET_GROUPS) // max(1, heads))
    chunk = -(-n_packed // want)
    chunk = max(ATTEND_THREADS, -(-chunk // ATTEND_THREADS) * ATTEND_THREADS)
    return chunk, -(-n_packed // chunk)


#: Packed splits on the tensor cores where the layout allows (CUDA, at most 4 query rows;
#: attention_mma_source): on by default, the H100 measured them 1.15-1.4x faster than the
#: SIMT body at 32K-128K (docs/kvcache.md). ``TQ_ATTEND_MMA=0`` or setting this False
#: keeps every split on the SIMT body.
def _env_mma() -> bool:
    text = os.environ.get("TQ_ATTEND_MMA", "1")
    if text not in ("0", "1"):
        raise ValueError(f"TQ_ATTEND_MMA must be 0 (SIMT body only) or 1 (default), got {text!r}")
    return text == "1"


MMA_ATTEND = _env_mma()


#: Steps (16 tokens a warp) ahead that each warp of a tensor-core split prefetches into L2
#: (0: none, the default). Off: timed on the H100 it made every step slower, 10-15% at
#: 32K-128K with a distance of 4 (docs/kvcache.md). ``TQ_ATTEND_PREFETCH=N``.
def _env_prefetch() -> int:
    text = os.environ.get("TQ_ATTEND_PREFETCH", "0")
    if not text.isdigit() or int(text) > 64:
        raise ValueError(
            f"TQ_ATTEND_PREFETCH must be an integer from 0 (off) to 64 steps, got {text!r}"
        )
    return int(text)


MMA_PREFETCH = _env_prefetch()


#: Asked every decode step and layer: its budget arithmetic cost ~20 us of host time.
_mma_applies = cache(mma_applies)

#: The tensor-core splits pay a fixed cost per split (pair tables, query fragments, the
#: warps' meet): below this many packed tokens a split (8 steps of 16 tokens per warp) the
#: SIMT body was as fast or faster on the H100 (4K-16K, docs/kvcache.md).
MMA_MIN_CHUNK = 1024


def knobs() -> tuple:
    """This module's knobs as they stand: a launch worked out under other values is stale."""
    return (
        MMA_ATTEND,
        MMA_MIN_CHUNK,
        _MMA_TARGET_GROUPS,
        _TARGET_GROUPS,
        ATTEND_MIN_BLOCKS,
        MMA_PREFETCH,
        *text_knobs(),
    )


def launch_plan(layout: AttendLayout, backend: str, n_packed: int, heads: int):
    """(tensor cores, tokens per split, splits) of one attend launch (the same between two
    flushes of a cache: looked up, with the module's knobs in the key)."""
    return _plan_for(layout, backend, n_packed, heads, knobs()[:4])


@lru_cache(maxsize=1024)
def _plan_for(layout, backend, n_packed, heads, knobs):
    mma_on, min_chunk, mma_groups, groups = knobs
    if mma_on and _mma_applies(layout, backend):
        chunk, nsplit = split_plan(n_packed, heads, mma_groups)
        if chunk >= min_chunk:
            return True, chunk, nsplit
    return (False, *split_plan(n_packed, heads, groups))


def tensor_core_splits(layout: AttendLayout, n_packed: int, heads: int) -> bool:
    """Whether an attend launch of ``layout`` over ``n_packed`` tokens and ``heads`` (batch
    x KV heads) columns runs its packed splits on the tensor cores (so a caller can tell
    the two compiled variants apart)."""
    backend = kernel_backend()
    return backend is not None and launch_plan(layout, backend, n_packed, heads)[0]


#: Threadgroups per SM the CUDA compiler is asked to fit (``__launch_bounds__``; 0: its own
#: choice; -1: automatic (:func:`min_blocks`)). ``TQ_ATTEND_MIN_BLOCKS=N`` sets it.
def _env_min_blocks() -> int:
    text = os.environ.get("TQ_ATTEND_MIN_BLOCKS", "-1")
    try:
        value = int(text)
    except ValueError:
        value = -2
    if not -1 <= value <= 8:
        raise ValueError(
            f"TQ_ATTEND_MIN_BLOCKS must be an integer from 0 to 8 (or -1: automatic), got {text!r}"
        )
    return value


ATTEND_MIN_BLOCKS = _env_min_blocks()


def min_blocks(layout: AttendLayout, mma: bool = False) -> int:
    """Up to 4 query rows the SIMT attend kernel is compiled for 4 threadgroups per SM (64
    registers a thread): on the H100 its own choice (92 registers, 2 per SM, 25% occupancy
    by Nsight Compute) was 5-12% slower at 32K-128K with K4V3 and K3V2 (docs/kvcache.md).
    The tensor-core packed splits hold their operands in registers: 2 per SM (128).
    More rows hold more accumulators; they keep the compiler's choice."""
    if ATTEND_MIN_BLOCKS >= 0:
        return ATTEND_MIN_BLOCKS
    if layout.rows > 4:
        return 0
    return 2 if mma else 4


def fp_splits(n_fp: int) -> int:
    """Splits of the fp16 sink and tail tokens: one per tile, at least one."""
    return max(1, -(-n_fp // ATTEND_THREADS))


def counts_values(chunk, n_sink, n_tail, queries_per_head, causal, rows=0, heads=0, sinks=False):
    """The kernels' ``counts`` input: (tokens per packed split, sinks present, tail present,
    queries per head, causal, query rows, KV heads, sink logits present, fp16 splits). The
    sink and tail lengths themselves are read from those arrays' shapes, so between flushes
    of the cache the tuple (and its array, :func:`_constant`) is the same every decode step."""
    n_fp = n_sink + n_tail
    return (
        chunk,
        int(n_sink > 0),
        int(n_tail > 0),
        queries_per_head,
        int(causal),
        rows,
        heads,
        int(sinks),
        fp_splits(n_fp),
    )
