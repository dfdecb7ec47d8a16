#!/usr/bin/env bash
# One call of the lent GPU machine (device tool): `bash benchmarks/gpu_session.sh tests` runs the whole
# test suite on CUDA (the kernels for real, the `gpu` tests included); `bash benchmarks/gpu_session.sh bench`
# runs the benchmark report. Each mode fits one 10-minute call. Logs and results go under $OUT when set.
# The machine has no package registry: the project runs from the tree (PYTHONPATH=.), and tests whose
# peer packages are missing there (ema-pytorch) skip themselves.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/triton-ema-gpu}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
case "${1:-tests}" in
tests)
    python3 -m pytest tests -q -p no:cacheprovider -m gpu 2>&1 | tee "$out/tests-gpu.log"
    python3 -m pytest tests -q -p no:cacheprovider --timeout 540 2>&1 | tee "$out/tests-all.log"
    ;;
bench)
    python3 -m benchmarks.report 2>&1 | tee "$out/bench.log"
    cp -r benchmarks/results "$out/"
    ;;
*)
    echo "usage: $0 tests|bench" >&2
    exit 2
    ;;
esac
