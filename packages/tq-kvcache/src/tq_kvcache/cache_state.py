"""Save/restore of a TurboQuantKVCache: mlx-lm's ``state`` / ``meta_state`` / ``from_state``,
versioned, with every restored array checked against the declared shape and codecs."""

from __future__ import annotations

import json

import mlx.core as mx

__all__ = ["STATE_VERSION", "CacheState"]

#: Version of the state / meta_state schema (bump on any layout change).
STATE_VERSION = 1


class CacheState:
    """The state half of :class:`tq_kvcache.cache.TurboQuantKVCache` (a mixin: it reads and
    sets the cache's storage attributes)."""

    @property
    def state(self) -> dict[str, mx.array]:
        """Arrays of the cache (sinks, tail, packed codes, channel permutations)."""
        out = {}
        for name in ("sink_k", "sink_v", "tail_k", "tail_v"):
            x = getattr(self, "_" + name)
            if x is not None:
                out[name] = x
        k_codes, v_codes = self.packed_codes()
        out.update({f"k.{n}": a for n, a in k_codes.items()})
        out.update({f"v.{n}": a for n, a in v_codes.items()})
        for name, codec in (("k_perm", self._k_codec), ("v_perm", self._v_codec)):
            if codec is not None and codec.perm is not None:
                out[name] = codec.perm
        return out

    @state.setter
    def state(self, arrays: dict[str, mx.array]):
        meta = getattr(self, "_pending_meta", None)
        if meta is None:
            raise ValueError("set meta_state before state (use from_state)")
        self._reset_storage()
        for name in ("sink_k", "sink_v", "tail_k", "tail_v"):
            setattr(self, "_" + name, arrays.get(name))
        self._packed_k = {n[2:]: a for n, a in arrays.items() if n.startswith("k.")}
        self._packed_v = {n[2:]: a for n, a in arrays.items() if n.startswith("v.")}
        self._n_packed = meta["packed"]
        shape = meta.get("shape")
        self._shape = tuple(shape) if shape else None
        self._itemsize = int(meta.get("itemsize", 2))
        if self._shape is not None:
            b, h, dk, dv = self._shape
            probe_k = mx.zeros((b, h, 1, dk))
            probe_v = mx.zeros((b, h, 1, dv))
            self._build_codecs(probe_k, probe_v, arrays.get("k_perm"), arrays.get("v_perm"))
        self._check_restored(arrays)

    def _check_restored(self, arrays):
        """Refuse arrays that do not fit the declared shape and codecs (a corrupt file)."""
        lengths = {n: a.shape[2] for n, a in arrays.items() if n.startswith(("k.", "v."))}
        if any(n != self._n_packed for n in lengths.values()):
            raise ValueError(f"packed code arrays disagree on the token count {self._n_packed}")
        if self._shape is None:
            if arrays:
                raise ValueError("cache state has arrays but no shape")
            return
        b, h, dk, dv = self._shape
        for name, d in (("sink_k", dk), ("sink_v", dv), ("tail_k", dk), ("tail_v", dv)):
            x = arrays.get(name)
            if x is not None and (x.ndim != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (b, h, d)):
                raise ValueError(f"{name} has shape {x.shape}, expected ({b}, {h}, tokens, {d})")
        for prefix, codec, d in (("k.", self._k_codec, dk), ("v.", self._v_codec, dv)):
            expected = codec.encode(mx.zeros((b, h, 1, d))) if self._n_packed else {}
            for name, probe in expected.items():
                got = arrays.get(prefix + name)
                if (
                    got is None
                    or got.dtype != probe.dtype
                    or (got.shape[:2] + got.shape[3:] != probe.shape[:2] + probe.shape[3:])
                ):
                    raise ValueError(f"packed array {prefix + name} is missing or malformed")

    @property
    def meta_state(self) -> tuple[str, str]:
        meta = dict(
            self.config(),
            offset=self.offset,
            packed=self._n_packed,
            shape=self._shape,
            itemsize=self._itemsize,
        )
        return (str(STATE_VERSION), json.dumps(meta))

    @meta_state.setter
    def meta_state(self, v):
        version, text = v
        if version != str(STATE_VERSION):
            raise ValueError(
                f"unsupported TurboQuant cache state version {version!r} (this tq-kvcache "
                f"reads version {STATE_VERSION})"
            )
        meta = json.loads(text)
        self.__init__(**{k: meta[k] for k in self.CONFIG_KEYS})
        self.offset = meta["offset"]
        self._pending_meta = meta

    @classmethod
    def from_state(cls, state, meta_state):
        obj = cls.__new__(cls)
        obj.meta_state = meta_state
        obj.state = state
        return obj
