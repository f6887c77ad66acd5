"""What fbgemm's int8 products change against csmcli's W8A8 kernel, on full-size random CSM-1B weights.

Multi-slot CPU engines without csmcli's W8A8 kernel (no C++ compiler, or ``CSM_CPU_KERNELS=packed``)
run int8 projections on fbgemm, which quantizes each call's activations to 8 bits with VNNI and 7
without (one scale for the whole call); where the kernel builds every engine runs them there (8
bits per row and group of 128 inputs).  The fbgemm model here is prepared as on AVX2 (7 bits).
Three models see the same inputs (teacher forcing with the bf16 model's greedy codes, so errors do
not compound): bf16, int8 as a one-slot engine prepares it, int8 on fbgemm.  For every frame and
codebook the script prints how often each int8 model picks bf16's code and fbgemm picks the
other's, with the relative logit errors.  Then one layer's rows alone and inside a batch of eight:
fbgemm's activation scale is shared by a batch's rows, so a row's result depends a little on the
other streams; the script prints by how much.

Usage: python scripts/int8_kernels_fidelity.py [FRAMES]
"""

from __future__ import annotations

import copy
import statistics
import sys

import torch

from csmcli import cpu
from csmcli.bench import physical_cores
from csmcli.checkpoint import CSM_1B_CONFIG
from csmcli.loader import build_model, random_state
from csmcli.quant import quantize

CPU = torch.device("cpu")
PROMPT_ROWS = 64


def build() -> dict[str, torch.nn.Module]:
    """The bf16 model and its two int8 variants: bf16 and int8 as a one-slot engine prepares them,
    fbgemm as a multi-slot engine on AVX2 without the kernel does (the layers do not depend on the slots)."""
    ref = build_model(CSM_1B_CONFIG, random_state(CSM_1B_CONFIG), CPU, torch.bfloat16)
    plain, fbgemm = (quantize(copy.deepcopy(ref), "int8") for _ in range(2))
    nets = {"bf16": ref, "int8 plain": plain, "int8 fbgemm": fbgemm}
    for name, net in nets.items():
        how = {"kernels": "packed", "max_batch": 2, "caps": cpu.cpu_caps("avx2")} if net is fbgemm else {}
        print(f"{name}: CPU kernels {cpu.prepare_cpu(net, **how)}")
    return nets


def teacher_forced(nets: dict[str, torch.nn.Module], frames: int) -> dict[str, list[torch.Tensor]]:
    """Each model's logits for every frame and codebook, all fed the bf16 model's greedy codes."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(PROMPT_ROWS, 33, dtype=torch.long)
    tokens[:, -1] = torch.randint(0, 128000, (PROMPT_ROWS,), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True
    caches = {
        k: (m.backbone.new_cache(1, 2048, torch.bfloat16, CPU), m.decoder.new_cache(1, 33, torch.bfloat16, CPU))
        for k, m in nets.items()
    }
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in nets}
    hidden = {k: m.prefill(m.embed_rows(tokens, mask), 0, caches[k][0], 0)[None] for k, m in nets.items()}
    for f in range(frames):
        forced: list[int] = []
        for name, net in nets.items():

            def pick(x: torch.Tensor, cb: int, name: str = name, forced: list = forced) -> torch.Tensor:
                logits[name].append(x[0, :2048].float())
                if len(forced) <= cb:  # the first model (bf16) chooses
                    forced.append(int(x[0, :2048].argmax()))
                return torch.tensor([forced[cb]])

            codes = net.decode_frame(hidden[name], pick, caches[name][1])
            pos = torch.tensor([PROMPT_ROWS + f])
            hidden[name] = net.backbone_step(codes, pos, caches[name][0], PROMPT_ROWS + 1 + f)
    return logits


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    agree = sum(int(x.argmax() == y.argmax()) for x, y in zip(a, b, strict=True))
    errors = sorted(float((x - y).norm() / x.norm()) for x, y in zip(a, b, strict=True))
    return (
        f"argmax agreement {100 * agree / len(a):5.1f}% of {len(a)}, "
        f"relative logit error median {errors[len(errors) // 2]:.4f} max {errors[-1]:.4f}"
    )


def batch_coupling(net: torch.nn.Module) -> str:
    """A depth-decoder layer's output for one row alone and inside a batch of eight rows of
    RMS-normalised activations (0.5x to 2x the first row's scale): the relative change."""
    layer = net.decoder.layers[0].w13
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(8, layer.in_features, generator=g) * torch.linspace(1, 2, 8)[:, None]
    rows[1] *= 0.25  # a quiet stream next to loud ones
    changes = []
    for i in range(8):
        alone = layer(rows[i : i + 1].bfloat16()).float()
        together = layer(rows.bfloat16())[i : i + 1].float()
        changes.append(float((alone - together).norm() / alone.norm()))
    return (
        f"row alone vs in a batch of 8: relative change median {statistics.median(changes):.4f}, max {max(changes):.4f}"
    )


def main() -> None:
    frames = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    torch.set_num_threads(physical_cores())
    nets = build()
    with torch.inference_mode():
        logits = teacher_forced(nets, frames)
        print(f"frames {frames}, teacher-forced")
        print(f"int8 plain  vs bf16:       {compare(logits['bf16'], logits['int8 plain'])}")
        print(f"int8 fbgemm vs bf16:       {compare(logits['bf16'], logits['int8 fbgemm'])}")
        print(f"int8 fbgemm vs int8 plain: {compare(logits['int8 plain'], logits['int8 fbgemm'])}")
        print(f"fbgemm, {batch_coupling(nets['int8 fbgemm'])}")
        print(f"plain,  {batch_coupling(nets['int8 plain'])}")


if __name__ == "__main__":
    main()
