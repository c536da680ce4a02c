"""Packed-KV attention kernel source: one body for CUDA and Metal per codes layout (CI)."""

import mlx.core as mx
import pytest
from tq_kernels.attention import (
    KeyPart,
    ValuePart,
    _constant,
    _layout,
    counts_values,
    fp_splits,
    split_plan,
)
from tq_kernels.attention_layout import (
    ATTEND_THREADS,
    AttendLayout,
    KeyPartLayout,
    ValuePartLayout,
    value_positions,
)
from tq_kernels.attention_merge_source import combine_source, finish_source
from tq_kernels.attention_mma_source import mma_applies
from tq_kernels.attention_source import attend_source

LAYOUTS = {
    "k4v3": ((KeyPart(128, 4),), (ValuePart(128, 3, None, None, None),)),
    "k3v2-prod": ((KeyPart(128, 2, sgn=object()),), (ValuePart(128, 2, None, None, None),)),
    "k3.5v2.5": (
        (KeyPart(64, 4), KeyPart(64, 3)),
        (ValuePart(64, 3, None, None, None), ValuePart(64, 2, None, None, None)),
    ),
    "k1-prod": ((KeyPart(64, 0, sgn=object()),), (ValuePart(64, 1, None, None, None),)),
}


def _strip(body: str) -> str:
    return body.split("tq_gid")[-1].split("\n", 1)[1]


@pytest.mark.parametrize("name", LAYOUTS)
def test_attend_source_is_one_body_for_both_backends(name):
    keys, values = LAYOUTS[name]
    dk, dv = sum(p.width for p in keys), sum(p.width for p in values)
    layout, dq = _layout(keys, values, 3, dk, dv)
    assert layout.rows == 4  # 3 query rows compile as the 4-row bucket
    # The SIMT body is one text; CUDA adds the tensor-core packed branch where it applies.
    cuda, metal = attend_source(layout, "cuda", mma=False), attend_source(layout, "metal")
    assert _strip(cuda[2]) == _strip(metal[2])
    mma = attend_source(layout, "cuda")
    assert ("tq_mma16816(" in mma[2]) == mma_applies(layout, "cuda") and mma[3] == cuda[3]
    assert cuda[3] == metal[3] and cuda[4] == ("o", "ml")
    assert "__shfl_xor_sync" in cuda[1] and "simd_max" in metal[1]
    assert "__shared__" not in metal[1] + metal[2] and "threadIdx" not in metal[2]
    # The query row holds each mse part's rotated slice, then each prod part's sketch.
    assert dq == sum(p.width for p in keys if p.bits) + sum(p.width for p in keys if p.prod)
    for i, p in enumerate(keys):
        assert (f"k{i}_idx" in cuda[3]) == bool(p.bits)
        assert (f"k{i}_sgn" in cuda[3]) == p.prod


def test_tensor_core_path_applies_to_mse_layouts_on_cuda_only():
    def layout(keys, values, rows=4):
        dk, dv = sum(p.width for p in keys), sum(p.width for p in values)
        return _layout(keys, values, rows, dk, dv)[0]

    k4v3 = layout(*LAYOUTS["k4v3"])
    assert mma_applies(k4v3, "cuda") and not mma_applies(k4v3, "metal")
    assert mma_applies(layout(*LAYOUTS["k3.5v2.5"]), "cuda")  # two parts each side
    assert not mma_applies(layout(*LAYOUTS["k3v2-prod"]), "cuda")  # QJL keys
    assert not mma_applies(layout(*LAYOUTS["k4v3"], rows=8), "cuda")  # hi|lo fill 8 columns
    k8 = ((KeyPart(128, 8),), (ValuePart(128, 3, None, None, None),))
    assert not mma_applies(layout(*k8), "cuda")  # no 8-bit pair table
    body = attend_source(k4v3, "cuda")[2]
    # One product per 16 channels on each side; operands from registers, no staged tiles.
    assert body.count("tq_mma16816(") == 8 + 8 and "ldmatrix" not in body


def test_combine_source_for_both_backends():
    cuda, metal = combine_source("cuda"), combine_source("metal")
    assert _strip(cuda[2]) == _strip(metal[2]) and cuda[3] == ("o", "ml", "sinks", "counts")


def test_layout_checks():
    with pytest.raises(ValueError, match="multiples of 32"):
        AttendLayout(
            (KeyPartLayout(48, 3, False, 0, 0),), (ValuePartLayout(64, 2, 0),), 1, 48, 48, 64
        )
    with pytest.raises(ValueError, match="rows"):
        AttendLayout(
            (KeyPartLayout(64, 3, False, 0, 0),), (ValuePartLayout(64, 2, 0),), 3, 64, 64, 64
        )
    with pytest.raises(ValueError, match="at most 16"):
        _layout(*LAYOUTS["k4v3"], 17, 128, 128)


