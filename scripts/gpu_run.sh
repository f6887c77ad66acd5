#!/usr/bin/env bash
# One device run: the CUDA path against the CPU engine (no compile, then the whole-step compile),
# the A/B of ways to run the frame (scripts/gpu_variants.py), then `csm bench` with `--compile`
# (and the transformers baseline) and without.  Run from the repository root with the carried
# wheels in .whl/; every log and JSON lands in $OUT (default docs/results/).
set -uo pipefail
OUT=${OUT:-docs/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
s=$SECONDS
step() { echo "== $1 (t=$((SECONDS - s)) s)"; }
quiet() { grep -v -e '^\[transformers\]' -e 'Warning' -e 'warnings.warn' -e 'softmax' -e 'split the reduction' \
    -e 'important use case' -e 'pow_by_natural' -e '^$'; }
step "gpu_check, graphs"
timeout 90 python3 scripts/gpu_check.py "$OUT" 2>&1 | quiet | tee "$OUT/gpu_check.log"
step "gpu_check, whole-step compile"
mkdir -p "$OUT/step" && timeout 150 python3 scripts/gpu_check.py "$OUT/step" step 2>&1 | quiet | tee "$OUT/gpu_check_step.log"
step "variants"
timeout 180 python3 scripts/gpu_variants.py "$OUT" 2>&1 | quiet | tee "$OUT/gpu_variants.log"
bench=(python3 -m csmcli bench --random-weights --device cuda --dtype bfloat16 --frames 24 --json)
step "bench, compiled"
timeout 150 "${bench[@]}" --compile --batch-sizes 1,8,64 --baseline transformers \
    >"$OUT/bench_cuda_bf16_compiled.json" 2>"$OUT/bench_compiled.err" || tail -n 8 "$OUT/bench_compiled.err"
step "bench, graphs"
timeout 70 "${bench[@]}" --batch-sizes 1,8,64 >"$OUT/bench_cuda_bf16.json" 2>"$OUT/bench.err" \
    || tail -n 8 "$OUT/bench.err"
step "done"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for name in ("bench_cuda_bf16_compiled.json", "bench_cuda_bf16.json"):
    try:
        r = json.loads((pathlib.Path(sys.argv[1]) / name).read_text())
    except Exception as exc:
        print(name, "missing:", exc)
        continue
    b = r["batches"]
    print(name, f"1 stream {r['ms_per_frame']:.2f} ms/frame, TTFA {r['time_to_first_audio_ms']:.1f} ms,",
          " ".join(f"b{k}: {v['ms_per_frame']:.2f} ms {v['frames_per_s']:.0f} fps" for k, v in b.items()),
          "setup", round(r["compile_and_capture_s"], 1), "s", "speedup", r.get("speedup_vs_baseline"))
PY
