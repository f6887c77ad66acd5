#!/usr/bin/env bash
# One device run: the CUDA path against the CPU engine, then `csm bench` on full-size random weights.
# Run from the repository root on the GPU machine with carried wheels in .whl/ and $OUT set.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 scripts/gpu_check.py "$OUT" 2>&1 | grep -v '^\[transformers\]' | tee "$OUT/gpu_check.log"
bench=(python3 -m csmcli bench --random-weights --device cuda --dtype bfloat16 --frames 24 --json)
if ! timeout 280 "${bench[@]}" --batch-sizes 1,4,8,16,32,64 --baseline transformers \
        >"$OUT/bench_cuda_bf16.json" 2>"$OUT/bench_cuda_bf16.err"; then
    tail -n 5 "$OUT/bench_cuda_bf16.err"
    timeout 100 "${bench[@]}" --batch-sizes 1,8,64 --no-cuda-graphs >"$OUT/bench_cuda_eager.json" 2>&1
    cat "$OUT/bench_cuda_eager.json" | tail -n 40
fi
cat "$OUT/bench_cuda_bf16.json"
