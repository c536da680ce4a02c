"""`tq serve`: mlx_lm.server's OpenAI-compatible server on TurboQuant weights and KV caches.

mlx_lm.server does the serving: the HTTP handler, the request queue and its one generation
thread, batching (BatchGenerator) and the prompt cache (LRUPromptCache). This module changes
only what tq needs: the model provider loads TurboQuant checkpoints with tq's loader; with
``--kv-*`` flags every fresh cache the server makes is a TurboQuant cache (requests are then
served one at a time, as mlx-lm does for its own quantized cache); the prompt cache gets a
byte cap on every path; requests are checked (serve_requests.py) before the handler sees them.
"""

from __future__ import annotations

import argparse
import gc
import io
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from .main import CommandError
from .serve_requests import (
    CHAT_PATHS,
    TEXT_PATHS,
    RequestError,
    ServeLimits,
    check_content_length,
    parse_body,
    validate_request,
)

log = logging.getLogger("tq.serve")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?\s*$", re.IGNORECASE)
#: Bodies declared larger than this are not read at all before the 413 (the connection is
#: closed instead); smaller over-limit bodies are read and dropped so the client sees the 413.
_MAX_DRAIN_BYTES = 64 << 20


def parse_size(text: str) -> int:
    """``"512MB"``, ``"2GiB"``, ``"1.5G"``, ``"1000000"`` -> bytes (k/M/G/T powers of 1000,
    Ki/Mi/Gi/Ti powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 512MB or 2GiB, got {text!r}")
    number, letter, binary = m.groups()
    power = " kmgt".index(letter.lower()) if letter else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .kv_options import add_kv_arguments

    parser.add_argument(
        "--model",
        metavar="PATH|HF-ID",
        help="TurboQuant checkpoint, or a float model (converted once with --preset, cached); "
        "default: SmolLM2-135M-Instruct",
    )
    parser.add_argument("--preset", help="recipe for converting a float model (default tq4)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: loopback only)"
    )
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--prompt-cache-bytes",
        type=parse_size,
        metavar="N",
        help="cap on the bytes the prompt cache keeps between requests (e.g. 512MB, 2GiB)",
    )
    parser.add_argument(
        "--prompt-cache-size", type=int, default=10, help="cap on cached prompts (default 10)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="tokens generated when a request gives none"
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=32768,
        help="largest max_tokens a request may ask for (larger ones get a 400)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=parse_size,
        default=4 << 20,
        metavar="N",
        help="largest request body accepted (larger ones get a 413; default 4MiB)",
    )
    parser.add_argument("--temp", type=float, default=0.0, help="default temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="default top-p")
    parser.add_argument("--top-k", type=int, default=0, help="default top-k (0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="default min-p (0: off)")
    parser.add_argument(
        "--decode-concurrency",
        type=int,
        default=32,
        help="requests decoded together in a batch (fp16 KV cache only)",
    )
    parser.add_argument(
        "--prompt-concurrency",
        type=int,
        default=8,
        help="prompts prefilled together in a batch (fp16 KV cache only)",
    )
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument(
        "--allowed-origins",
        type=lambda text: [o for o in text.split(",") if o],
        default=[],
        help="comma-separated browser origins allowed by CORS ('*' for any; default none)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="server log level (default INFO)",
    )
    add_kv_arguments(parser)


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be between 0 and 65535, got {args.port}")
    if args.prompt_cache_bytes is not None and args.prompt_cache_bytes < 0:
        raise CommandError("--prompt-cache-bytes must be >= 0")
    if args.prompt_cache_size < 0:
        raise CommandError("--prompt-cache-size must be >= 0")
    if args.max_tokens_limit < 1:
        raise CommandError("--max-tokens-limit must be at least 1")
    if not 1 <= args.max_tokens <= args.max_tokens_limit:
        raise CommandError(f"--max-tokens must be between 1 and {args.max_tokens_limit}")
    if args.max_body_bytes < 1024:
        raise CommandError("--max-body-bytes must be at least 1KB")
    for flag in ("decode_concurrency", "prompt_concurrency", "prefill_step_size"):
        if getattr(args, flag) < 1:
            raise CommandError(f"--{flag.replace('_', '-')} must be at least 1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mlx_server_args(args, model_path: Path) -> argparse.Namespace:
    """The namespace mlx_lm.server's ModelProvider and ResponseGenerator read their settings
    from. ``kv_bits`` stays None: it is mlx-lm's own quantized cache; TurboQuant caches come
    from the model's ``make_cache`` (see use_turboquant_caches)."""
    return argparse.Namespace(
        model=str(model_path),
        adapter_path=None,
        draft_model=None,
        num_draft_tokens=3,
        trust_remote_code=False,
        chat_template="",
        use_default_chat_template=False,
        chat_template_args={},
        pipeline=False,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        decode_concurrency=args.decode_concurrency,
        prompt_concurrency=args.prompt_concurrency,
        prefill_step_size=args.prefill_step_size,
        prompt_cache_size=args.prompt_cache_size,
        prompt_cache_bytes=args.prompt_cache_bytes,
        kv_bits=None,
        kv_group_size=64,
        quantized_kv_start=0,
        allowed_origins=args.allowed_origins,
        log_level=args.log_level,
    )


