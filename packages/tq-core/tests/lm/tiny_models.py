"""Tiny random mlx-lm models, one per architecture, for the end-to-end convert/load tests.

Each spec is an mlx-lm config (what ``mlx_lm.utils.load_model`` reads from config.json) small
enough to quantize in a fraction of a second: hidden size 64, 2-4 layers, 4 experts with top-2
routing, vocabulary 256, every matmul input size a multiple of 32 (so group size 32 quantizes
every weight). ``save_hf`` writes the model the way its Hugging Face checkpoint would store it
where the architecture's ``sanitize`` rewrites weights (per-expert MoE tensors, fused
``kv_b_proj``, torch conv layout, Qwen3-Next "norm - 1" weights, GPT-OSS MXFP4 blocks), so the
conversion also goes through mlx-lm's loading code.

Loaded by the tests with importlib (pytest runs with ``--import-mode=importlib``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

VOCAB = 256
HIDDEN = 64


@dataclass(frozen=True)
class Spec:
    name: str
    config: dict
    #: mlx-lm module the config must resolve to (through MODEL_REMAPPING for "mistral").
    module: str
    moe: bool = False
    #: regexes for the modules that must stay unquantized (routers, gates).
    kept: tuple[str, ...] = ()
    #: mlx-format weights -> the checkpoint layout that ``Model.sanitize`` turns back.
    to_hf: Callable[[dict, dict], dict] | None = None
    #: extra config.json fields that only the saved checkpoint carries.
    extra_config: dict = field(default_factory=dict)
    #: post-processing of the freshly built float model (GPT-OSS MXFP4 experts).
    post_build: Callable[[nn.Module], None] | None = None


# ---------------------------------------------------------------- checkpoint layouts


def _load_sibling(module: str, name: str):
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(module))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


_layouts = _load_sibling("hf_layouts.py", "tq_core_tests_lm_hf_layouts")
_unstack_experts = _layouts._unstack_experts
_deepseek_v3_to_hf = _layouts._deepseek_v3_to_hf
_conv_to_torch = _layouts._conv_to_torch
_nemotron_h_to_hf = _layouts._nemotron_h_to_hf
_minus_one_norms = _layouts._minus_one_norms
_qwen3_next_to_hf = _layouts._qwen3_next_to_hf
_qwen3_5_to_hf = _layouts._qwen3_5_to_hf
_gpt_oss_mxfp4_to_hf = _layouts._gpt_oss_mxfp4_to_hf
_mxfp4_round_trip_experts = _layouts._mxfp4_round_trip_experts
_switch_glu_unstack = _layouts._switch_glu_unstack
_QWEN_NEXT_NORMS = _layouts._QWEN_NEXT_NORMS


# ---------------------------------------------------------------- configs

_ATTN = dict(
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
    max_position_embeddings=512,
)

_LLAMA = dict(
    model_type="llama",
    num_hidden_layers=2,
    intermediate_size=128,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    **_ATTN,
)

_DEEPSEEK = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=4,
    routed_scaling_factor=1.0,
    kv_lora_rank=32,
    q_lora_rank=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    qk_nope_head_dim=32,
    num_experts_per_tok=2,
    moe_layer_freq=1,
    first_k_dense_replace=1,  # layer 0 dense MLP, layer 1 MoE
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)

_QWEN_LINEAR = dict(
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=32,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    full_attention_interval=2,  # layer 0 gated delta net, layer 1 full attention
    head_dim=16,
)

SPECS: dict[str, Spec] = {}


def _add(spec: Spec) -> None:
    SPECS[spec.name] = spec


_add(Spec("llama", dict(_LLAMA), "llama"))
_add(Spec("mistral", dict(_LLAMA, model_type="mistral", sliding_window=None), "llama"))
_add(Spec("qwen2", dict(_LLAMA, model_type="qwen2", tie_word_embeddings=True), "qwen2"))
_add(
    Spec(
        "qwen3",
        dict(_LLAMA, model_type="qwen3", head_dim=32, tie_word_embeddings=True, rope_theta=1e6),
        "qwen3",
    )
)
_add(
    Spec(
        "qwen2_moe",
        dict(
            _LLAMA,
            model_type="qwen2_moe",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
        ),
        "qwen2_moe",
        moe=True,
        kept=(r"\.mlp\.gate$", r"\.mlp\.shared_expert_gate$"),
        to_hf=_switch_glu_unstack,
    )
)
_add(
    Spec(
        "qwen3_moe",
        dict(
            _LLAMA,
            model_type="qwen3_moe",
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[0],  # layer 0 dense MLP, layer 1 MoE
            moe_intermediate_size=64,
            norm_topk_prob=True,
        ),
        "qwen3_moe",
        moe=True,
        kept=(r"\.mlp\.gate$",),
        to_hf=_switch_glu_unstack,
    )
)
_GPT_OSS = dict(
    model_type="gpt_oss",
    num_hidden_layers=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    vocab_size=VOCAB,
    rms_norm_eps=1e-5,
    hidden_size=HIDDEN,
    intermediate_size=64,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=4,  # shorter than the test prompts: the window mask matters
    rope_theta=150000,
    layer_types=["sliding_attention", "full_attention"],
)
_add(Spec("gpt_oss", _GPT_OSS, "gpt_oss", moe=True, kept=(r"\.mlp\.router$",)))
_add(
    Spec(
        "gpt_oss_mxfp4",
        _GPT_OSS,
        "gpt_oss",
        moe=True,
        kept=(r"\.mlp\.router$",),
        to_hf=_gpt_oss_mxfp4_to_hf,
        extra_config={"quantization_config": {"quant_method": "mxfp4"}},
        post_build=_mxfp4_round_trip_experts,
    )
)
_add(
    Spec(
        "deepseek_v2",
        dict(
            _DEEPSEEK,
            model_type="deepseek_v2",
            topk_method="greedy",
            rope_scaling={"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512},
        ),
        "deepseek_v2",
        moe=True,
        # the router is MoEGate (a bare weight, no nn.Linear): never a quantization candidate
        kept=(r"\.mlp\.gate$",),
        to_hf=_switch_glu_unstack,
    )
)
_add(
    Spec(
        "deepseek_v3",
        dict(_DEEPSEEK, model_type="deepseek_v3", n_group=1, topk_group=1, norm_topk_prob=True),
        "deepseek_v3",
        moe=True,
        # MoEGate, and MLA's per-head MultiLinear absorbed projections (not nn.Linear)
        kept=(r"\.mlp\.gate$", r"\.self_attn\.embed_q$", r"\.self_attn\.unembed_out$"),
        to_hf=_deepseek_v3_to_hf,
    )
)
_add(
    Spec(
        "nemotron_h",
        dict(
            model_type="nemotron_h",
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=128,
            max_position_embeddings=512,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            attention_bias=False,
            mamba_num_heads=4,
            mamba_head_dim=16,
            mamba_proj_bias=False,
            ssm_state_size=16,
            conv_kernel=4,
            n_groups=2,
            mlp_bias=False,
            layer_norm_epsilon=1e-5,
            use_bias=False,
            use_conv_bias=True,
            hybrid_override_pattern=["M", "*", "-", "E"],  # mamba2, attention, MLP, MoE
            moe_intermediate_size=64,
            moe_shared_expert_intermediate_size=64,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
        ),
        "nemotron_h",
        moe=True,
        kept=(r"\.mixer\.gate$",),
        to_hf=_nemotron_h_to_hf,
    )
)
_add(
    Spec(
        "qwen3_next",
        dict(
            _LLAMA,
            model_type="qwen3_next",
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            shared_expert_intermediate_size=64,
            mlp_only_layers=[],
            moe_intermediate_size=32,
            rope_theta=1e6,
            partial_rotary_factor=0.25,
            norm_topk_prob=True,
            **_QWEN_LINEAR,
        ),
        "qwen3_next",
        moe=True,
        kept=(r"\.mlp\.gate$", r"\.mlp\.shared_expert_gate$"),
        to_hf=_qwen3_next_to_hf,
    )
)
_add(
    Spec(
        "qwen3_5",
        dict(
            model_type="qwen3_5",
            tie_word_embeddings=True,
            text_config=dict(
                _ATTN,
                model_type="qwen3_5_text",
                num_hidden_layers=2,
                intermediate_size=128,
                tie_word_embeddings=True,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 1e6,
                    "partial_rotary_factor": 0.25,
                    "mrope_section": [1, 1, 0],
                },
                **_QWEN_LINEAR,
            ),
        ),
        "qwen3_5",
        to_hf=_qwen3_5_to_hf,
    )
)


# ---------------------------------------------------------------- building and saving


def model_classes(config: dict):
    from mlx_lm.utils import _get_classes

    return _get_classes(copy.deepcopy(config))


def _randomize_constants(model: nn.Module, seed: int) -> None:
    """Give random values to parameters that mlx-lm initializes to a constant (biases,
    MoEGate / router weights, attention sinks, dt_bias, D, score-correction biases), so no
    part of the forward pass is trivially zero or tied. Norm weights stay at one."""
    key = mx.random.key(seed + 1000)
    updates = []
    for name, p in tree_flatten(model.parameters()):
        if "norm" in name or p.size < 2 or not mx.issubdtype(p.dtype, mx.floating):
            continue
        if (p.max() == p.min()).item():
            key, sub = mx.random.split(key)
            scale = p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5
            updates.append((name, mx.random.uniform(-scale, scale, p.shape, key=sub)))
    model.update(tree_unflatten(updates))


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """The tiny float32 model of ``name`` (deterministic in ``seed``) and its config."""
    spec = SPECS[name]
    config = copy.deepcopy(spec.config)
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(copy.deepcopy(config)))
    _randomize_constants(model, seed)
    model.set_dtype(mx.float32)
    if spec.post_build is not None:
        spec.post_build(model)
    model.eval()
    mx.eval(model.parameters())
    return model, config


def save_hf(model: nn.Module, name: str, path: Path) -> Path:
    """Write ``model`` as a Hugging Face-style directory: config.json + model.safetensors."""
    spec = SPECS[name]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(copy.deepcopy(spec.config), **copy.deepcopy(spec.extra_config))
    weights = dict(tree_flatten(model.parameters()))
    if spec.to_hf is not None:
        weights = spec.to_hf(weights, spec.config)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
