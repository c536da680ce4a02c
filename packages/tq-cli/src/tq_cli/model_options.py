"""The --model and --preset flags of the commands that load a TurboQuant model."""

from __future__ import annotations

import argparse

PRESET_HELP = "recipe for converting a float model (default tq4)"


def add_model_arguments(
    parser: argparse.ArgumentParser, model_help: str, preset_help: str = PRESET_HELP
) -> None:
    """``--model PATH|HF-ID`` and ``--preset``, read by generate_cmd.resolve_tq_model."""
    parser.add_argument("--model", metavar="PATH|HF-ID", help=model_help)
    parser.add_argument("--preset", help=preset_help)
