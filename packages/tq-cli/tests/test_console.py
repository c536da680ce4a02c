"""Tests of the installed `tq` console command, run as a user runs it (a subprocess)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from tq_cli.blas_check import OPENBLAS

TQ = shutil.which("tq", path=os.path.dirname(sys.executable)) or shutil.which("tq")


@pytest.mark.skipif(TQ is None, reason="the tq console script is not installed")
def test_info_json():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_TQ_BLAS_REEXEC")}
    out = subprocess.run(
        [TQ, "info", "--json"], capture_output=True, text=True, env=env, check=True
    )
    info = json.loads(out.stdout)
    assert info["tq_core"] == "0.1.0"
    if (
        sys.platform.startswith("linux")
        and info["device"].startswith("Device(cpu")
        and os.path.exists(OPENBLAS)
    ):
        # The console command re-runs itself with OpenBLAS preloaded.
        assert info["cpu_blas"] == "openblas"


@pytest.mark.skipif(TQ is None, reason="the tq console script is not installed")
def test_unknown_command_is_a_usage_error():
    out = subprocess.run([TQ, "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr
