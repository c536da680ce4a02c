"""Shared builders for the tq-cli tests: a tiny llama with a word-level tokenizer, text,
and the helpers that run `tq` and check one-line errors. Everything is built in the test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tq_cli import main

# --------------------------------------------------------------------------- tiny llama

SPECIALS = ["<unk>", "<s>", "</s>"]
ROLES = ["<|user|>", "<|assistant|>", "<|system|>"]
COMMON = (
    "hi hello the a of and to in is it that was for on are as with his they at be this from "
    "have or by one had not but what all were when we there can an your which their said if "
    "do will each about how up out them then she many some so these would other into has more "
    "her two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after"
).split()
VOCAB = 256
WORDS = COMMON + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(ROLES) - len(COMMON))]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
LLAMA = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
#: Quantized leaves of the tiny llama: 7 linears per layer, the embedding and the head.
TINY_LAYERS = 2 * 7 + 2


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer (tokenizer.json + tokenizer_config.json) mlx-lm can load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + ROLES + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def write_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A random float32 llama saved as a Hugging Face-style directory."""
    from mlx_lm.models import llama

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(LLAMA))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(LLAMA))
    write_tokenizer(out)
    return out


def write_text(path: Path, words: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return path


# --------------------------------------------------------------------------- fixtures


def run_tq(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``tq argv``."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, prefix):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- the tokenizer