@pytest.mark.parametrize("n,heads", [(1, 8), (300, 8), (8192, 8), (131072, 8), (131072, 64)])
def test_split_plan_covers_every_token_in_whole_tiles(n, heads):
    chunk, splits = split_plan(n, heads)
    assert chunk % ATTEND_THREADS == 0
    assert (splits - 1) * chunk < n <= splits * chunk
    assert splits * heads <= 528 or chunk == ATTEND_THREADS


@pytest.mark.parametrize("n_fp,splits", [(0, 1), (1, 1), (256, 1), (257, 2), (320, 2), (513, 3)])
def test_fp16_tokens_take_one_split_per_tile(n_fp, splits):
    assert ATTEND_THREADS == 256 and fp_splits(n_fp) == splits


def test_every_kernel_reads_the_fp16_splits_the_launch_sizes():
    """The launch sizes the grid with fp_splits(n_sink + n_tail) and passes it as counts[8];
    attend, combine and finish read it there (the merges add the last NFP splits in the
    original basis), and attend reads the sink/tail lengths from their arrays."""
    layout, _ = _layout(*LAYOUTS["k4v3"], 4, 128, 128, True)
    attend = attend_source(layout, "cuda")[2]
    assert "const int nfp = counts[8];" in attend
    assert "const int NFP = counts[8];" in combine_source("cuda")[2]
    assert "const int NFP = counts[8];" in finish_source(layout, "cuda")[2]
    assert "counts[2] ? (int)tail_k_shape[2] : 0" in attend
    for n_sink, n_tail in [(0, 0), (128, 128), (128, 129), (0, 700)]:
        values = counts_values(512, n_sink, n_tail, 1, False, 4, 8, True)
        assert values == (
            512,
            int(n_sink > 0),
            int(n_tail > 0),
            1,
            0,
            4,
            8,
            1,
            fp_splits(n_sink + n_tail),
        )
    # between flushes the tail grows but the counts array stays the same object
    first = _constant(counts_values(512, 128, 130, 1, False), mx.int32)
    assert _constant(counts_values(512, 128, 140, 1, False), mx.int32) is first
    assert first.tolist() == [512, 1, 1, 1, 0, 0, 0, 0, 2]


def test_value_positions_follow_the_parts():
    keys, values = LAYOUTS["k3.5v2.5"]
    layout, _ = _layout(keys, values, 1, 128, 128)
    # Two 64-wide parts: lane 5 owns coordinates 10, 11 of part 0 and 64 + 10, 64 + 11.
    assert [5 * m + a for m, a in value_positions(layout)] == [10, 11, 74, 75]
    single, _ = _layout(*LAYOUTS["k4v3"], 1, 128, 128)
    assert [5 * m + a for m, a in value_positions(single)] == [20, 21, 22, 23]


@pytest.mark.parametrize("name", ["k4v3", "k3.5v2.5"])
def test_raw_query_sources_for_both_backends(name):
    keys, values = LAYOUTS[name]
    dk, dv = sum(p.width for p in keys), sum(p.width for p in values)
    perm = len(keys) > 1
    layout, _ = _layout(keys, values, 4, dk, dv, True, perm, perm)
    for make in (lambda lay, b: attend_source(lay, b, mma=False), finish_source):
        cuda, metal = make(layout, "cuda"), make(layout, "metal")
        assert _strip(cuda[2]) == _strip(metal[2]) and cuda[3] == metal[3]
    assert ("kperm" in attend_source(layout, "cuda")[3]) == perm
    assert ("vperm" in finish_source(layout, "cuda")[3]) == perm
    assert "params" in attend_source(layout, "cuda")[3]


def test_raw_queries_refuse_prod_keys():
    with pytest.raises(ValueError, match="raw queries"):
        _layout(*LAYOUTS["k3v2-prod"], 1, 128, 128, True)


def test_launch_bounds_name_their_own_cuda_module():
    keys, values = LAYOUTS["k4v3"]
    layout = _layout(keys, values, 4, 128, 128)[0]
    plain, capped = attend_source(layout, "cuda"), attend_source(layout, "cuda", min_blocks=3)
    assert "__launch_bounds__" not in plain[1] and "__launch_bounds__(256, 3)" in capped[1]
    assert capped[0] == plain[0] + "_lb3" and capped[2] == plain[2]  # MLX caches by name
    assert attend_source(layout, "metal", min_blocks=3)[1] == attend_source(layout, "metal")[1]


