#!/usr/bin/env bash
# One device call for the KV cache: fused attention tests, `tq bench kv` (attention per step
# at long contexts, then a whole 1B-class model: decode tok/s and prefill peak memory).
#   carry: .mlxcuda .mlxcuda-tools .devcarry   env: SKIP_TESTS, KV_ARGS, MODEL_ARGS
set -u
source benchmarks/device/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step() { echo "==== $*"; }
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step pytest
  timeout 400 bash benchmarks/device/pytest_parallel.sh 8 packages/tq-kvcache/tests/test_fused_attention.py \
    packages/tq-kernels/tests/test_attention_source.py ${EXTRA_TESTS:-}
fi
if [ -n "${KV_ARGS:-}" ]; then
step bench kv attention
timeout ${KV_TIMEOUT:-300} python3 -m tq_cli bench kv --json --out "$OUT/kv-attention.json" $KV_ARGS >/dev/null
fi
if [ -n "${MODEL_ARGS:-}" ]; then
  step bench kv model
  timeout ${MODEL_TIMEOUT:-300} python3 -m tq_cli bench kv --no-attention --json --out "$OUT/kv-model.json" $MODEL_ARGS >/dev/null
fi
if [ -n "${PROFILE_ARGS:-}" ]; then
  step profile decode
  timeout ${PROFILE_TIMEOUT:-200} python3 benchmarks/device/profile_kv_decode.py --json "$OUT/kv-profile.json" $PROFILE_ARGS
fi
