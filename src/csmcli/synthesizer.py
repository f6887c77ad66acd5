"""The public entry point: load a checkpoint once, then generate or stream speech."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import checkpoint, kernels
from .codec import Codec
from .engine import AudioChunk, Engine, EngineLoop, Job, JobStats
from .errors import CheckpointError, OptionsError, PromptTooLongError
from .model import CSMModel, TransformerSpec
from .options import FRAME_MS, GenerationOptions
from .prompt import Prompt, PromptBuilder, Segment, check_speaker, check_text
from .textsplit import split_text
from .utterance import Utterance
from .voices import NO_VOICE, VoiceLibrary

log = logging.getLogger("csmcli")
#: Silence between the pieces of a long text.
PIECE_PAUSE_S = 0.25

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Audio:
    """A finished utterance: float32 mono samples plus what produced them."""

    samples: np.ndarray
    sample_rate: int
    codes: Tensor
    seed: int
    stats: JobStats
    pieces: int = 1

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; asking for a missing one is an error."""
    if name not in DEVICES:
        raise OptionsError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise OptionsError("device cuda requested but no CUDA GPU is usable by this torch build")
    if name == "mps" and not mps:
        raise OptionsError("device mps requested but Apple's MPS backend is not available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and on CPUs with native bfloat16 (AVX512-BF16 or AMX), float16
    on MPS, float32 on other CPUs (where bfloat16 arithmetic is emulated and slower)."""
    if name == "auto":
        if device.type == "cpu":
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            return torch.bfloat16 if native else torch.float32
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if name not in DTYPES:
        raise OptionsError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_model(config: dict, state: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> CSMModel:
    """Instantiate :class:`CSMModel` on ``device`` straight from a state dict (no random init pass)."""
    with torch.device("meta"):
        model = CSMModel(config)
    ours = checkpoint.to_model_state(state, config)
    ours = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    try:
        model.load_state_dict(ours, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint tensors do not fit its config: {str(exc).splitlines()[0]}") from None
    model.init_buffers(device)
    model.requires_grad_(False)
    return model.eval()


def _compile_requested(compile: bool | None) -> bool:
    """``compile``, or when it is None whether ``CSM_COMPILE=1``."""
    return os.environ.get("CSM_COMPILE", "0") == "1" if compile is None else compile


class Synthesizer:
    """CSM-1B text-to-speech: ``Synthesizer.load(...)``, then :meth:`generate` or :meth:`stream`."""

    def __init__(
        self,
        model: CSMModel,
        codec: Codec,
        tokenizer,
        device: torch.device,  # noqa: ANN001
        dtype: torch.dtype,
        max_batch_size: int = 1,
        source: Path | None = None,
        prompts_dir: Path | None = None,
        compile: bool | None = None,
    ) -> None:
        self.model = model
        self.codec = codec
        self.device = device
        self.dtype = dtype
        self.source = source
        self.prompts = PromptBuilder(tokenizer, codec.encode, model.num_codebooks)
        self.voices = VoiceLibrary(prompts_dir)
        self._voice_segments: dict[tuple, Segment] = {}
        self.engine = Engine(model, codec, device, dtype, max_batch=max_batch_size)
        if _compile_requested(compile):
            self.engine.compile()
        if device.type == "cuda" and os.environ.get("CSM_CUDA_GRAPHS", "1") != "0":
            self.engine.capture_graphs()

    @property
    def sample_rate(self) -> int:
        """Output sample rate (24 kHz)."""
        return self.codec.sample_rate

    @classmethod
    def load(
        cls,
        model: str = checkpoint.DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        local_files_only: bool = False,
        max_batch_size: int = 1,
        quantize: str = "none",
        compile: bool | None = None,
    ) -> Synthesizer:
        """Load a hub id (through the hub cache) or a local checkpoint directory.

        ``quantize="int8"`` stores the projections as weight-only int8 (see :mod:`csmcli.quant`).
        ``compile`` (default: ``CSM_COMPILE=1``) runs :meth:`Engine.compile` before returning: on a
        GPU the layers, on the CPU (int8 weights) every depth-decoder step whole.
        """
        from .quant import check_quantization, quantize_int8

        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        if max_batch_size < 1:
            raise OptionsError(f"max_batch_size must be at least 1, got {max_batch_size}")
        check_quantization(quantize)
        compile = _compile_requested(compile)
        if compile and torch_device.type == "cpu":
            kernels.check_compilable(quantize == "int8")
        path = checkpoint.resolve(model, local_files_only=local_files_only)
        ckpt = checkpoint.inspect(path)
        if torch_device.type == "cpu":
            cfg = ckpt.config
            specs = [TransformerSpec.from_config(cfg), TransformerSpec.from_config(cfg["depth_decoder_config"])]
            if kernels.needs_gemv(None, specs, max_batch_size, quantize != "none"):
                kernels.warm_up(torch_dtype)  # compiles while the weights load
        state, codec_state = checkpoint.read_tensors(ckpt)
        net = build_model(ckpt.config, state, torch_device, torch_dtype)
        del state
        if quantize == "int8":
            quantize_int8(net)
        if codec_state:
            codec = Codec.from_state_dict(ckpt.config["codec_config"], codec_state, torch_device)
        else:
            mimi = os.environ.get("CSM_MIMI", checkpoint.MIMI_MODEL)
            codec = Codec.from_pretrained(checkpoint.resolve(mimi, local_files_only), torch_device)
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(ckpt.tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{ckpt.tokenizer_file} is not a valid tokenizer: {exc}") from None
        return cls(
            net,
            codec,
            tokenizer,
            torch_device,
            torch_dtype,
            max_batch_size,
            source=path,
            prompts_dir=ckpt.prompts_dir,
            compile=compile,
        )

    # -- requests ----------------------------------------------------------------------------

    def prompt(self, text: str, speaker: int = 0, context: Sequence[Segment] = ()) -> Prompt:
        """The prompt rows for ``text`` spoken by ``speaker`` after ``context``."""
        return self.prompts.build(text, speaker, context)

    def job(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        options: GenerationOptions | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 8,
        sink=None,
    ) -> Job:  # noqa: ANN001
        """Build and validate (but do not start) one generation job."""
        options = options or GenerationOptions()
        prompt = self.prompt(text, speaker, context)
        job = Job(prompt, options, first_chunk_frames, chunk_frames, sink)
        self.engine.check_fits(prompt, options)
        return job

    def voice_context(self, speaker: int = 0, voice: str | None = None) -> list[Segment]:
        """Context segments for a voice: ``None`` = the speaker's default preset (if the checkpoint
        has one), ``"none"`` = no context, otherwise a preset or user voice by name."""
        check_speaker(speaker)
        if voice == NO_VOICE:
            return []
        chosen = self.voices.default_for(speaker) if voice is None else self.voices.get(voice)
        if chosen is None:
            return []
        key = (chosen.name, chosen.audio_path, speaker)
        if key not in self._voice_segments:
            segment = Segment(chosen.text, speaker, chosen.load())
            self.prompts.segment_rows(segment)  # encode once; the codes stay on the segment
            self._voice_segments[key] = segment
        return [self._voice_segments[key]]

    def utterance(
        self,
        text: str,
        speaker: int = 0,
        *,
        voice: str | None = None,
        context: Sequence[Segment] | None = None,
        history: Sequence[Segment] = (),
        options: GenerationOptions | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 8,
        sink=None,  # noqa: ANN001
        pause_s: float = PIECE_PAUSE_S,
    ) -> Utterance:
        """One request for text of any length, spoken piece by piece (see :class:`Utterance`).

        Each piece hears the voice (or ``context``), then ``history`` (earlier utterances, e.g. a
        :class:`History`'s segments), then the pieces before it.  ``options.max_audio_ms`` limits
        the whole request.  Safe to call while a background loop steps the engine.
        """
        options = options or GenerationOptions()
        check_text(text)
        check_speaker(speaker)
        with self.engine.lock:  # a new voice is encoded by the codec, which the engine also uses
            base = list(context) if context is not None else self.voice_context(speaker, voice)
        return Utterance(
            self,
            split_text(text),
            speaker,
            base,
            list(history),
            options,
            (first_chunk_frames, chunk_frames),
            sink,
            pause_s,
        )

    def jobs(self, text: str, speaker: int = 0, **request: Any) -> Iterator[Job]:
        """The jobs of :meth:`utterance` (same arguments), one piece at a time; each must have finished
        before the next is asked for (:meth:`Utterance.next_job` raises otherwise)."""
        utterance = self.utterance(text, speaker, **request)
        job = utterance.next_job()
        while job is not None:
            yield job
            job = utterance.next_job(job)

    def fit_context(
        self,
        text: str,
        speaker: int,
        base: Sequence[Segment],
        history: Sequence[Segment],
        options: GenerationOptions,
    ) -> tuple[Prompt, GenerationOptions]:
        """The prompt for ``text`` after ``base`` (voices) and ``history`` (earlier utterances), and the
        options, such that the prompt plus the frame budget fit the model.

        What does not fit is dropped with a warning, never an error: the oldest history first, then
        the oldest base segment; text alone too long for the budget gets a smaller budget.
        """
        history, base = list(history), list(base)
        while True:
            prompt = self.prompt(text, speaker, [*base, *history])
            room = self.engine.max_len - len(prompt)
            if room >= options.max_frames:
                return prompt, options
            if history or base:
                dropped = (history or base).pop(0)
                log.warning(
                    "context too long for the model: dropping the oldest segment (%r); lower max_audio_ms to keep more",
                    dropped.text[:40],
                )
                continue
            if room < 1:
                raise PromptTooLongError("this piece of text alone fills the model's context")
            log.warning(
                "max_audio_ms=%d does not fit after the prompt: using %d ms", options.max_audio_ms, room * FRAME_MS
            )
            options = options.replace(max_audio_ms=room * FRAME_MS)

    def stream(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] | None = None,
        options: GenerationOptions | None = None,
        *,
        voice: str | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 8,
    ) -> Iterator[AudioChunk]:
        """Yield audio chunks as frames are generated (the first after ``first_chunk_frames``).

        Long text is spoken piece by piece with short pauses.  Concatenated, the chunks carry the
        same codes as :meth:`generate` and the same audio up to float rounding (the decoder runs in
        smaller pieces).  Closing the iterator early cancels the generation.
        """
        utterance = self.utterance(
            text,
            speaker,
            voice=voice,
            context=context,
            options=options,
            first_chunk_frames=first_chunk_frames,
            chunk_frames=chunk_frames,
        )
        yield from utterance.chunks()

    def stream_job(self, job: Job) -> Iterator[AudioChunk]:
        """Step the engine for ``job`` in this thread, yielding its chunks as they come; closing the
        iterator early cancels the job."""
        self.engine.submit(job)
        try:
            while True:
                yield from job.pop_chunks()
                if job.done.is_set():
                    yield from job.pop_chunks()
                    break
                self.engine.step()
            if job.error is not None:
                raise job.error
        finally:
            if not job.done.is_set():
                job.cancel()
                self.engine.step()

    run = stream_job

    def generate(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] | None = None,
        options: GenerationOptions | None = None,
        *,
        voice: str | None = None,
    ) -> Audio:
        """Synthesize ``text`` completely and return the audio."""
        utterance = self.utterance(
            text, speaker, voice=voice, context=context, options=options, first_chunk_frames=8, chunk_frames=32
        )
        samples = [c.samples for c in utterance.chunks()]
        return _result(utterance.jobs, samples, self.sample_rate)

    def generate_many(self, jobs: Sequence[Job]) -> list[Audio]:
        """Run independent jobs batched (up to ``max_batch_size`` at once) and return their audio."""
        for job in jobs:
            self.engine.submit(job)
        while not all(j.done.is_set() for j in jobs):
            self.engine.step()
        out = []
        for job in jobs:
            if job.error is not None:
                raise job.error
            out.append(_result([job], [c.samples for c in job.pop_chunks()], self.sample_rate))
        return out

    # -- the engine, for schedulers, servers and benchmarks ---------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (checked first: errors raise here); it starts at a later :meth:`step`."""
        return self.engine.submit(job)

    def step(self) -> bool:
        """Start waiting jobs in free slots, then generate one frame for every running job; False when idle."""
        return self.engine.step()

    def admit(self) -> int:
        """Start waiting jobs in free slots (prefill their prompts) without generating a frame; how many started."""
        return self.engine.admit()

    def clear_prefix_cache(self) -> None:
        """Forget the cached context prefixes (the next prompt with a voice computes its prefix again)."""
        self.engine.clear_prefix_cache()

    def background_loop(self) -> EngineLoop:
        """A started thread that steps the engine while jobs are waiting or running (for servers)."""
        return EngineLoop(self.engine).start()

    @property
    def capacity(self) -> int:
        """How many jobs generate at once (``max_batch_size``)."""
        return self.engine.max_batch

    def stats(self) -> dict[str, int]:
        """What the engine is doing now: jobs ``active`` (in a slot), ``waiting``, and ``max_batch_size``."""
        return self.engine.stats()


def _result(jobs: list[Job], samples: list[np.ndarray], sample_rate: int) -> Audio:
    """One Audio from the pieces of an utterance (codes concatenated, stats summed)."""
    audio = np.concatenate(samples) if samples else np.zeros(0, dtype=np.float32)
    first, last = jobs[0].stats, jobs[-1].stats
    stats = JobStats(
        prompt_rows=first.prompt_rows,
        prefix_cached=first.prefix_cached,
        frames=sum(j.stats.frames for j in jobs),
        stop_reason=last.stop_reason,
        submitted_at=first.submitted_at,
        started_at=first.started_at,
        first_audio_at=first.first_audio_at,
        finished_at=last.finished_at,
    )
    codes = torch.cat([j.all_codes() for j in jobs])
    return Audio(audio.astype(np.float32, copy=False), sample_rate, codes, jobs[0].seed, stats, len(jobs))
