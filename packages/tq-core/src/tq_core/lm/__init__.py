"""tq_core.lm: mlx-lm glue (the ``[lm]`` extra): convert a model to TurboQuant, load one."""

from .convert import convert, load_source
from .load import load

__all__ = ["convert", "load", "load_source"]
