"""Checks on `tq serve` request bodies before mlx_lm.server sees them: a 4xx, never a crash.

mlx_lm.server checks the types of the sampling parameters but not everything its generation
thread later trips over (a ``stop`` list of numbers, ``logit_bias`` ids past the vocabulary,
a prompt that is a list), nor sizes (``max_tokens`` of a billion, an unbounded body). Those
reach the one generation thread shared by every request, so they are refused here, with
OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
TEXT_PATHS = ("/v1/completions",)
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 16
MAX_MESSAGES = 4096

#: Parameters with a type and a range: name -> (types, lowest, highest). ``None`` is always
#: allowed (the server default applies).
NUMBERS: dict[str, tuple[tuple[type, ...], float | None, float | None]] = {
    "temperature": ((int, float), 0, 100),
    "top_p": ((int, float), 0, 1),
    "top_k": ((int,), 0, None),
    "min_p": ((int, float), 0, 1),
    "repetition_penalty": ((int, float), 0, 100),
    "repetition_context_size": ((int,), 0, 1 << 20),
    "presence_penalty": ((int, float), -2, 2),
    "presence_context_size": ((int,), 0, 1 << 20),
    "frequency_penalty": ((int, float), -2, 2),
    "frequency_context_size": ((int,), 0, 1 << 20),
    "xtc_probability": ((int, float), 0, 1),
    "xtc_threshold": ((int, float), 0, 1),
    "top_logprobs": ((int,), 0, 10),
    "seed": ((int,), 0, (1 << 63) - 1),
}
BOOLEANS = ("stream", "logprobs")
#: OpenAI parameters this server does not implement: name -> the only values accepted
#: (anything else would silently do something other than asked).
UNSUPPORTED = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "adapters": (None,),
    "functions": (None,),
    "function_call": (None,),
}


@dataclass
class RequestError(ValueError):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    kind: str = "invalid_request_error"

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class ServeLimits:
    """What a request may ask of this server."""

    served_id: str  #: the name /v1/models gives
    model_ids: frozenset[str]  #: every name a request may use for it
    vocab_size: int
    max_tokens: int = 32768
    max_body_bytes: int = 4 << 20


def check_content_length(value: str | None, limits: ServeLimits) -> int:
    """The body size from the ``Content-Length`` header, within the limit."""
    if value is None:
        raise RequestError(411, "a Content-Length header is required", code="length_required")
    try:
        length = int(value)
    except ValueError:
        raise RequestError(400, f"invalid Content-Length header {value!r}") from None
    if length < 0:
        raise RequestError(400, f"invalid Content-Length header {value!r}")
    if length > limits.max_body_bytes:
        raise RequestError(
            413,
            f"request body of {length} bytes is over this server's limit of "
            f"{limits.max_body_bytes} bytes (tq serve --max-body-bytes)",
            code="request_too_large",
        )
    return length


def parse_body(raw: bytes) -> dict:
    """The JSON object in ``raw``."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(400, f"request body is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, not {type(body).__name__}")
    return body


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value, types: tuple[type, ...]) -> bool:
    # bool is an int in Python; `"max_tokens": true` is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, types):
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


def _check_number(body: dict, name: str, types, low, high) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value, types):
        kind = "an integer" if types == (int,) else "a number"
        raise RequestError(400, f"{name} must be {kind}, got {_type_name(value)}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise RequestError(400, f"{name} must be {bounds}, got {value}", param=name)


def _check_max_tokens(body: dict, limits: ServeLimits) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value, (int,)):
            raise RequestError(400, f"{name} must be an integer, got {_type_name(value)}", name)
        if not 1 <= value <= limits.max_tokens:
            raise RequestError(
                400,
                f"{name} must be between 1 and {limits.max_tokens} on this server, got {value}",
                param=name,
            )


def _check_stop(body: dict) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a string or a list of non-empty strings", "stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(
            400, f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}", "stop"
        )


