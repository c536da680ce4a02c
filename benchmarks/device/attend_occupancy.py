"""Packed-KV decode attention per step with the attend kernel compiled for 1-4 threadgroups
per SM (``__launch_bounds__``, :data:`tq_kernels.attention_plan.ATTEND_MIN_BLOCKS`), SIMT and
tensor-core packed splits, side by side in one process, fp16 SDPA as the reference point.
A spill-free register cap that raises occupancy would speed a latency-bound kernel up.

usage: python benchmarks/device/attend_occupancy.py [--contexts 32768,131072]
           [--settings K4V3,K3V2] [--blocks=0,2,-1] [--mma 0,1] [--groups 528,264]
           [--lut-words 2048,4096] [--prefetch 0,4] [--key-chains 1,2] [--paired 0,1] [--lazy 0,1]
           [--min-chunk N] [--calls 16] [--json F]
(``--blocks=-1``, with ``=``: the automatic choice.)
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import tq_kernels.attention as attention
import tq_kernels.attention_mma_fragments as fragments
import tq_kernels.attention_mma_source as mma_source
import tq_kernels.attention_plan as plan
from probe_rows import ProbeRows
from tq_cli.bench_kernels import time_per_call
from tq_cli.bench_kv import _tq_cache, parse_settings
from tq_kvcache.attention import cache_attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--settings", default="K4V3,K3V2")
    ap.add_argument("--blocks", default="0,2,3,4")
    ap.add_argument("--mma", default="0,1")
    ap.add_argument("--groups", default="528,264", help="split targets (threadgroups) to try")
    ap.add_argument("--lut-words", default="2048", help="pair-table words a part may take")
    ap.add_argument("--prefetch", default="0", help="tensor-core L2 prefetch distances (steps)")
    ap.add_argument("--key-chains", default="2", help="score accumulator chains to try")
    ap.add_argument("--paired", default="1", help="PAIRED_VALUE_FIELDS settings to try")
    ap.add_argument("--lazy", default="1", help="LAZY_MAX settings to try")
    ap.add_argument("--min-chunk", type=int, help="MMA_MIN_CHUNK (packed tokens a split)")
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = ProbeRows("attend_occupancy", a.json)
    if a.min_chunk is not None:
        plan.MMA_MIN_CHUNK = a.min_chunk
    for T in (int(x) for x in a.contexts.split(",")):
        q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
        k = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
        v = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
        mx.eval(q, k, v)
        sec = time_per_call(
            lambda c, q=q, k=k, v=v: [
                mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088) for _ in range(c)
            ],
            a.calls,
            3,
        )
        fp16 = sec * 1e6
        rows.emit(context=T, kind="fp16", us_per_call=round(fp16, 1))
        for s in parse_settings(a.settings):
            caches = [_tq_cache(k, v, s["knobs"]) for _ in range(2)]
            ref = None
            combos = [
                (mma == "1", int(nb), int(gr), int(lw), int(pf), int(kc), pv == "1", lz == "1")
                for mma in a.mma.split(",")
                for pv in (a.paired.split(",") if mma == "1" else ["0"])
                for lz in (a.lazy.split(",") if mma == "1" else ["0"])
                for kc in (a.key_chains.split(",") if mma == "1" else ["1"])
                for pf in (a.prefetch.split(",") if mma == "1" else ["0"])
                for nb in a.blocks.split(",")
                for gr in a.groups.split(",")
                for lw in a.lut_words.split(",")
            ]
            # Every variant is timed twice, in order, and the second pass is reported: the
            # first variant timed in a process ran 5-10% slow at 32K (stop 18's sweeps).
            for final in (False, True):
                for mma, nb, groups, lut_words, pf, kc, pv, lz in combos:
                    plan.MMA_PREFETCH = pf
                    fragments.LUT_WORDS, mma_source.KEY_CHAINS = lut_words, kc
                    mma_source.PAIRED_VALUE_FIELDS, mma_source.LAZY_MAX = pv, lz
                    attention._attend_kernel.cache_clear()  # its text depends on these
                    plan._mma_applies.cache_clear()
                    plan.MMA_ATTEND, plan.ATTEND_MIN_BLOCKS = mma, nb
                    plan._TARGET_GROUPS = plan._MMA_TARGET_GROUPS = groups
                    for c in caches:  # the launch a cache keeps was made for other knobs
                        c.__dict__.pop("_tq_launch", None)
                    out = cache_attention(q, caches[0], 0.088).astype(mx.float32)
                    mx.eval(out)
                    ref = out if ref is None else ref
                    sec = time_per_call(
                        lambda c, cs=caches, q=q: [
                            cache_attention(q, cs[i % 2], 0.088) for i in range(c)
                        ],
                        a.calls,
                        3,
                    )
                    rel = float(mx.abs(out - ref).max()) / float(mx.abs(ref).max())
                    if not final:
                        continue
                    rows.emit(
                        context=T,
                        kind=s["name"],
                        mma=mma,
                        min_blocks=nb,
                        groups=groups,
                        lut_words=lut_words,
                        prefetch=pf,
                        key_chains=kc,
                        paired_values=pv,
                        lazy_max=lz,
                        us_per_call=round(sec * 1e6, 1),
                        speedup_vs_fp16=round(fp16 / (sec * 1e6), 2),
                        max_rel_diff_vs_first=rel,
                    )
            plan.MMA_ATTEND, plan.ATTEND_MIN_BLOCKS = False, -1
            plan.MMA_PREFETCH = 0
            del caches
        del k, v
        mx.clear_cache()
    rows.save()


if __name__ == "__main__":
    main()
