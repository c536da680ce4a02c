"""TurboQuantKVCache: mlx-lm's KV cache protocol over fp16 sinks, packed TurboQuant codes and an
fp16 recent-token buffer.

Token layout along the sequence axis, always in temporal order:
``[sinks (fp16, first sink_tokens) | packed codes (TurboQuant) | tail (fp16, most recent)]``.
New tokens enter the tail; the tail is compressed down to ``buffer`` tokens in batches of at
least ``flush_batch`` tokens, lazily at the start of the next update, so a prefill chunk's own
attention always runs on fp16 keys and values ("prefill on fp16 before compression").
``update_and_fetch`` returns the full keys and values (dequantized where packed) as lazy
arrays: a model whose attention goes through the installed hook (:mod:`tq_kvcache.hook`)
never evaluates them and attends straight from the codes; any other attention code still
gets correct keys and values.
"""

from __future__ import annotations

import copy
from operator import is_

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask

from .cache_state import STATE_VERSION, CacheState
from .codec import KEY_MODES, KVCodec, check_bits, make_codec, outlier_permutation
from .fused_attention import CACHE_ATTRIBUTES as FUSED_CACHE_ATTRIBUTES

__all__ = ["TurboQuantKVCache", "STATE_VERSION", "DECODE_MAX_QUERIES"]

#: Up to this many queries per call attend straight from the codes; longer calls (prefill
#: chunks) dequantize the packed tokens and run the fp16 kernel.
DECODE_MAX_QUERIES = 8
#: A prefill chunk evaluates each layer's packed codes and dequantized keys/values before
#: its attention, so the encode/decode temporaries of one layer are freed before the next
#: layer makes its own. Without it a lazy chunk builds every layer's temporaries into one
#: graph, and MLX-CUDA keeps an op's inputs alive until the CUDA graph holding it completes
#: (several layers at a time), which raised the prefill peak above the fp16 cache's.
PREFILL_EVAL = True
_STEP = 256


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _cat(a: mx.array | None, b: mx.array | None) -> mx.array | None:
    if a is None:
        return b
    if b is None or b.shape[2] == 0:
        return a
    return mx.concatenate([a, b], axis=2)


def _after(codes: dict, dependency: mx.array) -> dict:
    """``codes`` whose evaluation waits for ``dependency`` (no copy: ``mx.depends``)."""
    names = list(codes)
    return dict(zip(names, mx.depends([codes[n] for n in names], [dependency])))


def _eval_outside_transforms(*arrays: mx.array) -> None:
    """``mx.eval`` unless MLX is tracing (``mx.compile``/``vmap``), where arrays are
    placeholders that cannot be evaluated and the graph is evaluated by the caller."""
    try:
        mx.eval(*arrays)
    except ValueError as exc:
        if "transformations" not in str(exc):
            raise


def _length(x: mx.array | None) -> int:
    return 0 if x is None else x.shape[2]


