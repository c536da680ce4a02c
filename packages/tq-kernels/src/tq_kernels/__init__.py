"""tq-kernels: fused TurboQuant kernels for MLX (Metal and CUDA), registered into tq-core."""

from .attention import KeyPart, ValuePart, packed_kv_attention
from .backend import kernel_backend
from .launch import LaunchConfig, launch_config
from .matvec import (
    dequantize,
    gather_matvec,
    matvec,
    pack_sign_bits,
    rotating_matvec,
    rotating_matvec_plan,
)
from .ops import (
    rotating_matmul_plan,
    rotating_matmul_residual_plan,
    rotating_weight_matmul,
    weight_gather_matmul,
    weight_matmul,
)
from .register import register_all
from .sources import OPS, kernel_source
from .stub_kernels import zeros_kernel, zeros_kernel_factory

__version__ = "0.1.0"

__all__ = [
    "OPS",
    "KeyPart",
    "LaunchConfig",
    "ValuePart",
    "__version__",
    "dequantize",
    "gather_matvec",
    "kernel_backend",
    "kernel_source",
    "launch_config",
    "matvec",
    "pack_sign_bits",
    "packed_kv_attention",
    "register_all",
    "rotating_matmul_plan",
    "rotating_matmul_residual_plan",
    "rotating_matvec",
    "rotating_matvec_plan",
    "rotating_weight_matmul",
    "weight_gather_matmul",
    "weight_matmul",
    "zeros_kernel",
    "zeros_kernel_factory",
]
