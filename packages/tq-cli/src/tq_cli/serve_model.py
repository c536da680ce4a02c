"""The served model for `tq serve`: tq's loader and TurboQuant KV caches under mlx_lm.server."""

from __future__ import annotations

import gc
import json
from pathlib import Path

from .main import CommandError


def use_turboquant_caches(model, knobs: dict) -> None:
    """Make ``mlx_lm.models.cache.make_prompt_cache(model)`` return TurboQuant caches.

    mlx_lm.server builds every fresh cache with ``make_prompt_cache(model)``, which defers to
    ``model.make_cache()`` when the model has one; giving this model instance one that
    converts the architecture's own caches puts TurboQuant caches on every server path
    without copying mlx-lm's request loop. Per-layer types are kept (tq_kvcache.convert_cache).
    """
    from mlx_lm.models.cache import KVCache
    from tq_kvcache import convert_cache, install_attention_hook

    own = getattr(type(model), "make_cache", None)

    def make_cache():
        caches = own(model) if own is not None else [KVCache() for _ in model.layers]
        return convert_cache(caches, **knobs)

    install_attention_hook(model)
    model.make_cache = make_cache


def served_model_classes():
    """mlx_lm.server's ModelProvider and ResponseGenerator, subclassed (imported late:
    mlx_lm.server is a heavy import)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.server import ModelProvider, ResponseGenerator

    from .generate_cmd import load_tq
    from .status_line import StatusLine

    class TQModelProvider(ModelProvider):
        """Loads the one served TurboQuant checkpoint with tq's loader (no adapters or draft
        models); with ``kv_knobs`` its caches are TurboQuant caches."""

        def __init__(self, cli_args, kv_knobs: dict | None, aliases: set[str]):
            super().__init__(cli_args)
            self.kv_knobs = kv_knobs
            for alias in aliases:  # every name a client may use loads the same model once
                self._model_map[alias] = cli_args.model

        def _load(self, model_path, adapter_path=None, draft_model_path=None):
            if adapter_path is not None or draft_model_path is not None:
                raise ValueError("tq serve takes no adapters or draft models")
            if model_path != self.cli_args.model:
                raise ValueError(f"model {model_path!r} is not served here")
            self.reset()
            gc.collect()
            mx.clear_cache()
            with StatusLine(f"loading {model_path}", prefix="tq serve"):
                try:
                    model, tokenizer = load_tq(Path(model_path))
                except CommandError as e:
                    raise ValueError(str(e)) from None
            if self.kv_knobs is not None:
                use_turboquant_caches(model, self.kv_knobs)
            self.model_key = (model_path, None, None)
            self.model = model
            self.tokenizer = tokenizer
            self.processor = None  # text only
            self.draft_model = None
            # BatchGenerator merges per-request caches into batch caches, which TurboQuant
            # caches do not implement: with them requests are served one at a time.
            self.is_batchable = self.kv_knobs is None and all(
                hasattr(c, "merge") for c in make_prompt_cache(model)
            )

    class TQResponseGenerator(ResponseGenerator):
        def _is_batchable(self, args):
            return self.model_provider.kv_knobs is None and super()._is_batchable(args)

    return TQModelProvider, TQResponseGenerator


def vocab_size(model_path: Path) -> int:
    config = json.loads((model_path / "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(size, int) or size < 1:
        raise CommandError(f"{model_path / 'config.json'}: no vocab_size")
    return size
