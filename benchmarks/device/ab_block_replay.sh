#!/usr/bin/env bash
# A/B of replayed decoder blocks (tq_core.decode_block) on the lent GPU: pipelined decode split
# of affine3 and tq3 in one process per run, with TQ_COMPILE_BLOCK=1 and =0 alternated, then
# decode_speed (fp16, affine 4/3, tq 4/3) with the default. JSON lands in $OUT.
#   usage: bash benchmarks/device/ab_block_replay.sh MODEL [ROUNDS]   (after setup.sh)
set -u
m=$1
for r in $(seq 1 "${2:-2}"); do
  for on in 1 0; do
    echo "==== $m block replay=$on round $r"
    TQ_COMPILE_BLOCK=$on timeout 200 python3 benchmarks/device/decode_split.py \
      --model-dir ".devcarry/$m" --weights affine3,tq3 --context 256 --tokens 48 --rounds 4 \
      --json "$OUT/split-$m-block$on-r$r.json" 2>&1 | grep -E "token_ms|Error|Traceback"
  done
done
