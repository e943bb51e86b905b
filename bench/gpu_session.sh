#!/usr/bin/env bash
# The one prepared script for a lent GPU: full-size pi05, random bf16 weights, each phase timed.
# Run from the repo root on the device machine: `bash bench/gpu_session.sh`; results land in
# docs/benchmarks.md (copied to $OUT when set). Needs only jax, numpy, sentencepiece and orbax,
# which the device image has.
set -euo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pytest -q -m gpu tests/policy/test_full_size_gpu.py
python3 -m bench.model_latency --config pi05 --batch 1 16 --iters 20
# The engine as served needs a tokenizer and the device has no network: the tiny one times the same.
python3 -m bench.engine_latency --config pi05 --batch 1 2 4 8 16 --steps 25 --iters 10 \
  --tokenizer configs/assets/tiny_tokenizer.model --round-s 5
if [[ -n "${OUT:-}" ]]; then cp docs/benchmarks.md "$OUT/"; fi
