"""Replaying subclasses: a mixin put in front of an mlx-lm module's class, in place.

The decode replays (decode_mlp.py, decode_block.py, decode_moe.py) turn a module's class into
a subclass of itself with their mixin first. The subclass keeps the class's name and module,
so parameter paths, printing and lookups by ``type(m).__module__`` (tq-kvcache's attention
hook) stay as they are. Each keeps per input shape an entry ``(kind, conditions, held)``;
:func:`note_seen` records the first, plain, call of a shape.
"""

from __future__ import annotations

__all__ = ["note_seen", "replaying_class", "settle"]

_SUBCLASSES: dict[tuple[type, type], type] = {}


def replaying_class(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` in front, made once per pair."""
    sub = _SUBCLASSES.get((mixin, cls))
    if sub is None:
        attrs = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        sub = _SUBCLASSES[(mixin, cls)] = type(cls.__name__, (mixin, cls), attrs)
    return sub


def note_seen(entries: dict, key, conditions, max_shapes: int) -> None:
    """Record that the plain call ran for ``key`` under ``conditions`` (the next call may
    trace), dropping the oldest shapes beyond ``max_shapes``."""
    while len(entries) >= max_shapes and key not in entries:
        entries.pop(next(iter(entries)))
    entries[key] = ("seen", conditions, None)


def settle(entries: dict, key, conditions, plans: set, trace):
    """After a plain call of ``key``: where every projection's plan holds (``plans`` is
    ``{"valid"}``) record ``trace()`` = (what it holds, the compiled call) and return the
    call; where one projection runs without a fused plan (``"none"``) stay plain for good;
    otherwise (stale plans) return ``None`` and let the next plain call rebuild them."""
    if plans == {"valid"}:
        snapshot, fn = trace()
        entries[key] = ("replay", conditions, (snapshot, fn))
        return fn
    if "none" in plans:
        entries[key] = ("plain", conditions, None)
    return None
