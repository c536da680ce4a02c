"""A byte-budgeted LRU of experts, with pinned experts that are never evicted."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import mlx.core as mx

from .expert_store import ExpertLayout, ExpertLoader
from .safetensors_index import StreamError

__all__ = ["ExpertCache", "CacheStats"]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stall_seconds: float = 0.0  # time the forward pass waited for reads
    prefetched: int = 0  # experts read ahead of need
    prefetch_used: int = 0  # of those, later requested

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


class ExpertCache:
    """``(layer, expert) -> {param: array}`` within ``budget_bytes``. Pinned experts are
    loaded on first use and stay; the rest are evicted least recently used first."""

    def __init__(self, loader: ExpertLoader, budget_bytes: int, pinned=None):
        if budget_bytes <= 0:
            raise StreamError(f"--expert-cache-gb must be positive, got {budget_bytes} bytes")
        self.loader = loader
        self.budget = int(budget_bytes)
        self.pinned: set[tuple[str, int]] = set(pinned or ())
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, int], tuple[dict, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._prefetched: set[tuple[str, int]] = set()
        #: ``fn(layer, indices)`` called with every routing decision (calibration counts).
        self.observer = None

    @property
    def nbytes(self) -> int:
        return self._bytes

    def check_fits(self, layout: ExpertLayout, top_k: int) -> None:
        """A budget below one layer's top-k experts cannot serve one token."""
        need = layout.expert_nbytes * top_k
        if self.budget < need:
            raise StreamError(
                f"--expert-cache-gb {self.budget / 2**30:.4g} is smaller than one layer's "
                f"top-{top_k} experts ({need / 2**30:.4g} GiB for {layout.layer})"
            )

    def get(self, layout: ExpertLayout, experts: list[int]) -> list[dict[str, mx.array]]:
        """The arrays of ``experts`` (in that order), reading the missing ones at once."""
        with self._lock:
            missing = []
            for e in experts:
                key = (layout.layer, e)
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    if key in self._prefetched:
                        self._prefetched.discard(key)
                        self.stats.prefetch_used += 1
                else:
                    missing.append(e)
                    self.stats.misses += 1
            held = {e: self._entries[(layout.layer, e)][0] for e in experts if e not in missing}
        if missing:
            t0 = time.perf_counter()
            loaded = self.loader.load(layout, missing)
            self.stats.stall_seconds += time.perf_counter() - t0
            with self._lock:
                for e, arrays in loaded.items():
                    key = (layout.layer, e)
                    if key in self._entries:  # a prefetch got there first: keep one copy
                        loaded[e] = self._entries[key][0]
                        self._entries.move_to_end(key)
                    else:
                        self._insert(key, arrays)
                held.update(loaded)
                self._evict(protect={(layout.layer, e) for e in experts})
        return [held[e] for e in experts]

    def load_pinned(self, layouts: list[ExpertLayout]) -> None:
        """Read every pinned expert now; pins that do not fit the budget are an error."""
        by_layer = {lay.layer: lay for lay in layouts}
        need = 0
        for layer, e in self.pinned:
            if layer not in by_layer:
                raise StreamError(f"--pin-file: {layer} is not a streamed expert layer")
            need += by_layer[layer].expert_nbytes
        if need > self.budget:
            raise StreamError(
                f"--pin-file pins {need / 2**30:.4g} GiB of experts, more than "
                f"--expert-cache-gb {self.budget / 2**30:.4g}"
            )
        for layer, lay in by_layer.items():
            experts = sorted(e for name, e in self.pinned if name == layer)
            if experts:
                for e, arrays in self.loader.load(lay, experts).items():
                    with self._lock:
                        self._insert((layer, e), arrays)

    def prefetch(self, layout: ExpertLayout, experts: list[int]) -> None:
        """Read ``experts`` into the cache now (from a background thread), if absent."""
        with self._lock:
            missing = [e for e in experts if (layout.layer, e) not in self._entries]
        if not missing:
            return
        loaded = self.loader.load(layout, missing)
        with self._lock:
            for e, arrays in loaded.items():
                key = (layout.layer, e)
                if key not in self._entries:
                    self._insert(key, arrays)
                    self._prefetched.add(key)
                    self.stats.prefetched += 1
            self._evict(protect=set())

    def _insert(self, key, arrays: dict) -> None:
        size = sum(a.nbytes for a in arrays.values())
        self._entries[key] = (arrays, size)
        self._bytes += size

    def _evict(self, protect: set) -> None:
        """Drop least recently used, unpinned, unprotected experts until within budget."""
        if self._bytes <= self.budget:
            return
        for key in list(self._entries):
            if self._bytes <= self.budget:
                break
            if key in self.pinned or key in protect:
                continue
            _, size = self._entries.pop(key)
            self._prefetched.discard(key)
            self._bytes -= size
            self.stats.evictions += 1

    def __contains__(self, key) -> bool:
        return key in self._entries
