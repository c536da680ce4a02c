"""tq-kvcache: TurboQuant KV cache for mlx-lm, with decode attention straight from packed K/V."""

from .attention import cache_attention, packed_attention
from .cache import DECODE_MAX_QUERIES, STATE_VERSION, TurboQuantKVCache
from .codec import KVCodec, check_bits, make_codec
from .factory import convert_cache, make_turboquant_cache, to_turboquant
from .hook import install_attention_hook, turboquant_sdpa
from .prompt_cache import load_prompt_cache, save_prompt_cache
from .rotating import TurboQuantRotatingKVCache

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "DECODE_MAX_QUERIES",
    "STATE_VERSION",
    "KVCodec",
    "TurboQuantKVCache",
    "TurboQuantRotatingKVCache",
    "cache_attention",
    "check_bits",
    "convert_cache",
    "install_attention_hook",
    "load_prompt_cache",
    "make_codec",
    "make_turboquant_cache",
    "packed_attention",
    "save_prompt_cache",
    "to_turboquant",
    "turboquant_sdpa",
]
