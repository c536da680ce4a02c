"""Load test of `tq serve`: mixed valid and invalid requests, N at a time; every answer checked.

Each request has a kind (a valid chat or text completion, streaming or not, or one of the bad
requests below) and the answer that kind must get: 200 with a well-formed completion (at
most max_tokens tokens; a stream ending in ``data: [DONE]``), or the 4xx JSON error. A client
that hangs up mid-stream must leave the server answering. Reported: requests/s, p50/p99
latency, outcomes by kind, errors by status, whether /health answers after, and the server's
RSS (before, after a warmup, after the run, and its high-water mark) when it runs locally.

usage: python benchmarks/serve_load.py --model DIR [--requests 200] [--concurrency 8]
           [--server-args "--kv-bits 4"] [--json] [--out FILE]
       python benchmarks/serve_load.py --url http://127.0.0.1:8080 [--pid PID] ...
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

MAX_TOKENS = 8
#: kind -> (share of the mix, expected HTTP status); "disconnect" expects a 200 it abandons.
KINDS = {
    "chat": (0.2, 200),
    "chat_stream": (0.15, 200),
    "completion": (0.15, 200),
    "completion_stream": (0.1, 200),
    "malformed_json": (0.05, 400),
    "wrong_type": (0.05, 400),
    "negative_max_tokens": (0.05, 400),
    "absurd_max_tokens": (0.05, 400),
    "oversize_body": (0.05, 413),
    "unknown_model": (0.05, 404),
    "missing_messages": (0.05, 400),
    "disconnect": (0.05, 200),
}
WORDS = "the a of and to in is it that was for on are as with his they at be this".split()


def rss_kb(pid: int) -> dict:
    """VmRSS and VmHWM (high-water mark) of ``pid`` in kB (Linux /proc)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def make_request(kind: str, rng: random.Random, body_limit: int) -> tuple[str, bytes]:
    """(path, body bytes) of one request of ``kind``."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))
    chat = {"messages": [{"role": "user", "content": words}], "max_tokens": MAX_TOKENS}
    text = {"prompt": words, "max_tokens": MAX_TOKENS}
    bodies = {
        "chat": ("/v1/chat/completions", chat),
        "chat_stream": ("/v1/chat/completions", dict(chat, stream=True)),
        "completion": ("/v1/completions", text),
        "completion_stream": ("/v1/completions", dict(text, stream=True)),
        "wrong_type": ("/v1/chat/completions", dict(chat, temperature="warm")),
        "negative_max_tokens": ("/v1/completions", dict(text, max_tokens=-5)),
        "absurd_max_tokens": ("/v1/completions", dict(text, max_tokens=10**12)),
        "oversize_body": ("/v1/completions", {"prompt": "the " * (body_limit // 4 + 16)}),
        "unknown_model": ("/v1/chat/completions", dict(chat, model="no-such-model")),
        "missing_messages": ("/v1/chat/completions", {"max_tokens": MAX_TOKENS}),
        "disconnect": ("/v1/chat/completions", dict(chat, stream=True, max_tokens=4000)),
    }
    if kind == "malformed_json":
        return "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"'
    path, body = bodies[kind]
    return path, json.dumps(body).encode()


def check_answer(kind: str, status: int, data: bytes) -> str | None:
    """None when the answer is what ``kind`` must get, else what is wrong with it."""
    expected = KINDS[kind][1]
    if status != expected:
        return f"status {status}, expected {expected}: {data[:200]!r}"
    if status != 200:
        error = json.loads(data).get("error")
        if not (isinstance(error, dict) and error.get("message")):
            return f"no JSON error message: {data[:200]!r}"
        return None
    if kind.endswith("_stream"):
        events = [e[6:] for e in data.decode().split("\n") if e.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return "stream did not end with data: [DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        if not chunks or chunks[-1]["choices"][0]["finish_reason"] not in ("stop", "length"):
            return "stream has no final chunk with a finish_reason"
        return None
    reply = json.loads(data)
    choice = reply["choices"][0]
    content = choice["message"]["content"] if kind == "chat" else choice["text"]
    if content is not None and not isinstance(content, str):
        return "no text in the completion"
    if not 0 < reply["usage"]["completion_tokens"] <= MAX_TOKENS:
        return f"completion_tokens {reply['usage']['completion_tokens']} not in 1..{MAX_TOKENS}"
    return None


def send(host: str, port: int, kind: str, path: str, body: bytes) -> dict:
    start = time.perf_counter()
    try:
        if kind == "disconnect":
            return _disconnect(host, port, path, body, start)
        conn = http.client.HTTPConnection(host, port, timeout=300)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        problem = check_answer(kind, resp.status, data)
        status = resp.status
    except (OSError, http.client.HTTPException, json.JSONDecodeError, KeyError) as e:
        status, problem = None, f"{type(e).__name__}: {e}"
    return {
        "kind": kind,
        "status": status,
        "ok": problem is None,
        "problem": problem,
        "latency_s": time.perf_counter() - start,
    }


def _disconnect(host, port, path, body, start) -> dict:
    """Start a long stream, read its first bytes, hang up."""
    sock = socket.create_connection((host, port), timeout=300)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    first = sock.recv(4096)
    sock.close()
    ok = first.startswith(b"HTTP/1.") and b" 200 " in first.split(b"\r\n")[0]
    return {
        "kind": "disconnect",
        "status": 200 if ok else None,
        "ok": ok,
        "problem": None if ok else f"first bytes {first[:80]!r}",
        "latency_s": time.perf_counter() - start,
    }


def health(host: str, port: int) -> bool:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(
    url: str,
    requests: int = 200,
    concurrency: int = 8,
    seed: int = 0,
    body_limit: int = 4 << 20,
    pid: int | None = None,
) -> dict:
    """Send the mix to the server at ``url``; the result dict (see the module docstring)."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port
    rng = random.Random(seed)
    names = list(KINDS)
    kinds = rng.choices(names, weights=[KINDS[k][0] for k in names], k=requests)
    jobs = [(k, *make_request(k, rng, body_limit)) for k in kinds]
    memory = {"start": rss_kb(pid)} if pid else {}
    for kind in ("chat", "completion_stream"):  # warmup: first-call allocations and compiles
        send(host, port, kind, *make_request(kind, random.Random(seed + 1), body_limit))
    if pid:
        memory["after_warmup"] = rss_kb(pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: send(host, port, *job), jobs))
    wall = time.perf_counter() - start
    alive = health(host, port)
    if pid:
        memory["end"] = rss_kb(pid)
    by_kind: dict[str, dict] = {}
    for r in results:
        row = by_kind.setdefault(r["kind"], {"sent": 0, "correct": 0, "problems": []})
        row["sent"] += 1
        row["correct"] += r["ok"]
        if r["problem"] and len(row["problems"]) < 3:
            row["problems"].append(r["problem"])
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    latencies = [r["latency_s"] for r in results]
    valid = [r["latency_s"] for r in results if KINDS[r["kind"]][1] == 200]
    return {
        "benchmark": "serve_load",
        "url": url,
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": MAX_TOKENS,
        "wall_s": round(wall, 3),
        "requests_per_s": round(requests / wall, 2),
        "latency_s": {
            "p50": round(statistics.median(latencies), 4),
            "p99": round(percentile(latencies, 0.99), 4),
        },
        "valid_latency_s": {
            "p50": round(statistics.median(valid), 4) if valid else None,
            "p99": round(percentile(valid, 0.99), 4) if valid else None,
        },
        "correct": sum(r["ok"] for r in results),
        "by_kind": dict(sorted(by_kind.items())),
        "status_counts": dict(sorted(statuses.items())),
        "alive_after": alive,
        "rss_kb": memory,
    }


