"""End to end over mlx-lm architectures: a tiny random model per architecture is saved as a
Hugging Face-style directory, converted with ``tq_core.lm.convert``, loaded back with
``tq_core.lm.load``, and checked against

(a) the same model quantized in memory (``quantize_model``): identical codes, equal logits;
(b) a float model holding the dequantized weights: the TurboQuant forward is that math;
(c) the float source: bounded logit error;
(d) which layers were quantized (experts, embeddings, heads) and which not (routers, gates);
(e) greedy generation with a prompt cache: the same tokens from the loaded and in-memory
    models, and cached decoding equal to a full forward pass.

The tiny models (tiny_models.py) are float32, hidden size 64, 4 experts with top-2 routing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.models.switch_layers import SwitchLinear  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402
from tq_core import (  # noqa: E402
    QuantRecipe,
    TurboQuantEmbedding,
    TurboQuantLinear,
    TurboQuantSwitchLinear,
    dequantize_weight,
    plan_layers,
    preset,
    quantize_model,
)
from tq_core.lm import convert, load  # noqa: E402

convert_module = importlib.import_module("tq_core.lm.convert")  # the module, not the function

# float32 matmuls are exact to ~1e-6 on the CPU; a GPU may round them through TF32 (~1e-3).
TOL = 1e-5 if mx.default_device() == mx.cpu else 1e-3


def _import_tiny_models():
    name = "tq_core_tests_lm_tiny_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("tiny_models.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


tm = _import_tiny_models()

TQ_TYPES = (TurboQuantLinear, TurboQuantSwitchLinear, TurboQuantEmbedding)
GS = 32
RECIPES = {
    "4bit": QuantRecipe(bits=4, group_size=GS),
    "tq3a-tq2e": preset("tq3a-tq2e", group_size=GS),
}
#: Relative logit error ||q - f|| / ||f|| against the float source on the test batch (2 x 16
#: tokens), measured with seed 0, MLX 0.32 / mlx-lm 0.32.2 on the CPU. Per-layer 4-bit
#: Lloyd-Max error is ~0.1 relative RMS; through embedding, 2-4 blocks and head it compounds
#: to 0.2-0.35 on these random models. For scale, mlx-lm's affine 4-bit (group 32, scale and
#: bias per group, 5 bits/weight against TurboQuant's 4.5) measures 0.18 / 0.21 / 0.28 on
#: llama / qwen3 / qwen3_next, its uniform grid suiting the uniform random init. The test
#: allows 1.5x the measured value.
MEASURED_REL_ERR = {
    "4bit": {
        "llama": 0.249, "mistral": 0.249, "qwen2": 0.244, "qwen3": 0.246, "qwen2_moe": 0.215,
        "qwen3_moe": 0.286, "gpt_oss": 0.261, "gpt_oss_mxfp4": 0.265, "deepseek_v2": 0.257,
        "deepseek_v3": 0.245, "nemotron_h": 0.276, "qwen3_next": 0.332, "qwen3_5": 0.252,
    },
    "tq3a-tq2e": {  # 3-bit attention/MLP/embedding/head, 2-bit experts
        "qwen2_moe": 0.441, "qwen3_moe": 0.520, "gpt_oss": 0.594, "gpt_oss_mxfp4": 0.582,
        "deepseek_v2": 0.493, "deepseek_v3": 0.479, "nemotron_h": 0.476, "qwen3_next": 0.623,
    },
}  # fmt: skip
MARGIN = 1.5

CASES = [(arch, "4bit") for arch in tm.SPECS] + [
    (arch, "tq3a-tq2e") for arch, spec in tm.SPECS.items() if spec.moe
]


def _arch_available(arch: str) -> None:
    """Skip (with the reason) when this mlx-lm lacks the architecture or cannot build it."""
    spec = tm.SPECS[arch]
    try:
        model_class, _ = tm.model_classes(spec.config)
    except (ValueError, ImportError) as e:
        pytest.skip(f"mlx-lm has no {spec.config['model_type']!r} architecture: {e}")
    module = model_class.__module__.rsplit(".", 1)[-1]
    assert module == spec.module, f"{arch} maps to mlx_lm.models.{module}, not {spec.module}"


def _tokens() -> mx.array:
    # 2 x 16 tokens x top-2 = 64 (token, expert) pairs: SwitchGLU sorts them (its prefill path);
    # the 16-token greedy prompt (32 pairs) and single-token decoding take the unsorted paths.
    return mx.random.randint(0, tm.VOCAB, (2, 16), key=mx.random.key(7))


def _rel(a: mx.array, b: mx.array) -> float:
    """||a - b|| / ||b||."""
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


def _leaves(model: nn.Module) -> dict[str, nn.Module]:
    return dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))


@cache
def _source(arch: str, root: str):
    """(source dir, float logits) of ``arch``; the saved directory reloads through mlx-lm to
    the in-memory model's logits (the fixture's own sanity check)."""
    model, _ = tm.build(arch)
    src = tm.save_hf(model, arch, Path(root) / f"{arch}-hf")
    logits = model(_tokens())
    reloaded, _ = load_model(src)
    reloaded.eval()
    # Bit-exact except for the MXFP4 source, read back as quantized experts (gather_qmm).
    assert mx.allclose(reloaded(_tokens()), logits, atol=TOL, rtol=TOL).item(), arch
    mx.eval(logits)
    return src, logits


@cache
def _converted(arch: str, recipe_name: str, root: str):
    """(loaded TQ model, in-memory TQ model, plan, source dir, output dir)."""
    recipe = RECIPES[recipe_name]
    src, _ = _source(arch, root)
    out = convert(src, Path(root) / f"{arch}-{recipe_name}-tq", recipe, progress=False)
    loaded, tokenizer = load(out, tokenizer=False)
    assert tokenizer is None
    memory, _ = tm.build(arch)
    plan = quantize_model(memory, recipe)
    memory.eval()
    return loaded, memory, plan, src, out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("archs"))


@pytest.fixture(params=CASES, ids=[f"{a}-{r}" for a, r in CASES])
def case(request, root):
    arch, recipe_name = request.param
    _arch_available(arch)
    return arch, recipe_name, _converted(arch, recipe_name, root)


@pytest.mark.parametrize("arch", list(tm.SPECS))
def test_source_checkpoint_reloads(arch, root):
    """The fixture itself: the saved directory is in the checkpoint layout (per-expert
    tensors etc., where ``sanitize`` rewrites them) and mlx-lm reads it back to the same
    logits (asserted in ``_source``)."""
    _arch_available(arch)
    src, logits = _source(arch, root)
    model, _ = tm.build(arch)
    saved = set(mx.load(str(src / "model.safetensors")))
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert (saved != names) == (tm.SPECS[arch].to_hf is not None)
    assert logits.shape == (*_tokens().shape, tm.VOCAB)


def test_mistral_maps_to_llama():
    from mlx_lm.utils import MODEL_REMAPPING

    assert MODEL_REMAPPING.get("mistral") == "llama"


def test_loaded_equals_in_memory(case):
    """(a) Same seed, same codes: the checkpoint round trip changes nothing."""
    arch, _, (loaded, memory, plan, _, out) = case
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["layers"] == json.loads(json.dumps(plan))
    assert "quantization_config" not in config  # an MXFP4 source is dequantized, then coded
    lq, mq = _leaves(loaded), _leaves(memory)
    for path in plan:
        assert isinstance(lq[path], TQ_TYPES), path
        assert mx.array_equal(lq[path].indices, mq[path].indices).item(), path
        assert mx.array_equal(lq[path].scales, mq[path].scales).item(), path
        assert mx.array_equal(lq[path].signs, mq[path].signs).item(), path
    tokens = _tokens()
    a, b = loaded(tokens), memory(tokens)
    assert a.dtype == mx.float32
    assert mx.allclose(a, b, atol=TOL * mx.abs(b).max().item(), rtol=0).item(), arch


def test_tq_forward_is_dequantized_math(case):
    """(b) Float layers holding the dequantized weights give the TurboQuant model's logits."""
    arch, _, (loaded, _, plan, _, _) = case
    reference, _ = tm.build(arch)
    ref_leaves, tq_leaves = _leaves(reference), _leaves(loaded)
    for path in plan:
        float_layer, tq = ref_leaves[path], tq_leaves[path]
        w = dequantize_weight(tq.codes(), tq.rotation())
        assert w.shape == float_layer.weight.shape, path
        float_layer.weight = w
    tokens = _tokens()
    a, b = loaded(tokens), reference(tokens)
    assert mx.allclose(a, b, atol=10 * TOL * mx.abs(b).max().item(), rtol=0).item(), (
        arch,
        mx.abs(a - b).max().item(),
    )


