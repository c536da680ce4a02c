"""KV vector codec: TurboQuant_mse/prod codes of head vectors, scored and summed in rotated form.

A codec turns head vectors ``x`` (B, H, N, D) into packed arrays (one dict per batch of
tokens, token axis 2) and back, and scores queries / accumulates values straight from the
codes (DESIGN.md, KV): ``<q, k^> = |k| <R q, C[idx]>`` (plus the QJL term in prod mode,
arXiv 2504.19874 Sec. 3.2, Algorithm 2) and ``sum_i p_i v^_i = R^T sum_i p_i |v_i| C[idx_i]``.

Fractional bits (1.5, 2.5, 3.5) split the channels of each head into two halves, the outlier
half (largest mean energy on the first tokens seen) at ceil(bits) and the rest at floor(bits),
each half its own TurboQuant instance with its own rotation: the paper's mixed-precision
setting (Sec. 4.3, "outlier" channels at a higher bit-width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
from tq_core.codebook import Codebook, sphere_codebook
from tq_core.hadamard import largest_hadamard_block
from tq_core.pack import _unpack
from tq_core.qjl import make_sketch, qjl_scale
from tq_core.quant_mse import MSEQuantized, dequantize_mse, quantize_mse
from tq_core.quant_prod import ProdQuantized, dequantize_prod, quantize_prod
from tq_core.rotation import Rotation, make_rotation, rotate, unrotate

__all__ = [
    "INTEGER_BITS",
    "FRACTIONAL_BITS",
    "KEY_MODES",
    "KVCodec",
    "check_bits",
    "make_codec",
    "outlier_permutation",
]

INTEGER_BITS = (1, 2, 3, 4, 8)
FRACTIONAL_BITS = (1.5, 2.5, 3.5)
KEY_MODES = ("mse", "prod")
#: Smallest rotation block that still mixes coordinates enough for the sphere law to hold.
MIN_ROTATION_BLOCK = 16


def check_bits(name: str, bits) -> float | int:
    """Validate a bit-width (1-4 or 8, or 1.5/2.5/3.5); returns it as int when whole."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise ValueError(f"{name} must be one of 1, 1.5, 2, 2.5, 3, 3.5, 4, 8; got {bits!r}")
    if float(bits).is_integer() and int(bits) in INTEGER_BITS:
        return int(bits)
    if float(bits) in FRACTIONAL_BITS:
        return float(bits)
    raise ValueError(f"{name} must be one of 1, 1.5, 2, 2.5, 3, 3.5, 4, 8; got {bits!r}")


@dataclass(frozen=True)
class Part:
    """One TurboQuant instance over ``width`` consecutive (permuted) channels."""

    start: int
    width: int
    bits: int  # total bits per coordinate (prod: bits - 1 mse + 1 QJL)
    prod: bool
    rotation: Rotation
    sketch: mx.array | None

    @property
    def mse_bits(self) -> int:
        return self.bits - 1 if self.prod else self.bits

    def codebook(self) -> Codebook | None:
        return sphere_codebook(self.mse_bits, self.width) if self.mse_bits else None


