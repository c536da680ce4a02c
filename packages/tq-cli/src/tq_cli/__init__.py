"""tq-cli: the `tq` command (bench today; convert, generate, eval, serve as they land)."""

from .main import build_parser, main

__version__ = "0.1.0"

__all__ = ["build_parser", "main", "__version__"]
