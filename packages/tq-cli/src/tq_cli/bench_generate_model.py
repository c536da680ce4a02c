"""The model `tq bench generate` measures: a TurboQuant checkpoint or random weights."""

from __future__ import annotations

import json
from pathlib import Path

from .main import CommandError


def random_model(model_dir: Path, weights: str):
    """(model, tokenizer, config) of ``model_dir``'s architecture with random weights:
    float16 on a GPU, float32 on the CPU (its float16 matmuls are slow), TurboQuant-quantized
    for tq4/tq3."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_config, load_tokenizer
    from tq_core import QuantRecipe, quantize_model
    from tq_core.lm.load import build_model

    try:
        config = load_config(model_dir)
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise CommandError(f"{model_dir}: needs config.json and the tokenizer ({e})") from None
    config.pop("quantization", None)
    try:
        model = build_model(config)
    except ValueError as e:
        raise CommandError(str(e)) from None
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    mx.random.seed(0)
    model.update(
        tree_map(lambda p: (0.02 * mx.random.normal(p.shape)).astype(dtype), model.parameters())
    )
    mx.eval(model.parameters())
    if weights.startswith("tq"):
        quantize_model(model, QuantRecipe(bits=int(weights[2:]), group_size=64))
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer, config


def load(args):
    """(model, tokenizer, config, description)."""
    from .generate_cmd import load_tq, resolve_tq_model
    from .status_line import StatusLine

    if args.random_weights:
        path = Path(args.model).expanduser()
        with StatusLine(f"building {path.name} with random {args.weights} weights"):
            model, tokenizer, config = random_model(path, args.weights)
        return model, tokenizer, config, f"{path.name} (random {args.weights} weights)"
    path = resolve_tq_model(args.model, args.preset)
    with StatusLine(f"loading {path}"):
        model, tokenizer = load_tq(path)
    config = json.loads((path / "config.json").read_text())
    return model, tokenizer, config, f"{path} (TurboQuant checkpoint)"
