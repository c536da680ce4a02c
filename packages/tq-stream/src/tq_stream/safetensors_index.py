"""Where each tensor of a safetensors checkpoint lies on disk: file, dtype, shape, byte range.

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian header
length, a JSON header mapping names to ``dtype``, ``shape`` and ``data_offsets`` relative to
the end of the header, then the raw row-major data. Reading only the header lets a streamed
expert be located without touching the rest of the file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["StreamError", "TensorSlot", "read_header", "index_checkpoint", "DTYPES"]

#: safetensors dtype -> (numpy dtype of the stored bytes, MLX dtype name). bfloat16 is read
#: as uint16 and viewed as bfloat16 by MLX.
DTYPES = {
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "U32": (np.uint32, "uint32"),
    "I32": (np.int32, "int32"),
    "U8": (np.uint8, "uint8"),
    "I8": (np.int8, "int8"),
    "U16": (np.uint16, "uint16"),
    "I64": (np.int64, "int64"),
}

_MAX_HEADER = 100 << 20


class StreamError(ValueError):
    """A checkpoint or setting that expert streaming cannot use: names the file or setting."""


@dataclass(frozen=True)
class TensorSlot:
    """One tensor's place on disk: absolute byte range ``[start, end)`` of ``file``."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: str | os.PathLike) -> dict[str, TensorSlot]:
    """Every tensor of one safetensors file, checked against the file's size."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise StreamError(f"{file}: truncated (no safetensors header)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(_MAX_HEADER, size - 8):
                raise StreamError(f"{file}: corrupt safetensors header length {hlen}")
            header = json.loads(f.read(hlen))
    except FileNotFoundError:
        raise StreamError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StreamError(f"{file}: corrupt safetensors header ({e})") from None
    base = 8 + hlen
    slots = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            lo, hi = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise StreamError(f"{file}: tensor {name!r} has a malformed entry ({e})") from None
        if dtype not in DTYPES:
            raise StreamError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype][0]).itemsize
        if hi - lo != want or lo < 0:
            raise StreamError(f"{file}: tensor {name!r} byte range {lo}-{hi} != its shape")
        if base + hi > size:
            raise StreamError(
                f"{file}: truncated: tensor {name!r} ends at byte {base + hi}, the file has {size}"
            )
        slots[name] = TensorSlot(file, dtype, shape, base + lo, base + hi)
    return slots


def index_checkpoint(path: str | os.PathLike) -> dict[str, TensorSlot]:
    """Every tensor of a checkpoint directory (all ``*.safetensors`` files, or the one file
    ``path`` names); a name found in two files is an error."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise StreamError(f"{path}: no .safetensors files")
    slots: dict[str, TensorSlot] = {}
    for file in files:
        for name, slot in read_header(file).items():
            if name in slots:
                raise StreamError(f"{file}: tensor {name!r} also in {slots[name].file}")
            slots[name] = slot
    return slots
