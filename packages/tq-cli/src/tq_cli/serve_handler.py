"""The HTTP handler of `tq serve`: mlx_lm.server's, behind request checks and JSON errors."""

from __future__ import annotations

import io
import json
import logging

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

#: Bodies declared larger than this are not read at all before the 413 (the connection is
#: closed instead); smaller over-limit bodies are read and dropped so the client sees the 413.
_MAX_DRAIN_BYTES = 64 << 20


def served_handler_class():
    """mlx_lm.server's APIHandler, subclassed (imported late: mlx_lm.server is a heavy
    import)."""
    from mlx_lm.server import APIHandler

    class TQAPIHandler(APIHandler):
        """mlx_lm.server's handler behind request checks, with JSON errors everywhere and a
        models list that names only the served model."""

        #: seconds a socket read or write may stall (a client that sends half a body)
        timeout = 120

        def __init__(self, response_generator, *args, limits: ServeLimits, **kw):
            self.limits = limits
            super().__init__(response_generator, *args, **kw)

        def handle_one_request(self):
            # A client that hangs up before its answer is written (a health probe, an
            # aborted request) is logged in one line, not as a traceback from socketserver.
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError) as e:
                log.info("client %s disconnected: %s", self.address_string(), e)
                self.close_connection = True

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

    return TQAPIHandler


def _no_endpoint(path: str) -> RequestError:
    return RequestError(404, f"no endpoint {path}", code="not_found")
