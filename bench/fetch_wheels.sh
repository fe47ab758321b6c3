#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on the lent H200, downloaded here into .whl/ (git-ignored; named in the
# device call's carry). The machine's image has torch, transformers, peft, accelerate and the rest of what the
# check runs; bitsandbytes (it needs only torch, numpy and packaging) and torchao (fp8; no dependencies) are the
# ones missing. DeepSpeed is not carried: one GPU plans DDP only, so no step uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl bitsandbytes==0.50.2 torchao==0.18.0
