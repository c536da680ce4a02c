"""KV cache settings (`K<bits>V<bits>[-prod]`) and the options the kv evaluations share."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .main import CommandError

__all__ = [
    "DEFAULT_SETTINGS",
    "Setting",
    "add_setting_arguments",
    "check_counts",
    "parse_settings",
]

DEFAULT_SETTINGS = "K8V8,K4V3,K3.5V3.5,K3V2,K2V2,K4V3-prod"
_SETTING = re.compile(r"^k(\d+(?:\.\d+)?)v(\d+(?:\.\d+)?)(?:-(mse|prod))?$", re.IGNORECASE)


@dataclass(frozen=True)
class Setting:
    """One TurboQuant cache setting: ``K<bits>V<bits>[-prod]``."""

    k_bits: float | int
    v_bits: float | int
    key_mode: str = "mse"

    @property
    def name(self) -> str:
        mode = "-prod" if self.key_mode == "prod" else ""
        return f"K{self.k_bits:g}V{self.v_bits:g}{mode}"

    def knobs(self, sink: int, buffer: int, flush_batch: int = 64) -> dict:
        return dict(
            k_bits=self.k_bits,
            v_bits=self.v_bits,
            key_mode=self.key_mode,
            sink_tokens=sink,
            buffer=buffer,
            flush_batch=flush_batch,
        )


def parse_settings(text: str) -> list[Setting]:
    """``K4V3,K3.5V3.5,K4V3-prod`` -> settings (``fp16`` is accepted and skipped: the dense
    reference is always evaluated). Bad syntax or bits -> CommandError."""
    from tq_kvcache import check_bits

    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item or item.lower() == "fp16":
            continue
        m = _SETTING.match(item)
        if not m:
            raise CommandError(
                f"--settings: {item!r} is not a setting; write K<bits>V<bits>[-prod], "
                "e.g. K4V3,K3.5V3.5,K4V3-prod"
            )
        try:
            k = check_bits("key bits", float(m.group(1)))
            v = check_bits("value bits", float(m.group(2)))
        except ValueError as e:
            raise CommandError(f"--settings {item}: {e}") from None
        mode = (m.group(3) or "mse").lower()
        if mode == "prod" and math.ceil(k) > 4:
            raise CommandError(f"--settings {item}: prod keys take at most 4 bits (8 is mse only)")
        setting = Setting(k, v, mode)
        if setting not in out:
            out.append(setting)
    if not out:
        raise CommandError("--settings: give at least one TurboQuant setting, e.g. K4V3")
    return out


def add_setting_arguments(parser, default: str = DEFAULT_SETTINGS) -> None:
    """--model, --settings, --sink, --buffer, --json, --out: shared by the kv evaluations."""
    from .kv_options import DEFAULT_BUFFER, DEFAULT_SINK

    parser.add_argument(
        "--model", required=True, metavar="PATH", help="float model or TurboQuant checkpoint"
    )
    parser.add_argument(
        "--settings",
        type=str,
        default=default,
        help=f"comma-separated K<bits>V<bits>[-prod] (bits 1-4, 8, 1.5/2.5/3.5; default {default})",
    )
    parser.add_argument(
        "--sink", type=int, default=DEFAULT_SINK, metavar="N", help="first N tokens kept fp16"
    )
    parser.add_argument(
        "--buffer", type=int, default=DEFAULT_BUFFER, metavar="N", help="recent N tokens kept fp16"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (tables go to stderr)")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON to this file")


def check_counts(args) -> None:
    for flag in ("sink", "buffer"):
        if getattr(args, flag) < 0:
            raise CommandError(f"--{flag} must be >= 0")
