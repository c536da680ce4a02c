"""`tq serve` in this process on a tiny TurboQuant llama: endpoints, TurboQuant caches, bad
requests answered with 4xx JSON, disconnects, the prompt cache's byte cap."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from tq_cli.main import build_parser
from tq_cli.serve_cmd import Server, is_loopback, parse_size
from tq_cli.serve_requests import RequestError, ServeLimits, validate_request
from tq_cli_testkit import WORDS, assert_one_line_error, run_tq

CAP = 200_000  # prompt cache bytes: a few of the tiny model's caches


def _serve(model, *flags):
    args = build_parser().parse_args(
        ["serve", "--model", str(model), "--port", "0", "--log-level", "WARNING", *flags]
    )
    server = Server(args, model, str(model))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module", params=["fp16", "turboquant"])
def server(request, tq_model):
    kv = ["--kv-bits", "4", "--kv-sink", "4", "--kv-buffer", "4"]
    flags = ["--prompt-cache-bytes", str(CAP), "--max-body-bytes", "2KiB"]
    server, thread = _serve(tq_model, *flags, *(kv if request.param == "turboquant" else []))
    server.kind = request.param
    yield server
    server.httpd.shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive()


def call(server, method, path, body=None, raw: bytes | None = None, headers=None):
    """``(status, parsed JSON or text)`` of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def chat(content="hello the a", **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def test_chat_and_text_completions(server):
    status, reply = call(server, "POST", "/v1/chat/completions", chat())
    assert status == 200, reply
    message = reply["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    assert all(w in WORDS for w in message["content"].split())
    assert reply["usage"]["completion_tokens"] <= 6 and reply["usage"]["prompt_tokens"] == 5
    status, reply = call(
        server, "POST", "/v1/completions", {"prompt": "the of and", "max_tokens": 4}
    )
    assert status == 200 and reply["object"] == "text_completion"
    assert reply["choices"][0]["finish_reason"] in ("length", "stop")
    # greedy by default: the same request gets the same answer (from the prompt cache now)
    again = call(server, "POST", "/v1/completions", {"prompt": "the of and", "max_tokens": 4})
    assert again[1]["choices"][0]["text"] == reply["choices"][0]["text"]


def test_streaming_sends_chunks_then_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = chat(stream=True, stream_options={"include_usage": True}, max_tokens=5)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 5


def test_models_and_health(server, tq_model):
    assert call(server, "GET", "/health") == (200, {"status": "ok"})
    status, models = call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [str(tq_model)]
    assert call(server, "GET", f"/v1/models/{tq_model}")[0] == 200
    assert call(server, "GET", "/v1/models/other")[0] == 404
    assert call(server, "GET", "/nothing")[0] == 404


def test_turboquant_caches_are_used(server):
    from tq_kvcache import TurboQuantKVCache

    call(server, "POST", "/v1/completions", {"prompt": "w1 w2 w3 w4 w5 w6", "max_tokens": 3})
    types = {
        type(c).__name__ for entry in _entries(server.prompt_cache) for c in entry.prompt_cache
    }
    assert types, "nothing was kept in the prompt cache"
    if server.kind == "turboquant":
        assert types == {TurboQuantKVCache.__name__}
        assert not server.provider.is_batchable
    else:
        assert TurboQuantKVCache.__name__ not in types
        assert server.provider.is_batchable


def _entries(prompt_cache):
    """Every entry the LRU prompt cache holds (walks its trie). The generation thread stores
    a request's cache just after its last chunk is sent: give it a moment."""
    time.sleep(0.5)
    out, stack = [], [prompt_cache._trie._trie]
    while stack:
        node = stack.pop()
        for key, value in node.items():
            if key == "__value__":
                out.append(value)
            elif isinstance(value, dict):
                stack.append(value)
    return out


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": 7}]}, 400, "messages"),
        (chat(max_tokens=-3), 400, "max_tokens"),
        (chat(max_tokens=10**9), 400, "max_tokens"),
        (chat(max_tokens="5"), 400, "max_tokens"),
        (chat(max_tokens=True), 400, "max_tokens"),
        (chat(temperature="hot"), 400, "temperature"),
        (chat(top_p=1.5), 400, "top_p"),
        (chat(stream="yes"), 400, "stream"),
        (chat(stop=[1, 2]), 400, "stop"),
        (chat(logit_bias={"999999": 5}), 400, "logit_bias"),
        (chat(n=3), 400, "n"),
        (chat(model="gpt-4"), 404, "model"),
        (chat(model=["x"]), 400, "model"),
    ],
)
def test_bad_chat_requests_get_4xx_json(server, body, status, param):
    got, reply = call(server, "POST", "/v1/chat/completions", body)
    assert got == status, reply
    assert reply["error"]["param"] == param and reply["error"]["message"]


