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
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from .kv_fidelity import layer_fidelity, recording_attention, score_window
from .kv_harness import dense_cache, emit, greedy_tokens, load_model, setting_errors, tq_cache
from .kv_settings import Setting, add_setting_arguments, check_counts, parse_settings
from .main import CommandError

__all__ = ["add_arguments", "run"]

MIN_SEQ_LEN = 16


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
        with recording_attention(model, layer_of) as records:
            ref = score_window(model, window, args.prefix, args.chunk, cache, records)
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
                got = score_window(model, window, args.prefix, args.chunk, tq)
                for i in layers:
                    res = layer_fidelity(*kv[i], records["calls"].get(i, []), args.prefix, knobs)
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
