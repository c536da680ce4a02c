"""`tq convert`: a float Hugging Face / mlx-lm model -> a TurboQuant checkpoint."""

from __future__ import annotations

import json
import re
import struct
import sys
import time
from pathlib import Path

from .main import CommandError

#: QuantRecipe fields settable from the command line (flag = field with - for _).
RECIPE_FLAGS = (
    "bits",
    "group_size",
    "attn_bits",
    "mlp_bits",
    "expert_bits",
    "embed_bits",
    "head_bits",
    "seed",
    "scale_method",
    "use_qjl",
)
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def add_recipe_arguments(parser) -> None:
    from tq_core import PRESETS

    parser.add_argument(
        "--preset",
        default="tq4",
        help=f"one of {', '.join(PRESETS)} (default tq4); the flags below override its fields",
    )
    parser.add_argument("--bits", type=int, help="bits per weight (1, 2, 3, 4, 8)")
    parser.add_argument("--group-size", type=int, help="weights per scale (32, 64, 128)")
    for kind in ("attn", "mlp", "expert", "embed", "head"):
        parser.add_argument(
            f"--{kind}-bits", type=int, help=f"bits for {kind} layers (0 keeps them unquantized)"
        )
    parser.add_argument("--seed", type=int, help="rotation seed")
    parser.add_argument("--scale-method", help="group scales: lsq (default) or rms")
    parser.add_argument(
        "--use-qjl",
        action="store_true",
        default=None,
        help="add a 1-bit QJL sketch of each layer's residual (+1 + 16/group-size bits)",
    )


def recipe_from_args(args):
    """The QuantRecipe the flags ask for; bad values raise CommandError naming the flag."""
    from tq_core import preset

    overrides = {f: getattr(args, f, None) for f in RECIPE_FLAGS}
    try:
        return preset(args.preset, **overrides)
    except ValueError as e:
        raise CommandError(_flag_message(str(e))) from None


def _flag_message(message: str) -> str:
    """'attn_bits must be one of ...' -> '--attn-bits must be one of ...'."""
    first, _, rest = message.partition(" ")
    if first in RECIPE_FLAGS or first == "preset":
        return f"--{first.replace('_', '-')} {rest}"
    return message


def is_local_path(text: str) -> bool:
    """True for what can only be a local path (not a Hugging Face ``owner/name`` id)."""
    return Path(text).expanduser().exists() or not _HF_ID.fullmatch(text)


def check_source(src: str) -> None:
    """Clear errors for sources that cannot be converted, before anything is loaded."""
    from .default_model import is_tq_checkpoint

    path = Path(src).expanduser()
    if not path.exists():
        if is_local_path(src):
            raise CommandError(f"{src}: no such model directory")
        return  # a Hugging Face id: tq_core downloads it (or says why not)
    if not path.is_dir():
        raise CommandError(f"{src}: not a directory (give a Hugging Face model directory)")
    if not (path / "config.json").exists():
        raise CommandError(f"{src}: no config.json; expected a Hugging Face model directory")
    if is_tq_checkpoint(path):
        raise CommandError(
            f"{src} is already a TurboQuant checkpoint; convert the float original instead"
        )


def checkpoint_stats(path: str | Path) -> dict:
    """Layers quantized, bytes on disk and bits per weight of a TurboQuant checkpoint, read
    from config.json and the safetensors headers (no tensor is loaded).

    ``bits_per_weight`` = bytes stored for the quantized layers (codes, group scales, rotation
    signs; not biases) * 8 / number of weights of those layers.
    """
    path = Path(path)
    layers = json.loads((path / "config.json").read_text())["quantization"]["layers"]
    headers = {}
    for shard in sorted(path.glob("*.safetensors")):
        headers.update(_safetensors_header(shard))
    q_bytes = q_weights = 0
    for name, spec in layers.items():
        for key in (
            k
            for k in headers
            if k.startswith(name + ".")
            and k.count(".") == name.count(".") + 1
            and not k.endswith(".bias")
        ):
            start, end = headers[key]["data_offsets"]
            q_bytes += end - start
        scales = headers.get(f"{name}.scales")
        if scales is not None:
            q_weights += _prod(scales["shape"]) * spec["group_size"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    by_bits: dict[int, int] = {}
    for spec in layers.values():
        by_bits[spec["bits"]] = by_bits.get(spec["bits"], 0) + 1
    return {
        "layers": len(layers),
        "layers_by_bits": dict(sorted(by_bits.items())),
        "bytes_on_disk": size,
        "quantized_weights": q_weights,
        "quantized_bytes": q_bytes,
        "bits_per_weight": q_bytes * 8 / q_weights if q_weights else None,
    }


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _safetensors_header(file: Path) -> dict:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def run(args) -> int:
    recipe = recipe_from_args(args)
    src, out = args.model, Path(args.out).expanduser()
    check_source(src)
    if Path(src).expanduser().exists() and out.resolve() == Path(src).expanduser().resolve():
        raise CommandError("--out must differ from --model (the source would be replaced)")
    if out.exists() and not args.force:
        raise CommandError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out} exists and is not a directory")

    from tq_core.lm import convert

    print(
        f"converting {src} -> {out} (preset {args.preset}: bits {recipe.bits}, group size "
        f"{recipe.group_size}, scales {recipe.scale_method}, seed {recipe.seed}"
        f"{', QJL residual' if recipe.use_qjl else ''})",
        file=sys.stderr,
    )
    start = time.perf_counter()
    try:
        convert(src, out, recipe, overwrite=args.force, progress=True)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise CommandError(str(e)) from None
    seconds = time.perf_counter() - start
    stats = checkpoint_stats(out)
    mix = ", ".join(f"{n} at {b} bits" for b, n in stats["layers_by_bits"].items())
    bpw = stats["bits_per_weight"]
    print(f"wrote {out} in {seconds:.1f} s")
    print(f"  layers quantized: {stats['layers']} ({mix})")
    print(f"  size on disk:     {human_bytes(stats['bytes_on_disk'])}")
    if bpw is not None:
        print(
            f"  bits per weight:  {bpw:.3f} (quantized layers: "
            f"{stats['quantized_weights'] / 1e6:.1f}M weights in "
            f"{human_bytes(stats['quantized_bytes'])})"
        )
    return 0