@dataclass(frozen=True)
class KVCodec:
    """The codes layout of one of K or V: its parts and the channel permutation (or None)."""

    dim: int
    bits: float | int
    mode: str
    seed: int
    parts: tuple[Part, ...]
    perm: mx.array | None  # (H, D) int32: outlier channels first; None for whole bits

    # ------------------------------------------------------------------ encode / decode

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        """Codes of ``x`` (B, H, N, D): a dict of arrays with the token axis at 2."""
        xp = _gather_channels(x.astype(mx.float32), self.perm)
        out = {}
        for i, part in enumerate(self.parts):
            sub = xp[..., part.start : part.start + part.width]
            if part.prod:
                q = quantize_prod(sub, part.bits, part.rotation, part.sketch)
                if q.mse is not None:
                    out[f"{i}.idx"] = q.mse.indices
                    out[f"{i}.norm"] = q.mse.norms.astype(mx.float16)
                out[f"{i}.sgn"] = q.signs
                out[f"{i}.rnorm"] = q.residual_norms.astype(mx.float16)
            else:
                q = quantize_mse(sub, part.bits, part.rotation)
                out[f"{i}.idx"] = q.indices
                out[f"{i}.norm"] = q.norms.astype(mx.float16)
        return out

    def decode(self, codes: dict[str, mx.array]) -> mx.array:
        """Reconstruct (B, H, N, D) float32 vectors (prefill path and tests only)."""
        outs = []
        for i, part in enumerate(self.parts):
            mse = self._mse(codes, i, part)
            if part.prod:
                q = ProdQuantized(
                    mse,
                    codes[f"{i}.sgn"],
                    codes[f"{i}.rnorm"].astype(mx.float32),
                    part.bits,
                    part.width,
                )
                outs.append(dequantize_prod(q, part.rotation, part.sketch))
            else:
                outs.append(dequantize_mse(mse, part.rotation))
        return _scatter_channels(mx.concatenate(outs, axis=-1), self.perm)

    def _mse(self, codes, i: int, part: Part) -> MSEQuantized | None:
        if f"{i}.idx" not in codes:
            return None
        return MSEQuantized(
            codes[f"{i}.idx"], codes[f"{i}.norm"].astype(mx.float32), part.mse_bits, part.width
        )

    # ------------------------------------------------------------------ attention pieces

    def scores(self, q: mx.array, codes: dict[str, mx.array]) -> mx.array:
        """``<q, k^_i>`` for queries q (B, H, R, D) float32 against the coded keys: (B, H, R, N).

        Rotate the query once per part and score against ``|k| C[idx]`` in the rotated basis
        (an orthogonal R preserves inner products); prod mode adds the unbiased QJL term
        ``sqrt(pi/2)/d |r| <S q, z>`` (Algorithm 2, Theorem 2).
        """
        qp = _gather_channels(q, self.perm)
        total = None
        for i, part in enumerate(self.parts):
            qs = qp[..., part.start : part.start + part.width]
            s = None
            if f"{i}.idx" in codes:
                cent = _centroids(part, codes[f"{i}.idx"])
                s = (rotate(qs, part.rotation) @ cent.swapaxes(-1, -2)) * codes[f"{i}.norm"].astype(
                    mx.float32
                )[:, :, None, :]
            if part.prod:
                z = 2.0 * _unpack(codes[f"{i}.sgn"], 1, part.width).astype(mx.float32) - 1.0
                qjl = (qs @ part.sketch.T) @ z.swapaxes(-1, -2)
                qjl = (
                    qjl
                    * (qjl_scale(part.width) * codes[f"{i}.rnorm"].astype(mx.float32))[
                        :, :, None, :
                    ]
                )
                s = qjl if s is None else s + qjl
            total = s if total is None else total + s
        return total

    def weighted_sum(self, p: mx.array, codes: dict[str, mx.array]) -> mx.array:
        """``sum_i p_i v^_i`` for weights p (B, H, R, N) float32: (B, H, R, D) float32.

        Accumulate ``p_i |v_i| C[idx_i]`` in the rotated basis and un-rotate once per part.
        """
        outs = []
        for i, part in enumerate(self.parts):
            if part.prod:
                raise ValueError("values are coded with TurboQuant_mse only")
            cent = _centroids(part, codes[f"{i}.idx"])
            w = p * codes[f"{i}.norm"].astype(mx.float32)[:, :, None, :]
            outs.append(unrotate(w @ cent, part.rotation))
        return _scatter_channels(mx.concatenate(outs, axis=-1), self.perm)

    def bits_per_token(self) -> float:
        """Stored bits per head vector, norms included (fp16 norms)."""
        total = 0
        for part in self.parts:
            words = -(-part.width // 32)
            if part.mse_bits:
                total += words * 32 * part.mse_bits + 16
            if part.prod:
                total += words * 32 + 16
        return total


def _centroids(part: Part, packed: mx.array) -> mx.array:
    idx = _unpack(packed, part.mse_bits, part.width)
    return part.codebook().centroids_mx()[idx]


def _gather_channels(x: mx.array, perm: mx.array | None) -> mx.array:
    if perm is None:
        return x
    index = mx.broadcast_to(perm[None, :, None, :], (*x.shape[:-1], perm.shape[-1]))
    return mx.take_along_axis(x, index, axis=-1)


def _scatter_channels(x: mx.array, perm: mx.array | None) -> mx.array:
    if perm is None:
        return x
    return _gather_channels(x, mx.argsort(perm, axis=-1))


def outlier_permutation(x: mx.array) -> mx.array:
    """Channels of each head ordered by mean energy over batch and tokens, largest first:
    the first half are the outlier channels. ``x`` (B, H, N, D) -> (H, D) int32."""
    energy = mx.mean(mx.square(x.astype(mx.float32)), axis=(0, 2))
    return mx.argsort(-energy, axis=-1).astype(mx.int32)


def _rotation(width: int, seed: int) -> Rotation:
    block = largest_hadamard_block(width)
    if block < min(MIN_ROTATION_BLOCK, width):
        raise ValueError(
            f"head_dim split of {width} channels is not supported: its largest Hadamard block "
            f"is {block}; use a head_dim divisible by 16 (32 for fractional bits)"
        )
    return make_rotation(width, seed=seed)


def make_codec(
    dim: int, bits, mode: str, seed: int, perm: mx.array | None = None, name: str = "bits"
) -> KVCodec:
    """Build the codec for head_dim ``dim`` at ``bits`` (mode ``mse`` or ``prod``).

    Fractional bits need ``perm`` (H, D), e.g. from :func:`outlier_permutation`.
    """
    bits = check_bits(name, bits)
    if mode not in KEY_MODES:
        raise ValueError(f"key mode must be one of {KEY_MODES}, got {mode!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 3:
        raise ValueError(f"head_dim must be an integer >= 3, got {dim!r}")
    prod = mode == "prod"
    if prod and math.ceil(bits) > 5:
        raise ValueError(f"prod key mode supports {name} up to 4 (8 is mse only), got {bits}")
    if isinstance(bits, int):
        widths = [(dim, bits)]
        perm = None
    else:
        if dim % 2:
            raise ValueError(f"fractional {name}={bits} needs an even head_dim, got {dim}")
        if perm is None:
            raise ValueError("fractional bits need the outlier channel permutation (perm)")
        widths = [(dim // 2, math.ceil(bits)), (dim // 2, math.floor(bits))]
    parts, start = [], 0
    for i, (width, b) in enumerate(widths):
        rot = _rotation(width, seed + 2 * i)
        sketch = make_sketch(width, seed + 2 * i + 1) if prod else None
        parts.append(Part(start, width, b, prod, rot, sketch))
        start += width
    return KVCodec(dim, bits, mode, seed, tuple(parts), perm)
