"""Tests for tq_cli.blas_check: reference BLAS detection from a process's memory maps."""

from tq_cli.blas_check import reference_blas_loaded

REF = "7f00-7f01 r-xp 0 08:01 1 /x/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0\n"
OPEN = "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0\n"


def test_reference_only(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(REF)
    assert reference_blas_loaded(str(maps))


def test_openblas_preloaded(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(OPEN + REF)
    assert not reference_blas_loaded(str(maps))


def test_unreadable_maps_is_not_an_error(tmp_path):
    assert not reference_blas_loaded(str(tmp_path / "missing"))


def test_blas_in_use_names_the_library(tmp_path):
    from tq_cli.blas_check import blas_in_use

    maps = tmp_path / "maps"
    maps.write_text(REF)
    assert blas_in_use(str(maps)) == "reference"
    maps.write_text(OPEN + REF)
    assert blas_in_use(str(maps)) == "openblas"
    assert blas_in_use(str(tmp_path / "missing")) == "unknown"
