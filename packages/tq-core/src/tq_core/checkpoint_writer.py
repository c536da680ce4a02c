"""Write a checkpoint shard by shard into a temporary directory, then publish it atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.json",
    "chat_template.jinja", "added_tokens.json",
)  # fmt: skip


class CheckpointWriter:
    """Tensors go to disk as soon as a shard's worth has been added, so a conversion holds
    at most one shard of output in memory. Nothing appears at ``out`` until :meth:`finish`
    renames the finished temporary directory onto it; on an error (or :meth:`abort`) the
    temporary directory is removed. Use it as a context manager."""

    def __init__(
        self, out: str | os.PathLike, overwrite: bool = False, max_shard_bytes: int = 2 << 30
    ):
        self.out = Path(out).absolute()
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} already exists (pass overwrite=True / --force)")
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._pending: dict[str, mx.array] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, tensors: dict[str, mx.array]) -> None:
        """Queue tensors for the current shard; a full shard is written out at once."""
        for name, array in tensors.items():
            if name in self._names:
                raise ValueError(f"tensor {name!r} was added twice")
            self._names.add(name)
            if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
                self._flush()
            self._pending[name] = array
            self._pending_bytes += array.nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        part = self.tmp / f"part-{len(self._shards) + 1:05d}.safetensors"
        mx.save_safetensors(str(part), self._pending, metadata={"format": "mlx"})
        self._shards.append((part, sorted(self._pending)))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def finish(self, config: dict, tokenizer_dir: str | os.PathLike | None = None) -> Path:
        """Write the last shard, the index, ``config.json`` and the tokenizer files, then
        rename the directory onto ``out``."""
        try:
            self._flush()
            weight_map = {}
            for i, (part, keys) in enumerate(self._shards):
                name = f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"
                os.replace(part, self.tmp / name)
                weight_map.update(dict.fromkeys(keys, name))
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            if tokenizer_dir is not None:
                for fname in TOKENIZER_FILES:
                    src = Path(tokenizer_dir) / fname
                    if src.exists():
                        shutil.copy2(src, self.tmp / fname)
            # mkdtemp makes the directory private (0700); a checkpoint is an ordinary folder.
            os.chmod(self.tmp, 0o755)
            _publish(self.tmp, self.out, self.overwrite)
        except BaseException:
            self.abort()
            raise
        return self.out

    def abort(self) -> None:
        self._pending = {}
        shutil.rmtree(self.tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temporary directory onto ``out`` (replacing it if allowed)."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite=True / --force)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
