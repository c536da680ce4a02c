"""Kernel source text: every op yields CUDA and Metal source from one body (runs on CI)."""

import mlx.core as mx
import pytest
from tq_kernels import OPS, LaunchConfig, kernel_source, launch_config
from tq_kernels.launch import row_bucket


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("qjl", [False, True])
def test_every_op_yields_cuda_and_metal_source(op, qjl):
    if op == "dequantize" and qjl:
        pytest.skip("dequantize has no QJL variant")
    cuda, metal = kernel_source(op, "cuda", qjl), kernel_source(op, "metal", qjl)
    assert "__shfl_xor_sync" in cuda.header and "__shared__" in cuda.header
    assert "simd_sum" in metal.header and "threadgroup_barrier" in metal.header
    assert "__shared__" not in metal.header + metal.body
    assert "threadIdx" not in metal.header + metal.body
    # One body: the backends differ only in the prelude and the thread-id lines.
    strip = lambda s: s.split("tq_gid")[-1].split("\n", 1)[1]  # noqa: E731
    assert strip(cuda.body) == strip(metal.body)
    assert cuda.input_names == metal.input_names


def test_rotating_matvec_source_for_both_backends():
    cuda, metal = (
        kernel_source("matvec", "cuda", rotate=True),
        kernel_source("matvec", "metal", rotate=True),
    )
    assert cuda.input_names[-1] == metal.input_names[-1] == "rsigns"
    assert "__shfl_xor_sync" in cuda.header and "simd_shuffle_xor" in metal.header
    strip = lambda s: s.split("tq_gid")[-1].split("\n", 1)[1]  # noqa: E731
    assert strip(cuda.body) == strip(metal.body) and "rsigns, out" in cuda.body
    with pytest.raises(ValueError, match="rotate"):
        kernel_source("matvec", "cuda", qjl=True, rotate=True)


def test_sign_bits_pack_negative_signs():
    from tq_kernels import pack_sign_bits

    signs = mx.ones((64,))
    signs = mx.where(mx.array([i in (0, 5, 33, 63) for i in range(64)]), -1.0, signs)
    assert pack_sign_bits(signs).tolist() == [(1 << 0) | (1 << 5), (1 << 1) | (1 << 31)]


def test_unknown_op_and_backend_raise():
    with pytest.raises(ValueError, match="unknown op"):
        kernel_source("conv", "cuda")
    with pytest.raises(ValueError, match="backend"):
        kernel_source("matvec", "vulkan")


def test_launch_config_checks_and_buckets():
    with pytest.raises(ValueError, match="rows_per_warp"):
        LaunchConfig(rows_per_warp=3)
    with pytest.raises(ValueError, match="ksplit"):
        LaunchConfig(ksplit=3, warps=4)
    assert [row_bucket(r) for r in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="at most 8"):
        row_bucket(9)
    cfg = launch_config(4096, 14336, 1)
    assert cfg.warps % cfg.ksplit == 0 and cfg.rows_per_group >= 1


def test_ops_decline_on_the_cpu():
    from tq_core import QuantizedWeight
    from tq_kernels import weight_gather_matmul, weight_matmul

    codes = QuantizedWeight(
        mx.zeros((64, 6), dtype=mx.uint32), mx.ones((64, 1), dtype=mx.float16), 3, 64
    )
    with mx.stream(mx.cpu):
        prev = mx.default_device()
        mx.set_default_device(mx.cpu)
        try:
            assert weight_matmul(mx.ones((1, 64)), codes) is None
            experts = QuantizedWeight(codes.indices[None], codes.scales[None], 3, 64)
            assert (
                weight_gather_matmul(mx.ones((1, 1, 64)), experts, mx.zeros((1,), mx.uint32))
                is None
            )
        finally:
            mx.set_default_device(prev)


def test_register_all_fills_tq_core_dispatch():
    from tq_core import dispatch
    from tq_kernels import register_all, weight_gather_matmul, weight_matmul

    saved = dict(dispatch._kernels)
    try:
        register_all()
        assert dispatch._kernels["weight_matmul"] is weight_matmul
        assert dispatch._kernels["weight_gather_matmul"] is weight_gather_matmul
    finally:
        dispatch._kernels.clear()
        dispatch._kernels.update(saved)


@pytest.mark.parametrize("segments", [2, 3])
@pytest.mark.parametrize("rotate", [False, True])
def test_sibling_matvec_source_for_both_backends(segments, rotate):
    cuda, metal = (
        kernel_source("matvec", b, rotate=rotate, segments=segments) for b in ("cuda", "metal")
    )
    strip = lambda s: s.split("tq_gid")[-1].split("\n", 1)[1]  # noqa: E731
    assert strip(cuda.body) == strip(metal.body)
    assert cuda.input_names == metal.input_names
    assert cuda.input_names[-2:] == (f"w{segments - 1}", f"scales{segments - 1}")
    assert cuda.output_names == ("out", "out1", "out2")[:segments]
    # Every weight is read by exactly one branch, each writing its own output.
    for i in range(segments):
        s = str(i) if i else ""
        assert cuda.body.count(f"w{s}, scales{s}, w{s}, scales{s}") == 1
        assert f"out{s},\n" in cuda.body
    assert cuda.name != kernel_source("matvec", "cuda", rotate=rotate).name


