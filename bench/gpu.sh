#!/usr/bin/env bash
# What only a GPU can measure (bench/gpu.py): samtrain vs the official modules at bf16 1024 px K=64,
# torch.cuda.max_memory_allocated per memory mode beside the planner's prediction, the compile
# speed-up and the evaluation throughput, into one Markdown file (default outputs/bench_gpu.md).
#   bash bench/gpu.sh [--out FILE]          # on one GPU, under 8 minutes
#   bash bench/gpu.sh --tiny                # the tiny model on the CPU (also SAMTRAIN_GPU_BENCH_TINY=1)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
exec "$PYTHON" -m bench.gpu "$@"
