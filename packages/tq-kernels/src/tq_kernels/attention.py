"""Launch decode attention over packed TurboQuant keys/values: split-K attend, then combine.

The caller (tq-kvcache) prepares the query rows and un-rotates the result; this module only
knows arrays: :class:`KeyPart` / :class:`ValuePart` hold one TurboQuant instance's codes
(sliced to the packed tokens; views are read through their strides, never copied) and its
codebook. See :mod:`tq_kernels.attention_source` for the kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache, lru_cache

import mlx.core as mx

from .attention_layout import (
    ATTEND_THREADS,
    ROW_BUCKETS,
    AttendLayout,
    KeyPartLayout,
    ValuePartLayout,
)
from .attention_merge_source import combine_source, finish_source
from .attention_mma_source import mma_applies
from .attention_source import attend_source
from .backend import kernel_backend
from .minify import minify

__all__ = [
    "KeyPart",
    "ValuePart",
    "packed_kv_attention",
    "raw_kv_attention",
    "raw_layout",
    "raw_queries_apply",
    "MAX_ATTEND_ROWS",
    "split_plan",
    "fp_splits",
    "counts_values",
    "tensor_core_splits",
    "MMA_MIN_CHUNK",
]

MAX_ATTEND_ROWS = ROW_BUCKETS[-1]
#: Threadgroups to aim for over the whole GPU (H100: 132 SMs, 4 per SM): fewer leave SMs
#: idle on short contexts, more only add partial results to merge.
_TARGET_GROUPS = 528
#: The same for the tensor-core packed splits (2 threadgroups per SM): each split pays for
#: its pair tables and query fragments, and on the H100 264 splits beat 528 by 13-24% at
#: 32K-128K (docs/kvcache.md).
_MMA_TARGET_GROUPS = 264
_COMBINE_THREADS = 256


@dataclass(frozen=True)
class KeyPart:
    """Codes of one key part: ``idx`` (B, H, N, W) uint32 and ``norm`` (B, H, N) at ``bits``
    mse bits with ``codebook`` (2**bits floats), or ``bits`` = 0; with ``prod`` also the QJL
    ``sgn`` (B, H, N, width/32) uint32 and ``rnorm`` (B, H, N)."""

    width: int
    bits: int
    idx: mx.array | None = None
    norm: mx.array | None = None
    codebook: mx.array | None = None
    sgn: mx.array | None = None
    rnorm: mx.array | None = None
    signs: mx.array | None = None  # the part's rotation signs (float32), for raw queries

    @property
    def prod(self) -> bool:
        return self.sgn is not None


@dataclass(frozen=True)
class ValuePart:
    """Codes of one value part: ``idx`` (B, H, N, W) uint32, ``norm`` (B, H, N), codebook."""

    width: int
    bits: int
    idx: mx.array
    norm: mx.array
    codebook: mx.array
    signs: mx.array | None = None  # the part's rotation signs (float32), for raw queries


def _row_bucket(rows: int) -> int:
    for b in ROW_BUCKETS:
        if rows <= b:
            return b
    raise ValueError(f"packed attention takes at most {MAX_ATTEND_ROWS} query rows, got {rows}")


def split_plan(n_packed: int, heads: int, groups: int | None = None) -> tuple[int, int]:
    """(tokens per split, number of splits) for ``n_packed`` tokens over ``heads`` (batch x
    KV heads) threadgroup columns: whole tiles, enough splits to fill the GPU (``groups``
    threadgroups in all, :data:`_TARGET_GROUPS` by default)."""
    want = max(1, (groups or _TARGET_GROUPS) // max(1, heads))
    chunk = -(-n_packed // want)
    chunk = max(ATTEND_THREADS, -(-chunk // ATTEND_THREADS) * ATTEND_THREADS)
    return chunk, -(-n_packed // chunk)


@cache
def _compiled(source: tuple, backend: str, row_contiguous: bool):
    name, header, body, inputs, outputs = source
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return make(
        name=name,
        input_names=list(inputs),
        output_names=list(outputs),
        source=minify(body),
        header=minify(header),
        ensure_row_contiguous=row_contiguous,
    )


#: Packed splits on the tensor cores where the layout allows (CUDA, at most 4 query rows;
#: attention_mma_source): on by default, the H100 measured them 1.2-1.5x faster than the
#: SIMT body at 32K-128K (docs/kvcache.md). ``TQ_ATTEND_MMA=0`` or setting this False
#: keeps every split on the SIMT body.
MMA_ATTEND = os.environ.get("TQ_ATTEND_MMA", "1") != "0"


#: Asked every decode step and layer: its budget arithmetic cost ~20 us of host time.
_mma_applies = cache(mma_applies)

#: The tensor-core splits pay a fixed cost per split (pair tables, query fragments, the
#: warps' meet): below this many packed tokens a split (8 steps of 16 tokens per warp) the
#: SIMT body was as fast or faster on the H100 (4K-16K, docs/kvcache.md).
MMA_MIN_CHUNK = 1024


def _plan(layout: AttendLayout, backend: str, n_packed: int, heads: int):
    """(tensor cores, tokens per split, splits) of one attend launch (the same between two
    flushes of a cache: looked up, with the module's knobs in the key)."""
    knobs = (MMA_ATTEND, MMA_MIN_CHUNK, _MMA_TARGET_GROUPS, _TARGET_GROUPS)
    return _plan_for(layout, backend, n_packed, heads, knobs)


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
    return backend is not None and _plan(layout, backend, n_packed, heads)[0]


#: Threadgroups per SM the CUDA compiler is asked to fit (``__launch_bounds__``; 0: its own
#: choice; -1: :func:`_min_blocks`'s). ``TQ_ATTEND_MIN_BLOCKS=N`` sets it.
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


def _min_blocks(layout: AttendLayout, mma: bool = False) -> int:
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


@cache
def _attend_kernel(layout: AttendLayout, backend: str, mma: bool, min_blocks: int):
    # Code arrays are views sliced to the tokens held: read through their strides.
    return _compiled(attend_source(layout, backend, mma, min_blocks), backend, False)


def fp_splits(n_fp: int) -> int:
    """Splits of the fp16 sink and tail tokens: one per tile, at least one."""
    return max(1, -(-n_fp // ATTEND_THREADS))


def _attend(
    layout: AttendLayout, backend: str, inputs: list, nsplit: int, n_fp: int, cols: int, mma: bool
):
    """One attend launch: ``nsplit`` sequence splits of the packed tokens, then the splits of
    the ``n_fp`` fp16 tokens, per (batch x KV head) column, the packed ones on the tensor
    cores with ``mma``; returns the per-split partial outputs and (max, sum) rows."""
    rb, dv = layout.rows, layout.dv
    splits = nsplit + fp_splits(n_fp)
    return _attend_kernel(layout, backend, mma, _min_blocks(layout, mma))(
        inputs=inputs,
        grid=(splits * ATTEND_THREADS, cols, 1),
        threadgroup=(ATTEND_THREADS, 1, 1),
        output_shapes=[(cols, splits, rb, dv), (cols, splits, rb, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )


@cache
def _finish_kernel(layout: AttendLayout, backend: str):
    return _compiled(finish_source(layout, backend), backend, True)


@cache
def _combine_kernel(backend: str):
    return _compiled(combine_source(backend), backend, True)


def _layout(keys, values, rows, dk, dv, raw=False, kperm=False, vperm=False):
    kl, qoff = [], 0
    for p in keys:
        kl.append([p.width, p.bits, p.prod, qoff if p.bits else 0, 0])
        if p.bits:
            qoff += p.width
    for entry, p in zip(kl, keys):
        if p.prod:
            entry[4] = qoff
            qoff += p.width
    vl, off = [], 0
    for p in values:
        vl.append(ValuePartLayout(p.width, p.bits, off))
        off += p.width
    layout = AttendLayout(
        tuple(KeyPartLayout(*e) for e in kl),
        tuple(vl),
        _row_bucket(rows),
        qoff,
        dk,
        dv,
        raw,
        kperm,
        vperm,
    )
    return layout, qoff


def raw_layout(keys, values, queries_shape, kperm: bool, vperm: bool) -> AttendLayout:
    """The kernels' layout for :func:`raw_kv_attention` over these parts and queries of
    ``queries_shape`` (B, Hq, L, Dk)."""
    _, hq, L, dk = queries_shape
    h = keys[0].idx.shape[1]
    dv = sum(p.width for p in values)
    return _layout(keys, values, (hq // h) * L, dk, dv, True, kperm, vperm)[0]


def _fp_inputs(fp_segments, b, h, dk, dv):
    """The four fp16 segment inputs and the sink and tail lengths; an absent segment still
    needs a pointer of the fp dtype: another segment's array (or zeros), never read."""
    sink_k, sink_v, tail_k, tail_v = fp_segments
    n_sink = 0 if sink_k is None else sink_k.shape[2]
    n_tail = 0 if tail_k is None else tail_k.shape[2]
    some_k = next((x for x in (sink_k, tail_k) if x is not None and x.shape[2]), None)
    some_v = next((x for x in (sink_v, tail_v) if x is not None and x.shape[2]), None)
    if some_k is None:
        some_k = mx.zeros((b, h, 1, dk), mx.float16)
        some_v = mx.zeros((b, h, 1, dv), mx.float16)
    sink_k = sink_k if n_sink else some_k
    sink_v = sink_v if n_sink else some_v
    tail_k = tail_k if n_tail else some_k
    tail_v = tail_v if n_tail else some_v
    if sink_k.dtype != tail_k.dtype:
        tail_k, tail_v = tail_k.astype(sink_k.dtype), tail_v.astype(sink_k.dtype)
    return sink_k, sink_v, tail_k, tail_v, n_sink, n_tail


def raw_queries_apply(keys, values) -> bool:
    """Whether :func:`raw_kv_attention` takes these parts: mse keys, every key and value part
    a single power-of-two Hadamard block with its signs given."""
    parts = (*keys, *values)
    return all(
        p.signs is not None and not (p.width & (p.width - 1)) and not getattr(p, "prod", False)
        for p in parts
    ) and all(p.bits for p in keys)


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


@lru_cache(maxsize=512)
def _constant(values: tuple, dtype, shape: tuple | None = None) -> mx.array:
    """One evaluated array per distinct value (counts, the scale, no-sink logits): the
    kernels' small parameters are reused step after step, so a decode step makes no host
    array (docs/kvcache.md: with tq-kvcache's prefix reuse this took the attention share of
    a 3B decode step at 8K on the H100 from 5.5 to 3.4 ms)."""
    a = mx.array(values, dtype)
    if shape is not None:
        a = a.reshape(shape)
    mx.eval(a)
    return a


def raw_kv_attention(
    queries: mx.array,
    scale: float,
    keys: tuple[KeyPart, ...],
    values: tuple[ValuePart, ...],
    fp_segments: tuple,
    causal: bool,
    sinks: mx.array | None = None,
    kperm: mx.array | None = None,
    vperm: mx.array | None = None,
    layout: AttendLayout | None = None,
) -> mx.array:
    """The attention output (B, Hq, L, Dv) in ``queries.dtype`` from the model's raw queries
    (B, Hq, L, Dk): the kernels scale, permute and rotate the queries, and un-rotate and
    permute back the output themselves, so a decode step is two launches. ``kperm`` /
    ``vperm`` (H, D) int32: outlier-channel permutations of fractional bits; ``sinks``:
    (Hq,) attention-sink logits. Only where :func:`raw_queries_apply`. ``layout``: what
    :func:`raw_layout` returns for these arguments, when the caller keeps it between
    steps (it is the same every token)."""
    backend = kernel_backend()
    if backend is None:
        raise RuntimeError("tq-kernels: no GPU backend (Metal or CUDA) is available")
    b, hq, L, dk = queries.shape
    probe = keys[0].idx
    h, n_packed = probe.shape[1], probe.shape[2]
    rows = (hq // h) * L
    dv = sum(p.width for p in values)
    if layout is None:
        layout = raw_layout(keys, values, queries.shape, kperm is not None, vperm is not None)
    mma, chunk, nsplit = _plan(layout, backend, n_packed, b * h)
    sink_k, sink_v, tail_k, tail_v, n_sink, n_tail = _fp_inputs(fp_segments, b, h, dk, dv)
    counts = _constant(
        counts_values(chunk, n_sink, n_tail, L, causal, rows, h, sinks is not None), mx.int32
    )
    inputs = [mx.contiguous(queries), _constant((float(scale),), mx.float32), counts]
    for p in keys:
        inputs += [p.idx, p.norm, p.codebook, p.signs]
    if kperm is not None:
        inputs.append(kperm)
    for p in values:
        inputs += [p.idx, p.norm, p.codebook]
    inputs += [sink_k, sink_v, tail_k, tail_v]
    o, ml = _attend(layout, backend, inputs, nsplit, n_sink + n_tail, b * h, mma)
    finish = [o, ml, sinks.astype(mx.float32) if sinks is not None else counts, counts]
    finish += [p.signs for p in values]
    if vperm is not None:
        finish.append(vperm)
    (out,) = _finish_kernel(layout, backend)(
        inputs=finish,
        template=[("T", queries.dtype)],
        grid=(rows * ATTEND_THREADS, b * h, 1),
        threadgroup=(ATTEND_THREADS, 1, 1),
        output_shapes=[(b, hq, L, dv)],
        output_dtypes=[queries.dtype],
    )
    return out


def packed_kv_attention(
    q: mx.array,
    qf: mx.array,
    keys: tuple[KeyPart, ...],
    values: tuple[ValuePart, ...],
    fp_segments: tuple,
    queries_per_head: int,
    causal: bool,
    sinks: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Softmax attention of query rows over packed tokens and fp16 sink/tail tokens.

    ``q`` (B, H, R, DQ) float32: per key part its rotated query rows (parts with mse bits,
    in order), then its sketched rows (prod parts, in order); ``qf`` (B, H, R, Dk) float32:
    the plain rows for the fp16 tokens; both already scaled. Row r is query ``r % L`` of
    its head (L = ``queries_per_head``). ``fp_segments`` = (sink_k, sink_v, tail_k, tail_v),
    each (B, H, n, D) or None; with ``causal`` the last L tail tokens are the queries'.
    ``sinks``: (H, R) float32 attention-sink logits or None.

    Returns (rot, fp), each (B, H, R, Dv) float32 and already divided by the softmax
    denominator: ``rot`` is the packed tokens' share in the values' rotated basis (parts in
    order), ``fp`` the fp16 tokens' share in the original basis; the output is
    ``unrotate(rot) + fp``.
    """
    backend = kernel_backend()
    if backend is None:
        raise RuntimeError("tq-kernels: no GPU backend (Metal or CUDA) is available")
    b, h, rows, _ = q.shape
    dk = qf.shape[-1]
    dv = sum(p.width for p in values)
    layout, dq = _layout(keys, values, rows, dk, dv)
    if q.shape[-1] != dq:
        raise ValueError(f"query rows have {q.shape[-1]} values, the key parts need {dq}")
    rb = layout.rows
    if rb != rows:
        pad = [(0, 0), (0, 0), (0, rb - rows), (0, 0)]
        q, qf = mx.pad(q, pad), mx.pad(qf, pad)
    probe = keys[0].idx if keys[0].bits else keys[0].sgn
    n_packed = probe.shape[2]
    mma, chunk, nsplit = _plan(layout, backend, n_packed, b * h)

    sink_k, sink_v, tail_k, tail_v, n_sink, n_tail = _fp_inputs(fp_segments, b, h, dk, dv)
    counts = _constant(counts_values(chunk, n_sink, n_tail, queries_per_head, causal), mx.int32)

    inputs = [mx.contiguous(q.astype(mx.float32)), mx.contiguous(qf.astype(mx.float32)), counts]
    for p in keys:
        if p.bits:
            inputs += [p.idx, p.norm, p.codebook]
        if p.prod:
            inputs += [p.sgn, p.rnorm]
    for p in values:
        inputs += [p.idx, p.norm, p.codebook]
    inputs += [sink_k, sink_v, tail_k, tail_v]
    o, ml = _attend(layout, backend, inputs, nsplit, n_sink + n_tail, b * h, mma)
    if sinks is None:
        sink_logits = _constant((-float("inf"),) * (h * rb), mx.float32, (h, rb))
    else:
        sink_logits = sinks.astype(mx.float32)
        if rb != rows:
            sink_logits = mx.pad(sink_logits, [(0, 0), (0, rb - rows)], -float("inf"))
    total = b * h * rb * dv
    rot, fp = _combine_kernel(backend)(
        inputs=[o, ml, sink_logits, counts],
        grid=(-(-total // _COMBINE_THREADS) * _COMBINE_THREADS, 1, 1),
        threadgroup=(_COMBINE_THREADS, 1, 1),
        output_shapes=[(b, h, rb, dv), (b, h, rb, dv)],
        output_dtypes=[mx.float32, mx.float32],
    )
    if rb != rows:
        rot, fp = rot[:, :, :rows], fp[:, :, :rows]
    return rot, fp
