"""Kernel dispatch: fused kernels registered by other packages replace tq-core's reference ops.

tq-core computes everything with plain ``mlx.core`` ops (the reference path). A kernel
package (tq-kernels) registers faster implementations of named ops; it is found through the
``tq_core.kernels`` entry-point group, so installing it is enough and tq-core never imports
it. A kernel returns ``None`` when it does not cover a call (device, dtype, shape), and the
reference path runs. A kernel that raises (a Metal or CUDA compile failure) is switched off
for the process with one warning, and the reference path runs: never a crash.

Ops and their contracts (``x_rot`` is the activation already rotated by the layer's rotation;
``qjl`` is a :class:`~tq_core.weights.QJLResidual` or ``None`` and ``x_sketch`` the activation
rotated once more by its sketch, both present or both ``None``):

- ``"weight_matmul"``: ``fn(x_rot (..., in), codes: QuantizedWeight (out, in), qjl, x_sketch)``
  returns ``x_rot @ W_rot.T`` of shape ``(..., out)`` in ``x_rot.dtype``.
- ``"rotating_matmul_plan"``: ``fn(x (..., in), codes: list of 1-3 QuantizedWeight (out_i, in)
  sharing ``in``, bits and group size, rotation: Rotation)`` returns a *plan*: a callable
  ``plan(x2) -> [rotate(x2, rotation) @ W_i.T for each codes]`` for any ``x2`` of x's shape
  and dtype, with the weights bound, or ``None``. The kernel rotates the activation itself
  and serves sibling projections that read the same input (q/k/v, gate/up) in one launch;
  a plan is built once per shape and reused every decode step, so a step pays one lookup
  per projection instead of the checks of every call (decode_plan.py). ``rotation.signs``
  is in ``x.dtype``. Layers without QJL try it first, then ``weight_matmul``.
- ``"rotating_matmul_residual_plan"``: the same for one weight, with a residual added in the
  kernel: ``plan(x2, r) -> [r + rotate(x2, rotation) @ W.T]``, ``r`` of the output's shape
  and x's dtype. Replayed decoder blocks fold their residual adds into ``o_proj`` and
  ``down_proj`` with it (decode_block.py); without it they add as usual.
- ``"weight_gather_matmul"``: ``fn(x_rot, codes (E, out, in), expert_indices,
  sorted_indices, qjl, x_sketch)`` returns what
  ``mx.gather_mm(x_rot, W_rot.swapaxes(-1, -2), rhs_indices=expert_indices)`` returns.

Set ``TQ_KERNELS=0`` in the environment, or use :func:`reference_only`, to force the
reference path (tests compare the two this way).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points

OPS = (
    "weight_matmul",
    "rotating_matmul_plan",
    "rotating_matmul_residual_plan",
    "weight_gather_matmul",
)
ENTRY_POINT_GROUP = "tq_core.kernels"

_kernels: dict[str, Callable] = {}
_failed: set[str] = set()
_providers_loaded = False
_forced_reference = 0
# Bumped whenever what a call would run can change (registration, failure, reference_only),
# so cached plans (decode_plan.py) know to rebuild.
_generation = 0


def _changed() -> None:
    global _generation
    _generation += 1


def register_kernel(op: str, fn: Callable) -> None:
    """Register ``fn`` as the fused implementation of ``op`` (replacing any earlier one)."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known ops: {', '.join(OPS)}")
    if not callable(fn):
        raise TypeError(f"kernel for {op!r} must be callable, got {type(fn).__name__}")
    _kernels[op] = fn
    _failed.discard(op)
    _changed()


def unregister_kernel(op: str) -> None:
    _kernels.pop(op, None)
    _changed()


def _load_providers() -> None:
    """Call every ``tq_core.kernels`` entry point once; each registers its kernels."""
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
        except Exception as exc:  # a broken provider must not break the reference path
            warnings.warn(
                f"tq: kernel provider {ep.name!r} failed to load ({exc}); "
                "using tq-core's reference path",
                RuntimeWarning,
                stacklevel=3,
            )


def kernels_enabled() -> bool:
    return _forced_reference == 0 and os.environ.get("TQ_KERNELS", "1") != "0"


def generation() -> int:
    """A number that changes whenever registrations, failures or :func:`reference_only`
    change what a call would run. Cached plans (decode_plan.py) hold while it and the
    default device stay the same; ``TQ_KERNELS`` is read when a plan is built, so set it
    before the process starts (within a process, use :func:`reference_only`)."""
    return _generation


def registered_kernel(op: str) -> Callable | None:
    """The kernel registered for ``op`` (providers loaded on first use), or ``None``."""
    if not kernels_enabled() or op in _failed:
        return None
    _load_providers()
    return _kernels.get(op)


def call_kernel(op: str, *args):
    """Run the kernel for ``op``; ``None`` means: use the reference path."""
    fn = registered_kernel(op)
    if fn is None:
        return None
    try:
        return fn(*args)
    except Exception as exc:
        _failed.add(op)
        _changed()
        warnings.warn(
            f"tq: the fused {op!r} kernel failed ({type(exc).__name__}: {exc}); "
            "falling back to tq-core's reference path for this process",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


@contextmanager
def reference_only() -> Iterator[None]:
    """Within this block every op runs on tq-core's reference path."""
    global _forced_reference
    _forced_reference += 1
    _changed()
    try:
        yield
    finally:
        _forced_reference -= 1
        _changed()
