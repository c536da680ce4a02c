"""`tq eval ppl`: perplexity of a TurboQuant model, its float baseline, or mlx-lm's affine
quantization of the float model, on the same token windows of a text file.

Models:
- a TurboQuant checkpoint (or, with --preset, a float model converted once and cached; without
  --model, the default SmolLM2-135M-Instruct at --preset, default tq4);
- a float model directory: the float32 baseline;
- a float model directory with --affine-bits B [--affine-group-size G]: every layer mlx-lm's
  ``nn.quantize`` would quantize (``to_quantized`` layers whose input size G divides, as the
  model's ``quant_predicate`` allows) is quantized with ``mx.quantize`` and dequantized back
  to float32 weights. Numerically the same model as mlx-lm's affine-quantized one (the matmul
  of dequantized weights is what ``quantized_matmul`` computes), ~60x faster on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

from .main import CommandError

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)


def _check_args(args) -> None:
    if args.seq_len < 2:
        raise CommandError("--seq-len must be at least 2")
    if args.num_seqs < 1:
        raise CommandError("--num-seqs must be at least 1")
    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1")
    if args.affine_bits is None and args.affine_group_size is not None:
        raise CommandError("--affine-group-size needs --affine-bits")
    if args.affine_bits is not None:
        if args.affine_bits not in AFFINE_BITS:
            raise CommandError(
                f"--affine-bits must be one of {list(AFFINE_BITS)}, got {args.affine_bits}"
            )
        gs = args.affine_group_size or 64
        if gs not in AFFINE_GROUP_SIZES:
            raise CommandError(
                f"--affine-group-size must be one of {list(AFFINE_GROUP_SIZES)}, got {gs}"
            )
        if args.preset:
            raise CommandError("give --preset (TurboQuant) or --affine-bits (mlx-lm), not both")


def data_file(arg: str | None) -> Path:
    from .eval_ppl import DEFAULT_DATA

    if arg is not None:
        path = Path(arg).expanduser()
        if not path.is_file():
            raise CommandError(f"--data {arg}: no such file")
        return path
    path = DEFAULT_DATA.resolve()
    if not path.is_file():
        raise CommandError(
            f"no --data given and the default WikiText-2 test file ({path}) is not present; "
            "pass --data FILE (a UTF-8 text file)"
        )
    return path


def load_float(model_arg: str, affine: tuple[int, int] | None = None):
    """``(model, tokenizer, affine stats)`` with float32 weights. mlx-lm affine-quantized
    checkpoints are dequantized (the same numbers, without the CPU's slow quantized matmul);
    ``affine=(bits, group_size)`` first round-trips the stored weights through mx.quantize."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model
    from tq_core.lm.load import cast_dtype

    try:
        model, tokenizer = load(model_arg)
    except Exception as e:  # mlx-lm raises many kinds for a bad directory or id
        raise CommandError(f"{model_arg}: mlx-lm cannot load this model ({e})") from None
    if any(hasattr(m, "scales") for _, m in model.named_modules()):
        if affine is not None:
            raise CommandError(
                f"{model_arg} is already quantized by mlx-lm: evaluate it without --affine-bits"
            )
        dequantize_model(model)
    stats = affine_roundtrip(model, *affine) if affine is not None else None
    cast_dtype(model, mx.float32)
    mx.eval(model.parameters())
    return model, tokenizer, stats


def affine_roundtrip(model, bits: int, group_size: int) -> dict:
    """Replace, in place, the weights of the layers mlx-lm would quantize with their affine
    quantize -> dequantize round trip, in the stored dtype as mlx-lm quantizes. Returns
    ``{"layers", "weights", "bits_per_weight"}``; bits per weight counts the packed codes and
    a 16-bit scale and bias per group, as mlx-lm does for float16/bfloat16 models."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    predicate = getattr(model, "quant_predicate", None)
    layers = n_weights = n_bits = 0
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not hasattr(module, "to_quantized") or "weight" not in module:
            continue
        b, gs = bits, group_size
        verdict = predicate(path, module) if predicate is not None else True
        if verdict is False:
            continue
        if isinstance(verdict, dict):
            if verdict.get("mode", "affine") != "affine":
                continue
            b, gs = verdict.get("bits", b), verdict.get("group_size", gs)
        w = module.weight
        if w.shape[-1] % gs:
            continue
        q, scales, biases = mx.quantize(w, group_size=gs, bits=b)
        module.weight = mx.dequantize(q, scales, biases, group_size=gs, bits=b)
        mx.eval(module.weight)
        layers += 1
        n_weights += w.size
        n_bits += w.size * b + (w.size // gs) * 32
    return {
        "layers": layers,
        "weights": n_weights,
        "bits_per_weight": n_bits / n_weights if n_weights else None,
    }


def load_for_eval(args) -> tuple:
    """``(model, tokenizer, info)``: info has model, kind and bits_per_weight."""
    from .convert_cmd import checkpoint_stats
    from .default_model import is_tq_checkpoint
    from .generate_cmd import load_tq, resolve_tq_model

    path = Path(args.model).expanduser() if args.model else None
    is_tq = path is not None and path.exists() and is_tq_checkpoint(path)
    if args.affine_bits is not None and (path is None or is_tq):
        what = "the default model" if path is None else args.model
        raise CommandError(
            f"--affine-bits needs a float model directory; {what} is evaluated as TurboQuant"
        )
    if path is None or args.preset or is_tq:
        tq_path = resolve_tq_model(args.model, args.preset)
        model, tokenizer = load_tq(tq_path)
        q = json.loads((tq_path / "config.json").read_text())["quantization"]
        info = {
            "model": str(tq_path.resolve()),
            "kind": "turboquant",
            "bits": q.get("bits"),
            "group_size": q.get("group_size"),
            "bits_per_weight": checkpoint_stats(tq_path)["bits_per_weight"],
        }
        return model, tokenizer, info
    if not path.exists():
        from .convert_cmd import is_local_path

        if is_local_path(args.model):
            raise CommandError(f"{args.model}: no such model directory")
    elif not (path / "config.json").is_file():
        raise CommandError(f"{args.model}: no config.json; not a model directory")
    gs = args.affine_group_size or 64
    affine = (args.affine_bits, gs) if args.affine_bits is not None else None
    model, tokenizer, stats = load_float(args.model, affine)
    info = {
        "model": str(path.resolve() if path.exists() else args.model),
        "kind": "float",
        "bits_per_weight": None,
    }
    if stats is not None:
        if not stats["layers"]:
            raise CommandError(f"{args.model}: no layer has an input size that {gs} divides")
        info.update(
            kind="affine",
            bits=args.affine_bits,
            group_size=gs,
            bits_per_weight=stats["bits_per_weight"],
        )
    return model, tokenizer, info


@contextlib.contextmanager
def _quiet_transformers():
    try:
        from transformers.utils import logging
    except ImportError:
        yield
        return
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def run(args) -> int:
    from tqdm import tqdm

    from .eval_ppl import perplexity, text_windows
    from .table import format_table

    _check_args(args)
    data = data_file(args.data)
    start = time.perf_counter()
    model, tokenizer, info = load_for_eval(args)
    load_seconds = time.perf_counter() - start
    try:
        with _quiet_transformers():  # "sequence longer than the maximum": we cut windows
            windows = text_windows(tokenizer, data, args.seq_len, args.num_seqs)
    except ValueError as e:
        raise CommandError(str(e)) from None
    start = time.perf_counter()
    with tqdm(total=args.num_seqs, desc="perplexity", unit="window", file=sys.stderr) as bar:
        result = perplexity(model, windows, batch_size=args.batch_size, progress=bar.update)
    seconds = time.perf_counter() - start

    payload = {
        **info,
        "data": str(data),
        "seq_len": args.seq_len,
        "num_seqs": args.num_seqs,
        "tokens": result["tokens"],
        "ppl": result["ppl"],
        "ppl_stderr": result["ppl_stderr"],
        "loss": result["loss"],
        "seconds": round(seconds, 3),
        "load_seconds": round(load_seconds, 3),
    }
    bpw = info.get("bits_per_weight")
    kind = info["kind"] + (f" {info['bits']}-bit g{info['group_size']}" if "bits" in info else "")
    table = format_table(
        ["model", "kind", "bits/weight", "ppl", "± stderr", "tokens", "seconds"],
        [[Path(info["model"]).name, kind, f"{bpw:.3f}" if bpw else "-",
          f"{result['ppl']:.3f}", f"{result['ppl_stderr']:.3f}", result["tokens"],
          f"{seconds:.1f}"]],
        title=f"perplexity on {data.name}: {args.num_seqs} windows of {args.seq_len} tokens",
    )  # fmt: skip
    print(table, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        for key in ("ppl", "ppl_stderr", "loss"):  # JSON has no inf/nan
            if not math.isfinite(payload[key]):
                payload[key] = None
        print(json.dumps(payload, indent=2))
    return 0
