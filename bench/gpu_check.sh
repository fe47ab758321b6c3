#!/usr/bin/env bash
# Every GPU measurement of issue 21 in one command: memory truth, throughput (llaunch vs HF Trainer vs compiled),
# QLoRA on the 1.1B and an 8B, checkpoint blocking (sync vs async), the planner's pick vs its measured candidates;
# and issue 31's fp8 and cp steps (bench/fp8_cp.py):
#   fp8  `llaunch run` of the 1.1B in amp-bf16, then --precision fp8 (torchao float8 linears). Should show: losses
#        within a few per cent of amp-bf16's after the warm-up, peak memory about amp-bf16's, tokens/s above it
#        (fp8 tensor cores), each beside `llaunch plan`'s prediction for this GPU.
#   cp   torch's ring attention (context_parallel) on a Llama at seq 8192 on this one GPU, against plain SDPA.
#        Should show: equal losses (bf16 noise), the ring's step time and peak beside SDPA's. The ranks refuse
#        --cp (CUDA-only kernels, nothing to test them against on CPU: launcher.planning.parallel.CP_REFUSAL).
#
#   bash bench/gpu_check.sh [--smoke] [--out DIR] [--tag NAME] [--only STEP...]   (NAME: h200, or smoke)
#
# On a lent H200: the steps get 520 s together, each within its own budget (bench/gpu_check.py); installing the
# wheel and importing take ~30 s more. First, here, in the checkout the device call sends:
#   bash bench/fetch_wheels.sh            # bitsandbytes into .whl/ (git-ignored), for QLoRA and 8-bit AdamW
# then the one device call (7 files come back, within its 8):
#   run(command="bash bench/gpu_check.sh --out $OUT", carry=[".whl"], timeout_s=590)
# and copy what it brings back (<step>-h200.json for 5 steps, gpu-check-h200.json, gpu-check-h200.log) to
# bench/results/. The fp8 and cp steps come after the 520 s of the first five: a second call runs them alone,
#   run(command="bash bench/gpu_check.sh --out $OUT --only fp8 cp --tag h200-fp8cp", carry=[".whl"], timeout_s=300)
# --smoke runs the same steps with tiny shapes on the CPU (CI: tests/bench/test_gpu_check_smoke.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=bench/results
tag=h200
args=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift ;;
    --smoke) tag=${tag/h200/smoke} ;;
    --tag) tag=$2; shift ;;
  esac
  shift
done
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # the wheels bench/fetch_wheels.sh put there; the machine has the rest
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llaunch-site .whl/*.whl || exit
  export PYTHONPATH=$PYTHONPATH:/tmp/llaunch-site
fi
"$PYTHON" bench/gpu_check.py "${args[@]}" 2>&1 | tee "$out/gpu-check-$tag.log"
