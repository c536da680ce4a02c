"""tq-core: the TurboQuant math for MLX (rotations, codebooks, packing, TurboQuant_mse/prod)."""

from . import dispatch
from .checkpoint import CheckpointError, load_weights, read_quantization, save_checkpoint
from .codebook import CODEBOOK_BITS, Codebook, gaussian_codebook, sphere_codebook
from .decode_block import compile_decode_blocks
from .decode_mlp import compile_decode_mlps
from .decode_moe import compile_decode_moe
from .embedding import TurboQuantEmbedding
from .hadamard import (
    hadamard,
    hadamard_factor,
    inverse_hadamard,
    is_hadamard_size,
    largest_hadamard_block,
)
from .linear import TurboQuantLinear
from .pack import PACK_BITS, pack, packed_words, unpack
from .qjl import make_sketch, qjl_dequantize, qjl_signs
from .quant_mse import (
    MSE_BITS,
    MSEQuantized,
    dequantize_mse,
    dequantize_mse_rotated,
    nearest_index,
    quantize_mse,
)
from .quant_prod import PROD_BITS, ProdQuantized, dequantize_prod, inner_product_prod, quantize_prod
from .quantize_model import apply_plan, plan_layers, quantize_model
from .recipe import PRESETS, QuantRecipe, layer_kind, preset
from .rotation import Rotation, make_rotation, rotate, unrotate
from .sharded_linear import (
    TurboQuantAllToShardedLinear,
    TurboQuantShardedToAllLinear,
    shard_inplace,
    shard_linear,
)
from .siblings import group_siblings
from .switch_linear import TurboQuantSwitchLinear
from .weights import (
    GROUP_SIZES,
    WEIGHT_BITS,
    QJLResidual,
    QuantizedWeight,
    dequantize_weight,
    dequantize_weight_rotated,
    quantize_weight,
    weight_rotation,
)

__version__ = "0.1.0"

__all__ = [
    "GROUP_SIZES",
    "QJLResidual",
    "dispatch",
    "PRESETS",
    "WEIGHT_BITS",
    "CheckpointError",
    "QuantRecipe",
    "QuantizedWeight",
    "TurboQuantEmbedding",
    "TurboQuantLinear",
    "TurboQuantSwitchLinear",
    "TurboQuantAllToShardedLinear",
    "TurboQuantShardedToAllLinear",
    "shard_inplace",
    "shard_linear",
    "apply_plan",
    "dequantize_weight",
    "dequantize_weight_rotated",
    "group_siblings",
    "compile_decode_mlps",
    "compile_decode_blocks",
    "compile_decode_moe",
    "layer_kind",
    "load_weights",
    "plan_layers",
    "preset",
    "quantize_model",
    "quantize_weight",
    "read_quantization",
    "save_checkpoint",
    "weight_rotation",
    "CODEBOOK_BITS",
    "MSE_BITS",
    "PACK_BITS",
    "PROD_BITS",
    "Codebook",
    "MSEQuantized",
    "ProdQuantized",
    "Rotation",
    "dequantize_mse",
    "dequantize_mse_rotated",
    "dequantize_prod",
    "gaussian_codebook",
    "hadamard",
    "hadamard_factor",
    "inner_product_prod",
    "inverse_hadamard",
    "is_hadamard_size",
    "largest_hadamard_block",
    "make_rotation",
    "make_sketch",
    "nearest_index",
    "pack",
    "packed_words",
    "qjl_dequantize",
    "qjl_signs",
    "quantize_mse",
    "quantize_prod",
    "rotate",
    "sphere_codebook",
    "unpack",
    "unrotate",
    "__version__",
]
