"""Numeric equivalence with the reference: transformers' CsmForConditionalGeneration on the same weights.

Greedy codes must match frame for frame, backbone logits must agree to float tolerance along the
way (a RoPE-scaling or offset mistake moves them long before it flips an argmax), and decoded
audio must match transformers' Mimi decode.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import CsmConfig, CsmForConditionalGeneration
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from csmcli import GenerationOptions, Segment, Synthesizer, cpu
from csmcli.checkpoint import CSM_1B_CONFIG
from csmcli.gemv import compiled_gemv
from csmcli.model import rope_inv_freq
from csmcli.sampling import SamplingParams, sample

FRAMES = 24
GREEDY = GenerationOptions(temperature=0, max_audio_ms=FRAMES * 80)
PROMPTS = [
    ("Hello from CSM.", 0),
    ("How are you doing today?", 1),
    ("A much longer sentence, with commas, numbers like 42 and 1999, and several clauses that run on for a while.", 0),
]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    model = CsmForConditionalGeneration.from_pretrained(tiny_dir).eval()
    return model


def _context(tiny_dir) -> Segment:
    audio, rate = sf.read(str(tiny_dir / "prompts" / "conversational_a.wav"), dtype="float32")
    assert rate == 24000
    return Segment(text="Earlier words, with their audio.", speaker=0, audio=audio)


def _reference_inputs(
    synth: Synthesizer,
    reference,
    text: str,
    speaker: int,
    context: list[Segment],
) -> dict:
    """transformers' own input format: audio placeholders expanded, raw audio in input_values."""
    tok = synth.prompts
    audio_id, audio_eos_id = 128002, 128003
    ids: list[int] = []
    audios = []
    for seg in context:
        ids += tok.text_ids(seg.text, seg.speaker)
        with torch.no_grad():
            n = reference.codec_model.encode(torch.from_numpy(seg.audio)[None, None]).audio_codes.shape[-1]
        ids += [audio_id] * n + [audio_eos_id]
        audios.append(torch.from_numpy(seg.audio))
    ids += tok.text_ids(text, speaker)
    # The processor always passes an all-ones attention mask; without it generate() would treat
    # <|AUDIO|> (128002, also the config's pad id) as padding and mask the context audio out.
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if audios:
        inputs["input_values"] = torch.cat(audios)[None, None]
        inputs["input_values_cutoffs"] = torch.tensor([[a.numel() for a in audios]]).cumsum(-1)
    return inputs


