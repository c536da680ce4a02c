"""`tq eval ppl`: perplexity on fixed, non-overlapping windows of a text file."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

#: The WikiText-2 test split beside the repository: <repo>/../shared/data/wikitext-2-test.txt.
DEFAULT_DATA = (
    Path(__file__).resolve().parents[4].parent / "shared" / "data" / "wikitext-2-test.txt"
)


def text_windows(tokenizer, path: str | Path, seq_len: int, num_seqs: int) -> mx.array:
    """The first ``num_seqs`` consecutive windows of ``seq_len`` tokens of the whole file
    (tokenized once, no BOS), so every model is scored on exactly the same tokens."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    need = seq_len * num_seqs
    if len(ids) < need:
        raise ValueError(
            f"--data {path} has {len(ids)} tokens; {num_seqs} windows of {seq_len} need {need}"
        )
    return mx.array(np.array(ids[:need], dtype=np.int32).reshape(num_seqs, seq_len))


def perplexity(model: nn.Module, windows: mx.array, batch_size: int = 4, progress=None) -> dict:
    """Mean next-token loss over every window position (seq_len - 1 targets per window)."""
    losses = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(batch[:, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, batch[:, 1:], reduction="none")
        mx.eval(loss)
        losses.append(loss.flatten())
        if progress is not None:
            progress(batch.shape[0])
    losses = mx.concatenate(losses)
    mean = losses.mean().item()
    se = mx.sqrt(mx.var(losses, ddof=1)).item() / math.sqrt(losses.size)
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_stderr": ppl * se, "loss": mean, "tokens": int(losses.size)}
