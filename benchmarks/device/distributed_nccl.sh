#!/usr/bin/env bash
# Issue 9: TurboQuant generation on 1 and 2 NVIDIA GPUs over NCCL (mlx.launch --backend nccl),
# greedy tokens compared with the 1-GPU run; decode/prefill tok/s and peak memory per GPU as
# JSON in $OUT. Run on `nvidia-h200-x2` with the MLX-CUDA payload carried:
#   carry: .mlxcuda .mlxcuda-tools .devcarry     (.devcarry/<model>/ = float HF-style dirs:
#          smollm2 = SmolLM2-135M-Instruct, llama8b = an 8B-shaped llama config + tokenizer;
#          random weights of the real shapes are made here when a dir has no *.safetensors)
#   command: bash benchmarks/device/distributed_nccl.sh
# Knobs: MODELS="smollm2 llama8b", PRESET=tq3, TOKENS=128, PROMPT=..., SKIP_1GPU=1.
# SmolLM2 has 3 KV heads: mlx-lm's Model.shard cannot split it over 2 ranks and tq says so
# (the refusal is recorded in $OUT); the 8B shape (8 KV heads) splits.
set -u
source benchmarks/device/setup.sh || exit 1
# NVLink multicast stays off (shared GPUs; ../shared/device KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
PY=$(command -v python3)
TOKENS=${TOKENS:-128}
PROMPT=${PROMPT:-"Write a long story about a lighthouse keeper and the sea."}
LAUNCH=(python3 -m mlx._distributed_utils.launch --backend nccl -n 2 --python "$PY"
        --env NCCL_NVLS_ENABLE=0 --env TORCH_SYMM_MEM_DISABLE_MULTICAST=1
        --env NVSHMEM_DISABLE_NVLS=1 --env "PYTHONPATH=$PYTHONPATH" --env PYTHONUNBUFFERED=1)
GEN=(generate --prompt "$PROMPT" --max-tokens "$TOKENS" --min-tokens "$TOKENS" --temp 0)
step() { echo "==== $*"; }

for m in ${MODELS:-smollm2 llama8b}; do
  src=.devcarry/$m
  if ! ls "$src"/*.safetensors >/dev/null 2>&1; then
    step "random weights for $m"
    python3 - "$src" <<'EOF'
import sys, mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load_config
from tq_core.lm.load import build_model
src = sys.argv[1]
model = build_model(load_config(src))
mx.random.seed(0)
w = {k: (0.02 * mx.random.normal(v.shape)).astype(mx.float16) for k, v in tree_flatten(model.parameters())}
mx.save_safetensors(f"{src}/model.safetensors", w)
EOF
  fi
  tq=/tmp/$m-${PRESET:-tq3}
  [ -d "$tq" ] || { step "convert $m"; timeout 900 python3 -m tq_cli convert --model "$src" --out "$tq" --preset "${PRESET:-tq3}"; }
  if [ "${SKIP_1GPU:-0}" != 1 ]; then
    step "$m 1 GPU"
    timeout 600 python3 -m tq_cli "${GEN[@]}" --model "$tq" --stats-json "$OUT/$m-1gpu.json" \
      >"$OUT/$m-1gpu.txt" 2>"$OUT/$m-1gpu.err"; tail -4 "$OUT/$m-1gpu.err"
  fi
  step "$m 2 GPUs (tensor-parallel, NCCL)"
  timeout 600 "${LAUNCH[@]}" -m tq_cli "${GEN[@]}" --model "$tq" --distributed tensor \
    --stats-json "$OUT/$m-2gpu-{rank}.json" >"$OUT/$m-2gpu.txt" 2>"$OUT/$m-2gpu.err"
  echo "rc=$?"; grep -E "error|Prompt|Generation|Peak" "$OUT/$m-2gpu.err" | head -12
  if cmp -s "$OUT/$m-1gpu.txt" "$OUT/$m-2gpu.txt"; then echo "$m: 2-GPU text == 1-GPU text"
  else echo "$m: 2-GPU text DIFFERS from 1-GPU (or a run failed)"; fi
  for v in fp16 affine4; do  # mlx-lm's own sharding of the same model, beside tq
    step "$m $v 1 and 2 GPUs"
    timeout 600 python3 benchmarks/distributed_baseline.py --model "$src" --variant $v \
      --prompt "$PROMPT" --tokens "$TOKENS" --json "$OUT/$m-$v-1gpu.json" | tail -1
    timeout 600 "${LAUNCH[@]}" benchmarks/distributed_baseline.py --model "$src" --variant $v \
      --prompt "$PROMPT" --tokens "$TOKENS" --json "$OUT/$m-$v-2gpu-{rank}.json" | tail -2
  done
done
ls -la "$OUT"
