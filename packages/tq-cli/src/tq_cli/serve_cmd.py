"""`tq serve`: mlx_lm.server's OpenAI-compatible server on TurboQuant weights and KV caches."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from .main import CommandError
from .serve_handler import served_handler_class
from .serve_model import served_model_classes, use_turboquant_caches, vocab_size
from .serve_options import add_arguments, check_args, mlx_server_args, parse_size
from .serve_requests import ServeLimits

__all__ = [
    "Server",
    "add_arguments",
    "is_loopback",
    "mlx_server_args",
    "parse_size",
    "run",
    "use_turboquant_caches",
    "vocab_size",
]

log = logging.getLogger("tq.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """A running `tq serve` in this process: the generation thread and the HTTP server.

    mlx_lm.server does the serving: the HTTP handler, the request queue and its one
    generation thread, batching (BatchGenerator) and the prompt cache (LRUPromptCache). tq
    changes only what it needs: the model provider loads TurboQuant checkpoints with tq's
    loader; with ``--kv-*`` flags every fresh cache the server makes is a TurboQuant cache
    (requests are then served one at a time, as mlx-lm does for its own quantized cache;
    serve_model.py); the prompt cache gets a byte cap on every path; requests are checked
    (serve_requests.py) before the handler sees them (serve_handler.py).
    """

    def __init__(self, args, model_path: Path, served_id: str):
        from mlx_lm.models.cache import LRUPromptCache
        from mlx_lm.server import get_system_fingerprint

        from .kv_options import kv_knobs

        provider_class, generator_class = served_model_classes()
        handler_class = served_handler_class()
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

    check_args(args)
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