def _check_logit_bias(body: dict, limits: ServeLimits) -> None:
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise RequestError(400, "logit_bias must be an object of token id -> bias", "logit_bias")
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(
                400, f"logit_bias key {key!r} is not a token id", "logit_bias"
            ) from None
        if not 0 <= token < limits.vocab_size:
            raise RequestError(
                400,
                f"logit_bias token id {token} is outside the vocabulary "
                f"(0..{limits.vocab_size - 1})",
                "logit_bias",
            )
        if not _is_number(value, (int, float)) or not -100 <= value <= 100:
            raise RequestError(
                400, "logit_bias values must be numbers in [-100, 100]", "logit_bias"
            )


def _check_content(content, index: int, role: str) -> None:
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return
    if content is None:
        if role == "assistant":
            return  # an assistant turn that only called tools
        raise RequestError(400, f"{where} must be a string", "messages")
    if not isinstance(content, list):
        raise RequestError(
            400, f"{where} must be a string or a list of parts, got {_type_name(content)}",
            "messages",
        )  # fmt: skip
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise RequestError(
                400, f"{where}: only text parts are supported by this model, got {kind!r}",
                "messages",
            )  # fmt: skip
        if not isinstance(part.get("text"), str):
            raise RequestError(400, f"{where}: a text part needs a string 'text'", "messages")


def _check_messages(body: dict) -> None:
    messages = body.get("messages")
    if messages is None:
        raise RequestError(400, "messages is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(400, f"at most {MAX_MESSAGES} messages, got {len(messages)}", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(400, f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                "messages",
            )  # fmt: skip
        _check_content(message.get("content"), i, role)
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise RequestError(400, "tools must be a list of objects", "tools")
    for name in ("chat_template_kwargs", "role_mapping"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise RequestError(400, f"{name} must be an object", name)


def _check_prompt(body: dict) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        body["prompt"] = prompt = prompt[0]  # the openai client may send [text]
    if prompt is None:
        raise RequestError(400, "prompt is required", "prompt")
    if isinstance(prompt, list):
        raise RequestError(400, "one prompt string per request (lists are not supported)", "prompt")
    if not isinstance(prompt, str):
        raise RequestError(400, f"prompt must be a string, got {_type_name(prompt)}", "prompt")
    if not prompt:
        raise RequestError(400, "prompt is empty", "prompt")


def validate_request(path: str, body: dict, limits: ServeLimits) -> dict:
    """Refuse (RequestError) what the server cannot do well; return ``body``, normalized."""
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise RequestError(400, f"model must be a string, got {_type_name(model)}", "model")
        if model not in limits.model_ids:
            raise RequestError(
                404,
                f"model {model!r} is not served here; this server serves {limits.served_id!r}",
                param="model",
                code="model_not_found",
            )
    draft = body.get("draft_model")
    if draft not in (None, "default_model"):
        raise RequestError(400, "draft models are not supported by tq serve", "draft_model")
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise RequestError(
                400, f"{name}={body[name]!r} is not supported by tq serve", param=name
            )
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError(
            400, "response_format other than {'type': 'text'} is not supported", "response_format"
        )
    for name in BOOLEANS:
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise RequestError(400, f"{name} must be true or false", param=name)
    options = body.get("stream_options")
    if options is not None and not (
        isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)
    ):
        raise RequestError(400, "stream_options must be {'include_usage': bool}", "stream_options")
    if isinstance(options, dict):
        body["stream_options"] = {"include_usage": options.get("include_usage", False)}
    _check_max_tokens(body, limits)
    for name, (types, low, high) in NUMBERS.items():
        _check_number(body, name, types, low, high)
    _check_stop(body)
    _check_logit_bias(body, limits)
    if path in CHAT_PATHS:
        _check_messages(body)
    elif path in TEXT_PATHS:
        _check_prompt(body)
    return body
