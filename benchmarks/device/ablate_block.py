"""What the kernels left in a replayed decoder block cost: decode_split.py (affine3, tq3) with
the replayed block's residual adds, and then also its RMS norms, left out of the traces
(wrong arithmetic, same shapes: a measure of what fusing them into the matvec would save).
Llama blocks only. "none" runs the block as shipped; the other modes replace its traces
with these reduced copies (which call the MLP as it is, with no residual folding).

usage: ABLATE=none|noadd|noadd_nonorm python benchmarks/device/ablate_block.py
           [decode_split.py's arguments]
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import tq_core.decode_block as decode_block

MODE = os.environ.get("ABLATE", "none")


def _tail(block, output, x):
    B, _, L, _ = output.shape
    h = block.self_attn.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))
    return block.mlp(h if "nonorm" in MODE else block.post_attention_layernorm(h))


def _pre(block, x, offset):
    attn = block.self_attn
    B, L, _ = x.shape
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q = q.reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = k.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = v.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    return attn.rope(q, offset=offset), attn.rope(k, offset=offset), v


if "noadd" in MODE:
    decode_block._tail = _tail
if "nonorm" in MODE:
    decode_block._pre = _pre
runpy.run_path(str(Path(__file__).with_name("decode_split.py")), run_name="__main__")
