"""Rewrite a checkpoint with each MoE layer's experts in a new order (perm.json), and the
router's rows in the same order, so the model computes the same function while experts the
router picks together sit next to each other on disk (one read instead of several)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from .safetensors_index import StreamError, index_checkpoint
from .streamed_moe import NON_EXPERT_PARAMS

__all__ = ["read_perm_file", "repack_experts", "ROUTER_NAMES"]

#: Where mlx-lm's MoE blocks keep the router, beside the expert block (qwen/deepseek: gate,
#: gpt-oss: router). Its rows (and bias, score-correction bias) follow the experts' order.
ROUTER_NAMES = ("gate", "router")


def read_perm_file(path: str | os.PathLike) -> dict[str, list[int]]:
    path = Path(path)
    try:
        layers = json.loads(path.read_text())["layers"]
        return {str(k): [int(e) for e in v] for k, v in layers.items()}
    except FileNotFoundError:
        raise StreamError(f"--perm {path}: missing") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise StreamError(f"--perm {path}: malformed ({e})") from None


def repack_experts(src, perm: dict[str, list[int]], out, overwrite: bool = False) -> Path:
    """Write ``src`` to ``out`` with experts reordered by ``perm`` (``{layer: order}``,
    ``order[new] = old``). Written into a temporary directory and renamed at the end."""
    from tq_core.checkpoint_writer import CheckpointWriter

    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    if int(config.get("n_group") or 1) > 1:
        raise StreamError(
            f"{src}: grouped routing (n_group={config['n_group']}) ties experts to their "
            "index ranges; repacking would change the model"
        )
    slots = index_checkpoint(src)
    moves: dict[str, list[int]] = {}
    for layer, order in perm.items():
        stacked = [
            n
            for n in slots
            if n.startswith(layer + ".") and n.rsplit(".", 1)[-1] not in NON_EXPERT_PARAMS
        ]
        if not stacked:
            raise StreamError(f"perm.json: {layer} is not an expert layer of {src}")
        e = slots[stacked[0]].shape[0]
        if sorted(order) != list(range(e)):
            raise StreamError(f"perm.json: {layer}: not a permutation of its {e} experts")
        parent = layer.rsplit(".", 1)[0]
        routers = [
            n
            for n in slots
            if any(n.startswith(f"{parent}.{r}.") for r in ROUTER_NAMES)
            and slots[n].shape[:1] == (e,)
        ]
        if not routers:
            raise StreamError(f"{src}: no router found beside {layer} ({parent}.gate/router)")
        for name in stacked + routers:
            if slots[name].shape[:1] != (e,):
                raise StreamError(f"{src}: {name} is not stacked by expert")
            moves[name] = order
    with CheckpointWriter(out, overwrite) as writer:
        for file in sorted({s.file for s in slots.values()}):
            tensors = mx.load(str(file))
            for name, value in tensors.items():
                if name in moves:
                    value = mx.take(value, mx.array(moves[name]), axis=0)
                mx.eval(value)
                writer.add({name: value})
            del tensors
        return writer.finish(config, tokenizer_dir=src)
