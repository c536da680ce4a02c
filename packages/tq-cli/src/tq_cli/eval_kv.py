"""`tq eval kv`: TurboQuant KV cache fidelity against mlx-lm's dense cache on text windows.

Each window is run twice through the model per setting, with the same schedule: the first
``prefix`` tokens in one prefill call (as mlx-lm prefills a prompt: attention on fp16 within
it), then the rest ``chunk`` tokens at a time, scoring every chunk's next-token predictions.
The cache flushes in batches of ``chunk`` (its ``flush_batch``), so a scored token attends to
exactly what a decode step at its position would: fp16 sinks, packed codes, and the most
recent ``buffer`` + 1..chunk tokens in fp16.

Per attention layer the dense run's own keys, values and queries are then replayed through a
fresh cache of each setting on the same schedule: reconstruction cosine of the packed keys and
values against the expectation from the sphere codebook (``sqrt(1 - D_b)`` for mse), and the
cosine of the attention output computed straight from the codes against the dense output.

The module also holds what the kv evaluations share (settings, model loading, caches, greedy
decoding); ``tq eval niah`` and ``tq eval jsonl`` import it.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .main import CommandError

__all__ = [
    "DEFAULT_SETTINGS",
    "Setting",
    "add_arguments",
    "add_setting_arguments",
    "expected_cosine",
    "greedy_tokens",
    "load_model",
    "parse_settings",
    "run",
]

DEFAULT_SETTINGS = "K8V8,K4V3,K3.5V3.5,K3V2,K2V2,K4V3-prod"
MIN_SEQ_LEN = 16
_SETTING = re.compile(r"^k(\d+(?:\.\d+)?)v(\d+(?:\.\d+)?)(?:-(mse|prod))?$", re.IGNORECASE)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One TurboQuant cache setting: ``K<bits>V<bits>[-prod]``."""

    k_bits: float | int
    v_bits: float | int
    key_mode: str = "mse"

    @property
    def name(self) -> str:
        mode = "-prod" if self.key_mode == "prod" else ""
        return f"K{self.k_bits:g}V{self.v_bits:g}{mode}"

    def knobs(self, sink: int, buffer: int, flush_batch: int = 64) -> dict:
        return dict(
            k_bits=self.k_bits,
            v_bits=self.v_bits,
            key_mode=self.key_mode,
            sink_tokens=sink,
            buffer=buffer,
            flush_batch=flush_batch,
        )


def parse_settings(text: str) -> list[Setting]:
    """``K4V3,K3.5V3.5,K4V3-prod`` -> settings (``fp16`` is accepted and skipped: the dense
    reference is always evaluated). Bad syntax or bits -> CommandError."""
    from tq_kvcache import check_bits

    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item or item.lower() == "fp16":
            continue
        m = _SETTING.match(item)
        if not m:
            raise CommandError(
                f"--settings: {item!r} is not a setting; write K<bits>V<bits>[-prod], "
                "e.g. K4V3,K3.5V3.5,K4V3-prod"
            )
        try:
            k = check_bits("key bits", float(m.group(1)))
            v = check_bits("value bits", float(m.group(2)))
        except ValueError as e:
            raise CommandError(f"--settings {item}: {e}") from None
        mode = (m.group(3) or "mse").lower()
        if mode == "prod" and math.ceil(k) > 4:
            raise CommandError(f"--settings {item}: prod keys take at most 4 bits (8 is mse only)")
        setting = Setting(k, v, mode)
        if setting not in out:
            out.append(setting)
    if not out:
        raise CommandError("--settings: give at least one TurboQuant setting, e.g. K4V3")
    return out


def add_setting_arguments(parser, default: str = DEFAULT_SETTINGS) -> None:
    """--model, --settings, --sink, --buffer, --json, --out: shared by the kv evaluations."""
    from .kv_options import DEFAULT_BUFFER, DEFAULT_SINK

    parser.add_argument(
        "--model", required=True, metavar="PATH", help="float model or TurboQuant checkpoint"
    )
    parser.add_argument(
        "--settings",
        type=str,
        default=default,
        help=f"comma-separated K<bits>V<bits>[-prod] (bits 1-4, 8, 1.5/2.5/3.5; default {default})",
    )
    parser.add_argument(
        "--sink", type=int, default=DEFAULT_SINK, metavar="N", help="first N tokens kept fp16"
    )
    parser.add_argument(
        "--buffer", type=int, default=DEFAULT_BUFFER, metavar="N", help="recent N tokens kept fp16"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (tables go to stderr)")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON to this file")