def test_tensor_core_fragment_windows_and_tables():
    from tq_kernels.attention_mma_fragments import field, lut_plan, window_load, window_shift

    # A field inside one word, and one that straddles two (funnel shift).
    assert field("x", 6, 6) == "((x[0] >> 6) & 63u)"
    assert field("x", 30, 6) == "(tq_funnel(x[0], x[1], 30) & 63u)"
    # 16-byte loads where every window starts on a word boundary and the stream allows.
    k4 = "\n".join(window_load("w", "k0_idx", "t", "t < end", "t4 * 128", 128, 16))
    assert "uint4" in k4 and "tq_funnel" not in k4
    # 3-bit values of a 128-wide part: 48-bit windows, words touched, then shifted.
    v3 = "\n".join(window_load("w", "v0_idx", "t", "t < end", "g * 48", 48, 12))
    assert "uint" not in v3.replace("tq_uint", "") and "<= last" in v3
    assert window_shift("x", "w", "g * 48", 48)[1] == "x"
    assert window_shift("x", "w", "t4 * 128", 128) == ([], "w")
    keys, values = LAYOUTS["k4v3"]
    k4v3 = _layout(keys, values, 4, 128, 128)[0]
    [(koff, kc)], [(voff, vc)], total = lut_plan(k4v3, 10**6)
    assert (kc, vc) == (8, 32) and voff == 256 * 8 and total == 256 * 8 + 64 * 32
    small = lut_plan(k4v3, 1024)  # halved together until the tables fit
    assert small[2] <= 1024 and small[0][0][1] < 8


def test_tensor_core_splits_only_where_splits_are_long(monkeypatch):
    import tq_kernels.attention_plan as plan

    keys, values = LAYOUTS["k4v3"]
    k4v3 = _layout(keys, values, 4, 128, 128)[0]
    monkeypatch.setattr(plan, "MMA_ATTEND", True)
    mma, chunk, nsplit = plan.launch_plan(k4v3, "cuda", 131072, 8)
    # 264 threadgroups over 8 KV heads: 33 splits of 4096 tokens.
    assert (mma, chunk, nsplit) == (True, 4096, 32)
    assert plan.launch_plan(k4v3, "cuda", 4096, 8) == (False, *split_plan(4096, 8))
    assert not plan.launch_plan(k4v3, "metal", 131072, 8)[0]
    assert not plan.launch_plan(_layout(keys, values, 8, 128, 128)[0], "cuda", 131072, 8)[0]
    monkeypatch.setattr(plan, "MMA_ATTEND", False)
    assert not plan.launch_plan(k4v3, "cuda", 131072, 8)[0]


@pytest.mark.parametrize(
    "name, reader, bad, good",
    [
        ("TQ_ATTEND_MIN_BLOCKS", "_env_min_blocks", ("four", "9", "-3"), ("3", 3)),
        ("TQ_ATTEND_MMA", "_env_mma", ("yes", "false", ""), ("0", False)),
        ("TQ_ATTEND_PREFETCH", "_env_prefetch", ("four", "-1", "65", ""), ("8", 8)),
    ],
)
def test_bad_attend_settings_are_refused(monkeypatch, name, reader, bad, good):
    import tq_kernels.attention_plan as plan

    read = getattr(plan, reader)
    for text in bad:
        monkeypatch.setenv(name, text)
        with pytest.raises(ValueError, match=name):
            read()
    monkeypatch.setenv(name, good[0])
    assert read() == good[1]


def test_l2_prefetch_is_in_the_tensor_core_text_only_when_asked():
    """``prefetch`` steps ahead: the tensor-core splits ask for the lines of every key and
    value part's codes and norms, once in the prologue loop and once a step; the SIMT body
    and ``prefetch=0`` carry none, and the kernel names tell the variants apart."""
    k4v3 = _layout((KeyPart(128, 4),), (ValuePart(128, 3, None, None, None),), 4, 128, 128)[0]
    off, on = (attend_source(k4v3, "cuda", True, prefetch=n) for n in (0, 4))
    simt = attend_source(k4v3, "cuda", False, prefetch=4)
    assert "tq_prefetch_span(lane" not in off[2] + simt[2]
    body = on[2]
    for arr in ("k0_idx", "k0_norm", "v0_idx", "v0_norm"):
        assert body.count(f"tq_prefetch_span(lane, {arr} + ") == 2
    assert "for (int s = 0; s < 4; ++s)" in body and "tok0 + 4 * NWARPS * 16" in body
    assert len({off[0], on[0], simt[0]}) == 3
