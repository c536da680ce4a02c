"""Host cost of recording one decode projection, affine against TurboQuant, level by level.

A decode step of a 1B-class model with TurboQuant weights spends more host time building its
graph than with affine weights (decode_split.py --weights). This splits a TurboQuant
projection into the layers of its call (the layer's ``__call__``, ``fused_rotating_matmul``,
the plan's validity check, the compiled launch alone) and times each against the affine
layer's call, and the embedding lookup of one token, a whole decoder layer and its attention
(with an fp16 cache): us per call to record it (no
evaluation; a round of N calls is evaluated after it is timed), medians of 5 rounds after a
warmup. One decoder layer of the model's config, random weights.

usage: python benchmarks/device/probe_projection_cost.py --model-dir DIR [--calls 500] [--json F]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load_config
from probe_rows import ProbeRows, host_cost_us

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: decode_speed
from decode_speed import make_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = ProbeRows("probe_projection_cost", a.json)
    config = load_config(Path(a.model_dir))
    config.pop("quantization", None)
    config["num_hidden_layers"] = 1
    d, ffn = config["hidden_size"], config["intermediate_size"]
    x = mx.random.normal((1, 1, d)).astype(mx.float16)
    h = mx.random.normal((1, 1, ffn)).astype(mx.float16)
    ids = mx.array([[17]])
    mx.eval(x, h, ids)
    kinds = {}
    for variant in ("affine3", "tq3"):
        model = make_model(config, variant).model
        layer = model.layers[0]
        kinds[f"{variant} embedding row"] = lambda m=model: m.embed_tokens(ids)
        at, mlp = layer.self_attn, layer.mlp

        def qkv(at=at):
            return at.q_proj(x), at.k_proj(x), at.v_proj(x)

        kinds[f"{variant} q/k/v"] = qkv
        kinds[f"{variant} down"] = lambda mlp=mlp: mlp.down_proj(h)
        kinds[f"{variant} mlp"] = lambda mlp=mlp: mlp(x)
        layer_cache, attention_cache = KVCache(), KVCache()
        kinds[f"{variant} decoder layer"] = lambda la=layer, c=layer_cache: la(x, None, c)
        kinds[f"{variant} attention"] = lambda at=at, c=attention_cache: at(x, None, c)
        if variant == "tq3":
            mx.eval(qkv(), mlp(x))  # builds the plans
            down = mlp.down_proj
            plans = down.__dict__.get("_plans")
            entry = plans and plans.entries.get((h.shape, h.dtype))
            if entry is None or entry.plan is None:
                print("no decode plan (no GPU kernels here): the plan's levels are skipped")
                continue
            kinds["tq3 down: fused_rotating_matmul"] = lambda d=down: d.fused_rotating_matmul(
                h, h.dtype
            )
            kinds["tq3 down: plan validity"] = lambda e=entry, p=plans: e.valid(p.layers)
            kinds["tq3 down: compiled launch alone"] = lambda e=entry: e.plan(h)
    for kind, fn in kinds.items():
        rows.emit(kind=kind, build_us=round(host_cost_us(fn, a.calls)[0], 2))
    rows.save()


if __name__ == "__main__":
    main()
