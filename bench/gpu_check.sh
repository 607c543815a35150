#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU benchmark, then the GPU-marked tests.
# Output goes to bench/results/ (or $OUT when set, as on the device tool), named after the GPU.
#   bash bench/gpu_check.sh [bench|tests|loader|all]  (default: all = bench and tests; bench and tests
#                                                   take about 5 minutes each, so a 10-minute limit
#                                                   per command fits one stage; loader: the DataLoader
#                                                   path against the reference's, a few minutes)
# The benchmark needs ../shared/bench/reference_loop.py; the device tool carries only the checkout
# (and a shared/ inside it), so copy it there first: `cp -r ../shared shared` (git ignores it).
# Exit status 1 when a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
out=${OUT:-bench/results}
py=${PYTHON:-python3}  # the device machines' interpreter with torch is python3
mkdir -p "$out"
gpu=$($py -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null) \
    || { echo "gpu_check: no CUDA GPU (or no torch) for $py" >&2; exit 1; }
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu-device-$gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu-device-$gpu.txt"
status=0
if [[ $stage == bench || $stage == all ]]; then
    SECONDS=0
    $py bench/compare_gpu.py --repeats 2 --epochs 3 2>&1 | tee "$out/gpu-bench-$gpu.md" || status=1
    echo "bench: ${SECONDS}s" | tee -a "$out/gpu-bench-$gpu.md"
fi
if [[ $stage == loader ]]; then
    SECONDS=0
    $py bench/compare_gpu.py --repeats 1 --epochs 3 \
        --variants "reference compile,reference dataloader compile,nncli dataloader compile" 2>&1 \
        | tee "$out/gpu-loader-$gpu.md" || status=1
    echo "loader: ${SECONDS}s" | tee -a "$out/gpu-loader-$gpu.md"
fi
if [[ $stage == tests || $stage == all ]]; then
    SECONDS=0
    # the GPU-marked tests only: the others assume a CPU (their --nproc 2 runs would want 2 GPUs)
    $py -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests-$gpu.txt" || status=1
    echo "tests: ${SECONDS}s" | tee -a "$out/gpu-tests-$gpu.txt"
fi
exit "$status"
