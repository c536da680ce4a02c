"""Perplexity of SmolLM2-135M-Instruct under TurboQuant and MLX affine weight quantization.

Every row is scored on the same WikiText-2 windows (first N windows of L tokens of the test
file). TurboQuant rows are quantized in memory exactly as `tq convert` does (same recipe
code path); affine rows use `mx.quantize` then `mx.dequantize` back to float32 on every
Linear/Embedding mlx-lm's `nn.quantize` would quantize (numerically the same model as
mlx-lm's affine checkpoint; `quantized_matmul` is 60x slower on the CPU). Appends one JSON
object per row to --out, so an interrupted run keeps its rows.

usage: python benchmarks/weight_quality.py --rows NAME[,NAME...] --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import load
from tq_cli.eval_ppl import perplexity, text_windows
from tq_core import QuantRecipe, quantize_model

MODEL = Path("~/.cache/tq-models/smollm2-135m-instruct").expanduser()
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-test.txt"


def _affine(
    model: nn.Module, bits: int, group_size: int, keep_embed: bool, overrides=()
) -> tuple[int, int]:
    """Fake-quantize like nn.quantize: returns (quantized weights, their storage bits)."""
    count = storage = 0
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(m, (nn.Linear, nn.Embedding)) or m.weight.shape[-1] % group_size:
            continue
        if keep_embed and isinstance(m, nn.Embedding):
            continue
        here = next((b for pattern, b in overrides if re.search(pattern, path)), bits)
        w = m.weight.astype(mx.float16)
        wq, s, b = mx.quantize(w, group_size, here)
        m.weight = mx.dequantize(wq, s, b, group_size, here).astype(mx.float32)
        count += w.size
        storage += wq.size * 32 + (s.size + b.size) * 16
    return count, storage


def _turboquant_outliers(model: nn.Module, recipe: QuantRecipe, tau: float) -> tuple[int, int]:
    """Fake-quantized TurboQuant with weights above tau * (matrix RMS) kept exactly (sparse
    fp16 values + int32 positions), the rest quantized; weights written back as float."""
    from tq_core import dequantize_weight, quantize_weight, weight_rotation
    from tq_core.quantize_model import plan_layers

    plan = plan_layers(model, recipe)
    leaves = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    count = storage = 0
    for path, spec in plan.items():
        m = leaves[path]
        w = m.weight.astype(mx.float32)
        mask = mx.abs(w) > tau * mx.sqrt(mx.mean(w * w))
        n_out = mx.sum(mask).item()
        rot = weight_rotation(w.shape[-1], spec["group_size"], spec["seed"], spec["span"])
        q = quantize_weight(
            mx.where(mask, 0.0, w), spec["bits"], spec["group_size"], rot, recipe.scale_method
        )
        m.weight = mx.where(
            mask, w.astype(mx.float16).astype(mx.float32), dequantize_weight(q, rot)
        )
        mx.eval(m.weight)
        count += w.size
        storage += q.indices.size * 32 + q.scales.size * 16 + w.shape[-1] * 16 + n_out * 48
    return count, storage


def _turboquant(model: nn.Module, recipe: QuantRecipe) -> tuple[int, int]:
    plan = quantize_model(model, recipe)
    count = storage = 0
    leaves = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    for path in plan:
        layer = leaves[path]
        n = layer.scales.size * layer.group_size
        count += n
        # indices, fp16 scales, fp16 rotation signs (shared, counted per layer anyway) and,
        # with QJL, the residual's sign bits, scales and sketch signs: every parameter but bias
        storage += sum(
            v.nbytes * 8 for k, v in tree_flatten(layer.parameters()) if not k.endswith("bias")
        )
    return count, storage


def parse_row(name: str) -> dict:
    """fp | affine-b3-g64[-keepembed] | tq-b3-g64-s0[-rms][-keepembed][-embed4][-span128]
    [-v4][-attn3][-mlp3][-out8][-qjl]"""
    parts = name.split("-")
    row = {"name": name, "kind": parts[0]}
    for p in parts[1:]:
        if p.startswith("b"):
            row["bits"] = int(p[1:])
        elif p.startswith("g"):
            row["group_size"] = int(p[1:])
        elif p.startswith("s") and p[1:].isdigit():
            row["seed"] = int(p[1:])
        elif p.startswith("span"):
            row["span"] = int(p[4:])
        elif p.startswith("embed"):
            row["embed_bits"] = int(p[5:])
        elif p == "keepembed":
            row["embed_bits"] = 0
        elif p.startswith("v") and p[1:].isdigit():
            row.setdefault("overrides", []).append((r"v_proj$", int(p[1:])))
        elif p.startswith("out"):
            row["outlier_tau"] = float(p[3:])
        elif p == "rms":
            row["scale_method"] = "rms"
        elif p == "qjl":
            row["use_qjl"] = True
        elif p.startswith("attn"):
            row["attn_bits"] = int(p[4:])
        elif p.startswith("mlp"):
            row["mlp_bits"] = int(p[3:])
        else:
            raise ValueError(f"unknown row part {p!r} in {name!r}")
    return row


def run_row(name: str, windows: mx.array) -> dict:
    row = parse_row(name)
    model, _ = load(str(MODEL))
    matrices = sum(
        m.weight.size
        for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, (nn.Linear, nn.Embedding))
    )
    start = time.time()
    if row["kind"] == "affine":
        count, storage = _affine(
            model,
            row["bits"],
            row["group_size"],
            row.get("embed_bits") == 0,
            tuple(tuple(o) for o in row.get("overrides", ())),
        )
    elif row["kind"] == "tq":
        fields = {
            k: row[k]
            for k in (
                "bits",
                "group_size",
                "seed",
                "span",
                "embed_bits",
                "scale_method",
                "attn_bits",
                "mlp_bits",
                "use_qjl",
            )
            if k in row
        }
        if "overrides" in row:
            fields["overrides"] = tuple(tuple(o) for o in row["overrides"])
        if "outlier_tau" in row:
            count, storage = _turboquant_outliers(model, QuantRecipe(**fields), row["outlier_tau"])
        else:
            count, storage = _turboquant(model, QuantRecipe(**fields))
    else:
        count = storage = 0
    model.set_dtype(mx.float32)
    quant_s = time.time() - start
    result = perplexity(model, windows)
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    row.update(result)
    row.update(
        quantized_weights=count,
        bits_per_weight=storage / count if count else 16.0,
        # Every Linear/Embedding weight counted, the unquantized ones at 16 bits.
        model_bits_per_weight=(storage + (matrices - count) * 16) / matrices,
        matrix_weights=matrices,
        quantize_seconds=quant_s,
        eval_seconds=time.time() - start - quant_s,
        parameters=total,
    )
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--num-seqs", type=int, default=16)
    args = ap.parse_args()
    _, tok = load(str(MODEL))
    windows = text_windows(tok, DATA, args.seq_len, args.num_seqs)
    for name in args.rows.split(","):
        row = run_row(name, windows)
        row.update(seq_len=args.seq_len, num_seqs=args.num_seqs)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name:40s} ppl {row['ppl']:8.2f}  bpw {row['bits_per_weight']:.3f}", flush=True)


if __name__ == "__main__":
    main()
