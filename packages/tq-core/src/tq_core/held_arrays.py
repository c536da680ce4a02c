"""Identity snapshots of a module's modules and arrays, for compiled traces that capture them.

A trace recorded by ``mx.compile`` holds the arrays it read as constants; it stays right only
while the module still holds those very arrays (a weight load or a replaced layer swaps them).
``held(module)`` notes every ``(container, key, value)`` under the module once, and
``still_held`` checks them by identity: a few dozen ``is`` tests per call.
"""

from __future__ import annotations

from operator import is_

import mlx.core as mx
import mlx.nn as nn

__all__ = ["held", "still_held"]


def _walk(container, out: list) -> list:
    items = container.items() if isinstance(container, dict) else enumerate(container)
    for key, value in items:
        if isinstance(value, (mx.array, nn.Module, dict, list)):
            out.append((container, key, value))
            if not isinstance(value, mx.array):
                _walk(value, out)
    return out


def held(module: nn.Module) -> tuple[tuple, tuple]:
    """``(places, values)``: every module, array and container under ``module`` and where it
    sits (``container[key]``)."""
    found = _walk(module, [])
    return tuple((c, k) for c, k, _ in found), tuple(v for _, _, v in found)


def still_held(snapshot: tuple[tuple, tuple]) -> bool:
    """Whether every place of ``snapshot`` still holds the very same object."""
    places, values = snapshot
    return all(map(is_, [c[k] for c, k in places], values))
