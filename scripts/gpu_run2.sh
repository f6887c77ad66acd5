#!/usr/bin/env bash
# Second device run: torch.compile'd layers inside the CUDA graphs, checked against the CPU engine, then timed.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
CSM_COMPILE=1 timeout 100 python3 scripts/gpu_check.py "$OUT" 2>&1 | grep -v '^\[transformers\]' | tail -n 14
timeout 170 python3 -m csmcli bench --random-weights --device cuda --dtype bfloat16 --frames 24 --compile \
    --batch-sizes 1,8,64 --json >"$OUT/bench_cuda_bf16_compiled.json" 2>"$OUT/bench_compiled.err" \
    || tail -n 8 "$OUT/bench_compiled.err"
cat "$OUT/bench_cuda_bf16_compiled.json"
