"""TurboQuantRotatingKVCache: the compressed variant of mlx-lm's sliding-window RotatingKVCache.

mlx-lm's RotatingKVCache keeps the first ``keep`` tokens and the most recent tokens up to
``max_size`` in a ring buffer. Here the kept tokens are the fp16 sinks, the rest is held in
temporal order (packed codes, then the fp16 tail) and the oldest non-sink tokens are dropped
before each update so that at most ``max_size - 1`` old tokens remain, exactly as mlx-lm
trims; masks follow from the temporal order (no ring index).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask

from .cache import TurboQuantKVCache, _check_count, _length

__all__ = ["TurboQuantRotatingKVCache"]


class TurboQuantRotatingKVCache(TurboQuantKVCache):
    """Sliding-window TurboQuant cache: ``max_size`` tokens, the first ``keep`` kept fp16."""

    CONFIG_KEYS = (
        "max_size",
        "keep",
        "k_bits",
        "v_bits",
        "key_mode",
        "buffer",
        "flush_batch",
        "min_tokens",
        "seed",
    )

    def __init__(self, max_size: int, keep: int = 0, **knobs):
        knobs.pop("sink_tokens", None)  # the sinks of a rotating cache are its kept tokens
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
        self.max_size = max_size
        self.keep = _check_count("keep", keep)
        super().__init__(sink_tokens=self.keep, **knobs)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self._check_shape(keys, values)
        self._drop_oldest(TurboQuantKVCache.size(self) - self.max_size + 1)
        return super().update_and_fetch(keys, values)

    def _drop_oldest(self, n: int):
        """Drop the ``n`` oldest tokens after the sinks: packed codes first, then the tail."""
        if n <= 0:
            return
        take = min(n, self._n_packed)
        if take:
            for store in (self._packed_k, self._packed_v):
                for name, arr in store.items():
                    store[name] = arr[:, :, take : self._n_packed]
            self._n_packed -= take
            self._packed_version += 1
            n -= take
        take = min(n, _length(self._tail_k))
        if take:
            self._tail_k = self._tail_k[:, :, take:]
            self._tail_v = self._tail_v[:, :, take:]

    def size(self) -> int:
        return min(super().size(), self.max_size)

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        held = min(self.max_size - 1, TurboQuantKVCache.size(self))
        if N > 1:
            window_size = window_size or self.max_size
            if held + N > window_size or return_array:
                return create_causal_mask(N, held, window_size=window_size)
            return "causal"
        if window_size is None or held + 1 <= window_size:
            return None
        return mx.arange(held + 1) >= held + 1 - window_size
