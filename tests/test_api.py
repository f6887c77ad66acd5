"""The Python API on the tiny checkpoint: streaming, voices, prefix cache, long text, budgets, batching."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf
import torch

from csmcli import GenerationOptions, Segment
from csmcli.errors import InputError, PromptTooLongError
from csmcli.voices import PRESET_TRANSCRIPTS

GREEDY = GenerationOptions(temperature=0, max_audio_ms=480)


def test_stream_equals_generate_and_first_chunk_is_small(synth) -> None:
    opts = GenerationOptions(seed=11, max_audio_ms=800)
    chunks = list(synth.stream("Streaming test.", 0, options=opts, first_chunk_frames=1, chunk_frames=3))
    assert chunks[0].frames == 1 and len(chunks[0].samples) == 1920
    assert [c.frames for c in chunks[1:-1]] == [3, 3, 3]
    assert chunks[-1].final
    whole = synth.generate("Streaming test.", 0, options=opts)
    np.testing.assert_allclose(np.concatenate([c.samples for c in chunks]), whole.samples, atol=1e-5)


def test_closing_a_stream_cancels_the_job(synth) -> None:
    stream = synth.stream("Cancel me.", 0, options=GenerationOptions(max_audio_ms=8000))
    next(stream)
    stream.close()
    assert not synth.engine.busy


def test_default_voice_is_the_speakers_preset(synth, tiny_dir) -> None:
    for speaker, name in ((0, "conversational_a"), (1, "conversational_b")):
        segs = synth.voice_context(speaker)
        assert [s.text for s in segs] == [PRESET_TRANSCRIPTS[name]]
        audio = sf.read(str(tiny_dir / "prompts" / f"{name}.wav"), dtype="float32")[0]
        assert torch.equal(segs[0].codes, synth.codec.encode(audio))
        prompt = synth.prompt("Hi.", speaker, segs)
        assert prompt.prefix_len == len(synth.prompt(segs[0].text, speaker)) + len(segs[0].codes) + 1
    assert synth.voice_context(0, "none") == []
    with pytest.raises(InputError, match="unknown voice"):
        synth.voice_context(0, "nope")


def test_voice_changes_the_prompt_as_csm_facts_say(synth) -> None:
    seg = synth.voice_context(0)[0]
    with_voice = synth.prompt("Hello.", 0, [seg])
    bare = synth.prompt("Hello.", 0, [])
    text_rows = synth.prompt(seg.text, 0, [])
    n_text, n_audio = len(text_rows), len(seg.codes)
    assert torch.equal(with_voice.tokens[:n_text], text_rows.tokens)
    audio_rows = with_voice.tokens[n_text : n_text + n_audio]
    assert torch.equal(audio_rows[:, :32], seg.codes) and with_voice.mask[n_text : n_text + n_audio, :32].all()
    assert not with_voice.mask[n_text : n_text + n_audio + 1, 32].any()
    end = with_voice.tokens[n_text + n_audio]
    assert not end.any() and with_voice.mask[n_text + n_audio, :32].all()
    assert torch.equal(with_voice.tokens[n_text + n_audio + 1 :], bare.tokens)


def test_prefix_cache_gives_exactly_the_uncached_codes(synth) -> None:
    opts = GenerationOptions(seed=5, max_audio_ms=640)
    synth.engine.prefix_store.clear()
    first = synth.generate("Same voice, same seed.", 1, options=opts)
    assert not first.stats.prefix_cached and len(synth.engine.prefix_store) == 1
    second = synth.generate("Same voice, same seed.", 1, options=opts)
    assert second.stats.prefix_cached
    assert torch.equal(first.codes, second.codes)
    assert np.array_equal(first.samples, second.samples)


@contextlib.contextmanager
def eos_every(synth, frames: int) -> Iterator[None]:
    """The model ends each utterance after ``frames`` frames (a random model never stops by itself):
    every ``frames + 1``-th frame comes out all zeros, the end-of-speech frame."""
    engine, original = synth.engine, synth.engine.sample_fn
    count = [0]

    def sample(logits, params, codebook, *rest):
        codes = original(logits, params, codebook, *rest)
        count[0] += codebook == 0
        return torch.zeros_like(codes) if count[0] % (frames + 1) == 0 else codes

    engine.sample_fn = sample
    try:
        yield
    finally:
        engine.sample_fn = original


LONG_TEXT = "This sentence is one of many that together are far too long for a single piece. " * 8


def test_long_text_is_split_and_pieces_carry_the_voice(synth) -> None:
    opts = GenerationOptions(seed=2, max_audio_ms=2400)
    with eos_every(synth, 3):
        utterance = synth.utterance(LONG_TEXT, 0, options=opts)
        job = utterance.next_job()
        while job is not None:
            list(synth.stream_job(job))
            job = utterance.next_job(job)
        jobs = utterance.jobs
        assert len(jobs) >= 3 and all(j.stats.frames == 3 for j in jobs)
        first, second = jobs[0].prompt, jobs[1].prompt
        # piece 2's context: the voice preset, then piece 1's text rows followed by its generated codes
        own_rows = first.tokens[first.prefix_len :]
        assert torch.equal(second.tokens[first.prefix_len : len(first)], own_rows)
        assert torch.equal(second.tokens[len(first) : len(first) + jobs[0].stats.frames, :32], jobs[0].all_codes())
        audio = synth.generate(LONG_TEXT, 0, options=opts)
    pause = round(0.25 * 24000)
    assert audio.pieces == len(jobs)
    assert torch.equal(audio.codes, utterance.codes())
    assert len(audio.samples) == sum(j.stats.frames for j in jobs) * 1920 + pause * (len(jobs) - 1)


def test_max_audio_ms_limits_the_whole_request(synth) -> None:
    opts = GenerationOptions(seed=2, max_audio_ms=5 * 80)
    with eos_every(synth, 3):
        audio = synth.generate(LONG_TEXT, 0, options=opts)
        chunks = list(synth.stream(LONG_TEXT, 0, options=opts))
    assert audio.pieces == 2 and audio.stats.frames == 5 and audio.stats.stop_reason == "budget"
    assert sum(c.frames for c in chunks) == 5
    assert synth.generate(LONG_TEXT, 0, options=opts).stats.frames == 5  # one piece takes it all


def test_the_next_piece_needs_the_last_one_finished(synth) -> None:
    utterance = synth.utterance(LONG_TEXT, 0, options=GenerationOptions(seed=1, max_audio_ms=800))
    job = utterance.next_job()
    with pytest.raises(ValueError, match="returned last"):
        utterance.next_job()
    with pytest.raises(RuntimeError, match="has not finished"):
        utterance.next_job(job)
    job.cancel()
    list(synth.stream_job(job))
    assert utterance.next_job(job) is None and utterance.stop_reason == "cancelled"


def test_context_that_does_not_fit_is_dropped_with_a_warning(synth, caplog) -> None:
    codes = torch.randint(0, 2048, (700, 32))
    context = [Segment("old", 0, codes=codes), Segment("newer", 0, codes=codes[:100])]
    opts = GenerationOptions(seed=1, max_audio_ms=100_000)
    with caplog.at_level(logging.WARNING, logger="csmcli"):
        job = next(synth.jobs("Fits after dropping.", 0, context=context, options=opts))
    assert "dropping the oldest" in caplog.text
    assert len(job.prompt) + job.options.max_frames <= 2048
    assert len(job.prompt) < 700


def test_single_job_that_cannot_fit_is_a_clear_error(synth) -> None:
    codes = torch.randint(0, 2048, (1500, 32))
    with pytest.raises(PromptTooLongError, match="more than the model's 2048"):
        synth.job("Too much.", 0, [Segment("ctx", 0, codes=codes)], GenerationOptions(max_audio_ms=60_000))


def test_batched_jobs_match_solo_results(synth) -> None:
    opts = [GenerationOptions(seed=s, max_audio_ms=400 + 80 * s) for s in range(4)]
    texts = ["One.", "Two words.", "Three words here.", "Four words are here."]
    solo = [synth.generate(t, i % 2, [], o) for i, (t, o) in enumerate(zip(texts, opts, strict=True))]
    jobs = [synth.job(t, i % 2, [], o) for i, (t, o) in enumerate(zip(texts, opts, strict=True))]
    batched = synth.generate_many(jobs)
    for a, b in zip(solo, batched, strict=True):
        assert torch.equal(a.codes, b.codes)
        np.testing.assert_allclose(a.samples, b.samples, atol=1e-5)


def test_sampling_settings_change_the_output(synth) -> None:
    base = GenerationOptions(seed=3, max_audio_ms=400)
    ref = synth.generate("Options.", 0, [], base).codes
    for change in ({"temperature": 0.5}, {"top_k": 5}, {"top_p": 0.5}, {"repetition_penalty": 1.5}):
        assert not torch.equal(ref, synth.generate("Options.", 0, [], base.replace(**change)).codes), change


def test_static_shape_frames_match_the_dynamic_path(synth, tiny_dir) -> None:
    """What a CUDA graph replays (bucketed batch width, full-length attention) gives the same codes.

    The graph itself needs a GPU; here ``capture_graphs(eager=True)`` records stand-ins that run
    each bucket's frame eagerly on the CPU.
    """
    from csmcli import Synthesizer

    opts = [GenerationOptions(seed=s, max_audio_ms=320 + 80 * s) for s in range(3)]
    texts = ["a b", "c d e", "f"]
    expected = [synth.generate(t, 0, [], o).codes for t, o in zip(texts, opts, strict=True)]
    graphed = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", max_batch_size=4)
    graphed.engine.capture_graphs(eager=True)
    assert graphed.engine.graph_buckets == [1, 2, 4]
    got = graphed.generate_many([graphed.job(t, 0, [], o) for t, o in zip(texts, opts, strict=True)])
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b.codes)


def test_engine_operations_through_the_synthesizer(synth) -> None:
    from csmcli.bench import BenchSetup, measure_engine

    idle = {"active": 0, "waiting": 0, "max_batch_size": synth.capacity}
    assert synth.stats() == idle
    job = synth.submit(synth.job("Queued.", 0, [], GenerationOptions(seed=1, max_audio_ms=160)))
    assert synth.stats()["waiting"] == 1
    assert synth.admit() == 1 and synth.stats() == {**idle, "active": 1}
    while synth.step():
        pass
    assert job.stats.frames == 2 and job.stats.stop_reason == "budget"
    figures = measure_engine(synth, BenchSetup(prompt_rows=16, frames=2, warmup=1, voice_rows=16))
    assert figures["prefill_ms"] > 0 and figures["batches"]["1"]["ms_per_frame"] > 0
    assert synth.stats() == idle


def test_generate_and_stream_take_the_same_request_arguments() -> None:
    """The two entry points of a request stay in step (stream adds only its chunk sizes)."""
    import inspect

    from csmcli import Synthesizer

    stream = dict(inspect.signature(Synthesizer.stream).parameters)
    for extra in ("first_chunk_frames", "chunk_frames"):
        stream.pop(extra)
    assert stream == dict(inspect.signature(Synthesizer.generate).parameters)
