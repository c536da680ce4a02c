"""Model loading, fp16 and TurboQuant caches, greedy answers and output for the kv evaluations."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from .main import CommandError

__all__ = [
    "answer_rows",
    "chat_parts",
    "convert_dense",
    "copy_dense",
    "dense_cache",
    "emit",
    "encode",
    "greedy_tokens",
    "load_model",
    "prefill",
    "setting_errors",
    "tq_cache",
]


def load_model(model_arg: str) -> tuple:
    """``(model, tokenizer, info)`` of a local float model (float32 weights) or TurboQuant
    checkpoint; anything else -> CommandError. Never downloads."""
    from .default_model import is_tq_checkpoint
    from .eval_cmd import _quiet_transformers, load_float
    from .generate_cmd import load_tq

    path = Path(model_arg).expanduser()
    if not path.is_dir():
        raise CommandError(f"--model {model_arg}: no such model directory")
    with _quiet_transformers():
        if is_tq_checkpoint(path):
            model, tokenizer = load_tq(path)
            kind = "turboquant"
        elif not (path / "config.json").is_file():
            raise CommandError(f"--model {model_arg}: no config.json; not a model directory")
        else:
            model, tokenizer, _ = load_float(str(path))
            kind = "float"
    from tq_kvcache import install_attention_hook

    install_attention_hook(model)  # decode attends straight from the packed codes
    return model, tokenizer, {"model": str(path.resolve()), "kind": kind}


def dense_cache(model) -> list:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def tq_cache(model, knobs: dict) -> list:
    from tq_kvcache import make_turboquant_cache

    return make_turboquant_cache(model, **knobs)


def copy_dense(cache: list) -> list:
    """A copy of a dense prompt cache that generation can extend without touching ``cache``."""
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        if type(c) is not KVCache:
            raise CommandError(f"the kv evaluations need plain KV caches, got {type(c).__name__}")
        new = KVCache()
        if c.offset:
            new.keys = c.keys[..., : c.offset, :]
            new.values = c.values[..., : c.offset, :]
            new.offset = c.offset
        out.append(new)
    return out


def convert_dense(cache: list, knobs: dict) -> list:
    """The dense cache compressed into TurboQuant caches (as a saved prompt cache would be)."""
    from tq_kvcache import convert_cache

    out = convert_cache(cache, **knobs)
    import mlx.core as mx

    mx.eval([c.state for c in out])
    return out


def prefill(model, ids, cache, step: int = 2048) -> None:
    """Run ``ids`` into ``cache`` in mlx-lm's prefill steps, without computing logits."""
    import mlx.core as mx

    for start in range(0, len(ids), step):
        model(mx.array(ids[start : start + step])[None], cache=cache)
        mx.eval([c.state for c in cache])


def greedy_tokens(model, prompt_ids, cache, max_tokens: int, stop=()) -> list[int]:
    """Greedy tokens after ``prompt_ids`` through mlx-lm's generate_step with ``cache``
    (decode attends from the packed codes); stops after a token in ``stop``."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(
        mx.array(prompt_ids), model, max_tokens=max_tokens, prompt_cache=cache
    ):
        out.append(int(token))
        if out[-1] in stop:
            break
    return out


def chat_parts(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a single user message (with the
    generation prompt); without a template, the raw text followed by a newline."""
    if not getattr(tokenizer, "has_chat_template", False):
        return "", "\n"
    marker = "\x00tq-user-message\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    pre, _, post = text.partition(marker)
    return pre, post


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as part of a templated prompt (no extra special tokens)."""
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def answer_rows(model, doc_ids, question_ids, row_knobs, max_tokens: int, stop=()) -> list:
    """Greedy answers to ``question_ids`` after ``doc_ids``, one per entry of ``row_knobs``
    (None: the fp16 cache; else TurboQuantKVCache knobs). The document is prefilled once on
    the fp16 cache and compressed into each setting's cache, as a saved prompt cache would
    be; the question is then read, and the answer generated, through the compressed cache."""
    dense = dense_cache(model)
    prefill(model, doc_ids, dense)
    out = []
    for knobs in row_knobs:
        cache = copy_dense(dense) if knobs is None else convert_dense(dense, knobs)
        out.append(greedy_tokens(model, question_ids, cache, max_tokens, stop))
    return out


@contextlib.contextmanager
def setting_errors(name: str):
    """ValueError from the cache (e.g. a head_dim the setting cannot split) -> CommandError."""
    try:
        yield
    except ValueError as e:
        raise CommandError(f"setting {name}: {e}") from None


def emit(payload: dict, table: str, args) -> None:
    """The table (stderr with --json), the JSON on stdout with --json, the file with --out."""
    import json

    from .atomic_write import write_text_atomic

    print(table, file=sys.stderr if args.json else sys.stdout)
    text = json.dumps(payload, indent=2)
    if args.json:
        print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
