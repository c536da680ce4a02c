"""Expert calibration: count which experts each layer's router picks on a text, then choose
the experts to pin (hottest first, within a byte budget) and an expert order per layer that
puts experts picked together next to each other (adjacent experts are read in one call)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .expert_store import ExpertLayout

__all__ = ["ExpertUsage", "choose_pins", "co_activation_order"]


@dataclass
class ExpertUsage:
    """Per layer: how often each expert was picked, and how often two were picked together
    for one token (the router's top-k of that token)."""

    num_experts: dict[str, int]
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    pairs: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0

    def observe(self, layer: str, indices: np.ndarray) -> None:
        e = self.num_experts[layer]
        rows = np.asarray(indices).reshape(-1, np.asarray(indices).shape[-1]).astype(np.int64)
        counts = self.counts.setdefault(layer, np.zeros(e, np.int64))
        pairs = self.pairs.setdefault(layer, np.zeros((e, e), np.int64))
        np.add.at(counts, rows.reshape(-1), 1)
        k = rows.shape[1]
        for a in range(k):
            for b in range(k):
                if a != b:
                    np.add.at(pairs, (rows[:, a], rows[:, b]), 1)
        if layer == next(iter(self.num_experts)):
            self.tokens += rows.shape[0]


def choose_pins(usage: ExpertUsage, layouts: list[ExpertLayout], budget: int) -> dict:
    """The most used experts over all layers, most used first, while they fit ``budget``."""
    size = {lay.layer: lay.expert_nbytes for lay in layouts}
    ranked = sorted(
        ((int(c), layer, e) for layer, cs in usage.counts.items() for e, c in enumerate(cs)),
        reverse=True,
    )
    pins: dict[str, list[int]] = {}
    used = 0
    for count, layer, e in ranked:
        if count == 0 or used + size[layer] > budget:
            continue
        pins.setdefault(layer, []).append(e)
        used += size[layer]
    return {"layers": {k: sorted(v) for k, v in pins.items()}, "bytes": used}


def co_activation_order(counts: np.ndarray, pairs: np.ndarray) -> list[int]:
    """A greedy chain: start from the most used expert, then always append the unplaced
    expert most often picked together with the last one (ties: the more used)."""
    e = len(counts)
    order = [int(np.argmax(counts))]
    left = set(range(e)) - set(order)
    while left:
        last = order[-1]
        nxt = max(left, key=lambda j: (pairs[last, j], counts[j], -j))
        order.append(nxt)
        left.remove(nxt)
    return order
