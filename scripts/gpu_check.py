"""GPU check: the CUDA path (one CUDA graph per frame and batch bucket) against the CPU engine.

Greedy codes on a tiny random checkpoint must match the CPU engine's exactly (float32, TF32 off),
seeded sampling must match too (also with top_k above the graphs' 64 candidates, which runs the
frame eagerly), and bfloat16 must produce valid codes.  Prints one line per check and exits
non-zero on a mismatch.  MODE ``layers`` checks ``Engine.compile()`` (what ``--compile`` and
``CSM_COMPILE=1`` use), ``step`` ``Engine.compile(whole_step=True)``; the default is no compile.
Usage: python scripts/gpu_check.py OUT_DIR [eager|layers|step]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_checkpoint import make_tiny_checkpoint

from csmcli import GenerationOptions, Synthesizer

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

PROMPTS = [("Hello from CSM.", 0), ("How are you doing today?", 1), ("Numbers like 42 and 1999, and clauses.", 0)]


def on_gpu(tiny: Path, dtype: str, max_batch: int, mode: str) -> Synthesizer:
    """A CUDA synthesizer compiled as ``mode`` says, with its graphs captured."""
    synth = Synthesizer.load(str(tiny), device="cuda", dtype=dtype, max_batch_size=max_batch, cuda_graphs=False)
    if mode != "eager":
        synth.engine.compile(whole_step=mode == "step")
    synth.engine.capture_graphs()
    return synth


def main(out: Path, mode: str) -> int:
    tiny = make_tiny_checkpoint(out / "tiny")
    cpu = Synthesizer.load(str(tiny), device="cpu", dtype="float32", max_batch_size=4)
    t = time.perf_counter()
    gpu = on_gpu(tiny, "float32", 4, mode)
    report = {
        "mode": mode,
        "load_compile_capture_s": time.perf_counter() - t,
        "graphs": sorted(gpu.engine.graphs or {}),
    }
    ok = True
    for opts in (
        GenerationOptions(temperature=0, max_audio_ms=24 * 80),
        GenerationOptions(seed=7, max_audio_ms=24 * 80),
        GenerationOptions(seed=9, top_k=200, max_audio_ms=12 * 80),
    ):
        for text, speaker in PROMPTS:
            a = cpu.generate(text, speaker, options=opts)
            b = gpu.generate(text, speaker, options=opts)
            same = torch.equal(a.codes, b.codes)
            audio = float(abs(a.samples - b.samples).max())
            print(
                f"{'greedy' if opts.greedy else f'top_k {opts.top_k}'} {text[:20]!r}: codes equal={same} "
                f"(frames {len(a.codes)}), max audio diff {audio:.2e}"
            )
            ok &= same and audio < 1e-3
    jobs = [gpu.job(t, s, [], GenerationOptions(seed=i, max_audio_ms=800)) for i, (t, s) in enumerate(PROMPTS)]
    batched = gpu.generate_many(jobs)
    for i, ((text, speaker), got) in enumerate(zip(PROMPTS, batched, strict=True)):
        solo = cpu.generate(text, speaker, [], GenerationOptions(seed=i, max_audio_ms=800))
        same = torch.equal(solo.codes, got.codes)
        print(f"batched on GPU vs solo on CPU, row {i}: codes equal={same}")
        ok &= same
    bf16 = on_gpu(tiny, "bfloat16", 1, mode)
    r = bf16.generate("Half precision.", 0, options=GenerationOptions(temperature=0, max_audio_ms=800))
    valid = int(r.codes.max()) < 2048 and bool(torch.isfinite(torch.from_numpy(r.samples)).all())
    print(f"bfloat16 + graphs: {len(r.codes)} frames, valid={valid}")
    ok &= valid
    report["ok"] = bool(ok)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print("GPU CHECK", "PASSED" if ok else "FAILED", report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "eager"))
