"""tq-kvcache: TurboQuant KV cache for mlx-lm (attention over packed K/V). Scaffold for now."""

__version__ = "0.1.0"

__all__ = ["__version__"]
