#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU-marked tests, then the GPU benchmark, in a few minutes.
# Output goes to bench/results/ (or $OUT when set, as on the device tool), named after the GPU.
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))") || exit 1
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests-$gpu.txt"
python bench/compare_gpu.py --repeats 2 --epochs 3 2>&1 | tee "$out/gpu-bench-$gpu.md"
