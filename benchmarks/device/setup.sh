#!/usr/bin/env bash
# Source on the lent GPU machine (see ../shared/device/README.md): installs the carried MLX-CUDA
# payload, puts every tq package's src/ on PYTHONPATH, and writes a dist-info for tq-kernels so
# tq-core's dispatch finds it through its entry point, as after `pip install tq-kernels`.
#   usage: source benchmarks/device/setup.sh   (carry .mlxcuda and .mlxcuda-tools)
source .mlxcuda-tools/unpack-mlx-cuda .mlxcuda || return 1
for p in packages/*/src; do PYTHONPATH="$PWD/$p:$PYTHONPATH"; done
export PYTHONPATH PYTHONUNBUFFERED=1
info=/tmp/site/tq_kernels-0.0.0.dist-info
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: tq-kernels\nVersion: 0.0.0\n' >"$info/METADATA"
printf '[tq_core.kernels]\ntq_kernels = tq_kernels.register:register_all\n' >"$info/entry_points.txt"
python3 -c 'from tq_core import dispatch; print("kernels:", dispatch.registered_kernel("weight_matmul"))'
