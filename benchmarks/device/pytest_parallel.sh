#!/usr/bin/env bash
# Run pytest over PATHS in N parallel processes (the device has no pytest-xdist): NVRTC
# compiles each kernel variant on one core, so the GPU tests are bound by compile time.
#   usage: bash benchmarks/device/pytest_parallel.sh N PATHS...   (after setup.sh)
n=$1; shift
# The GPU tests compare kernels with float32 reference paths: MLX-CUDA rounds float32
# matmuls through TF32 by default, which moved the prod-key GPT-OSS decode test's logits by
# up to 3e-3 (docs/kvcache.md); the references run in full float32 here.
export MLX_ENABLE_TF32=0
python3 -m pytest -q -p no:cacheprovider --collect-only "$@" 2>/dev/null | grep "::" >/tmp/ids
rm -f /tmp/ids.part.*
split -n r/$n /tmp/ids /tmp/ids.part.
rc=0
for f in /tmp/ids.part.*; do
  python3 -m pytest -q -p no:cacheprovider $(cat $f) >"$f.log" 2>&1 &
done
for job in $(jobs -p); do wait $job || rc=1; done
# Logs go to $OUT as one file (the device returns a limited number of files).
for f in /tmp/ids.part.*.log; do
  tail -3 "$f"; grep -E "^(FAILED|ERROR)" "$f"
  [ -n "${OUT:-}" ] && { echo "==== $f"; cat "$f"; } >>"$OUT/pytest.log"
done
exit $rc