def test_sibling_matvec_limits():
    with pytest.raises(ValueError, match="segments"):
        kernel_source("matvec", "cuda", segments=4)
    with pytest.raises(ValueError, match="segments"):
        kernel_source("matvec", "cuda", qjl=True, segments=2)
    with pytest.raises(ValueError, match="segments"):
        kernel_source("gather_matvec", "cuda", segments=2)


def test_minify_keeps_code_and_drops_comments():
    from tq_kernels.minify import minify

    text = "#define A 1\n  // why\n  int x = a  /  b; // c\n\n  /* block\n */ y = -x;\n"
    assert minify(text) == "#define A 1\nint x = a / b;\ny = -x;\n"
    # String literals (inline PTX) are kept as written, "//" and blanks inside included.
    asm = 'asm("mma.sync  {%0}, [%1]; // not a comment");  // a comment\n'
    assert minify(asm) == 'asm("mma.sync  {%0}, [%1]; // not a comment");\n'
    for bad in ("char c = 'x';\n", 'asm("open\n'):
        with pytest.raises(ValueError, match="literals"):
            minify(bad)


@pytest.mark.parametrize("op", OPS)
def test_minified_sources_stay_one_body(op):
    from tq_kernels.minify import minify

    cuda, metal = kernel_source(op, "cuda"), kernel_source(op, "metal")
    for src in (cuda, metal):
        small = minify(src.header) + minify(src.body)
        assert len(small) < len(src.header + src.body)
        assert "//" not in small and "\n\n" not in small
        for name in src.input_names:  # MLX finds the shape arguments by name in the body
            assert (f"{name}_shape" in minify(src.body)) == (f"{name}_shape" in src.body)
    body = lambda s: minify(s.body).split("tq_gid")[-1].split("\n", 1)[1]  # noqa: E731
    assert body(cuda) == body(metal)


def test_residual_variant_is_one_weight_matvec_with_a_last_input():
    src = kernel_source("matvec", "cuda", rotate=True, residual=True)
    assert src.input_names[-1] == "res" and src.name.endswith("_res_cuda")
    assert "RES" in src.header and "true>(" in src.body
    plain = kernel_source("matvec", "cuda", rotate=True)
    assert "res" not in plain.input_names and "false>(" in plain.body
    for bad in (
        dict(op="matvec", segments=2),
        dict(op="matvec", qjl=True),
        dict(op="gather_matvec"),
    ):
        with pytest.raises(ValueError, match="residual=True"):
            kernel_source(backend="cuda", residual=True, **bad)


