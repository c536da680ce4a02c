"""tq-kernels: fused TurboQuant kernels for MLX (Metal and CUDA), registered into tq-core."""

from .backend import kernel_backend
from .launch import LaunchConfig, launch_config
from .matvec import dequantize, gather_matvec, matvec
from .ops import weight_gather_matmul, weight_matmul
from .register import register_all
from .sources import OPS, kernel_source

__version__ = "0.1.0"

__all__ = [
    "OPS",
    "LaunchConfig",
    "__version__",
    "dequantize",
    "gather_matvec",
    "kernel_backend",
    "kernel_source",
    "launch_config",
    "matvec",
    "register_all",
    "weight_gather_matmul",
    "weight_matmul",
]
