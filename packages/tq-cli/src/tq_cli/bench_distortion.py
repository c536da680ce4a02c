"""`tq bench distortion`: TurboQuant_mse and TurboQuant_prod distortion against the paper."""

from __future__ import annotations

import math

import mlx.core as mx
from tq_core import (
    dequantize_mse,
    inner_product_prod,
    make_rotation,
    make_sketch,
    quantize_mse,
    quantize_prod,
    sphere_codebook,
)

from .table import format_table

# arXiv 2504.19874, Theorem 1 and Sec. 4: rounded distortions for b = 1..4.
PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
# Theorem 2: D_prod ~ c_b / d for unit x and y, c_b rounded.
PAPER_PROD_TIMES_D = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}


def _unit_vectors(n: int, d: int, seed: int) -> mx.array:
    x = mx.random.normal((n, d), key=mx.random.key(seed))
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def _mean_and_stderr(batch_means: list[float]) -> tuple[float, float]:
    k = len(batch_means)
    mean = sum(batch_means) / k
    var = sum((m - mean) ** 2 for m in batch_means) / (k - 1)
    return mean, math.sqrt(var / k)


def measure(dim: int, bits: int, num_vectors: int, seed: int = 0, num_draws: int = 100) -> dict:
    """Distortion and bias of the mse and prod quantizers over random unit vectors.

    The paper's guarantees are expectations over the random rotation and QJL sketch, so the
    vectors are split into ``num_draws`` batches, each with its own rotation and sketch; the
    standard errors come from the batch means. Distortion uses an independent random unit
    query y; bias uses y = x, the case where TurboQuant_mse is biased by -D_mse (centroid
    condition) and TurboQuant_prod must not be.
    """
    num_draws = max(2, min(num_draws, num_vectors // 50))
    per_draw = num_vectors // num_draws
    mse_means, prod_means, bias_means, mse_bias_means = [], [], [], []
    for draw in range(num_draws):
        draw_seed = seed * 100003 + draw
        x = _unit_vectors(per_draw, dim, 2 * draw_seed + 1)
        y = _unit_vectors(per_draw, dim, 2 * draw_seed + 2)
        rotation = make_rotation(dim, seed=draw_seed)
        sketch = make_sketch(dim, seed=draw_seed)
        x_mse = dequantize_mse(quantize_mse(x, bits, rotation), rotation)
        codes = quantize_prod(x, bits, rotation, sketch)
        ip_err = inner_product_prod(codes, y, rotation, sketch) - mx.sum(x * y, axis=-1)
        self_err = inner_product_prod(codes, x, rotation, sketch) - 1.0
        stats = mx.stack(
            [
                mx.mean(mx.sum((x - x_mse) ** 2, axis=-1)),
                mx.mean(ip_err * ip_err),
                mx.mean(self_err),
                mx.mean(mx.sum(x * x_mse, axis=-1) - 1.0),
            ]
        ).tolist()
        for acc, value in zip((mse_means, prod_means, bias_means, mse_bias_means), stats):
            acc.append(value)
    n = per_draw * num_draws
    mse, mse_se = _mean_and_stderr(mse_means)
    prod, _ = _mean_and_stderr(prod_means)
    bias, bias_se = _mean_and_stderr(bias_means)
    mse_bias, _ = _mean_and_stderr(mse_bias_means)

    optimum = sphere_codebook(bits, dim).distortion
    # Expected prod distortion for random unit y: (pi/2 - 1/d) * D_mse(b - 1) / d, where
    # D_mse(0) = 1 because a 0-bit mse part leaves the whole vector as residual.
    residual = sphere_codebook(bits - 1, dim).distortion if bits > 1 else 1.0
    prod_expected = (math.pi / 2 - 1 / dim) * residual / dim
    return {
        "dim": dim,
        "bits": bits,
        "num_vectors": n,
        "num_draws": num_draws,
        "mse": mse,
        "mse_stderr": mse_se,
        "mse_paper": PAPER_MSE[bits],
        "mse_optimum": optimum,
        "mse_lower_bound": 4.0**-bits,
        "mse_ratio_to_optimum": mse / optimum,
        "mse_ratio_to_paper": mse / PAPER_MSE[bits],
        "mse_self_ip_bias": mse_bias,
        "prod_distortion": prod,
        "prod_distortion_times_d": prod * dim,
        "prod_paper_times_d": PAPER_PROD_TIMES_D[bits],
        "prod_expected_times_d": prod_expected * dim,
        "prod_ratio_to_expected": prod / prod_expected,
        "prod_bias": bias,
        "prod_bias_stderr": bias_se,
        "prod_bias_z": bias / bias_se if bias_se > 0 else 0.0,
        "mse_within_3pct": abs(mse / optimum - 1) <= 0.03,
        "prod_unbiased_3se": abs(bias) <= 3 * bias_se,
    }


def run(dims: list[int], bits: list[int], num_vectors: int, seed: int) -> list[dict]:
    return [measure(d, b, num_vectors, seed) for d in dims for b in bits]


def render(rows: list[dict]) -> str:
    headers = [
        "d", "b", "mse", "paper", "optimum", "4^-b", "/opt", "/paper",
        "prod*d", "paper*d", "expect*d", "/expect", "mse bias", "prod bias", "z", "ok",
    ]  # fmt: skip
    body = [
        [
            r["dim"], r["bits"], f"{r['mse']:.4f}", f"{r['mse_paper']:.3f}",
            f"{r['mse_optimum']:.4f}", f"{r['mse_lower_bound']:.4f}",
            f"{r['mse_ratio_to_optimum']:.3f}", f"{r['mse_ratio_to_paper']:.3f}",
            f"{r['prod_distortion_times_d']:.4f}", f"{r['prod_paper_times_d']:.3f}",
            f"{r['prod_expected_times_d']:.4f}", f"{r['prod_ratio_to_expected']:.3f}",
            f"{r['mse_self_ip_bias']:+.4f}", f"{r['prod_bias']:+.1e}", f"{r['prod_bias_z']:+.2f}",
            "yes" if r["mse_within_3pct"] and r["prod_unbiased_3se"] else "NO",
        ]
        for r in rows
    ]  # fmt: skip
    n = rows[0]["num_vectors"] if rows else 0
    title = (
        f"TurboQuant distortion over {n} random unit vectors, {rows[0]['num_draws']} rotation/"
        "sketch draws. mse: E||x-x^||^2. prod*d: d*E[(<y,x^>-<y,x>)^2], y random unit. "
        "bias: E[<x,x^>] - 1 (y = x); z = prod bias / stderr"
    )
    return format_table(headers, body, title)
