"""tq_core.lm: mlx-lm glue (the ``[lm]`` extra): convert a model to TurboQuant, load one."""

from .convert import convert, load_source
from .distributed import pipeline_model, shard_model, sharded_load, turboquant_sharding
from .load import load

__all__ = [
    "convert",
    "load",
    "load_source",
    "pipeline_model",
    "shard_model",
    "sharded_load",
    "turboquant_sharding",
]
