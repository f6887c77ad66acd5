"""The tiny checkpoint's self-check: greedy decoding is not degenerate, both weight formats hold the
same model, RoPE scaling and reserved codes are the real model's, and Mimi round-trips codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from safetensors.torch import load_file
from tiny_checkpoint import (
    AUDIO_VOCAB,
    BACKBONE_ROPE,
    DEPTH_ROPE,
    MIMI_CODES,
    NUM_CODEBOOKS,
    ORIGINAL_WEIGHTS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    SPECIAL_TOKENS,
    one_thread,
)
from tokenizers import Tokenizer
from transformers import CsmForConditionalGeneration

from csmcli.convert import original_to_transformers


def greedy_frames(model: CsmForConditionalGeneration, text_ids: torch.Tensor, frames: int) -> torch.Tensor:
    """Greedy CSM decoding of ``frames`` frames after a text prompt, without caches; (1, frames, 32) codes.

    Much faster than ``model.generate`` on a tiny model (no nested generate); no early stop.
    """
    offsets = torch.arange(NUM_CODEBOOKS) * AUDIO_VOCAB
    audio_table = model.backbone_model.embed_tokens.embed_audio_tokens
    embeds = model.embed_text_tokens(text_ids)
    rows = []
    for _ in range(frames):
        hidden = model.backbone_model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
        codes = [int(model.lm_head(hidden).argmax(-1))]
        for _ in range(1, NUM_CODEBOOKS):
            depth_ids = torch.tensor([[0, *codes]])
            logits = model.depth_decoder(
                input_ids=depth_ids, backbone_last_hidden_state=hidden, use_cache=False, logits_to_keep=1
            ).logits
            codes.append(int(logits[0, -1].argmax()))
        frame = torch.tensor(codes)
        rows.append(frame)
        embeds = torch.cat([embeds, audio_table(frame + offsets).sum(0).view(1, 1, -1)], dim=1)
    return torch.stack(rows).unsqueeze(0)


def verify_tiny_checkpoint(out_dir: str | Path, frames: int = 30) -> dict[str, Any]:
    """Self-check a checkpoint written with the codec: it loads cleanly and avoids every known trap.

    Raises AssertionError on failure; returns a few numbers for the report.
    """
    with one_thread():
        return _verify(Path(out_dir), frames)


def _verify(out: Path, frames: int) -> dict[str, Any]:
    """Body of :func:`verify_tiny_checkpoint`."""
    from transformers import AutoTokenizer

    model, info = CsmForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"} or info.get("error_msgs")
    assert not problems, f"from_pretrained reported {problems}"
    AutoTokenizer.from_pretrained(out)
    if (out / ORIGINAL_WEIGHTS).exists():
        _check_original_matches(out, model)
    _check_rope_scaling(model)
    with torch.no_grad():
        _check_reserved_codes(model)
        codes_in_one_second = _check_codec(out, model.codec_model)
        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        text = tokenizer.encode("[0]Hello there.", add_special_tokens=False).ids
        ids = torch.tensor([[SPECIAL_TOKENS["<|begin_of_text|>"], *text, SPECIAL_TOKENS["<|end_of_text|>"]]])
        generated = greedy_frames(model, ids, frames)
        audio = model.codec_model.decode(generated.transpose(1, 2)).audio_values
    assert int(generated.max()) < MIMI_CODES, "greedy picked a reserved code"
    distinct_frames = len({tuple(row.tolist()) for row in generated[0]})
    assert distinct_frames >= frames // 2, f"greedy repeats itself: {distinct_frames} distinct frames"
    assert generated[0, :, 0].unique().numel() > 3, "codebook 0 barely changes across frames"
    assert min(row.unique().numel() for row in generated[0]) > 8, "codes barely vary across codebooks"
    peak = float(audio.abs().max())
    assert 1e-3 < peak < 0.9, f"decoded audio peak {peak} is not well inside [-1, 1]"
    return {"distinct_frames": distinct_frames, "peak": peak, "codes_in_one_second": codes_in_one_second}


def _check_original_matches(out: Path, model: CsmForConditionalGeneration) -> None:
    """model.safetensors, converted back to transformers names, equals the loaded transformers weights."""
    converted = original_to_transformers(load_file(str(out / ORIGINAL_WEIGHTS)), model.config)
    state = model.state_dict()
    for name, tensor in converted.items():
        assert torch.equal(tensor, state[name]), f"{ORIGINAL_WEIGHTS} disagrees with the shards at {name}"


def _check_rope_scaling(model: CsmForConditionalGeneration) -> None:
    """Llama-3 scaling must change some RoPE frequency of both stacks (else the fixture cannot catch it)."""
    for rotary, rope in (
        (model.backbone_model.rotary_emb, BACKBONE_ROPE),
        (model.depth_decoder.model.rotary_emb, DEPTH_ROPE),
    ):
        dim = rotary.inv_freq.numel() * 2
        plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
        assert not torch.allclose(rotary.inv_freq, plain), "Llama-3 RoPE scaling changes no frequency"


def _check_reserved_codes(model: CsmForConditionalGeneration) -> None:
    """No hidden state makes a reserved code (2048..2050) the argmax of any head."""
    gen = torch.Generator().manual_seed(1234)
    hidden = 10 * torch.randn(1024, model.config.hidden_size, generator=gen)
    assert int(model.lm_head(hidden).argmax(-1).max()) < MIMI_CODES, "lm_head can pick a reserved code"
    heads = model.depth_decoder.codebooks_head.weight
    hidden = 10 * torch.randn(128, heads.shape[1], generator=gen)
    logits = torch.einsum("nh,chv->cnv", hidden, heads)
    assert int(logits.argmax(-1).max()) < MIMI_CODES, "codebooks_head can pick a reserved code"


def _check_codec(out: Path, codec: torch.nn.Module) -> int:
    """Mimi runs at 1920 samples per frame, uses its codes, and spreads audio over many codes."""
    prompt = sf.read(str(out / "prompts" / "conversational_a.wav"), dtype="float32")[0]
    codes = codec.encode(torch.from_numpy(prompt[:SAMPLE_RATE]).view(1, 1, -1)).audio_codes
    assert tuple(codes.shape) == (1, NUM_CODEBOOKS, 13), f"1 s encodes to {tuple(codes.shape)}"
    assert codes.unique().numel() > NUM_CODEBOOKS, "encoding maps audio to too few codes"
    assert codes[0, 0].unique().numel() > 1, "codebook 0 gets a single code for a chirp"
    noise = 0.1 * torch.randn(1, 1, SAMPLE_RATE, generator=torch.Generator().manual_seed(7))
    noise_codes = codec.encode(noise).audio_codes
    assert noise_codes.unique().numel() > NUM_CODEBOOKS, "encoding maps noise to too few codes"
    assert (noise_codes != 0).float().mean() > 0.9, "encoding maps noise to code 0"
    zeros = torch.zeros(1, NUM_CODEBOOKS, 5, dtype=torch.long)
    changed = zeros.clone()
    changed[0, 5, 2] = 17
    audio = codec.decode(zeros).audio_values
    assert audio.shape[-1] == 5 * SAMPLES_PER_FRAME, f"5 frames decode to {audio.shape[-1]} samples"
    assert not torch.allclose(audio, codec.decode(changed).audio_values), "codes do not change the audio"
    return codes.unique().numel()
