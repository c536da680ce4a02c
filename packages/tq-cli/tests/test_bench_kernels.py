"""Tests for `tq bench kernels`' arguments and its refusal where no GPU backend exists (the
timings themselves come from the H100, docs/kernels.md)."""

import argparse

import mlx.core as mx
import pytest
from tq_cli import main
from tq_cli.bench_cli import _shape_list

needs_cpu = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="a GPU backend is here")


def test_shapes_take_the_default_shapes_and_refuse_partial_groups():
    assert _shape_list("14336x4096,2880x2880") == [(14336, 4096), (2880, 2880)]
    for bad in ("100x100", "4096", "ax4096", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="multiple of 64"):
            _shape_list(bad)


@needs_cpu
def test_without_a_gpu_backend_it_says_so(capsys):
    with pytest.raises(SystemExit, match="no GPU backend"):
        main(["bench", "kernels", "--shapes", "2880x2880", "--json"])
