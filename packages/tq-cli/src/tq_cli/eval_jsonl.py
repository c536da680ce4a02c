"""`tq eval jsonl`: score a local JSONL task file with the fp16 cache and TurboQuant caches.

One JSON object per line: ``{"prompt": str, "answer": str, "match": "exact" | "substring"}``
and optionally ``"context": str`` and ``"id"``. The user message is the context (if any), a
blank line and the prompt, in the tokenizer's chat template. The context part is prefilled
on the fp16 cache and compressed into each setting's cache before the prompt is read, so a
task that needs the context reads it from the packed codes; the answer is generated greedily.
Matching is on normalized text (case, surrounding whitespace, quotes and final punctuation
ignored): ``exact`` compares the answer with the first line of the output, ``substring``
looks for the answer anywhere in the output.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .main import CommandError

__all__ = ["DEFAULT_TASKS", "add_arguments", "load_tasks", "matches", "run"]

DEFAULT_TASKS = Path(__file__).parent / "data" / "kv_tasks.jsonl"
DEFAULT_SETTINGS = "K4V3,K3.5V3.5,K3V2,K2V2"
MATCH_KINDS = ("exact", "substring")


def add_arguments(parser) -> None:
    from .kv_settings import add_setting_arguments

    parser.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="JSONL task file (default: the shipped kv_tasks.jsonl)",
    )
    add_setting_arguments(parser, default=DEFAULT_SETTINGS)
    parser.add_argument("--max-tokens", type=int, default=20, help="answer tokens (default 20)")


def load_tasks(path: Path) -> list[dict]:
    """The tasks of a JSONL file; a malformed line -> CommandError naming its number."""
    if not path.is_file():
        raise CommandError(f"{path}: no such task file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CommandError(f"{path}: not a UTF-8 text file") from None
    tasks = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            task = json.loads(line)
        except json.JSONDecodeError as e:
            raise CommandError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(task, dict):
            raise CommandError(f"{where}: expected a JSON object, got {type(task).__name__}")
        for key in ("prompt", "answer"):
            if not isinstance(task.get(key), str) or not task[key].strip():
                raise CommandError(f'{where}: "{key}" must be a non-empty string')
        match = task.get("match", "exact")
        if match not in MATCH_KINDS:
            raise CommandError(f'{where}: "match" must be "exact" or "substring", got {match!r}')
        context = task.get("context", "")
        if not isinstance(context, str):
            raise CommandError(f'{where}: "context" must be a string')
        tasks.append(
            {
                "id": str(task.get("id", number)),
                "line": number,
                "context": context,
                "prompt": task["prompt"],
                "answer": task["answer"],
                "match": match,
            }
        )
    if not tasks:
        raise CommandError(f"{path}: no tasks (one JSON object per line)")
    return tasks


def _normalize(text: str) -> str:
    text = " ".join(text.strip().lower().split())
    return text.strip("\"'`").rstrip(".!?;:,").strip("\"'` ")


def matches(output: str, answer: str, kind: str) -> bool:
    """Whether ``output`` answers ``answer`` under ``kind`` (exact or substring)."""
    if kind == "exact":
        first = next((line for line in output.splitlines() if line.strip()), "")
        return _normalize(first) == _normalize(answer)
    return _normalize(answer) in _normalize(output)


def _split(tokenizer, parts, task) -> tuple[list[int], list[int]]:
    """(context ids, prompt ids): the template head and context, then the rest."""
    from .kv_harness import encode

    pre, post = parts
    if task["context"]:
        return encode(tokenizer, pre + task["context"]), encode(
            tokenizer, "\n\n" + task["prompt"] + post
        )
    return encode(tokenizer, pre), encode(tokenizer, task["prompt"] + post)


def run(args) -> int:
    from tqdm import tqdm

    from .eval_cmd import _quiet_transformers
    from .kv_harness import answer_rows, chat_parts, emit, load_model, setting_errors
    from .kv_settings import check_counts, parse_settings

    check_counts(args)
    if args.max_tokens < 1:
        raise CommandError("--max-tokens must be at least 1")
    path = Path(args.file).expanduser() if args.file else DEFAULT_TASKS
    tasks = load_tasks(path)
    settings = parse_settings(args.settings)
    model, tokenizer, info = load_model(args.model)
    parts = chat_parts(tokenizer)
    names = ["fp16"] + [s.name for s in settings]
    knobs = [None] + [s.knobs(args.sink, args.buffer) for s in settings]
    stop = set(getattr(tokenizer, "eos_token_ids", None) or ())
    details = []
    start = time.perf_counter()
    with _quiet_transformers(), tqdm(tasks, desc="tasks", unit="task", file=sys.stderr) as bar:
        for task in bar:
            context_ids, prompt_ids = _split(tokenizer, parts, task)
            with setting_errors(",".join(names[1:])):
                answers = answer_rows(model, context_ids, prompt_ids, knobs, args.max_tokens, stop)
            texts = [tokenizer.decode([i for i in a if i not in stop]) for a in answers]
            details.append(
                {
                    "id": task["id"],
                    "line": task["line"],
                    "answer": task["answer"],
                    "match": task["match"],
                    "context_tokens": len(context_ids),
                    "outputs": dict(zip(names, texts)),
                    "correct": {
                        n: matches(t, task["answer"], task["match"]) for n, t in zip(names, texts)
                    },
                }
            )
    rows = []
    for name in names:
        correct = [d["correct"][name] for d in details]
        rows.append(
            {
                "setting": name,
                "correct": sum(correct),
                "tasks": len(details),
                "accuracy": sum(correct) / len(details),
                "same_text_as_fp16": sum(
                    d["outputs"][name] == d["outputs"]["fp16"] for d in details
                )
                / len(details),
                "same_verdict_as_fp16": sum(
                    d["correct"][name] == d["correct"]["fp16"] for d in details
                )
                / len(details),
            }
        )
    payload = {
        "eval": "jsonl",
        **info,
        "file": str(path),
        "sink": args.sink,
        "buffer": args.buffer,
        "max_tokens": args.max_tokens,
        "rows": rows,
        "tasks": details,
        "seconds": round(time.perf_counter() - start, 1),
    }
    emit(payload, render(payload), args)
    return 0


def render(payload: dict) -> str:
    from .table import format_table

    rows = [
        [
            r["setting"],
            f"{r['correct']}/{r['tasks']}",
            f"{r['accuracy']:.3f}",
            f"{r['same_text_as_fp16']:.3f}",
            f"{r['same_verdict_as_fp16']:.3f}",
        ]
        for r in payload["rows"]
    ]
    title = (
        f"tasks of {Path(payload['file']).name}: greedy answers, sink/buffer "
        f"{payload['sink']}/{payload['buffer']}"
    )
    return format_table(
        ["setting", "correct", "accuracy", "same text as fp16", "same verdict"], rows, title=title
    )
