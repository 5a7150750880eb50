#!/usr/bin/env bash
# The search's GPU checks as one short run on a CUDA machine (a few minutes on an H200), from the repository root:
#   1. the Triton kernel's tests compiled on the GPU (tests/test_search_triton.py: every answer against the
#      float64 argmin, the error bound against the tensor cores' own products) and the shared path tests;
#   2. benchmarks/quantizer.py at N = 16,384 tokens, d = 128, K = 1,024 / 65,536 / 262,144: SimVQ forward +
#      backward against vector-quantize-pytorch and the search alone, with search="bf16-triton" (and the
#      search's fraction of the tensor cores' bf16 rate, from an 8,192^3 matmul), then the exact fp32 path.
# Needs torch with CUDA and triton; the peer (vector-quantize-pytorch) too for the speed ratios. On a machine
# without network, give its wheels in WHEELS (a folder), fetched elsewhere with, e.g.:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     vector-quantize-pytorch==1.32.0 einx==0.4.3 loguru==0.7.3 torch-einops-utils==0.2.0 frozendict
# Logs go to $OUT (default gpu-results/). Nothing is installed into the running Python.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/simvq-gpu-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/simvq-gpu-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')" \
  2>&1 | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_search_triton.py tests/test_search_paths.py 2>&1 | tee "$out/tests.log"
tests_rc=$?
python3 benchmarks/quantizer.py --device cuda --tokens 16384 --dim 128 --sizes 1024,65536,262144 --repeats 5 \
  --search bf16-triton 2>&1 | tee "$out/bench-bf16-triton.log"
python3 benchmarks/quantizer.py --device cuda --tokens 16384 --dim 128 --sizes 1024,65536,262144 --repeats 5 \
  --search exact-fp32 --cases ours,search 2>&1 | tee "$out/bench-exact-fp32.log"
exit "$tests_rc"