@pytest.mark.parametrize(
    "raw, status",
    [
        (b'{"prompt": ', 400),
        (b"\xff\xfe", 400),
        (b"[1, 2]", 400),
        (b'{"prompt": ["a", "b"]}', 400),
        (b'{"prompt": ""}', 400),
        (b'{"max_tokens": 3}', 400),
        (b'{"prompt": "hi", "echo": true}', 400),
    ],
)
def test_bad_text_requests_get_4xx_json(server, raw, status):
    got, reply = call(server, "POST", "/v1/completions", raw=raw)
    assert got == status and "error" in reply, reply


def test_oversize_and_unframed_bodies(server):
    big = json.dumps({"prompt": "the " * 1000}).encode()  # over the 2 KiB limit
    status, reply = call(server, "POST", "/v1/completions", raw=big)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    # no Content-Length: http.client sends none for a body given as an iterator
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and json.loads(resp.read())["error"]["code"] == "length_required"
    conn.close()
    assert call(server, "POST", "/v1/nothing", {"prompt": "hi"})[0] == 404


def test_client_that_disconnects_mid_stream(server):
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        body = json.dumps(chat(stream=True, max_tokens=2000)).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert b"200" in sock.recv(4096).split(b"\r\n")[0]
        sock.close()  # gone with ~2000 tokens to go
    # the server is alive and answers the next request in full
    status, reply = call(server, "POST", "/v1/chat/completions", chat())
    assert status == 200 and reply["choices"][0]["message"]["content"]
    assert call(server, "GET", "/health")[0] == 200


def test_client_gone_before_the_answer_is_one_log_line(server, monkeypatch, capfd):
    """A peer that hangs up before a GET is answered (seen once in CI as a BrokenPipeError
    traceback from a /health probe) is logged in one line and the server goes on."""
    import logging

    from mlx_lm.server import APIHandler

    def gone(self):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(APIHandler, "handle_health_check", gone)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tq.serve")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096) == b""  # closed without an answer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    monkeypatch.undo()
    assert call(server, "GET", "/health")[0] == 200
    assert any("disconnected" in r.getMessage() for r in records)
    assert "Traceback" not in capfd.readouterr().err


def test_concurrent_requests_and_the_prompt_cache_cap(server):
    results = [None] * 12

    def one(i):
        prompt = " ".join(WORDS[(i * 7 + j) % 200 + 8] for j in range(12 + i))
        results[i] = call(server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 5})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r[0] == 200 for r in results), results
    assert all(r[1]["usage"]["completion_tokens"] <= 5 for r in results)
    held = sum(entry.nbytes for entry in _entries(server.prompt_cache))
    assert 0 < held <= CAP and server.prompt_cache.nbytes == held
    assert len(server.prompt_cache) < 12  # the cap evicted some


# --------------------------------------------------------------------------- units


def test_parse_size():
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5k") == 1500
    assert parse_size("1000") == 1000
    with pytest.raises(Exception, match="size like"):
        parse_size("lots")


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


def test_validation_normalizes_and_refuses():
    limits = ServeLimits("m", frozenset({"m", "default_model"}), vocab_size=10, max_tokens=50)
    body = validate_request("/v1/completions", {"prompt": ["hi"], "model": "m"}, limits)
    assert body["prompt"] == "hi"
    with pytest.raises(RequestError) as e:
        validate_request("/v1/completions", {"prompt": "hi", "logit_bias": {"3": 500}}, limits)
    assert e.value.status == 400 and e.value.body()["error"]["param"] == "logit_bias"
    with pytest.raises(RequestError, match="serves 'm'"):
        validate_request("/v1/completions", {"prompt": "hi", "model": "x"}, limits)


def test_bad_flags_are_one_line_errors(capsys, tq_model):
    for flags, text in [
        (["--port", "70000"], "--port"),
        (["--kv-bits", "9"], "bits"),
        (["--max-tokens", "0"], "--max-tokens"),
    ]:
        code, _, err = run_tq(capsys, "serve", "--model", tq_model, *flags)
        assert text in assert_one_line_error(code, err, "tq serve:")
