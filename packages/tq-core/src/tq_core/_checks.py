"""Argument checks shared by tq-core's public functions: clear errors at the boundary."""

from __future__ import annotations

import mlx.core as mx

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def check_choice(name: str, value, allowed) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``; for integer choices the value
    must be a true ``int`` (2.0 and True are refused)."""
    ints = all(isinstance(a, int) for a in allowed)
    wrong_type = ints and (isinstance(value, bool) or not isinstance(value, int))
    if wrong_type or value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def check_array(name: str, x) -> None:
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mlx.core.array, got {type(x).__name__}")


def check_float_array(name: str, x, min_ndim: int = 1) -> None:
    """Refuse non-arrays, integer/bool/complex dtypes and arrays of too few dimensions."""
    check_array(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16 or float32), got {x.dtype}"
        )
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_last_dim(name: str, x, dim: int) -> None:
    if x.shape[-1] != dim:
        raise ValueError(
            f"{name}.shape[-1] must be {dim} (the quantizer's dimension), got shape {x.shape}"
        )