def check_counts(args) -> None:
    for flag in ("sink", "buffer"):
        if getattr(args, flag) < 0:
            raise CommandError(f"--{flag} must be >= 0")


# --------------------------------------------------------------------------- models and caches


def load_model(model_arg: str) -> tuple:
    """``(model, tokenizer, info)`` of a local float model (float32 weights) or TurboQuant
    checkpoint; anything else -> CommandError. Never downloads."""
    from .default_model import is_tq_checkpoint
    from .eval_cmd import _quiet_transformers, load_float
    from .generate_cmd import load_tq

    path = Path(model_arg).expanduser()
    if not path.is_dir():
        raise CommandError(f"--model {model_arg}: no such model directory")
    with _quiet_transformers():
        if is_tq_checkpoint(path):
            model, tokenizer = load_tq(path)
            kind = "turboquant"
        elif not (path / "config.json").is_file():
            raise CommandError(f"--model {model_arg}: no config.json; not a model directory")
        else:
            model, tokenizer, _ = load_float(str(path))
            kind = "float"
    from tq_kvcache import install_attention_hook

    install_attention_hook(model)  # decode attends straight from the packed codes
    return model, tokenizer, {"model": str(path.resolve()), "kind": kind}


def dense_cache(model) -> list:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def tq_cache(model, knobs: dict) -> list:
    from tq_kvcache import make_turboquant_cache

    return make_turboquant_cache(model, **knobs)


def copy_dense(cache: list) -> list:
    """A copy of a dense prompt cache that generation can extend without touching ``cache``."""
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        if type(c) is not KVCache:
            raise CommandError(f"the kv evaluations need plain KV caches, got {type(c).__name__}")
        new = KVCache()
        if c.offset:
            new.keys = c.keys[..., : c.offset, :]
            new.values = c.values[..., : c.offset, :]
            new.offset = c.offset
        out.append(new)
    return out


def convert_dense(cache: list, knobs: dict) -> list:
    """The dense cache compressed into TurboQuant caches (as a saved prompt cache would be)."""
    from tq_kvcache import convert_cache

    out = convert_cache(cache, **knobs)
    import mlx.core as mx

    mx.eval([c.state for c in out])
    return out


def prefill(model, ids, cache, step: int = 2048) -> None:
    """Run ``ids`` into ``cache`` in mlx-lm's prefill steps, without computing logits."""
    import mlx.core as mx

    for start in range(0, len(ids), step):
        model(mx.array(ids[start : start + step])[None], cache=cache)
        mx.eval([c.state for c in cache])


