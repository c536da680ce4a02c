"""StreamedExperts: a drop-in for mlx-lm's SwitchGLU/SwitchMLP whose expert weights stay on
disk and come through the expert cache, token by token, as the router picks them."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .expert_cache import ExpertCache
from .expert_store import ExpertLayout

__all__ = ["StreamedExperts", "Prefetcher", "NON_EXPERT_PARAMS"]

#: Parameters of an expert projection that are shared by all experts (the TurboQuant input
#: rotation and its QJL sketch signs): resident, never streamed.
NON_EXPERT_PARAMS = ("signs", "qjl_flips")


class Prefetcher:
    """Look-ahead: while layer L computes, read the experts layer L+1 used for the previous
    token (routers of consecutive tokens overlap). Turns itself off when fewer than
    ``min_use`` of the experts it read were then used, after ``warmup`` of them."""

    def __init__(self, cache: ExpertCache, min_use: float = 0.3, warmup: int = 64):
        self.cache = cache
        self.min_use, self.warmup = min_use, warmup
        self.enabled = True
        self.last_used: dict[str, list[int]] = {}
        self.next_layer: dict[str, ExpertLayout] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tq-prefetch")
        self._pending = None
        self._lock = threading.Lock()

    def after(self, layout: ExpertLayout, used: list[int]) -> None:
        self.last_used[layout.layer] = used
        if not self.enabled:
            return
        s = self.cache.stats
        if s.prefetched >= self.warmup and s.prefetch_used < self.min_use * s.prefetched:
            self.enabled = False
            return
        nxt = self.next_layer.get(layout.layer)
        guess = self.last_used.get(nxt.layer) if nxt is not None else None
        if guess:
            with self._lock:
                self._pending = self._pool.submit(self.cache.prefetch, nxt, guess)

    def wait(self) -> None:
        """Finish the read in flight (so its errors surface and stats are complete)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class StreamedExperts(nn.Module):
    """Holds the layer's template (the original SwitchGLU with its expert tensors removed)
    out of the parameter tree; on each call it gathers the routed experts from the cache
    into a compact stack and runs the template's own code on it, with the indices renumbered
    into that stack. Renumbering keeps the experts' order, so sorting, grouping and every
    per-expert product are the same as in the resident model: the output is bit-identical.
    """

    def __init__(
        self,
        template: nn.Module,
        layout: ExpertLayout,
        cache: ExpertCache,
        dtype=None,
        prefetcher: Prefetcher | None = None,
    ):
        super().__init__()
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_layout", layout)
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_prefetcher", prefetcher)
        object.__setattr__(self, "_dtype", dtype)

    @property
    def layout(self) -> ExpertLayout:
        return self._layout

    def _compact(self, arrays: list[dict[str, mx.array]]) -> nn.Module:
        glu = copy.copy(self._template)
        by_proj: dict[str, dict[str, mx.array]] = {}
        for name in self._layout.params:
            proj, param = name.split(".", 1)
            stacked = mx.stack([a[name] for a in arrays])
            if self._dtype is not None and mx.issubdtype(stacked.dtype, mx.floating):
                stacked = stacked.astype(self._dtype)  # as the resident model's cast
            by_proj.setdefault(proj, {})[param] = stacked
        for proj, params in by_proj.items():
            layer = copy.copy(self._template[proj])
            for param, value in params.items():
                layer[param] = value
            glu[proj] = layer
        return glu

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # The router's choice must be known to read the experts: this is the one sync point
        # streaming adds per MoE layer.
        routed = np.asarray(indices)
        if self._cache.observer is not None:
            self._cache.observer(self._layout.layer, routed)
        flat = routed.reshape(-1)
        used = sorted(set(flat.tolist()))
        arrays = self._cache.get(self._layout, used)
        if self._prefetcher is not None:
            self._prefetcher.after(self._layout, used)
        renumber = np.zeros(self._layout.num_experts, dtype=flat.dtype)
        renumber[used] = np.arange(len(used), dtype=flat.dtype)
        local = mx.array(renumber[routed])
        return self._compact(arrays)(x, local)
