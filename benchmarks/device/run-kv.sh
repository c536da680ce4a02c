#!/usr/bin/env bash
# One device call for the KV cache: fused attention tests, `tq bench kv` (attention per step
# at long contexts, then a whole 1B-class model: decode tok/s and prefill peak memory).
#   carry: .mlxcuda .mlxcuda-tools .devcarry
#   env: SKIP_TESTS, EXTRA_TESTS, KV_ARGS, MODEL_ARGS, PROFILE_ARGS, ATTEND_ARGS (attend_occupancy.py),
#        CALL_COST=1 (probe_call_cost.py), SPLIT_ARGS (decode_split.py), NCU="CONTEXT SETTING"
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
if [ -n "${ATTEND_ARGS:-}" ]; then
  step attend variants
  (cd benchmarks/device && timeout ${ATTEND_TIMEOUT:-300} python3 attend_occupancy.py --json "$OUT/attend.json" $ATTEND_ARGS)
fi
if [ "${CALL_COST:-0}" = 1 ]; then
  step custom-kernel call cost
  (cd benchmarks/device && timeout 120 python3 probe_call_cost.py --json "$OUT/call-cost.json")
fi
if [ -n "${SPLIT_ARGS:-}" ]; then
  step pipelined decode split
  (cd benchmarks/device && timeout ${SPLIT_TIMEOUT:-200} python3 decode_split.py --json "$OUT/decode-split.json" $SPLIT_ARGS)
fi
if [ -n "${NCU:-}" ]; then
  step nsight compute
  # ncu_attend.py runs 3 warmup steps (attend + finish each), then one profiled step.
  timeout ${NCU_TIMEOUT:-240} /usr/local/cuda/bin/ncu --kernel-name regex:tq_kv_ --launch-skip 6 \
    --launch-count 2 --section SpeedOfLight --section WarpStateStats --section InstructionStats \
    --section SourceCounters --section Occupancy python3 benchmarks/device/ncu_attend.py $NCU \
    >"$OUT/ncu.txt" 2>&1
  grep -E "tq_kv|Duration|Registers|Executed Ipc|Warp Cycles|Achieved Occ" "$OUT/ncu.txt" | head -30
fi