def greedy_tokens(model, prompt_ids, cache, max_tokens: int, stop=()) -> list[int]:
    """Greedy tokens after ``prompt_ids`` through mlx-lm's generate_step with ``cache``
    (decode attends from the packed codes); stops after a token in ``stop``."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(
        mx.array(prompt_ids), model, max_tokens=max_tokens, prompt_cache=cache
    ):
        out.append(int(token))
        if out[-1] in stop:
            break
    return out


def chat_parts(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a single user message (with the
    generation prompt); without a template, the raw text followed by a newline."""
    if not getattr(tokenizer, "has_chat_template", False):
        return "", "\n"
    marker = "\x00tq-user-message\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    pre, _, post = text.partition(marker)
    return pre, post


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as part of a templated prompt (no extra special tokens)."""
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def answer_rows(model, doc_ids, question_ids, row_knobs, max_tokens: int, stop=()) -> list:
    """Greedy answers to ``question_ids`` after ``doc_ids``, one per entry of ``row_knobs``
    (None: the fp16 cache; else TurboQuantKVCache knobs). The document is prefilled once on
    the fp16 cache and compressed into each setting's cache, as a saved prompt cache would
    be; the question is then read, and the answer generated, through the compressed cache."""
    dense = dense_cache(model)
    prefill(model, doc_ids, dense)
    out = []
    for knobs in row_knobs:
        cache = copy_dense(dense) if knobs is None else convert_dense(dense, knobs)
        out.append(greedy_tokens(model, question_ids, cache, max_tokens, stop))
    return out


@contextlib.contextmanager
def setting_errors(name: str):
    """ValueError from the cache (e.g. a head_dim the setting cannot split) -> CommandError."""
    try:
        yield
    except ValueError as e:
        raise CommandError(f"setting {name}: {e}") from None


# --------------------------------------------------------------------------- expectations


def _part_gains(part) -> tuple[float, float]:
    """``(a, g)`` with E<x, x^> = a |x|^2 and E|x^|^2 = g |x|^2 for one codec part.

    mse: a = g = 1 - D (centroid condition). prod: unbiased, a = 1; the QJL estimate of the
    residual r has E|q|^2 = |r|^2 (pi/2 + 1 - 1/w) for a w x w Gaussian sketch, so
    g = 1 + D (pi/2 - 1/w) with D the distortion of the (b-1)-bit mse stage (1 without one).
    """
    from tq_core.codebook import sphere_codebook

    d = sphere_codebook(part.mse_bits, part.width).distortion if part.mse_bits else 1.0
    if part.prod:
        return 1.0, 1.0 + d * (math.pi / 2 - 1.0 / part.width)
    return 1.0 - d, 1.0 - d


def expected_cosine(codec, x):
    """Expected cosine between each vector of ``x`` (B, H, N, D) and its reconstruction,
    mean over vectors: ``sum_p e_p a_p / sqrt(sum_p e_p g_p)`` with e_p the energy share of
    part p (whole bits: one part, so sqrt(1 - D_b) for mse)."""
    import mlx.core as mx

    x = x.astype(mx.float32)
    if codec.perm is not None:
        index = mx.broadcast_to(codec.perm[None, :, None, :], x.shape)
        x = mx.take_along_axis(x, index, axis=-1)
    energy = mx.maximum(mx.sum(x * x, axis=-1), 1e-30)
    a_sum = g_sum = 0.0
    for part in codec.parts:
        share = mx.sum(mx.square(x[..., part.start : part.start + part.width]), axis=-1) / energy
        a, g = _part_gains(part)
        a_sum = a_sum + a * share
        g_sum = g_sum + g * share
    return mx.mean(a_sum / mx.sqrt(g_sum)).item()


def _cos(a, b):
    """Cosine along the last axis, (...,)."""
    import mlx.core as mx

    a, b = a.astype(mx.float32), b.astype(mx.float32)
    den = mx.sqrt(mx.sum(a * a, axis=-1) * mx.sum(b * b, axis=-1))
    return mx.sum(a * b, axis=-1) / mx.maximum(den, 1e-30)


# --------------------------------------------------------------------------- one window


@contextlib.contextmanager
def _recording(model, layer_of: dict):
    """Record (queries, mask, output, scale, sinks) of every attention call of the layers in
    ``layer_of`` (id(cache) -> layer), wrapping the SDPA the model's modules call."""
    names = {type(m).__module__ for _, m in model.named_modules()} | {type(model).__module__}
    records = {"on": False, "calls": {}}
    patched = []
    for name in sorted(names):
        module = sys.modules.get(name)
        fn = getattr(module, "scaled_dot_product_attention", None)
        if fn is None:
            continue

        def recorder(queries, keys, values, cache, scale, mask, sinks=None, _fn=fn):
            out = _fn(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
            layer = layer_of.get(id(cache))
            if records["on"] and layer is not None:
                records["calls"].setdefault(layer, []).append((queries, mask, out, scale, sinks))
            return out

        module.scaled_dot_product_attention = recorder
        patched.append((module, fn))
    try:
        yield records
    finally:
        for module, fn in patched:
            module.scaled_dot_product_attention = fn


def _score_window(model, window, prefix: int, chunk: int, cache, records=None) -> dict:
    """Prefill ``prefix`` tokens, then score the rest chunk by chunk: losses and argmaxes."""
    import mlx.core as mx
    import mlx.nn as nn

    n = window.shape[0]
    model(window[None, :prefix], cache=cache)
    mx.eval([c.state for c in cache])
    losses, tops = [], []
    if records is not None:
        records["on"] = True
    for start in range(prefix, n - 1, chunk):
        stop = min(start + chunk, n - 1)
        logits = model(window[None, start:stop], cache=cache)[0].astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, window[start + 1 : stop + 1], reduction="none")
        top = mx.argmax(logits, axis=-1)
        mx.eval(loss, top, [c.state for c in cache])
        losses.append(loss)
        tops.append(top)
    if records is not None:
        records["on"] = False
    return {"loss": mx.concatenate(losses), "top": mx.concatenate(tops)}