def test_plan_passes_inputs_in_the_kernels_order(monkeypatch):
    """On the CPU, a stand-in kernel that computes the op from its inputs *by name* (the
    names kernel_source declares) checks the plan's argument order, outputs and replay."""
    import sys

    from tq_core import QuantizedWeight, pack
    from tq_core.rotation import Rotation, rotate
    from tq_core.weights import dequantize_weight_rotated
    from tq_kernels import rotating_matvec_plan

    mv = sys.modules["tq_kernels.matvec"]

    class StandIn:
        def __init__(self, segments, residual):
            self.src = kernel_source(
                "matvec", "cuda", rotate=True, segments=segments, residual=residual
            )

        def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            named = dict(zip(self.src.input_names, inputs, strict=True))
            t = dict(template)
            bits = (named["rsigns"][:, None] >> mx.arange(32, dtype=mx.uint32)) & 1
            signs = (1 - 2 * bits.astype(mx.float32)).reshape(-1)
            x = rotate(named["x"], Rotation(signs.size, t["SPAN"], 0, signs))
            outs = []
            for i, shape in enumerate(output_shapes):
                s = str(i) if i else ""
                w = QuantizedWeight(named[f"w{s}"], named[f"scales{s}"], t["BITS"], t["GS"])
                outs.append((x @ dequantize_weight_rotated(w).T).reshape(shape))
            if "res" in named:
                outs[0] = outs[0] + named["res"]
            return outs

    monkeypatch.setattr(
        mv,
        "get_kernel",
        lambda op, qjl, rotate, segments, residual: StandIn(segments, residual),
    )
    mv._matvec_plan.cache_clear()
    mv._compiled_launch.cache_clear()
    try:
        k, ns = 256, (40, 8, 24)
        codes = []
        for i, n in enumerate(ns):
            idx = mx.random.randint(0, 8, (n, k), key=mx.random.key(i)).astype(mx.uint32)
            scales = mx.random.uniform(0.5, 1.5, (n, k // 64), key=mx.random.key(9 + i))
            codes.append(QuantizedWeight(pack(idx, 3), scales.astype(mx.float16), 3, 64))
        signs = mx.where(mx.random.uniform(shape=(k,), key=mx.random.key(5)) < 0.5, -1.0, 1.0)
        rot = Rotation(k, 64, 0, signs)
        from tq_kernels import pack_sign_bits

        x = mx.random.normal((1, 1, k))
        plan = rotating_matvec_plan(x, codes, pack_sign_bits(signs), 64)
        for xt in (x, mx.random.normal((1, 1, k), key=mx.random.key(3))):
            outs = plan(xt)
            assert [o.shape for o in outs] == [(1, 1, n) for n in ns]
            for out, c in zip(outs, codes):
                want = rotate(xt, rot) @ dequantize_weight_rotated(c).T
                assert mx.allclose(out, want, atol=1e-4).item()
        # The residual plan: x, w, scales, codebook, rsigns, then the residual.
        plan = rotating_matvec_plan(x, codes[:1], pack_sign_bits(signs), 64, residual=True)
        r = mx.random.normal((1, 1, ns[0]), key=mx.random.key(4))
        (out,) = plan(x, r)
        want = r + rotate(x, rot) @ dequantize_weight_rotated(codes[0]).T
        assert mx.allclose(out, want, atol=1e-4).item()
        with pytest.raises(ValueError, match="one weight"):
            rotating_matvec_plan(x, codes, pack_sign_bits(signs), 64, residual=True)
        for bad in (r[..., :-1], r.astype(mx.float16), mx.concatenate([r, r])):
            with pytest.raises(ValueError, match=r"residual must be \(1, 1, 40\)"):
                plan(x, bad)  # the kernel would read past a short residual
        from tq_kernels import rotating_matvec

        with pytest.raises(ValueError, match="residual must be"):
            rotating_matvec(x, codes[0], pack_sign_bits(signs), 64, residual=r[..., :8])
        with pytest.raises(ValueError, match="one weight"):
            rotating_matvec(x, codes, pack_sign_bits(signs), 64, residual=r)
    finally:
        mv._matvec_plan.cache_clear()
        mv._compiled_launch.cache_clear()


def test_rotating_launches_rotate_once_per_threadgroup_where_it_fits(monkeypatch):
    """R x goes to threadgroup memory where M * K values of the dtype fit (40 KB CUDA, 28 KB
    Metal); those launches take 8 warps and no input split; elsewhere, or with
    ``TQ_ROTATE_SHARED=0``, XSH is 0 and the geometry is the general one."""
    import sys

    mv = sys.modules["tq_kernels.matvec"]
    cfg = LaunchConfig()
    assert mv.rotated_elements(mx.float16, 14336, 1, cfg, "cuda") == 14336
    assert mv.rotated_elements(mx.float16, 14336, 1, cfg, "metal") == 14336  # 28 KB exactly
    assert mv.rotated_elements(mx.float16, 14336, 2, cfg, "cuda") == 0  # 56 KB
    assert mv.rotated_elements(mx.float32, 4096, 2, cfg, "cuda") == 2 * 4096
    assert mv.rotated_elements(mx.float32, 14336, 1, cfg, "cuda") == 0
    assert mv.rotated_elements(mx.float16, 576, 1, cfg, None) == 0  # no GPU backend
    assert mv.rotated_elements(mx.float16, 576, 1, LaunchConfig(rotate_shared=False), "cuda") == 0

    monkeypatch.setattr(mv, "kernel_backend", lambda: "cuda")
    monkeypatch.setattr(mv, "get_kernel", lambda *a, **k: None)
    mv._matvec_plan.cache_clear()
    try:
        for k, want_xsh in ((4096, 4096), (14336, 14336)):
            launch = mv._matvec_plan(mx.float16, (4096,), k, 1, 3, 64, False, None, 64)[2]
            t = dict(launch["template"])
            assert t["XSH"] == want_xsh and (t["KSPLIT"], t["NWARPS"]) == (1, 8)
            assert launch["threadgroup"] == (256, 1, 1)
        # Two rows of K 14336 do not fit: registers, and the general geometry.
        launch = mv._matvec_plan(mx.float16, (4096,), 14336, 2, 3, 64, False, None, 64)[2]
        t = dict(launch["template"])
        assert t["XSH"] == 0 and (t["RPW"], t["KSPLIT"], t["NWARPS"]) == (4, 2, 4)
        monkeypatch.setattr(mv, "ROTATE_SHARED", False)
        mv._matvec_plan.cache_clear()
        t = dict(
            mv._matvec_plan(mx.float16, (4096,), 4096, 1, 3, 64, False, None, 64)[2]["template"]
        )
        assert t["XSH"] == 0 and t["NWARPS"] == 4
        # A matvec on a pre-rotated input has no XSH at all.
        t = dict(
            mv._matvec_plan(mx.float16, (4096,), 4096, 1, 3, 64, False, None, 0)[2]["template"]
        )
        assert "XSH" not in t
    finally:
        mv._matvec_plan.cache_clear()