def _our_logits(synth: Synthesizer, text: str, speaker: int, context, codes: torch.Tensor) -> torch.Tensor:
    """Codebook-0 logits of our model along a given code path (teacher forcing)."""
    model = synth.model
    prompt = synth.prompt(text, speaker, context)
    cache = model.backbone.new_cache(1, model.max_len, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        h = model.prefill(model.embed_rows(prompt.tokens, prompt.mask), 0, cache, 0)[None]
        out = []
        pos = len(prompt)
        for frame in codes:
            out.append(model.codebook0_head(h)[0])
            h = model.backbone_step(frame[None], torch.tensor([pos]), cache, pos + 1)
            pos += 1
    return torch.stack(out)


@pytest.mark.parametrize("with_context", [False, True], ids=["text-only", "with-context"])
@pytest.mark.parametrize("prompt_index", range(len(PROMPTS)))
def test_greedy_codes_and_logits_match_transformers(
    synth,
    reference,
    tiny_dir,
    prompt_index,
    with_context,
) -> None:
    text, speaker = PROMPTS[prompt_index]
    context = [_context(tiny_dir)] if with_context else []
    inputs = _reference_inputs(synth, reference, text, speaker, context)
    with torch.no_grad():
        ref = reference.generate(
            **inputs,
            max_new_tokens=FRAMES,
            do_sample=False,
            depth_decoder_do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    ref_codes = ref.sequences[0]
    assert ref_codes.shape == (FRAMES, 32)

    ours = synth.generate(text, speaker, context, GREEDY)
    assert ours.codes.shape == (FRAMES, 32)
    assert torch.equal(ours.codes, ref_codes), "greedy codes differ from transformers"
    assert len({tuple(f.tolist()) for f in ref_codes}) > FRAMES // 2, "fixture too degenerate to prove anything"

    ref_logits = torch.stack([step[0] for step in ref.logits])
    our_logits = _our_logits(synth, text, speaker, context, ref_codes)
    torch.testing.assert_close(our_logits, ref_logits, atol=2e-5, rtol=1e-5)

    with torch.no_grad():
        ref_audio = reference.codec_model.decode(ref_codes.T[None]).audio_values[0, 0].numpy()
    assert len(ours.samples) == FRAMES * 1920
    np.testing.assert_allclose(ours.samples, ref_audio, atol=1e-4)
    assert np.abs(ours.samples).max() > 1e-3


def test_context_encoding_matches_transformers(synth, reference, tiny_dir) -> None:
    seg = _context(tiny_dir)
    with torch.no_grad():
        ref = reference.codec_model.encode(torch.from_numpy(seg.audio)[None, None]).audio_codes[0, :32].T
    assert torch.equal(synth.codec.encode(seg.audio), ref)


def test_original_format_gives_the_same_codes(synth, tiny_dir, tiny_original_dir, monkeypatch) -> None:
    """Sesame's key names with interleaved RoPE, converted on load, give exactly the same output."""
    mimi_dir = tiny_original_dir.parent / "mimi"
    synth.codec.model.save_pretrained(mimi_dir)
    original = Synthesizer.load(str(tiny_original_dir), device="cpu", dtype="float32", mimi=str(mimi_dir))
    for text, speaker in PROMPTS[:2]:
        a = synth.generate(text, speaker, options=GREEDY)
        b = original.generate(text, speaker, options=GREEDY)
        assert torch.equal(a.codes, b.codes)
        np.testing.assert_allclose(a.samples, b.samples, atol=1e-5)


@pytest.mark.parametrize("part", ["backbone", "depth"])
def test_rope_scaling_matches_transformers_for_the_real_config(part) -> None:
    """Our Llama-3 frequency scaling equals transformers' for CSM-1B's real RoPE settings."""
    config = CsmConfig(**{k: v for k, v in CSM_1B_CONFIG.items() if k != "model_type"})
    cfg = config if part == "backbone" else config.depth_decoder_config
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    from csmcli.model import rope_parameters

    raw = CSM_1B_CONFIG if part == "backbone" else CSM_1B_CONFIG["depth_decoder_config"]
    ours = rope_inv_freq(raw["head_dim"], rope_parameters(raw))
    torch.testing.assert_close(ours, expected)
    plain = rope_inv_freq(raw["head_dim"], {**rope_parameters(raw), "rope_type": "default"})
    assert not torch.allclose(ours, plain)


def test_sampling_never_picks_reserved_codes() -> None:
    logits = torch.full((3, 2051), -10.0)
    logits[:, 2048:] = 50.0
    params = SamplingParams.empty(3, torch.device("cpu"))
    params.set_row(1, 1.0, 50, 1.0, 1.0, 7)
    params.set_row(2, 1.5, 2051, 0.9, 1.0, 9)
    for codebook in range(32):
        assert int(sample(logits, params, codebook, 2048).max()) < 2048


@pytest.mark.skipif(compiled_gemv() is None, reason="torch.compile cannot build CPU kernels here")
@pytest.mark.parametrize("with_context", [False, True], ids=["text-only", "with-context"])
def test_compiled_gemv_kernels_match_transformers(reference, tiny_dir, monkeypatch, with_context) -> None:
    """The same greedy codes with every single-row projection on the compiled gemv kernel."""
    monkeypatch.setattr(cpu, "GEMV_MIN_ELEMENTS", 0)
    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", max_batch_size=1)
    layers = [m for m in synth.model.modules() if isinstance(m, cpu.CpuLinear)]
    assert synth.engine.cpu_kernels == "gemv+linear" and all(m.gemv for m in layers)
    text, speaker = PROMPTS[2]
    context = [_context(tiny_dir)] if with_context else []
    inputs = _reference_inputs(synth, reference, text, speaker, context)
    with torch.no_grad():
        ref = reference.generate(**inputs, max_new_tokens=FRAMES, do_sample=False, depth_decoder_do_sample=False)
    ours = synth.generate(text, speaker, context, GREEDY)
    assert torch.equal(ours.codes, ref[0])
