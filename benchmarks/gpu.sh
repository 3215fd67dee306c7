#!/usr/bin/env bash
# All GPU checks and timings in one run, for a machine with a CUDA GPU (meant to finish in under 5 minutes):
#   bash benchmarks/gpu.sh 2>&1 | tee gpu.log
# 1. parity on the GPU (benchmarks/gpu_check.py), 2. the decoding table in bfloat16 and float32, 3. bfloat16 with
# generate(compile=True).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python benchmarks/gpu_check.py --device cuda
python benchmarks/bench.py --device cuda --dtype bfloat16 --models small,base --repeats 3
python benchmarks/bench.py --device cuda --dtype float32 --models small,base --repeats 3
python benchmarks/bench.py --device cuda --dtype bfloat16 --models small,base --repeats 3 --compile
