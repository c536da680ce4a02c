"""Experts of one MoE layer on disk: per-expert slices of the stacked (E, ...) tensors, read
in parallel with adjacent experts of one tensor merged into one read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .reader import RangeReader
from .safetensors_index import DTYPES, StreamError, TensorSlot

__all__ = ["ExpertLayout", "ExpertLoader"]


@dataclass(frozen=True)
class ExpertLayout:
    """The stacked expert tensors of one layer: ``params`` maps a parameter path inside the
    layer (``gate_proj.indices``) to its slot; every slot's first dimension is the expert."""

    layer: str
    num_experts: int
    params: dict[str, TensorSlot]

    def __post_init__(self):
        for name, slot in self.params.items():
            if not slot.shape or slot.shape[0] != self.num_experts:
                raise StreamError(
                    f"{slot.file}: tensor {self.layer}.{name} has shape {slot.shape}; "
                    f"expected {self.num_experts} experts first"
                )

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert (all its parameters)."""
        return sum(s.nbytes // self.num_experts for s in self.params.values())


def _to_array(buf, slot: TensorSlot) -> mx.array:
    np_dtype, mx_name = DTYPES[slot.dtype]
    # Copy out of the read buffer: the array outlives it and must own aligned memory.
    arr = np.frombuffer(buf, dtype=np_dtype).reshape(slot.shape[1:]).copy()
    a = mx.array(arr)
    if mx_name == "bfloat16":
        a = a.view(mx.bfloat16)
    return a


class ExpertLoader:
    """Reads experts of any layer; ``workers`` threads serve the reads of one call."""

    def __init__(self, reader: RangeReader, workers: int = 8):
        if workers < 1:
            raise StreamError(f"--prefetch-workers must be at least 1, got {workers}")
        self.reader = reader
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tq-expert")

    def load(self, layout: ExpertLayout, experts: list[int]) -> dict[int, dict[str, mx.array]]:
        """``{expert: {param: array}}`` for ``experts`` of ``layout``."""
        for e in experts:
            if not 0 <= e < layout.num_experts:
                raise StreamError(f"{layout.layer}: expert {e} out of range")
        runs = []  # (param, first expert, count): consecutive experts of one tensor
        for name in layout.params:
            ordered = sorted(experts)
            first = prev = ordered[0]
            for e in ordered[1:]:
                if e != prev + 1:
                    runs.append((name, first, prev - first + 1))
                    first = e
                prev = e
            runs.append((name, first, prev - first + 1))

        def read_run(run):
            name, first, count = run
            slot = layout.params[name]
            stride = slot.nbytes // layout.num_experts
            return self.reader.read(slot.file, slot.start + first * stride, count * stride)

        out: dict[int, dict[str, mx.array]] = {e: {} for e in experts}
        for (name, first, count), data in zip(runs, self.pool.map(read_run, runs)):
            slot = layout.params[name]
            stride = slot.nbytes // layout.num_experts
            view = memoryview(data)
            for j in range(count):
                out[first + j][name] = _to_array(view[j * stride : (j + 1) * stride], slot)
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)