class TurboQuantKVCache(CacheState):
    """A TurboQuant-compressed KV cache for one attention layer (drop-in for mlx-lm's KVCache).

    ``k_bits`` / ``v_bits``: 1-4 or 8, or 1.5 / 2.5 / 3.5 (outlier-channel split).
    ``key_mode``: ``"mse"`` or ``"prod"`` (k_bits - 1 bits mse + 1-bit QJL, unbiased scores).
    ``sink_tokens``: the first tokens kept fp16. ``buffer``: recent tokens kept fp16.
    ``flush_batch``: the tail is compressed once it holds ``buffer + flush_batch`` tokens.
    ``min_tokens``: nothing is compressed before the cache holds this many tokens.
    """

    def __init__(
        self,
        k_bits=4,
        v_bits=3,
        key_mode: str = "mse",
        sink_tokens: int = 128,
        buffer: int = 128,
        flush_batch: int = 64,
        min_tokens: int = 0,
        seed: int = 0,
    ):
        self.k_bits = check_bits("k_bits", k_bits)
        self.v_bits = check_bits("v_bits", v_bits)
        if key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {KEY_MODES}, got {key_mode!r}")
        self.key_mode = key_mode
        self.sink_tokens = _check_count("sink_tokens", sink_tokens)
        self.buffer = _check_count("buffer", buffer)
        self.flush_batch = max(1, _check_count("flush_batch", flush_batch))
        self.min_tokens = _check_count("min_tokens", min_tokens)
        self.seed = _check_count("seed", seed)
        self.offset = 0
        self._reset_storage()

    def _reset_storage(self):
        self._sink_k = self._sink_v = None
        self._tail_k = self._tail_v = None
        self._packed_k: dict[str, mx.array] = {}
        self._packed_v: dict[str, mx.array] = {}
        self._n_packed = 0
        self._packed_version = 0  # bumped on every change of the packed codes
        # (version, dtype, sinks, keys, values): lazy [sinks | dequantized packed] for decode
        self._decoded = None
        self._codes_memo = None  # (version, count, store arrays, codes): see packed_codes
        self._k_codec: KVCodec | None = None
        self._v_codec: KVCodec | None = None
        self._shape: tuple[int, int, int, int] | None = None  # (B, H, Dk, Dv)
        self._itemsize = 2  # bytes per element of the keys/values the model gives

    #: State derived from the arrays (decoded keys, memos, and what
    #: :mod:`tq_kvcache.fused_attention` keeps on a cache): rebuilt on demand, never copied.
    _DERIVED = frozenset({"_decoded", "_codes_memo", *FUSED_CACHE_ATTRIBUTES})

    def __deepcopy__(self, memo):
        """The cache without its derived state. mlx-lm's ``LRUPromptCache`` (its server's)
        deep-copies a stored cache for each request that shares its prefix; the decoded
        keys hold a dtype, which ``copy`` cannot copy, and would drag fp16 keys along."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name not in self._DERIVED:
                new.__dict__[name] = copy.deepcopy(value, memo)
        new._decoded = new._codes_memo = None
        return new

    # ------------------------------------------------------------------ configuration

    CONFIG_KEYS = (
        "k_bits",
        "v_bits",
        "key_mode",
        "sink_tokens",
        "buffer",
        "flush_batch",
        "min_tokens",
        "seed",
    )

    def config(self) -> dict:
        """The constructor arguments of this cache."""
        return {k: getattr(self, k) for k in self.CONFIG_KEYS}

    def _build_codecs(self, keys: mx.array, values: mx.array, k_perm=None, v_perm=None):
        _, _, _, dk = keys.shape
        dv = values.shape[-1]
        if isinstance(self.k_bits, float) and k_perm is None:
            k_perm = outlier_permutation(keys)
        if isinstance(self.v_bits, float) and v_perm is None:
            v_perm = outlier_permutation(values)
        # Keys and values get independent rotations (seed, seed + 1000).
        self._k_codec = make_codec(dk, self.k_bits, self.key_mode, self.seed, k_perm, "k_bits")
        self._v_codec = make_codec(dv, self.v_bits, "mse", self.seed + 1000, v_perm, "v_bits")

    def _check_shape(self, keys: mx.array, values: mx.array):
        if keys.ndim != 4 or values.ndim != 4:
            raise ValueError(
                f"keys and values must be (batch, kv_heads, tokens, head_dim), got "
                f"{keys.shape} and {values.shape}"
            )
        shape = (keys.shape[0], keys.shape[1], keys.shape[3], values.shape[3])
        if keys.shape[:3] != values.shape[:3]:
            raise ValueError(f"keys {keys.shape} and values {values.shape} do not match")
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"this cache holds (batch, kv_heads, k_dim, v_dim) = {self._shape} but got "
                f"{shape}: a cache from another model or batch size"
            )
        self._shape = shape
        self._itemsize = keys.dtype.size

    # ------------------------------------------------------------------ mlx-lm protocol

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self._check_shape(keys, values)
        if self._k_codec is None:
            self._build_codecs(keys, values)
        self._flush()
        self._append(keys, values)
        decode = keys.shape[2] <= DECODE_MAX_QUERIES
        full_k, full_v = self._full_kv(keys.dtype, decode=decode, after=keys)
        if not decode and PREFILL_EVAL and self._n_packed:
            _eval_outside_transforms(
                full_k, full_v, *self._packed_k.values(), *self._packed_v.values()
            )
        return full_k, full_v

    def _append(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        room = max(0, self.sink_tokens - _length(self._sink_k))
        if room and self._n_packed == 0 and _length(self._tail_k) == 0:
            take = min(room, n)
            self._sink_k = _cat(self._sink_k, keys[:, :, :take])
            self._sink_v = _cat(self._sink_v, values[:, :, :take])
            keys, values = keys[:, :, take:], values[:, :, take:]
        if keys.shape[2]:
            self._tail_k = _cat(self._tail_k, keys)
            self._tail_v = _cat(self._tail_v, values)
        self.offset += n

    def _flush(self, force: bool = False):
        """Compress the oldest tail tokens, keeping ``buffer`` of them fp16."""
        if self.offset < self.min_tokens:
            return
        excess = _length(self._tail_k) - self.buffer
        if excess <= 0 or (excess < self.flush_batch and not force):
            return
        k, v = self._tail_k[:, :, :excess], self._tail_v[:, :, :excess]
        self._tail_k, self._tail_v = self._tail_k[:, :, excess:], self._tail_v[:, :, excess:]
        self._append_packed(self._k_codec.encode(k), self._v_codec.encode(v), excess)

    def _append_packed(self, k_codes: dict, v_codes: dict, n: int):
        start = self._n_packed
        cap = _length(next(iter(self._packed_k.values()), None))
        if start + n > cap:
            grow = -(-(start + n - cap) // _STEP) * _STEP
            for store, codes in ((self._packed_k, k_codes), (self._packed_v, v_codes)):
                for name, arr in codes.items():
                    extra = mx.zeros((*arr.shape[:2], grow, *arr.shape[3:]), arr.dtype)
                    old = store.get(name)
                    store[name] = extra if old is None else mx.concatenate([old, extra], axis=2)
        for store, codes in ((self._packed_k, k_codes), (self._packed_v, v_codes)):
            for name, arr in codes.items():
                store[name][:, :, start : start + n] = arr
        self._n_packed = start + n
        self._packed_version += 1

    def compress(self):
        """Compress everything beyond the sinks and ``buffer`` now (conversion, eviction)."""
        if self._k_codec is not None:
            self._flush(force=True)

    def packed_codes(self) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
        """The packed key and value codes, sliced to the tokens held. The same dicts come
        back until the codes change (decode asks every token; flushes are rare), so a
        caller may key its own derived state on their identity."""
        n = self._n_packed
        stores = (*self._packed_k.values(), *self._packed_v.values())
        memo = self._codes_memo
        if (
            memo is not None
            and memo[0] == self._packed_version
            and memo[1] == n
            and len(memo[2]) == len(stores)
            and all(map(is_, memo[2], stores))
        ):
            return memo[3]
        codes = (
            {k: a[:, :, :n] for k, a in self._packed_k.items()},
            {k: a[:, :, :n] for k, a in self._packed_v.items()},
        )
        self._codes_memo = (self._packed_version, n, stores, codes)
        return codes

    def _full_kv(self, dtype, decode: bool = False, after: mx.array | None = None):
        """Every token's keys and values, the packed ones dequantized, as lazy arrays. In
        decode ``[sinks | dequantized packed tokens]`` is built once per change of the
        packed codes (or sinks) and reused: attention through the hook never evaluates it,
        so the per-token cost is one concatenation with the tail instead of a
        dequantization graph per layer. In prefill the dequantization is made to wait for
        ``after`` (this layer's new keys): it depends on nothing else, and MLX would
        otherwise be free to run every layer's dequantization up front and hold all of
        them in memory at once."""
        keys = self._sink_k
        values = self._sink_v
        if self._n_packed:
            hit = self._decoded
            if (
                decode
                and hit is not None
                and hit[0] == self._packed_version
                and hit[1] == dtype
                and hit[2] is self._sink_k
            ):
                keys, values = hit[3], hit[4]
            else:
                k_codes, v_codes = self.packed_codes()
                if after is not None and not decode:
                    k_codes, v_codes = (_after(c, after) for c in (k_codes, v_codes))
                keys = _cat(keys, self._k_codec.decode(k_codes).astype(dtype))
                values = _cat(values, self._v_codec.decode(v_codes).astype(dtype))
            # Kept only for decode: a prefill chunk evaluates it, and a kept evaluated copy
            # would hold the packed tokens in fp16.
            self._decoded = (
                (self._packed_version, dtype, self._sink_k, keys, values) if decode else None
            )
        return _cat(keys, self._tail_k), _cat(values, self._tail_v)

    def segments(self):
        """(sink_k, sink_v, k_codes, v_codes, tail_k, tail_v) for attention from the codes."""
        k_codes, v_codes = self.packed_codes()
        return self._sink_k, self._sink_v, k_codes, v_codes, self._tail_k, self._tail_v

    @property
    def codecs(self) -> tuple[KVCodec | None, KVCodec | None]:
        return self._k_codec, self._v_codec

    def uses_packed_attention(self, num_queries: int) -> bool:
        return self._n_packed > 0 and num_queries <= DECODE_MAX_QUERIES

    def size(self) -> int:
        return _length(self._sink_k) + self._n_packed + _length(self._tail_k)

    def empty(self) -> bool:
        return self.size() == 0

    @property
    def keys(self) -> mx.array | None:
        """One array of this cache's state (the newest fp16 keys, else the packed key codes),
        or None when empty. mlx-lm's pipeline-parallel models chain a stage's send onto its
        last layer's cache with ``cache.keys = mx.depends(cache.keys, h)``, so evaluating
        the cache runs the send; this is the slot that makes that work here."""
        slot = self._dependency_slot()
        return None if slot is None else slot[0][slot[1]]

    @keys.setter
    def keys(self, value: mx.array) -> None:
        slot = self._dependency_slot()
        if slot is None:
            raise ValueError("an empty TurboQuantKVCache has no keys to replace")
        holder, name = slot
        holder[name] = value

    def _dependency_slot(self) -> tuple[dict, str] | None:
        for name in ("_tail_k", "_sink_k"):
            if self.__dict__.get(name) is not None:
                return self.__dict__, name
        for name in self._packed_k:
            return self._packed_k, name
        return None

    @property
    def nbytes(self) -> int:
        total = sum(
            x.nbytes
            for x in (self._sink_k, self._sink_v, self._tail_k, self._tail_v)
            if x is not None
        )
        k_codes, v_codes = self.packed_codes()
        total += sum(a.nbytes for a in (*k_codes.values(), *v_codes.values()))
        return total

    def dense_nbytes(self) -> int:
        """What mlx-lm's KVCache would hold for the same tokens, in the dtype the model gave
        (fp16/bf16 on a GPU, float32 on the CPU): the reference for compression ratios."""
        if self._shape is None:
            return 0
        b, h, dk, dv = self._shape
        return self._itemsize * b * h * self.size() * (dk + dv)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self._drop_newest(n)
        self.offset -= n
        return n

    def _drop_newest(self, n: int):
        for attr in ("_tail", "_packed", "_sink"):
            if n <= 0:
                return
            if attr == "_packed":
                take = min(n, self._n_packed)
                self._n_packed -= take
                self._packed_version += 1
            else:
                k = getattr(self, attr + "_k")
                take = min(n, _length(k))
                if take:
                    setattr(self, attr + "_k", k[:, :, : k.shape[2] - take])
                    v = getattr(self, attr + "_v")
                    setattr(self, attr + "_v", v[:, :, : v.shape[2] - take])
            n -= take

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        offset = self.size()
        if window_size is not None:
            return create_causal_mask(N, offset, window_size=window_size)
        if N == 1:
            return None
        if return_array:
            return create_causal_mask(N, offset)
        return "causal"