def test_error_against_float_source(case, root):
    """(c) Quantized logits stay near the float model's."""
    arch, recipe_name, (loaded, *_) = case
    _, float_logits = _source(arch, root)
    rel = _rel(loaded(_tokens()), float_logits)
    print(f"\n{arch} {recipe_name}: relative logit error {rel:.3f}")
    assert 0 < rel < MARGIN * MEASURED_REL_ERR[recipe_name][arch], (arch, recipe_name, rel)


def test_quantized_layer_kinds(case):
    """(d) Experts, embeddings, heads and projections are TurboQuant layers with the recipe's
    bits; routers and gates (and only they) stay float."""
    arch, recipe_name, (loaded, _, plan, src, _) = case
    spec, recipe = tm.SPECS[arch], RECIPES[recipe_name]
    source, _ = load_model(src, lazy=True)
    if "quantization_config" in spec.extra_config:  # MXFP4 source: convert dequantizes it
        from mlx_lm.utils import dequantize_model

        dequantize_model(source)
    assert plan == plan_layers(source, recipe)
    before, after = _leaves(source), _leaves(loaded)
    assert set(before) == set(after)
    kinds = {"expert": 0, "embed": 0, "head": 0}
    kept = []
    for path, old in before.items():
        new = after[path]
        if isinstance(old, SwitchLinear):
            assert isinstance(new, TurboQuantSwitchLinear), path
            assert new.bits == recipe.bits_for("expert") and new.group_size == GS, path
            assert new.num_experts == old.num_experts and new.output_dims == old.output_dims
            assert ("bias" in new) == ("bias" in old), path
            kinds["expert"] += 1
        elif isinstance(old, nn.Embedding):
            assert isinstance(new, TurboQuantEmbedding), path
            kinds["embed"] += 1
        elif isinstance(old, nn.Linear):
            if isinstance(new, TurboQuantLinear):
                assert ("bias" in new) == ("bias" in old), path
                kinds["head"] += path.endswith("lm_head")
            else:
                assert type(new) is type(old), path
                kept.append(path)
        elif type(old).__name__ in ("MoEGate", "MultiLinear"):
            assert type(new) is type(old), path
            kept.append(path)
    assert kinds["embed"] == 1
    tied = not any(p.endswith("lm_head") for p in before)
    assert kinds["head"] == (0 if tied else 1)
    assert (kinds["expert"] > 0) == spec.moe
    # exactly the routers/gates stay float: nothing else was skipped
    assert all(any(re.search(k, p) for k in spec.kept) for p in kept), kept
    for pattern in spec.kept:
        assert any(re.search(pattern, p) for p in kept), pattern


