"""What each weight quantization costs in fidelity against bf16 weights (CPU), per component.

Every model sees the same inputs (teacher forcing with the bf16 model's greedy codes), so errors do
not compound: for every frame and codebook the quantized model's logits are compared with bf16's
(relative L2 error) and whether its argmax picks the same code, separately for the backbone's
codebook 0 and the depth decoder's codebooks 1-31.  The models run one after another (memory).

Random weights make argmax fragile: their logits are nearly flat (the top two codes are close), so
a small error flips the choice far more often than trained weights, whose logits are peaked.  Read
the agreement column as a comparison between quantizations, the logit error as the closer measure.

Usage: python scripts/quant_fidelity.py [--frames N] [--tiny] [--variants int8,int4,...]
(``--tiny``: the tiny test checkpoint of ``tests/tiny_checkpoint.py`` instead of full-size random
weights.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from csmcli import checkpoint, quant
from csmcli.bench import physical_cores
from csmcli.cpu import prepare_cpu
from csmcli.loader import build_model, random_state

# name: (quantization, int4 group, parts kept at int8)
VARIANTS = {
    "int8": ("int8", quant.INT4_GROUP, ()),
    "int4": ("int4", quant.INT4_GROUP, quant.INT4_KEEP_INT8),
    "int4-all": ("int4", quant.INT4_GROUP, ()),
    "int4-cb0-8": ("int4", quant.INT4_GROUP, ("codebook0_head",)),
    "int4-heads8": ("int4", quant.INT4_GROUP, ("heads",)),
    "int4-proj8": ("int4", quant.INT4_GROUP, ("projection",)),
    "int4-heads+cb0-8": ("int4", quant.INT4_GROUP, ("codebook0_head", "heads")),
    "int4-bb8": ("int4", quant.INT4_GROUP, (*quant.INT4_KEEP_INT8, "backbone")),
    "int4-g32": ("int4", 32, quant.INT4_KEEP_INT8),
    "int4-g128": ("int4", 128, quant.INT4_KEEP_INT8),
}
ROWS = 64
CODES = 2048  # the real codes (the reserved ones above never win)


def load_state(tiny: bool) -> tuple[dict, dict]:
    """The config and a bf16 state dict: full-size random weights, or the tiny test checkpoint."""
    if not tiny:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # draw in bf16: half the memory of float32
        try:
            return checkpoint.CSM_1B_CONFIG, random_state(checkpoint.CSM_1B_CONFIG)
        finally:
            torch.set_default_dtype(default)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_checkpoint

    path = tiny_checkpoint.make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "csm-tiny", seed=0, formats="both")
    ckpt = checkpoint.inspect(path)
    state, _ = checkpoint.read_tensors(ckpt)
    return ckpt.config, {k: v.to(torch.bfloat16) for k, v in state.items()}


def run_model(model, tokens, mask, frames: int, forced: list[list[int]] | None) -> tuple[list, list]:
    """Each frame's 32 logit rows; greedy codes when ``forced`` is None, else those codes."""
    cpu, dtype = torch.device("cpu"), torch.bfloat16
    cache = model.backbone.new_cache(1, 2048, dtype, cpu)
    depth_cache = model.decoder.new_cache(1, 33, dtype, cpu)
    logits, codes_out = [], []
    with torch.inference_mode():
        hidden = model.prefill(model.embed_rows(tokens, mask), 0, cache, 0)[None]
        for f in range(frames):
            rows: list[torch.Tensor] = []
            chosen: list[int] = []

            def pick(x: torch.Tensor, cb: int, rows: list = rows, chosen: list = chosen, f: int = f) -> torch.Tensor:
                rows.append(x[0, :CODES].float())
                chosen.append(int(x[0, :CODES].argmax()) if forced is None else forced[f][cb])
                return torch.tensor([chosen[-1]])

            codes = model.decode_frame(hidden, pick, depth_cache)
            logits.append(rows)
            codes_out.append(chosen)
            hidden = model.backbone_step(codes, torch.tensor([ROWS + f]), cache, ROWS + 1 + f)
    return logits, codes_out


def compare(ref: list, got: list) -> dict[str, tuple[float, float, float]]:
    """Per component: (argmax agreement %, median and max relative logit error)."""
    out = {}
    for name, cbs in (("codebook0", range(1)), ("depth 1-31", range(1, 32))):
        errs, agree = [], 0
        for fr, fg in zip(ref, got, strict=True):
            for cb in cbs:
                a, b = fr[cb], fg[cb]
                errs.append(float((a - b).norm() / a.norm()))
                agree += int(a.argmax() == b.argmax())
        out[name] = (100 * agree / len(errs), statistics.median(errs), max(errs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the tiny test checkpoint, not full-size random weights")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        parser.error(f"unknown variants {unknown}")
    torch.set_num_threads(physical_cores())
    config, state = load_state(args.tiny)
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(ROWS, 33, dtype=torch.long)
    tokens[:, -1] = torch.randint(0, min(128000, config["text_vocab_size"]), (ROWS,), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True

    def model_for(variant: str | None):
        model = build_model(config, state, torch.device("cpu"), torch.bfloat16)
        if variant:
            name, group, keep = VARIANTS[variant]
            quant.quantize(model, name, group=group, keep_int8=keep)
        prepare_cpu(model, max_batch=1)  # the kernels a one-stream engine (csm say / play) runs
        return model

    ref_logits, forced = run_model(model_for(None), tokens, mask, args.frames, None)
    weights = "tiny checkpoint" if args.tiny else "full-size random weights"
    print(f"{weights}, {args.frames} frames, teacher-forced with bf16's greedy codes, torch {torch.__version__}")
    head = f"{'argmax agree':>12s} {'median err':>10s} {'max err':>8s}"
    print(f"{'variant':16s} {'8-bit parts':46s} {'component':11s} {head}")
    for variant in names:
        got, _ = run_model(model_for(variant), tokens, mask, args.frames, forced)
        name, group, keep = VARIANTS[variant]
        kept = "all" if name == "int8" else (",".join(keep) or "none") + f" (g{group})"
        for comp, (agree, med, worst) in compare(ref_logits, got).items():
            print(f"{variant:16s} {kept:46s} {comp:11s} {agree:11.1f}% {med:10.4f} {worst:8.4f}", flush=True)


if __name__ == "__main__":
    main()
