#!/usr/bin/env bash
# A/B of a decode host-cost switch on the lent GPU (default TQ_COMPILE_BLOCK: replayed decoder
# blocks, tq_core.decode_block; or VAR=TQ_FUSE_RESIDUAL: their residual adds folded into the
# o/down launches): the pipelined decode split of affine3 and tq3 in one process per run,
# with VAR=1 and VAR=0 alternated for ROUNDS rounds.
# Writes $OUT/ab-MODEL[-VAR].json: {"variable", "runs": [{"on", "round", "rows"}]}.
#   usage: [VAR=TQ_FUSE_RESIDUAL] bash benchmarks/device/ab_block_replay.sh MODEL [ROUNDS]
set -u
m=$1
var=${VAR:-TQ_COMPILE_BLOCK}
tmp=$(mktemp -d)
for r in $(seq 1 "${2:-2}"); do
  for on in 1 0; do
    echo "==== $m $var=$on round $r"
    env "$var=$on" timeout 200 python3 benchmarks/device/decode_split.py \
      --model-dir ".devcarry/$m" --weights affine3,tq3 --context 256 --tokens 48 --rounds 4 \
      --json "$tmp/$on-$r.json" 2>&1 | grep -E "token_ms|Error|Traceback"
  done
done
suffix=$([ "$var" = TQ_COMPILE_BLOCK ] && echo "" || echo "-$var")
python3 - "$tmp" "${OUT:-.}/ab-$m$suffix.json" "$var" <<'PY'
import json, pathlib, sys
runs = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stem[::-1]):
    on, r = f.stem.split("-")
    runs.append({"on": on == "1", "round": int(r), **json.loads(f.read_text())})
doc = {"variable": sys.argv[3], "runs": runs}
pathlib.Path(sys.argv[2]).write_text(json.dumps(doc, indent=1))
PY
