"""tq-stream: MoE expert streaming from disk for TurboQuant models. Scaffold: API lands later."""

__version__ = "0.1.0"

__all__ = ["__version__"]
