"""Make a tiny random CSM-1B checkpoint laid out like the real ``sesame/csm-1b`` repository.

Usage: ``python tests/tiny_checkpoint.py OUT_DIR [--seed N] [--no-codec] [--format both|...]``; the
self-check it runs afterwards is :mod:`tiny_check`.

The checkpoint keeps every real-model fact that code can get wrong (Llama-3 RoPE scaling, 32
codebooks of 2051 ids, the flat audio embedding table, 24 kHz Mimi at 12.5 frames/s with 2048
codes per codebook, Llama-3 special-token ids, both weight key formats) and shrinks everything
else, so end-to-end tests run on CPU in seconds. The weights are random but fixed by the seed and
arranged to avoid the traps listed in CSM_FACTS.md: Mimi codebooks have random centroids, Mimi's
output stays inside [-1, 1], reserved codes 2048..2050 never win an argmax, and greedy decoding is
not degenerate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig

try:
    from csmcli.convert import transformers_to_original
except ImportError:  # running from a source checkout where csmcli is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from csmcli.convert import transformers_to_original

SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 1920
NUM_CODEBOOKS = 32
AUDIO_VOCAB = 2051
MIMI_CODES = 2048
TEXT_VOCAB = 128_256

#: Llama-3 special tokens as the CSM repository names them (128002/128003 are CSM's audio tokens).
SPECIAL_TOKENS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|AUDIO|>": 128002,
    "<|audio_eos|>": 128003,
    "<|finetune_right_pad_id|>": 128004,
    "<|reserved_special_token_2|>": 128005,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    **{f"<|reserved_special_token_{i}|>": 128008 + i for i in range(3, 248)},
}

#: RoPE scaling of the real checkpoint, in transformers' rewritten (equivalent) form.
BACKBONE_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 0.125,
    "high_freq_factor": 0.5,
    "original_max_position_embeddings": 1024,
}
DEPTH_ROPE = {
    **BACKBONE_ROPE,
    "low_freq_factor": 0.001953125,
    "high_freq_factor": 0.0078125,
    "original_max_position_embeddings": 16,
}

TRANSFORMERS_INDEX = "transformers.safetensors.index.json"
TRANSFORMERS_SHARDS = ("transformers-00001-of-00002.safetensors", "transformers-00002-of-00002.safetensors")
ORIGINAL_WEIGHTS = "model.safetensors"
PROMPTS = ("conversational_a", "conversational_b", "read_speech_a")

#: Text the tiny tokenizer learns its merges from (any English works; this keeps it self-contained).
_TOKENIZER_CORPUS = (
    "Hello there. How are you doing today? I am doing well, thank you for asking. "
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
    "We were talking about the weather and then about the park, and the game we played there. "
    "It is what it is, and that is that. Do you want to go for a walk later this evening? "
    "This is a test of the speech model, speaking one sentence after another sentence. "
    "Well, I think that the answer is yes, but I am not sure that everyone will agree with me."
)
_TOKENIZER_MERGES = 240


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny ops are fastest that way and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_config() -> CsmConfig:
    """The tiny CsmConfig: real vocabularies, codebooks, positions and RoPE scaling; small widths."""
    codec = MimiConfig(
        sampling_rate=SAMPLE_RATE,
        hidden_size=32,
        num_filters=4,
        upsampling_ratios=[8, 6, 5, 4],
        codebook_size=MIMI_CODES,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=NUM_CODEBOOKS,
        num_semantic_quantizers=1,
        upsample_groups=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    depth = {
        "num_codebooks": NUM_CODEBOOKS,
        "backbone_hidden_size": 64,
        "vocab_size": AUDIO_VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": NUM_CODEBOOKS + 1,
        "rope_parameters": dict(DEPTH_ROPE),
    }
    return CsmConfig(
        num_codebooks=NUM_CODEBOOKS,
        vocab_size=AUDIO_VOCAB,
        text_vocab_size=TEXT_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_parameters=dict(BACKBONE_ROPE),
        depth_decoder_config=depth,
        codec_config=codec.to_dict(),
        architectures=["CsmForConditionalGeneration"],
    )


#: Embedding tables (drawn with std 1); the depth decoder's copy of the audio table is tied to the backbone's.
_EMBEDDINGS = ("embed_text_tokens.weight", "backbone_model.embed_tokens.embed_audio_tokens.weight")


def _init_csm_weights(model: CsmForConditionalGeneration, gen: torch.Generator) -> None:
    """Draw every CSM (non-codec) weight: O(1) activations and logits, so greedy decoding is lively.

    Linear weights get std 1/sqrt(fan_in), embeddings std 1, norm scales 1 +- 0.1 (so swapped norms
    show). Heads give reserved codes 2048..2050 a zero column and centre the real codes' columns:
    the real logits then sum to exactly 0, so their maximum is >= 0 = the reserved logits, and
    argmax (first index on ties) can never pick a reserved code.
    """
    tied = model.depth_decoder.model.embed_tokens.weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("codec_model.") or param is tied:
                continue
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name in _EMBEDDINGS:
                param.copy_(torch.randn(param.shape, generator=gen))
            elif name == "depth_decoder.codebooks_head.weight":
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1]))
        lm_head = model.lm_head.weight  # (vocab, hidden)
        lm_head[:MIMI_CODES] -= lm_head[:MIMI_CODES].mean(dim=0, keepdim=True)
        lm_head[MIMI_CODES:] = 0.0
        heads = model.depth_decoder.codebooks_head.weight  # (codebooks - 1, hidden, vocab)
        heads[..., :MIMI_CODES] -= heads[..., :MIMI_CODES].mean(dim=-1, keepdim=True)
        heads[..., MIMI_CODES:] = 0.0
        tied.copy_(model.backbone_model.embed_tokens.embed_audio_tokens.weight)


def _codebooks(codec: torch.nn.Module) -> list[torch.nn.Module]:
    """Every MimiEuclideanCodebook of the codec, semantic first."""
    return [module for module in codec.modules() if hasattr(module, "embed_sum") and hasattr(module, "cluster_usage")]


def _init_codec(codec: torch.nn.Module, gen: torch.Generator) -> None:
    """Give Mimi random centroids and scale its last convolution so decoded audio peaks near 0.3."""
    with torch.no_grad():
        probe = 0.3 * torch.randn(1, 1, SAMPLE_RATE, generator=gen)
        latents = codec.quantizer.semantic_residual_vector_quantizer.input_proj(codec.encoder(probe).latents)
        scale = float(latents.std())
        for codebook in _codebooks(codec):
            codebook.embed_sum.copy_(scale * torch.randn(codebook.embed_sum.shape, generator=gen))
            codebook.cluster_usage.fill_(1.0)
            codebook.initialized.fill_(1.0)
            codebook._embed = None  # transformers caches embed_sum / cluster_usage
        codes = torch.randint(0, MIMI_CODES, (4, NUM_CODEBOOKS, 10), generator=gen)
        peak = float(codec.decode(codes).audio_values.abs().max())
        last_conv = codec.decoder.decoder_seanet.layers[-1].conv
        last_conv.weight.mul_(0.3 / peak)
        last_conv.bias.mul_(0.3 / peak)


def _legacy_codec_name(name: str) -> str:
    """Name a codec tensor the way the real checkpoint (and transformers' save_pretrained) does."""
    renames = (
        ("codec_model.encoder.encoder_seanet.layers.", "codec_model.encoder.layers."),
        ("codec_model.encoder.encoder_transformer.", "codec_model.encoder_transformer."),
        ("codec_model.encoder.downsample.", "codec_model.downsample."),
        ("codec_model.decoder.upsample.", "codec_model.upsample."),
        ("codec_model.decoder.decoder_transformer.", "codec_model.decoder_transformer."),
        ("codec_model.decoder.decoder_seanet.layers.", "codec_model.decoder.layers."),
    )
    for new, old in renames:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def _transformers_state_dict(model: CsmForConditionalGeneration, with_codec: bool) -> dict[str, torch.Tensor]:
    """The transformers-format tensors, contiguous and unshared, sorted by name."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("codec_model.") and not with_codec:
            continue
        state[_legacy_codec_name(name)] = tensor.detach().clone().contiguous()
    return dict(sorted(state.items()))


#: Generic PreTrainedConfig fields that say nothing about CSM; left out of config.json for readability.
_GENERIC_CONFIG_KEYS = (
    "_name_or_path",
    "_frame_rate",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "is_encoder_decoder",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
)


def _config_json(config: CsmConfig) -> dict[str, Any]:
    """config.json content: every CSM, depth-decoder and Mimi field spelled out, generic noise removed."""
    data = config.to_dict()
    for section in (data, data["depth_decoder_config"], data["codec_config"]):
        for key in _GENERIC_CONFIG_KEYS:
            section.pop(key, None)
        if section is not data:
            section.pop("architectures", None)
            section.pop("dtype", None)
    data["dtype"] = "float32"
    return data


def _write_json(path: Path, data: Any) -> None:
    """Write JSON deterministically (sorted keys, two-space indent, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_transformers_shards(out: Path, state: dict[str, torch.Tensor]) -> None:
    """Split ``state`` into the two shards of the real repository and write the index."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    shards: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    filled = 0
    for name, tensor in state.items():
        shards[0 if filled < total // 2 else 1][name] = tensor
        filled += tensor.numel() * tensor.element_size()
    weight_map = {}
    for filename, shard in zip(TRANSFORMERS_SHARDS, shards, strict=True):
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total_parameters = sum(t.numel() for t in state.values())
    index = {
        "metadata": {"total_size": total, "total_parameters": total_parameters},
        "weight_map": weight_map,
    }
    _write_json(out / TRANSFORMERS_INDEX, index)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _learn_merges(corpus: str, count: int) -> list[tuple[str, str]]:
    """A small deterministic byte-level BPE: most frequent pair first, ties broken by the pair itself."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(corpus))
    split = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            symbols = split[word]
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in split.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            split[word] = merged
    return merges


def build_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer of a few hundred ids whose special tokens keep Llama-3's real ids."""
    vocab = {char: index for index, char in enumerate(_bytes_to_unicode().values())}
    merges = _learn_merges(_TOKENIZER_CORPUS, _TOKENIZER_MERGES)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab.update(SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", SPECIAL_TOKENS["<|begin_of_text|>"])],
    )
    return tokenizer


#: A CSM chat template: each turn is "<bos>[speaker]text<eos>", then audio placeholders if it has audio.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
    {%- if not (message['role'] | string).isdigit() -%}
        {{- raise_exception("The role must be a speaker id such as '0' or '1'") -}}
    {%- endif -%}
    {%- set texts = message['content'] | selectattr('type', 'equalto', 'text') | list -%}
    {%- set audios = message['content'] | selectattr('type', 'equalto', 'audio') | list -%}
    {%- if texts | length != 1 -%}
        {{- raise_exception('Each message needs exactly one text item') -}}
    {%- endif -%}
    {{- bos_token + '[' + (message['role'] | string) + ']' + texts[0]['text'] + eos_token -}}
    {%- if audios | length > 0 -%}
        {{- '<|AUDIO|><|audio_eos|>' -}}
    {%- endif -%}
{%- endfor -%}
"""


def _write_tokenizer_files(out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja."""
    (out / "tokenizer.json").write_text(build_tokenizer().to_str(pretty=True) + "\n")
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "pad_token": "<|end_of_text|>",
            "audio_token": "<|AUDIO|>",
            "audio_eos_token": "<|audio_eos|>",
            "extra_special_tokens": {"audio_token": "<|AUDIO|>", "audio_eos_token": "<|audio_eos|>"},
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "clean_up_tokenization_spaces": True,
            "processor_class": "CsmProcessor",
        },
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _write_side_configs(out: Path) -> None:
    """generation_config.json (Sesame's sampling defaults) and preprocessor_config.json (Mimi input)."""
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": SPECIAL_TOKENS["<|begin_of_text|>"],
            "pad_token_id": SPECIAL_TOKENS["<|AUDIO|>"],
            "do_sample": True,
            "temperature": 0.9,
            "top_k": 50,
            "max_new_tokens": 125,
            "depth_decoder_do_sample": True,
            "depth_decoder_temperature": 0.9,
            "depth_decoder_top_k": 50,
        },
    )
    _write_json(
        out / "preprocessor_config.json",
        {
            "feature_extractor_type": "EncodecFeatureExtractor",
            "processor_class": "CsmProcessor",
            "feature_size": 1,
            "sampling_rate": SAMPLE_RATE,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": True,
            "chunk_length_s": None,
            "overlap": None,
        },
    )