def _layer_fidelity(keys, values, calls, prefix: int, knobs: dict) -> dict:
    """Replay one layer's dense keys/values/queries through a fresh cache of ``knobs``."""
    import mlx.core as mx
    from tq_kvcache import TurboQuantKVCache, cache_attention

    cache = TurboQuantKVCache(**knobs)
    cache.update_and_fetch(keys[:, :, :prefix], values[:, :, :prefix])
    mx.eval(cache.state)
    pos, attn_sum, attn_n = prefix, 0.0, 0
    for queries, mask, ref, scale, sinks in calls:
        n = queries.shape[2]
        cache.update_and_fetch(keys[:, :, pos : pos + n], values[:, :, pos : pos + n])
        out = cache_attention(queries, cache, scale=scale, mask=mask, sinks=sinks)
        cos = _cos(out, ref)
        attn_sum += mx.sum(cos).item()
        attn_n += cos.size
        pos += n
    sink_k, _, k_codes, v_codes, _, _ = cache.segments()
    start = 0 if sink_k is None else sink_k.shape[2]
    n_packed = next(iter(k_codes.values())).shape[2] if k_codes else 0
    out = {"attn": attn_sum / max(attn_n, 1), "packed": n_packed, "tokens": cache.size()}
    k_codec, v_codec = cache.codecs
    for name, codec, codes, x in (("k", k_codec, k_codes, keys), ("v", v_codec, v_codes, values)):
        if not n_packed:
            out[name], out[name + "_exp"] = None, None
            continue
        orig = x[:, :, start : start + n_packed]
        out[name] = mx.mean(_cos(codec.decode(codes), orig)).item()
        out[name + "_exp"] = expected_cosine(codec, orig)
    return out


# --------------------------------------------------------------------------- the command


def add_arguments(parser) -> None:
    add_setting_arguments(parser)
    parser.add_argument(
        "--data", metavar="FILE", help="text file (default: ../shared/data/wikitext-2-test.txt)"
    )
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per window")
    parser.add_argument("--num-seqs", type=int, default=4, help="windows")
    parser.add_argument(
        "--prefix",
        type=int,
        metavar="N",
        help="tokens prefilled before scoring starts (default: half the window)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=64,
        metavar="N",
        help="scored tokens per model call, and the cache's flush batch (default 64)",
    )
    parser.add_argument(
        "--no-zero",
        action="store_true",
        help="skip the rows with --sink 0 --buffer 0 (by default every setting runs at both)",
    )
    parser.add_argument(
        "--greedy-prompts",
        type=int,
        default=0,
        metavar="N",
        help="also generate greedily after the first N windows and compare with fp16",
    )
    parser.add_argument(
        "--greedy-tokens", type=int, default=32, metavar="M", help="tokens generated per prompt"
    )


def _check_args(args) -> None:
    check_counts(args)
    if args.seq_len < MIN_SEQ_LEN:
        raise CommandError(f"--seq-len must be at least {MIN_SEQ_LEN}, got {args.seq_len}")
    if args.num_seqs < 1:
        raise CommandError("--num-seqs must be at least 1")
    if args.chunk < 1:
        raise CommandError("--chunk must be at least 1")
    if args.prefix is None:
        args.prefix = args.seq_len // 2
    if not 1 <= args.prefix <= args.seq_len - 2:
        raise CommandError(f"--prefix must be in [1, {args.seq_len - 2}], got {args.prefix}")
    # A scored chunk starting at p sees packed codes once p - sink - buffer >= chunk.
    last = args.prefix + (args.seq_len - 2 - args.prefix) // args.chunk * args.chunk
    if last < args.sink + args.buffer + args.chunk:
        raise CommandError(
            f"--seq-len {args.seq_len} leaves nothing compressed with --sink {args.sink} "
            f"--buffer {args.buffer} (--chunk {args.chunk}, --prefix {args.prefix}): use a "
            f"--seq-len of at least {2 * (args.sink + args.buffer + args.chunk) + 2}"
        )
    if args.greedy_prompts < 0 or args.greedy_tokens < 1:
        raise CommandError("--greedy-prompts must be >= 0 and --greedy-tokens >= 1")


def _rows(args, settings) -> list[tuple[Setting, int, int]]:
    pairs = [(args.sink, args.buffer)]
    if not args.no_zero and (args.sink, args.buffer) != (0, 0):
        pairs.append((0, 0))
    return [(s, sink, buf) for sink, buf in pairs for s in settings]


