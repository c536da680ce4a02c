"""`tq eval niah`: needle in a haystack with the needle in the compressed part of the cache.

A trial hides ``The secret code is NNNN.`` in filler text (the --data file) at a depth of the
compressed region: after the ``sink`` fp16 tokens and before the ``buffer`` recent ones. The
document (chat template head, filler and needle) is prefilled once on the fp16 cache and
compressed into each setting's cache; the question is read and the answer generated through
that cache, so the needle is only reachable through its packed codes. A trial passes when
the code's digits appear in the greedy answer. The fp16 cache's pass rate is the baseline.
"""

from __future__ import annotations

import random
import sys
import time

from .main import CommandError

__all__ = ["add_arguments", "build_trial", "run"]

DEFAULT_SETTINGS = "K4V3,K3.5V3.5,K3V2,K2V2"
INTRO = "Read the text below. It hides a secret code; remember it.\n\n"
NEEDLE = "\nThe secret code is {code}.\n"
QUESTION = "\n\nWhat is the secret code? Answer with the number only."
_OFFSET = 7919  # filler tokens between the haystacks of successive trials


def add_arguments(parser) -> None:
    from .bench_cli import float_list, int_list
    from .kv_settings import add_setting_arguments

    add_setting_arguments(parser, default=DEFAULT_SETTINGS)
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="filler text (default: ../shared/data/wikitext-2-test.txt)",
    )
    parser.add_argument(
        "--lengths",
        type=int_list,
        default=[1024, 2048, 4096, 8192],
        help="prompt lengths in tokens (default 1024,2048,4096,8192)",
    )
    parser.add_argument(
        "--depths",
        type=float_list,
        default=[0.1, 0.3, 0.5, 0.7, 0.9],
        help="needle depths in [0, 1] of the compressed region (default 0.1,0.3,0.5,0.7,0.9)",
    )
    parser.add_argument(
        "--trials", type=int, default=2, help="codes and filler offsets per length and depth"
    )
    parser.add_argument("--max-tokens", type=int, default=12, help="answer tokens (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the codes")


def _check_args(args) -> None:
    from .kv_settings import check_counts

    check_counts(args)
    if any(n < 16 for n in args.lengths):
        raise CommandError("--lengths must be at least 16 tokens each")
    if any(not 0 <= d <= 1 for d in args.depths):
        raise CommandError("--depths must lie in [0, 1]")
    if args.trials < 1:
        raise CommandError("--trials must be at least 1")
    if args.max_tokens < 1:
        raise CommandError("--max-tokens must be at least 1")


def build_trial(tokenizer, parts, hay: list[int], length: int, depth: float, code: int, args):
    """``(doc_ids, question_ids, needle_pos)`` of ``length`` tokens in all, the needle's first
    token at ``depth`` of the compressed region [sink, doc_len - buffer - needle)."""
    from .kv_harness import encode

    pre, post = parts
    head = encode(tokenizer, pre + INTRO)
    needle = encode(tokenizer, NEEDLE.format(code=code))
    question = encode(tokenizer, QUESTION + post)
    n_hay = length - len(head) - len(needle) - len(question)
    doc_len = length - len(question)
    lo = max(args.sink, len(head))
    hi = doc_len - args.buffer - len(needle)
    if n_hay < 0 or hi < lo:
        raise CommandError(
            f"--lengths {length} is too short to put a needle between --sink {args.sink} and "
            f"--buffer {args.buffer} (the template, needle and question take "
            f"{len(head) + len(needle) + len(question)} tokens)"
        )
    if len(hay) < n_hay:
        raise CommandError(f"--data has {len(hay)} tokens; --lengths {length} needs {n_hay}")
    pos = lo + round(depth * (hi - lo))
    before = pos - len(head)
    doc = head + hay[:before] + needle + hay[before:n_hay]
    return doc, question, pos


def _haystacks(tokenizer, path, need: int, trials: int) -> list[list[int]]:
    """``need`` filler tokens per trial, from spread-out offsets of the file."""
    from .kv_harness import encode

    text = path.read_text(encoding="utf-8")
    want = need + _OFFSET * (trials - 1)
    ids = encode(tokenizer, text[: 8 * want])  # ~4 characters a token: tokenize what we use
    if len(ids) < want and len(text) > 8 * want:
        ids = encode(tokenizer, text)
    if len(ids) < need:
        raise CommandError(f"--data {path} has {len(ids)} tokens; the longest length needs {need}")
    room = len(ids) - need + 1
    return [ids[(_OFFSET * t) % room : (_OFFSET * t) % room + need] for t in range(trials)]


