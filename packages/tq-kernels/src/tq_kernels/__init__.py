"""tq-kernels: fused TurboQuant kernels for MLX (Metal and CUDA), registered into tq-core."""

from .backend import kernel_backend

__version__ = "0.1.0"

__all__ = ["kernel_backend", "__version__"]