def _greedy(model, prompt: mx.array, steps: int):
    """Greedy tokens with a prompt cache, and the logits each step chose from."""
    cache = make_prompt_cache(model)
    logits = model(prompt[None], cache=cache)[0, -1]
    tokens, step_logits = [], []
    for _ in range(steps):
        step_logits.append(logits)
        tokens.append(mx.argmax(logits).item())
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]
    return tokens, mx.stack(step_logits)


def test_greedy_generation(case):
    """(e) Cached greedy decoding: loaded == in-memory, and equal to full forward passes."""
    arch, _, (loaded, memory, *_) = case
    prompt = _tokens()[0]
    steps = 5
    tokens, step_logits = _greedy(loaded, prompt, steps)
    assert _greedy(memory, prompt, steps)[0] == tokens
    via_mlx_lm = [
        t.item() if isinstance(t, mx.array) else t
        for t, _ in generate_step(prompt, loaded, max_tokens=steps)
    ]
    assert via_mlx_lm == tokens
    # Decoding with the cache (single-token steps: gathered experts, KV/SSM caches, MLA's
    # absorbed path) matches one forward pass over the whole sequence.
    full = loaded(mx.concatenate([prompt, mx.array(tokens[:-1])])[None])[0, len(prompt) - 1 :]
    err = mx.abs(full - step_logits).max().item()
    assert err < 10 * TOL * mx.abs(full).max().item(), (arch, err)


# ------------------------------------------------------------------ streaming conversion


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory) -> Path:
    model, _ = tm.build("llama")
    return tm.save_hf(model, "llama", tmp_path_factory.mktemp("src") / "llama-hf")


def test_small_shards_give_the_same_model(llama_source, tmp_path):
    recipe = QuantRecipe(bits=3, group_size=32)
    one = convert(llama_source, tmp_path / "one", recipe, progress=False)
    many = convert(llama_source, tmp_path / "many", recipe, progress=False, max_shard_bytes=4_000)
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(shards) > 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert len(list(one.glob("*.safetensors"))) == 1
    tokens = mx.array([[1, 2, 3, 4, 5]])
    a, _ = load(one, tokenizer=False)
    b, _ = load(many, tokenizer=False)
    assert mx.array_equal(a(tokens), b(tokens)).item()


def test_failure_mid_conversion_leaves_nothing(llama_source, tmp_path, monkeypatch):
    real = convert_module.quantize_layer
    calls = []

    def flaky(module, spec, scale_method):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(module, spec, scale_method)

    monkeypatch.setattr(convert_module, "quantize_layer", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(llama_source, tmp_path / "out", QuantRecipe(bits=4), progress=False,
                max_shard_bytes=4_000)  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory
