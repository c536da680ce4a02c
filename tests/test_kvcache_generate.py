"""mlx_lm.generate / stream_generate with a TurboQuant cache on a tiny mlx-lm model built in
code, and a prompt-cache save/load round trip that continues generation identically."""

import importlib.util
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import generate, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from tq_kvcache import (
    TurboQuantKVCache,
    load_prompt_cache,
    make_turboquant_cache,
    save_prompt_cache,
)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "tq_kvcache_tiny_lm", ROOT / "packages/tq-kvcache/tests/tiny_lm.py"
)
tiny_lm = sys.modules.setdefault("tq_kvcache_tiny_lm", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(tiny_lm)


def _tokenizer():
    """A word-level tokenizer over ``w2 .. w127``, built in code (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, tiny_lm.VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


PROMPT = " ".join(f"w{(i * 37) % 126 + 2}" for i in range(300))


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_generate_with_turboquant_cache(name):
    model, tokenizer = tiny_lm.build(name), _tokenizer()
    cache = make_turboquant_cache(model, k_bits=8, v_bits=8, sink_tokens=8, buffer=8)
    text = generate(model, tokenizer, PROMPT, max_tokens=12, prompt_cache=cache)
    fp_text = generate(
        model, tokenizer, PROMPT, max_tokens=12, prompt_cache=make_prompt_cache(model)
    )
    assert len(text.split()) == 12
    full = [c for c in cache if type(c) is TurboQuantKVCache][0]
    # mlx-lm computes one step ahead: the last generated token may already be in the cache
    assert full.offset - 300 in (11, 12) and full.packed_codes()[0]
    assert full.nbytes < full.dense_nbytes()
    # 8-bit keys and values: greedy tokens follow the fp16 cache for the first steps
    assert text.split()[:4] == fp_text.split()[:4]


def test_prompt_cache_round_trip_continues_identically(tmp_path):
    model, tokenizer = tiny_lm.build("qwen3"), _tokenizer()
    knobs = dict(k_bits=3, v_bits=2, sink_tokens=4, buffer=4, flush_batch=4)
    cache = make_turboquant_cache(model, **knobs)
    for _ in stream_generate(model, tokenizer, PROMPT, max_tokens=1, prompt_cache=cache):
        pass
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, cache, {"note": "tiny"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta["note"] == "tiny"
    follow = "w5 w6 w7"
    a = generate(model, tokenizer, follow, max_tokens=10, prompt_cache=cache)
    b = generate(model, tokenizer, follow, max_tokens=10, prompt_cache=loaded)
    assert a == b and len(a.split()) == 10
    mx.eval([c.state for c in loaded])


def test_chunked_prefill_evaluates_per_layer_and_generates_the_same(monkeypatch):
    """mlx_lm.generate prefilling 300 tokens in chunks of 64: each chunk after the first
    evaluates every TurboQuant layer inside update_and_fetch (tq_kvcache.cache.PREFILL_EVAL),
    and the text is the same as with the evaluation off."""
    from tq_kvcache import cache as cache_module

    model, tokenizer = tiny_lm.build("llama"), _tokenizer()
    knobs = dict(k_bits=4, v_bits=3, sink_tokens=8, buffer=8, flush_batch=8)
    evals = []
    real_eval = mx.eval
    monkeypatch.setattr(
        cache_module, "_eval_outside_transforms", lambda *a: evals.append(1) or real_eval(*a)
    )
    texts = []
    for on in (True, False):
        monkeypatch.setattr(cache_module, "PREFILL_EVAL", on)
        cache = make_turboquant_cache(model, **knobs)
        layers = sum(isinstance(c, TurboQuantKVCache) for c in cache)
        before = len(evals)
        texts.append(
            generate(
                model, tokenizer, PROMPT, max_tokens=8, prompt_cache=cache, prefill_step_size=64
            )
        )
        # chunks 2..4 of 64 (the 5th holds 43 tokens: also a prefill chunk) evaluate per layer
        assert len(evals) - before == (4 * layers if on else 0)
    assert texts[0] == texts[1] and len(texts[0].split()) == 8