def run(args) -> int:
    from tqdm import tqdm

    from .eval_cmd import _quiet_transformers, data_file
    from .kv_harness import answer_rows, chat_parts, emit, load_model, setting_errors
    from .kv_settings import parse_settings

    _check_args(args)
    settings = parse_settings(args.settings)
    data = data_file(args.data)
    model, tokenizer, info = load_model(args.model)
    parts = chat_parts(tokenizer)
    names = ["fp16"] + [s.name for s in settings]
    knobs = [None] + [s.knobs(args.sink, args.buffer) for s in settings]
    stop = set(getattr(tokenizer, "eos_token_ids", None) or ())
    rng = random.Random(args.seed)
    trials = []
    passes = {n: {} for n in names}  # name -> (length, depth) -> [bool]
    start = time.perf_counter()
    total = len(args.lengths) * len(args.depths) * args.trials
    bar = tqdm(total=total, desc="niah", unit="trial", file=sys.stderr)
    with _quiet_transformers(), bar:
        hays = _haystacks(tokenizer, data, max(args.lengths), args.trials)
        for length in args.lengths:
            for depth in args.depths:
                for t in range(args.trials):
                    code = rng.randint(1000, 9999)
                    doc, question, pos = build_trial(
                        tokenizer, parts, hays[t], length, depth, code, args
                    )
                    with setting_errors(",".join(names[1:])):
                        answers = answer_rows(model, doc, question, knobs, args.max_tokens, stop)
                    texts = [tokenizer.decode([i for i in a if i not in stop]) for a in answers]
                    for name, text in zip(names, texts):
                        passes[name].setdefault((length, depth), []).append(str(code) in text)
                    trials.append(
                        {
                            "length": length,
                            "depth": depth,
                            "trial": t,
                            "code": code,
                            "needle_position": pos,
                            "document_tokens": len(doc),
                            "answers": dict(zip(names, texts)),
                        }
                    )
                    bar.update(1)

    rows = []
    for name in names:
        grid = passes[name]
        same = [a == b for key in grid for a, b in zip(grid[key], passes["fp16"][key])]
        rows.append(
            {
                "setting": name,
                "pass_rate": _rate([v for vals in grid.values() for v in vals]),
                "by_length": {
                    str(n): _rate([v for (ln, _), vals in grid.items() if ln == n for v in vals])
                    for n in args.lengths
                },
                "by_depth": {
                    str(d): _rate([v for (_, dp), vals in grid.items() if dp == d for v in vals])
                    for d in args.depths
                },
                "grid": [[_rate(grid[(n, d)]) for d in args.depths] for n in args.lengths],
                "same_as_fp16": sum(same) / len(same),
            }
        )
    payload = {
        "eval": "niah",
        **info,
        "data": str(data),
        "lengths": args.lengths,
        "depths": args.depths,
        "trials": args.trials,
        "sink": args.sink,
        "buffer": args.buffer,
        "needle": NEEDLE.strip(),
        "question": QUESTION.strip(),
        "rows": rows,
        "trial_answers": trials,
        "seconds": round(time.perf_counter() - start, 1),
    }
    emit(payload, render(payload), args)
    return 0


def _rate(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def render(payload: dict) -> str:
    from .table import format_table

    lengths, depths = payload["lengths"], payload["depths"]
    headers = ["setting"] + [f"L={n}" for n in lengths] + ["all", "same as fp16"]
    rows = [
        [r["setting"]]
        + [f"{r['by_length'][str(n)]:.2f}" for n in lengths]
        + [f"{r['pass_rate']:.2f}", f"{r['same_as_fp16']:.2f}"]
        for r in payload["rows"]
    ]
    per = len(depths) * payload["trials"]
    title = (
        f"needle in a haystack: pass rate per length ({per} trials each: depths "
        f"{','.join(f'{d:g}' for d in depths)} x {payload['trials']}), sink/buffer "
        f"{payload['sink']}/{payload['buffer']}"
    )
    by_length = format_table(headers, rows, title=title)
    headers = ["setting"] + [f"depth {d:g}" for d in depths]
    rows = [
        [r["setting"]] + [f"{r['by_depth'][str(d)]:.2f}" for d in depths] for r in payload["rows"]
    ]
    return by_length + "\n\n" + format_table(headers, rows, title="pass rate per depth")
