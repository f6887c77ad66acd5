#!/usr/bin/env bash
# One device run for the compiled depth-decoder step: the CUDA path against the CPU engine (graphs
# eager, then compiled), the A/B of ways to run the frame, then `csm bench` compiled (with the
# transformers baseline) and eager.  Run from the repository root with carried wheels in .whl/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
s=$SECONDS
step() { echo "== $1 (t=$((SECONDS - s)) s)"; }
quiet() { grep -v -e '^\[transformers\]' -e 'UserWarning' -e '^  warnings.warn'; }
step "gpu_check, graphs"
timeout 120 python3 scripts/gpu_check.py "$OUT" 2>&1 | quiet | tee "$OUT/gpu_check.log"
step "gpu_check, compiled"
mkdir -p /tmp/c && CSM_COMPILE=1 timeout 150 python3 scripts/gpu_check.py /tmp/c 2>&1 | quiet | tee "$OUT/gpu_check_compiled.log"
bench=(python3 -m csmcli bench --random-weights --device cuda --dtype bfloat16 --frames 24 --json)
step "bench, compiled"
timeout 170 "${bench[@]}" --compile --batch-sizes 1,8,64 --baseline transformers \
    >"$OUT/bench_cuda_bf16_compiled.json" 2>"$OUT/bench_compiled.err" || tail -n 8 "$OUT/bench_compiled.err"
step "variants"
timeout 120 python3 scripts/gpu_variants.py "$OUT" 2>&1 | quiet | tee "$OUT/gpu_variants.log"
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
