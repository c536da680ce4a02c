"""tq-stream: run MoE models with their experts streamed from disk through a byte-budgeted
LRU, bit-identical to the resident model."""

from .calibrate import ExpertUsage, choose_pins, co_activation_order
from .expert_cache import CacheStats, ExpertCache
from .expert_store import ExpertLayout, ExpertLoader
from .reader import RangeReader
from .repack import read_perm_file, repack_experts
from .safetensors_index import StreamError, TensorSlot, index_checkpoint, read_header
from .streamed_moe import Prefetcher, StreamedExperts
from .streaming_model import StreamingSession, expert_modules, load_streaming, read_pin_file

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "CacheStats",
    "ExpertCache",
    "ExpertLayout",
    "ExpertLoader",
    "ExpertUsage",
    "Prefetcher",
    "RangeReader",
    "StreamError",
    "StreamedExperts",
    "StreamingSession",
    "TensorSlot",
    "choose_pins",
    "co_activation_order",
    "expert_modules",
    "index_checkpoint",
    "load_streaming",
    "read_header",
    "read_perm_file",
    "read_pin_file",
    "repack_experts",
]