def _summary(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    return (sum(vals) / len(vals), min(vals)) if vals else (None, None)


def _greedy(model, windows, rows, args, bar) -> list[dict]:
    """Greedy tokens after the first --greedy-prompts windows: agreement with fp16."""
    n = min(args.greedy_prompts, windows.shape[0])
    prompts = [windows[i].tolist() for i in range(n)]
    refs = []
    for ids in prompts:
        refs.append(greedy_tokens(model, ids, dense_cache(model), args.greedy_tokens))
        bar.update(1)
    out = []
    for setting, sink, buf in rows:
        same = prefix_len = 0
        for ids, ref in zip(prompts, refs):
            knobs = setting.knobs(sink, buf, args.chunk)
            with setting_errors(setting.name):
                got = greedy_tokens(model, ids, tq_cache(model, knobs), len(ref))
            same += sum(a == b for a, b in zip(got, ref))
            prefix_len += next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
            bar.update(1)
        total = sum(len(r) for r in refs)
        out.append({"agreement": same / total, "first_divergence": prefix_len / len(refs)})
    return out


def evaluate(model, windows, settings, args, progress=None) -> dict:
    """The JSON payload's measurements: reference row and one row per (setting, sink/buffer)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    rows = _rows(args, settings)
    acc = [{"loss": [], "top": [], "layers": {}, "bits": None, "packed_frac": []} for _ in rows]
    ref_loss, ref_top, layers = [], [], None
    for w in range(windows.shape[0]):
        window = windows[w]
        cache = dense_cache(model)
        layer_of = {id(c): i for i, c in enumerate(cache) if type(c) is KVCache}
        layers = sorted(layer_of.values())
        with _recording(model, layer_of) as records:
            ref = _score_window(model, window, args.prefix, args.chunk, cache, records)
        ref_loss.append(ref["loss"])
        ref_top.append(ref["top"])
        if progress:
            progress(1)
        kv = {
            i: (
                cache[i].keys[..., : cache[i].offset, :],
                cache[i].values[..., : cache[i].offset, :],
            )
            for i in layers
        }
        for (setting, sink, buf), a in zip(rows, acc):
            knobs = setting.knobs(sink, buf, args.chunk)
            with setting_errors(setting.name):
                tq = tq_cache(model, knobs)
                got = _score_window(model, window, args.prefix, args.chunk, tq)
                for i in layers:
                    res = _layer_fidelity(*kv[i], records["calls"].get(i, []), args.prefix, knobs)
                    a["layers"].setdefault(i, []).append(res)
            a["loss"].append(got["loss"])
            a["top"].append((mx.sum(got["top"] == ref["top"]).item(), got["top"].size))
            k_codec, v_codec = next(c for c in tq if hasattr(c, "codecs")).codecs
            dims = k_codec.dim + v_codec.dim
            a["bits"] = (k_codec.bits_per_token() + v_codec.bits_per_token()) / dims
            res0 = a["layers"][layers[0]][-1]
            a["packed_frac"].append(res0["packed"] / res0["tokens"])
            if progress:
                progress(1)
        del records, kv, cache

    ref_losses = mx.concatenate(ref_loss)
    base_loss = ref_losses.mean().item()
    out_rows = [
        {
            "setting": "fp16",
            "sink": None,
            "buffer": None,
            "ppl": math.exp(base_loss),
            "loss": base_loss,
            "top1_agreement": 1.0,
        }
    ]
    for (setting, sink, buf), a in zip(rows, acc):
        losses = mx.concatenate(a["loss"])
        diff = losses - ref_losses
        loss = losses.mean().item()
        per_layer = {}
        for key in ("k", "k_exp", "v", "v_exp", "attn"):
            per_layer[key] = [_mean([r[key] for r in a["layers"][i]]) for i in layers]
        row = {
            "setting": setting.name,
            "k_bits": setting.k_bits,
            "v_bits": setting.v_bits,
            "key_mode": setting.key_mode,
            "sink": sink,
            "buffer": buf,
            "bits_per_element": a["bits"],
            "packed_fraction": _mean(a["packed_frac"]),
            "ppl": math.exp(loss),
            "loss": loss,
            "ppl_ratio": math.exp(loss - base_loss),
            "delta_loss_stderr": math.sqrt(mx.var(diff, ddof=1).item() / diff.size)
            if diff.size > 1
            else None,
            "top1_agreement": sum(t[0] for t in a["top"]) / sum(t[1] for t in a["top"]),
            "layers": layers,
            "k_cos": per_layer["k"],
            "k_cos_expected": per_layer["k_exp"],
            "v_cos": per_layer["v"],
            "v_cos_expected": per_layer["v_exp"],
            "attn_cos": per_layer["attn"],
        }
        for kv_name in ("k", "v"):
            dev = [
                None if c is None else c - e
                for c, e in zip(per_layer[kv_name], per_layer[kv_name + "_exp"])
            ]
            row[f"{kv_name}_cos_deviation"] = dev
            row[f"{kv_name}_cos_mean"] = _summary(per_layer[kv_name])[0]
            row[f"{kv_name}_cos_expected_mean"] = _summary(per_layer[kv_name + "_exp"])[0]
            row[f"{kv_name}_cos_max_abs_deviation"] = max(
                (abs(d) for d in dev if d is not None), default=None
            )
        row["attn_cos_mean"], row["attn_cos_min"] = _summary(per_layer["attn"])
        out_rows.append(row)
    return {"rows": out_rows, "tokens_scored": int(ref_losses.size)}


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(payload: dict) -> str:
    from .table import format_table

    table = []
    for r in payload["rows"]:
        sb = "-" if r["sink"] is None else f"{r['sink']}/{r['buffer']}"
        base = payload["rows"][0]["ppl"]
        greedy = r.get("greedy", {}).get("agreement")
        table.append(
            [
                r["setting"],
                sb,
                _fmt(r.get("bits_per_element"), ".3f"),
                f"{r['ppl']:.3f}",
                _fmt(None if r["sink"] is None else 100 * (r["ppl"] / base - 1), "+.2f"),
                f"{r['top1_agreement']:.4f}",
                _fmt(greedy, ".3f"),
                _fmt(r.get("k_cos_mean"), ".4f"),
                _fmt(r.get("k_cos_expected_mean"), ".4f"),
                _fmt(r.get("k_cos_max_abs_deviation"), ".4f"),
                _fmt(r.get("v_cos_mean"), ".4f"),
                _fmt(r.get("v_cos_expected_mean"), ".4f"),
                _fmt(r.get("v_cos_max_abs_deviation"), ".4f"),
                _fmt(r.get("attn_cos_mean"), ".4f"),
                _fmt(r.get("attn_cos_min"), ".4f"),
            ]
        )
    headers = [
        "setting", "sink/buf", "bits/elt", "ppl", "dppl %", "top-1", "greedy",
        "K cos", "K exp", "max|dK|", "V cos", "V exp", "max|dV|", "attn cos", "attn min",
    ]  # fmt: skip
    title = (
        f"KV cache fidelity on {Path(payload['data']).name}: {payload['num_seqs']} windows of "
        f"{payload['seq_len']} tokens, {payload['tokens_scored']} scored after a "
        f"{payload['prefix']}-token prefix, chunks of {payload['chunk']}"
    )
    return format_table(headers, table, title=title)


def run(args) -> int:
    from tqdm import tqdm

    from .eval_cmd import _quiet_transformers, data_file
    from .eval_ppl import text_windows

    _check_args(args)
    settings = parse_settings(args.settings)
    data = data_file(args.data)
    model, tokenizer, info = load_model(args.model)
    try:
        with _quiet_transformers():
            windows = text_windows(tokenizer, data, args.seq_len, args.num_seqs)
    except ValueError as e:
        raise CommandError(str(e)) from None
    rows = _rows(args, settings)
    n_greedy = min(args.greedy_prompts, args.num_seqs)
    start = time.perf_counter()
    total = args.num_seqs * (1 + len(rows)) + n_greedy * (1 + len(rows))
    with tqdm(total=total, desc="kv fidelity", unit="run", file=sys.stderr) as bar:
        result = evaluate(model, windows, settings, args, progress=bar.update)
        if n_greedy:
            for row, g in zip(result["rows"][1:], _greedy(model, windows, rows, args, bar)):
                row["greedy"] = dict(g, prompts=n_greedy, tokens=args.greedy_tokens)
            result["rows"][0]["greedy"] = {"agreement": 1.0, "first_divergence": None}
    payload = {
        "eval": "kv",
        **info,
        "data": str(data),
        "seq_len": args.seq_len,
        "num_seqs": args.num_seqs,
        "prefix": args.prefix,
        "chunk": args.chunk,
        "tokens_scored": result["tokens_scored"],
        "rows": result["rows"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    emit(payload, render(payload), args)
    return 0


def emit(payload: dict, table: str, args) -> None:
    """The table (stderr with --json), the JSON on stdout with --json, the file with --out."""
    import json

    from .atomic_write import write_text_atomic

    print(table, file=sys.stderr if args.json else sys.stdout)
    text = json.dumps(payload, indent=2)
    if args.json:
        print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