def use_turboquant_caches(model, knobs: dict) -> None:
    """Make ``mlx_lm.models.cache.make_prompt_cache(model)`` return TurboQuant caches.

    mlx_lm.server builds every fresh cache with ``make_prompt_cache(model)``, which defers to
    ``model.make_cache()`` when the model has one; giving this model instance one that
    converts the architecture's own caches puts TurboQuant caches on every server path
    without copying mlx-lm's request loop. Per-layer types are kept (tq_kvcache.convert_cache).
    """
    from mlx_lm.models.cache import KVCache
    from tq_kvcache import convert_cache, install_attention_hook

    own = getattr(type(model), "make_cache", None)

    def make_cache():
        caches = own(model) if own is not None else [KVCache() for _ in model.layers]
        return convert_cache(caches, **knobs)

    install_attention_hook(model)
    model.make_cache = make_cache


def _served_classes():
    """mlx_lm.server's classes, subclassed (imported late: mlx_lm.server is a heavy import)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.server import APIHandler, ModelProvider, ResponseGenerator

    from .generate_cmd import load_tq
    from .status_line import StatusLine

    class TQModelProvider(ModelProvider):
        """Loads the one served TurboQuant checkpoint with tq's loader (no adapters or draft
        models); with ``kv_knobs`` its caches are TurboQuant caches."""

        def __init__(self, cli_args, kv_knobs: dict | None, aliases: set[str]):
            super().__init__(cli_args)
            self.kv_knobs = kv_knobs
            for alias in aliases:  # every name a client may use loads the same model once
                self._model_map[alias] = cli_args.model

        def _load(self, model_path, adapter_path=None, draft_model_path=None):
            if adapter_path is not None or draft_model_path is not None:
                raise ValueError("tq serve takes no adapters or draft models")
            if model_path != self.cli_args.model:
                raise ValueError(f"model {model_path!r} is not served here")
            self.reset()
            gc.collect()
            mx.clear_cache()
            with StatusLine(f"loading {model_path}", prefix="tq serve"):
                try:
                    model, tokenizer = load_tq(Path(model_path))
                except CommandError as e:
                    raise ValueError(str(e)) from None
            if self.kv_knobs is not None:
                use_turboquant_caches(model, self.kv_knobs)
            self.model_key = (model_path, None, None)
            self.model = model
            self.tokenizer = tokenizer
            self.processor = None  # text only
            self.draft_model = None
            # BatchGenerator merges per-request caches into batch caches, which TurboQuant
            # caches do not implement: with them requests are served one at a time.
            self.is_batchable = self.kv_knobs is None and all(
                hasattr(c, "merge") for c in make_prompt_cache(model)
            )

    class TQResponseGenerator(ResponseGenerator):
        def _is_batchable(self, args):
            return self.model_provider.kv_knobs is None and super()._is_batchable(args)

    class TQAPIHandler(APIHandler):
        """mlx_lm.server's handler behind request checks, with JSON errors everywhere and a
        models list that names only the served model."""

        #: seconds a socket read or write may stall (a client that sends half a body)
        timeout = 120

        def __init__(self, response_generator, *args, limits: ServeLimits, **kw):
            self.limits = limits
            super().__init__(response_generator, *args, **kw)

        def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
            log.info("%s %s", self.address_string(), format % args)

        def send_json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self._set_cors_headers()
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def send_error_json(self, error: RequestError) -> None:
            log.info("refused %s: %s %s", self.path, error.status, error.message)
            self.send_json(error.status, error.body())

        def _discard_body(self, length: int) -> None:
            if length > _MAX_DRAIN_BYTES:
                return
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 20))
                if not chunk:
                    return
                length -= len(chunk)

        def do_POST(self):
            if self.path not in CHAT_PATHS + TEXT_PATHS:
                self.close_connection = True
                self.send_error_json(_no_endpoint(self.path))
                return
            try:
                length = check_content_length(self.headers.get("Content-Length"), self.limits)
            except RequestError as e:
                self.close_connection = True
                if e.status == 413:
                    self._discard_body(int(self.headers.get("Content-Length")))
                self.send_error_json(e)
                return
            try:
                raw = self.rfile.read(length)
                if len(raw) != length:
                    raise RequestError(400, f"body ended after {len(raw)} of {length} bytes")
                body = validate_request(self.path, parse_body(raw), self.limits)
            except RequestError as e:
                self.send_error_json(e)
                return
            except (TimeoutError, ConnectionError) as e:
                log.info("client %s went away while sending: %s", self.address_string(), e)
                self.close_connection = True
                return
            # mlx-lm's do_POST reads the body itself: hand it the checked, normalized one.
            data = json.dumps(body).encode()
            del self.headers["Content-Length"]
            self.headers["Content-Length"] = str(len(data))
            socket_reader, self.rfile = self.rfile, io.BytesIO(data)
            try:
                super().do_POST()
            except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
                # mlx-lm's handler stops the generation (ctx.stop()) on the way out.
                log.info("client %s disconnected: %s", self.address_string(), e)
                self.close_connection = True
            finally:
                self.rfile = socket_reader

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self.send_json(200, {"object": "list", "data": [self._model_card()]})
            elif self.path.startswith("/v1/models/"):
                name = self.path[len("/v1/models/") :]
                if name in self.limits.model_ids:
                    self.send_json(200, self._model_card())
                else:
                    self.send_error_json(
                        RequestError(
                            404, f"model {name!r} is not served here", code="model_not_found"
                        )  # fmt: skip
                    )
            elif self.path == "/health":
                self.handle_health_check()
            else:
                self.send_error_json(_no_endpoint(self.path))

        def _model_card(self) -> dict:
            return {
                "id": self.limits.served_id,
                "object": "model",
                "created": self.created,
                "owned_by": "tq",
            }

    return TQModelProvider, TQResponseGenerator, TQAPIHandler


def _no_endpoint(path: str) -> RequestError:
    return RequestError(404, f"no endpoint {path}", code="not_found")


def vocab_size(model_path: Path) -> int:
    config = json.loads((model_path / "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(size, int) or size < 1:
        raise CommandError(f"{model_path / 'config.json'}: no vocab_size")
    return size


class Server:
    """A running `tq serve` in this process: the generation thread and the HTTP server."""

    def __init__(self, args, model_path: Path, served_id: str):
        from mlx_lm.models.cache import LRUPromptCache
        from mlx_lm.server import get_system_fingerprint

        from .kv_options import kv_knobs

        provider_class, generator_class, handler_class = _served_classes()
        knobs = kv_knobs(args)
        aliases = {"default_model", served_id, str(model_path), str(model_path.resolve())}
        self.limits = ServeLimits(
            served_id=served_id,
            model_ids=frozenset(aliases),
            vocab_size=vocab_size(model_path),
            max_tokens=args.max_tokens_limit,
            max_body_bytes=args.max_body_bytes,
        )
        self.provider = provider_class(mlx_server_args(args, model_path), knobs, aliases)
        # mlx-lm's run() caps the prompt cache in bytes only while batching; the cap given
        # here holds on every path (LRUPromptCache evicts on each insert).
        cap = args.prompt_cache_bytes if args.prompt_cache_bytes is not None else 1 << 63
        self.prompt_cache = LRUPromptCache(max_size=args.prompt_cache_size, max_bytes=cap)
        self.generator = generator_class(self.provider, self.prompt_cache)
        while self.provider.model is None and self.generator.generation_available():
            time.sleep(0.05)  # the generation thread loads the model (mlx-lm's design)
        if self.provider.model is None:
            self.generator.stop_and_join()
            raise CommandError(f"{model_path}: the model did not load (see the log above)")
        family, _, _, _, address = socket.getaddrinfo(
            args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = type(
            "TQHTTPServer",
            (ThreadingHTTPServer,),
            {"address_family": family, "request_queue_size": 64, "daemon_threads": True},
        )
        fingerprint = get_system_fingerprint()
        limits = self.limits
        self.httpd = server_class(
            address,
            lambda *a, **kw: handler_class(
                self.generator,
                *a,
                system_fingerprint=fingerprint,
                limits=limits,
                **kw,
            ),
        )
        self.port = self.httpd.server_address[1]

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        self.httpd.server_close()
        self.generator.stop_and_join()


def _stop_on_sigterm() -> None:
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def run(args) -> int:
    from .generate_cmd import resolve_tq_model
    from .kv_options import kv_knobs

    _check_args(args)
    knobs = kv_knobs(args)  # bad --kv-* flags fail before any loading
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not is_loopback(args.host):
        log.warning(
            "listening on %s, beyond this machine: the server has no authentication", args.host
        )
    path = resolve_tq_model(args.model, args.preset)
    from .default_model import MODEL_NAME

    served_id = args.model or MODEL_NAME
    server = Server(args, path, served_id)
    cache = "fp16 KV cache, batched" if knobs is None else f"TurboQuant KV cache {knobs}"
    cap = args.prompt_cache_bytes
    print(
        f"tq serve: {served_id} ({cache}; prompt cache cap "
        f"{'none' if cap is None else f'{cap} bytes'}) on "
        f"http://{args.host}:{server.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    _stop_on_sigterm()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("tq serve: stopped", file=sys.stderr, flush=True)
    # The HTTP server is closed and the generation thread joined. After a batched request,
    # interpreter teardown aborts in MLX's C++ stream threads ("terminate called without an
    # active exception", exit 134) although everything was stopped; skip that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
