"""What weight-only int8 costs in fidelity, on full-size random CSM-1B weights (CPU).

Both models see the same inputs (teacher forcing with the bf16 model's greedy codes), so errors do
not compound: for every frame and codebook we compare the int8 model's logits with bf16's
(relative L2 error) and whether its argmax picks the same code.
Usage: python scripts/int8_fidelity.py [FRAMES]
"""

from __future__ import annotations

import copy
import sys

import torch

from csmcli.bench import physical_cores
from csmcli.checkpoint import CSM_1B_CONFIG
from csmcli.cpu import prepare_cpu
from csmcli.loader import build_model, random_state
from csmcli.quant import quantize_int8


def run(frames: int) -> None:
    torch.set_num_threads(physical_cores())
    state = random_state(CSM_1B_CONFIG)
    ref = build_model(CSM_1B_CONFIG, state, torch.device("cpu"), torch.bfloat16)
    del state
    q = quantize_int8(copy.deepcopy(ref))
    for net in (ref, q):  # the kernels a one-stream engine (csm say / play) runs
        print(f"CPU kernels: {prepare_cpu(net, max_batch=1)}")
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(64, 33, dtype=torch.long)
    tokens[:, -1] = torch.randint(0, 128000, (64,), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True
    nets = {"bf16": ref, "int8": q}
    caches = {
        k: (
            m.backbone.new_cache(1, 2048, torch.bfloat16, torch.device("cpu")),
            m.decoder.new_cache(1, 33, torch.bfloat16, torch.device("cpu")),
        )
        for k, m in nets.items()
    }
    errors, agree, total = [], 0, 0
    with torch.inference_mode():
        hidden = {k: m.prefill(m.embed_rows(tokens, mask), 0, caches[k][0], 0)[None] for k, m in nets.items()}
        for f in range(frames):
            logits: dict[str, list[torch.Tensor]] = {"bf16": [], "int8": []}
            forced: list[int] = []

            def greedy(x: torch.Tensor, cb: int, logits: dict = logits, forced: list = forced) -> torch.Tensor:
                logits["bf16"].append(x[0, :2048].float())
                forced.append(int(x[0, :2048].argmax()))
                return torch.tensor([forced[-1]])

            def follow(x: torch.Tensor, cb: int, logits: dict = logits, forced: list = forced) -> torch.Tensor:
                logits["int8"].append(x[0, :2048].float())
                return torch.tensor([forced[cb]])

            codes = ref.decode_frame(hidden["bf16"], greedy, caches["bf16"][1])
            q.decode_frame(hidden["int8"], follow, caches["int8"][1])
            for a, b in zip(logits["bf16"], logits["int8"], strict=True):
                errors.append(float((a - b).norm() / a.norm()))
                agree += int(a.argmax() == b.argmax())
                total += 1
            pos = torch.tensor([64 + f])
            for k, m in nets.items():
                hidden[k] = m.backbone_step(codes, pos, caches[k][0], 65 + f)
    errors.sort()
    print(f"frames {frames}, codebooks compared {total}")
    print(f"argmax agreement int8 vs bf16: {100 * agree / total:.1f}%")
    print(f"relative logit error: median {errors[len(errors) // 2]:.4f}, max {errors[-1]:.4f}")


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
