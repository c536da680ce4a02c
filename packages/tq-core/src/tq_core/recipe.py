"""Which layers get which TurboQuant bits: layer kinds, mixed-precision recipes, presets."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

import mlx.nn as nn

from ._checks import check_choice
from .weights import GROUP_SIZES, SCALE_METHODS, WEIGHT_BITS

LAYER_KINDS = ("attn", "mlp", "expert", "embed", "head", "other")
#: Modules never quantized: MoE routers and small gates (their errors flip expert choices).
DEFAULT_KEEP = (r"(^|\.)router(\.|$)", r"(^|\.)gate$", r"shared_expert_gate$", r"(^|\.)gate\.")


@dataclass(frozen=True)
class QuantRecipe:
    """Bits per layer kind. ``None`` for a kind's bits means: use ``bits``; ``0`` means keep
    that kind unquantized. Routers, gates and norms are always kept (``keep`` patterns)."""

    bits: int = 4
    group_size: int = 64
    attn_bits: int | None = None
    mlp_bits: int | None = None
    expert_bits: int | None = None
    embed_bits: int | None = None
    head_bits: int | None = None
    seed: int = 0
    span: int | None = None
    scale_method: str = "lsq"
    #: Add a 1-bit QJL sketch of each quantized layer's residual (+1 + 16/group_size bits).
    use_qjl: bool = False
    keep: tuple[str, ...] = field(default=DEFAULT_KEEP)
    #: (regex, bits) pairs matched against module paths before the kind rules; 0 keeps.
    overrides: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        check_choice("bits", self.bits, WEIGHT_BITS)
        if not isinstance(self.use_qjl, bool):
            raise TypeError(f"use_qjl must be True or False, got {self.use_qjl!r}")
        check_choice("group_size", self.group_size, GROUP_SIZES)
        check_choice("scale_method", self.scale_method, SCALE_METHODS)
        for kind in ("attn", "mlp", "expert", "embed", "head"):
            value = getattr(self, f"{kind}_bits")
            if value is not None:
                check_choice(f"{kind}_bits", value, (0, *WEIGHT_BITS))
        for pattern, bits in self.overrides:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"override pattern {pattern!r} is not a valid regex: {e}"
                ) from None
            check_choice(f"bits for {pattern!r}", bits, (0, *WEIGHT_BITS))

    def bits_for(self, kind: str, path: str = "") -> int:
        """Bits for a layer of this kind at this path (0 = keep unquantized)."""
        for pattern, bits in self.overrides:
            if re.search(pattern, path):
                return bits
        value = getattr(self, f"{kind}_bits", None)
        return self.bits if value is None else value

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep"] = list(self.keep)
        d["overrides"] = [list(o) for o in self.overrides]
        return d


#: Value projections read the attention-sink / massive-activation channels, where a 3-bit
#: rotated code costs far more output error than elsewhere (docs/weights.md): measured on
#: SmolLM2-135M, 4-bit v_proj in a 3-bit model takes WikiText-2 perplexity from 167 to 108
#: (mean of 3 seeds) for +0.025 bits per weight.
_V_PROJ_4BIT = ((r"(^|\.)v_proj$", 4),)

PRESETS = {
    "tq4": QuantRecipe(bits=4),
    "tq3": QuantRecipe(bits=3, overrides=_V_PROJ_4BIT),
    "tq2": QuantRecipe(bits=2, overrides=_V_PROJ_4BIT),
    "tq3a-tq2e": QuantRecipe(bits=3, expert_bits=2, overrides=_V_PROJ_4BIT),
}


def preset(name: str, **overrides) -> QuantRecipe:
    """A named recipe, with fields overridden (``None`` overrides are ignored)."""
    check_choice("preset", name, tuple(PRESETS))
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


_ATTN = re.compile(r"(attn|attention|self_attn|cross_attn)")
_MLP = re.compile(r"(mlp|feed_forward|ffn|shared_expert|experts)")
# Leaf names that say the kind where the path does not (nemotron_h's `mixer.q_proj`).
_ATTN_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "wq", "wk", "wv", "wo",
                "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}  # fmt: skip
_MLP_LEAVES = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3",
               "gate_up_proj"}  # fmt: skip


def layer_kind(path: str, module: nn.Module) -> str | None:
    """The kind of a quantizable leaf module, or None when it is not quantizable."""
    name = type(module).__name__
    if isinstance(module, nn.Embedding):
        return "embed"
    if name == "SwitchLinear":
        return "expert"
    if not isinstance(module, nn.Linear):
        return None
    if path == "lm_head" or path.endswith(".lm_head"):
        return "head"
    if _ATTN.search(path):
        return "attn"
    if _MLP.search(path):
        return "mlp"
    leaf = path.rsplit(".", 1)[-1]
    if leaf in _ATTN_LEAVES:
        return "attn"
    if leaf in _MLP_LEAVES:
        return "mlp"
    return "other"


def is_kept(path: str, recipe: QuantRecipe) -> bool:
    return any(re.search(pattern, path) for pattern in recipe.keep)
