#!/usr/bin/env bash
# One device call: GPU kernel tests, `tq bench kernels`, decode speed (SmolLM2 and a 1B-class
# llama config, random weights of the real shapes). Results land in $OUT.
#   carry: .mlxcuda .mlxcuda-tools .devcarry   (see benchmarks/device/setup.sh)
set -u
source benchmarks/device/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step() { echo "==== $*"; }
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step pytest
  timeout 300 bash benchmarks/device/pytest_parallel.sh 8 packages/tq-kernels ${EXTRA_TESTS:-}
fi
step bench kernels
timeout 300 python3 -m tq_cli bench kernels --json --out "$OUT/kernels.json" ${BENCH_ARGS:-} >/dev/null
for m in ${DECODE_MODELS:-smollm2 llama1b}; do
  step decode $m
  timeout 240 python3 benchmarks/decode_speed.py --model-dir .devcarry/$m \
    --variants ${VARIANTS:-fp16,affine4,affine3,tq4,tq3} --json "$OUT/decode-$m.json" 2>&1 \
    | grep -E "tok/s|Error|error|Traceback"
done