def _prompt_signal(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A short, distinct synthetic signal per prompt (chirps and noise bursts), peak <= 0.5."""
    if kind == "conversational_a":
        t = np.arange(int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
        signal = 0.4 * np.sin(2 * np.pi * (200 * t + 200 * t**2)) + 0.02 * rng.standard_normal(t.size)
    elif kind == "conversational_b":
        t = np.arange(int(1.2 * SAMPLE_RATE)) / SAMPLE_RATE
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
        signal = 0.4 * envelope * np.sin(2 * np.pi * (700 * t - 200 * t**2)) + 0.02 * rng.standard_normal(t.size)
    else:
        n = int(1.7 * SAMPLE_RATE)  # deliberately not a whole number of 1920-sample frames
        noise = np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same")
        bursts = (np.sin(2 * np.pi * 2.5 * np.arange(n) / SAMPLE_RATE) > 0).astype(float)
        signal = 0.8 * noise * bursts
    return np.clip(signal, -0.5, 0.5).astype(np.float32)


def _write_prompts(out: Path, seed: int) -> None:
    """prompts/*.wav: 24 kHz mono 16-bit PCM."""
    folder = out / "prompts"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for kind in PROMPTS:
        sf.write(str(folder / f"{kind}.wav"), _prompt_signal(kind, rng), SAMPLE_RATE, subtype="PCM_16")


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, formats: str = "both", with_codec: bool = True) -> Path:
    """Write a tiny random CSM checkpoint in the real ``sesame/csm-1b`` layout into ``out_dir``.

    ``formats``: ``"both"`` (default, like the real repository), ``"transformers"`` (only the sharded
    transformers weights) or ``"original"`` (only Sesame's ``model.safetensors``; config.json then has
    no ``transformers_weights``). ``with_codec=False`` leaves ``codec_model.*`` out of the shards.
    The same seed gives the same bytes. Returns the output directory.
    """
    if formats not in ("both", "transformers", "original"):
        raise ValueError(f"formats must be both, transformers or original, not {formats!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with one_thread():
        _write_checkpoint(out, seed, formats, with_codec)
    return out


def _write_checkpoint(out: Path, seed: int, formats: str, with_codec: bool) -> None:
    """Build the random model and write every file of the repository layout."""
    config = tiny_config()
    torch.manual_seed(seed)  # transformers' own init (Mimi) draws from the global generator
    model = CsmForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    _init_csm_weights(model, gen)
    _init_codec(model.codec_model, gen)

    config_dict = _config_json(config)
    if formats in ("both", "transformers"):
        config_dict["transformers_weights"] = TRANSFORMERS_INDEX
        _write_transformers_shards(out, _transformers_state_dict(model, with_codec))
    if formats in ("both", "original"):
        original = transformers_to_original(_transformers_state_dict(model, with_codec=False), config_dict)
        save_file(dict(sorted(original.items())), str(out / ORIGINAL_WEIGHTS), metadata={"format": "pt"})
    _write_json(out / "config.json", config_dict)
    _write_tokenizer_files(out)
    _write_side_configs(out)
    _write_prompts(out, seed)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--no-codec", action="store_true", help="leave codec_model.* out of the shards")
    parser.add_argument(
        "--format",
        choices=("both", "transformers", "original"),
        default="both",
        help="weight files to write: both (like sesame/csm-1b), transformers shards, or model.safetensors",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the self-check (greedy decode, Mimi)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = make_tiny_checkpoint(args.out_dir, seed=args.seed, formats=args.format, with_codec=not args.no_codec)
    made = time.perf_counter() - start
    report = ""
    if not args.no_check and not args.no_codec and args.format != "original":
        from tiny_check import verify_tiny_checkpoint

        stats = verify_tiny_checkpoint(out)
        frames, peak = stats["distinct_frames"], stats["peak"]
        report = f"; self-check passed ({frames} distinct greedy frames, audio peak {peak:.2f})"
    print(f"wrote {out} in {made:.1f} s{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
