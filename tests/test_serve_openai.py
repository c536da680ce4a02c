"""Integration: `tq serve` as a subprocess on a tiny TurboQuant llama, driven by the real
`openai` client (fp16 and TurboQuant KV caches), then a small run of the load test
(benchmarks/serve_load.py): mixed valid and invalid requests, 8 at a time, every answer
checked, the server alive after and its memory bounded."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed")

ROOT = Path(__file__).parents[1]
TQ = shutil.which("tq", path=os.path.dirname(sys.executable)) or shutil.which("tq")
pytestmark = pytest.mark.skipif(TQ is None, reason="the tq console script is not installed")


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


testkit = _module("tq_cli_testkit_serve", ROOT / "packages/tq-cli/tests/tq_cli_testkit.py")
serve_load = _module("serve_load", ROOT / "benchmarks/serve_load.py")
KV_FLAGS = ["--kv-bits", "4", "--kv-sink", "4", "--kv-buffer", "4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cache")
    drop = ("LD_PRELOAD", "_TQ_BLAS_REEXEC")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(TQ_MODELS_DIR=str(root / "models"), HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf"))
    return env


@pytest.fixture(scope="module")
def tq_model(tmp_path_factory, env):
    base = tmp_path_factory.mktemp("serve-model")
    src = testkit.write_tiny_llama(base / "tiny-llama")
    out = base / "tiny-tq4"
    convert = [TQ, "convert", "--model", src, "--out", out, "--preset", "tq4"]
    subprocess.run(list(map(str, convert)), env=env, check=True, capture_output=True, timeout=300)
    return out


def start(env, model: Path, log: Path, *flags: str):
    """`tq serve` on a free port: ``(process, base url)`` once it listens."""
    cmd = [TQ, "serve", "--model", str(model), "--port", "0", "--max-body-bytes", "64KiB", *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if m:
            return proc, m.group(1)
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"tq serve did not start:\n{log.read_text()}")


@pytest.fixture(scope="module", params=["fp16", "turboquant"])
def server(request, env, tq_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    proc, url = start(env, tq_model, log, *(KV_FLAGS if request.param == "turboquant" else []))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield {"proc": proc, "url": url, "client": client, "model": str(tq_model), "log": log}
    proc.terminate()
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_models(server):
    assert [m.id for m in server["client"].models.list()] == [server["model"]]


def test_chat_completion(server):
    reply = server["client"].chat.completions.create(
        model=server["model"],
        messages=[{"role": "system", "content": "the"}, {"role": "user", "content": "hi a"}],
        max_tokens=6,
        temperature=0,
    )
    assert reply.choices[0].message.role == "assistant"
    words = reply.choices[0].message.content.split()
    assert words and all(w in testkit.WORDS for w in words)
    assert 0 < reply.usage.completion_tokens <= 6
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_chat_completion_stream(server):
    stream = server["client"].chat.completions.create(
        model=server["model"],
        messages=[{"role": "user", "content": "hello the of"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5
    assert chunks[-1].usage.completion_tokens == 5
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}


def test_text_completion_stream_matches_non_stream(server):
    client, model = server["client"], server["model"]
    whole = client.completions.create(model=model, prompt="w5 w6 w7 the", max_tokens=6)
    parts = client.completions.create(model=model, prompt="w5 w6 w7 the", max_tokens=6, stream=True)
    streamed = "".join(c.choices[0].text for c in parts)
    assert streamed == whole.choices[0].text and whole.choices[0].text


def test_a_prompt_sharing_a_cached_prefix_reuses_it(server):
    """mlx-lm's prompt cache deep-copies the cache a finished request left for the next one
    with the same prefix; with TurboQuant caches that copy once failed after any decode over
    packed tokens (the 120-word prompt is more than sinks, buffer and a flush batch)."""
    client, model = server["client"], server["model"]
    prompt = " ".join(testkit.WORDS[i % len(testkit.WORDS)] for i in range(120))
    first = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    again = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    assert first.choices[0].text and again.choices[0].text == first.choices[0].text


def test_errors_reach_the_client(server):
    client, model = server["client"], server["model"]
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=model, messages=messages, max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=messages, temperature=-1)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=model, prompt="the " * 20000, max_tokens=1)
    assert e.value.status_code == 413
    # and it still serves
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).choices


def test_load_mix(server):
    result = serve_load.run_load(
        server["url"], requests=48, concurrency=8, seed=1, body_limit=64 << 10,
        pid=server["proc"].pid,
    )  # fmt: skip
    assert result["correct"] == 48, json.dumps(result["by_kind"], indent=1)
    assert result["alive_after"]
    assert {"disconnect", "oversize_body", "malformed_json"} <= set(result["by_kind"])
    rss = result["rss_kb"]
    if rss.get("end"):  # Linux: the requests after warmup add little resident memory
        assert rss["end"]["VmRSS"] - rss["after_warmup"]["VmRSS"] < 150_000, rss


def test_load_script_runs_its_own_server(env, tq_model):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/serve_load.py"), "--model", str(tq_model),
         "--requests", "16", "--concurrency", "4", "--server-args", " ".join(KV_FLAGS),
         "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["correct"] == 16 and result["alive_after"] and result["requests_per_s"] > 0
    assert result["server_args"][:2] == ["--kv-bits", "4"]