def start_server(
    model: str, server_args: list[str], log_path: Path
) -> tuple[subprocess.Popen, str]:
    """`tq serve` on a free port in a subprocess; ``(process, base url)`` once it listens."""
    log = open(log_path, "w")  # noqa: SIM115 - the server writes it until it stops
    cmd = [sys.executable, "-m", "tq_cli", "serve", "--model", model, "--port", "0"]
    proc = subprocess.Popen([*cmd, *server_args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = re.search(r"on (http://[\d.:\[\]a-z]+)/v1", log_path.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"tq serve exited ({proc.returncode}):\n{log_path.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"tq serve did not start in 300 s:\n{log_path.read_text()}")


def render(result: dict) -> str:
    lines = [
        f"{result['requests']} requests, {result['concurrency']} at a time: "
        f"{result['requests_per_s']} req/s, latency p50 {result['latency_s']['p50']} s, "
        f"p99 {result['latency_s']['p99']} s; correct {result['correct']}/{result['requests']}; "
        f"alive after: {result['alive_after']}",
    ]
    for kind, row in result["by_kind"].items():
        lines.append(f"  {kind:20s} {row['correct']:4d}/{row['sent']:<4d} {row['problems'][:1]}")
    lines.append(f"  statuses: {result['status_counts']}")
    if result["rss_kb"]:
        lines.append(f"  server RSS kB: {result['rss_kb']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start `tq serve --model MODEL` for the run")
    where.add_argument("--url", help="an already running server")
    ap.add_argument("--pid", type=int, help="the running server's pid (for RSS)")
    ap.add_argument("--server-args", default="", help="extra tq serve flags, one string")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--body-limit",
        type=int,
        help="the server's --max-body-bytes (default: 64 KiB, given to the server --model "
        "starts; with --url the server default, 4 MiB)",
    )
    ap.add_argument("--json", action="store_true", help="print JSON (the summary goes to stderr)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        ap.error("--requests and --concurrency must be at least 1")
    proc = None
    url, pid = args.url, args.pid
    if args.body_limit is None:
        args.body_limit = 64 << 10 if args.model else 4 << 20
    if args.model:
        server_args = [*shlex.split(args.server_args), "--max-body-bytes", str(args.body_limit)]
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tq-serve-load-{os.getpid()}.log"
        proc, url = start_server(args.model, server_args, log_path)
        pid = proc.pid
    try:
        result = run_load(url, args.requests, args.concurrency, args.seed, args.body_limit, pid)
        if proc is not None:
            result["server_args"] = server_args
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    print(render(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    return 0 if result["correct"] == result["requests"] and result["alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
