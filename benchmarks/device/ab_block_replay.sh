#!/usr/bin/env bash
# A/B of replayed decoder blocks (tq_core.decode_block) on the lent GPU: the pipelined decode
# split of affine3 and tq3 in one process per run, with TQ_COMPILE_BLOCK=1 and =0 alternated
# for ROUNDS rounds. Writes $OUT/ab-MODEL.json: {"runs": [{"block_replay", "round", "rows"}]}.
#   usage: bash benchmarks/device/ab_block_replay.sh MODEL [ROUNDS]   (after setup.sh)
set -u
m=$1
tmp=$(mktemp -d)
for r in $(seq 1 "${2:-2}"); do
  for on in 1 0; do
    echo "==== $m block replay=$on round $r"
    TQ_COMPILE_BLOCK=$on timeout 200 python3 benchmarks/device/decode_split.py \
      --model-dir ".devcarry/$m" --weights affine3,tq3 --context 256 --tokens 48 --rounds 4 \
      --json "$tmp/$on-$r.json" 2>&1 | grep -E "token_ms|Error|Traceback"
  done
done
python3 - "$tmp" "${OUT:-.}/ab-$m.json" <<'PY'
import json, pathlib, sys
runs = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stem[::-1]):
    on, r = f.stem.split("-")
    runs.append({"block_replay": on == "1", "round": int(r), **json.loads(f.read_text())})
pathlib.Path(sys.argv[2]).write_text(json.dumps({"runs": runs}, indent=1))
PY
