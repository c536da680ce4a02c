"""Launch decode attention over packed TurboQuant keys/values: split-K attend, then combine.

The caller (tq-kvcache) prepares the query rows and un-rotates the result; this module only
knows arrays: :class:`KeyPart` / :class:`ValuePart` hold one TurboQuant instance's codes
(sliced to the packed tokens; views are read through their strides, never copied) and its
codebook. See :mod:`tq_kernels.attention_source` for the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import mlx.core as mx

from . import attention_plan
from .attention_layout import (
    ATTEND_THREADS,
    ROW_BUCKETS,
    AttendLayout,
    KeyPartLayout,
    ValuePartLayout,
)
from .attention_merge_source import combine_source, finish_source
from .attention_mma_source import text_knobs
from .attention_plan import counts_values, fp_splits, launch_plan, min_blocks, split_plan
from .attention_plan import tensor_core_splits as tensor_core_splits
from .attention_source import attend_source
from .backend import kernel_backend
from .build import make_kernel

__all__ = [
    "KeyPart",
    "ValuePart",
    "packed_kv_attention",
    "raw_kv_attention",
    "raw_launcher",
    "raw_layout",
    "raw_queries_apply",
    "MAX_ATTEND_ROWS",
    "split_plan",
    "fp_splits",
    "counts_values",
    "tensor_core_splits",
]

MAX_ATTEND_ROWS = ROW_BUCKETS[-1]
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


@cache
def _compiled(source: tuple, backend: str, row_contiguous: bool):
    name, header, body, inputs, outputs = source
    return make_kernel(backend, name, header, body, inputs, outputs, row_contiguous)


@cache
def _attend_kernel(
    layout: AttendLayout,
    backend: str,
    mma: bool,
    blocks_per_sm: int,
    prefetch: int = 0,
    text_knobs: tuple = (),
):
    # Code arrays are views sliced to the tokens held: read through their strides.
    # ``text_knobs`` (attention_mma_source.text_knobs()) only keys the cache: the text
    # generator reads them itself.
    source = attend_source(layout, backend, mma, blocks_per_sm, prefetch)
    return _compiled(source, backend, False)


def _attend_launch(
    layout: AttendLayout, backend: str, nsplit: int, n_fp: int, cols: int, mma: bool
) -> tuple:
    """(kernel, keyword arguments) of one attend launch: ``nsplit`` sequence splits of the
    packed tokens, then the splits of the ``n_fp`` fp16 tokens, per (batch x KV head)
    column, the packed ones on the tensor cores with ``mma``; it returns the per-split
    partial outputs and (max, sum) rows."""
    rb, dv = layout.rows, layout.dv
    splits = nsplit + fp_splits(n_fp)
    ahead = attention_plan.MMA_PREFETCH if mma else 0
    kernel = _attend_kernel(
        layout, backend, mma, min_blocks(layout, mma), ahead, text_knobs() if mma else ()
    )
    return kernel, dict(
        grid=(splits * ATTEND_THREADS, cols, 1),
        threadgroup=(ATTEND_THREADS, 1, 1),
        output_shapes=[(cols, splits, rb, dv), (cols, splits, rb, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )


def _attend(layout, backend, inputs: list, nsplit: int, n_fp: int, cols: int, mma: bool):
    kernel, launch = _attend_launch(layout, backend, nsplit, n_fp, cols, mma)
    return kernel(inputs=inputs, **launch)


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
    if n_sink and n_tail and sink_k.dtype == tail_k.dtype:  # a decode step's usual case
        return sink_k, sink_v, tail_k, tail_v, n_sink, n_tail
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
    **options,
) -> mx.array:
    """The attention output (B, Hq, L, Dv) in ``queries.dtype`` from the model's raw queries
    (B, Hq, L, Dk): the kernels scale, permute and rotate the queries, and un-rotate and
    permute back the output themselves, so a decode step is two launches. ``options``
    (keywords of :func:`raw_launcher`): ``sinks`` (Hq,) attention-sink logits, ``kperm`` /
    ``vperm`` (H, D) int32 outlier-channel permutations of fractional bits, ``layout``
    (what :func:`raw_layout` returns, when the caller keeps it between steps). Only where
    :func:`raw_queries_apply`. One call of what :func:`raw_launcher` returns."""
    launch = raw_launcher(
        queries.shape, queries.dtype, scale, keys, values, fp_segments, causal, **options
    )
    return launch(queries, fp_segments)


def raw_launcher(
    queries_shape: tuple,
    dtype,
    scale: float,
    keys: tuple[KeyPart, ...],
    values: tuple[ValuePart, ...],
    fp_segments: tuple,
    causal: bool,
    sinks: mx.array | None = None,
    kperm: mx.array | None = None,
    vperm: mx.array | None = None,
    layout: AttendLayout | None = None,
):
    """``launch(queries, fp_segments) -> output``: :func:`raw_kv_attention` with everything
    that stays the same from one decode step to the next worked out once (kernels, launch
    plan, constant inputs, grids). A caller may keep it while the packed codes, the query
    shape and dtype, the sinks and the number of fp16 splits (:func:`fp_splits` of the
    sink and tail tokens in ``fp_segments``) stay the same, and whether sinks and tail
    tokens are present; a decode step then costs two kernel calls of host work."""
    backend = kernel_backend()
    if backend is None:
        raise RuntimeError("tq-kernels: no GPU backend (Metal or CUDA) is available")
    b, hq, L, dk = queries_shape
    probe = keys[0].idx
    h, n_packed = probe.shape[1], probe.shape[2]
    rows = (hq // h) * L
    dv = sum(p.width for p in values)
    if layout is None:
        layout = raw_layout(keys, values, queries_shape, kperm is not None, vperm is not None)
    mma, chunk, nsplit = launch_plan(layout, backend, n_packed, b * h)
    n_sink, n_tail = _fp_inputs(fp_segments, b, h, dk, dv)[4:]
    counts = _constant(
        counts_values(chunk, n_sink, n_tail, L, causal, rows, h, sinks is not None), mx.int32
    )
    head = [_constant((float(scale),), mx.float32), counts]
    parts = []
    for p in keys:
        parts += [p.idx, p.norm, p.codebook, p.signs]
    if kperm is not None:
        parts.append(kperm)
    for p in values:
        parts += [p.idx, p.norm, p.codebook]
    finish_in = [sinks.astype(mx.float32) if sinks is not None else counts, counts]
    finish_in += [p.signs for p in values]
    if vperm is not None:
        finish_in.append(vperm)
    attend, attend_args = _attend_launch(layout, backend, nsplit, n_sink + n_tail, b * h, mma)
    finish = _finish_kernel(layout, backend)
    finish_args = dict(
        template=[("T", dtype)],
        grid=(rows * ATTEND_THREADS, b * h, 1),
        threadgroup=(ATTEND_THREADS, 1, 1),
        output_shapes=[(b, hq, L, dv)],
        output_dtypes=[dtype],
    )

    def launch(queries: mx.array, fp_segments: tuple) -> mx.array:
        sink_k, sink_v, tail_k, tail_v = _fp_inputs(fp_segments, b, h, dk, dv)[:4]
        inputs = [queries, *head, *parts, sink_k, sink_v, tail_k, tail_v]  # read via strides
        o, ml = attend(inputs=inputs, **attend_args)
        return finish(inputs=[o, ml, *finish_in], **finish_args)[0]

    return launch


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
    mma, chunk, nsplit = launch_plan(layout, backend, n_packed, b * h)

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
