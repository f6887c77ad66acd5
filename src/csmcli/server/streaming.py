"""One request's generation and how its audio is answered: a whole file, an audio stream or SSE.

Chunks travel from the engine thread to the request's coroutine through one asyncio queue, and the
end of every job is an item in that queue too, so nothing the engine produced can be left behind
when the answer ends.  A stream that cannot finish (time limit, engine failure, a reader too slow to
keep up) is cut: the connection is aborted, so the client sees an incomplete body, never a clean end.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from .. import formats
from ..engine import AudioChunk, Job
from ..errors import CsmError
from ..options import FRAME_MS, real_time_factor
from ..prompt import Segment
from .context import context_segments
from .requests import ApiError, SpeechRequest

if TYPE_CHECKING:
    from .app import SpeechServer

log = logging.getLogger("csmcli.server")

#: Frames in the first and in later chunks: small for streams (fast first audio), large otherwise.
STREAM_CHUNKS = (1, 4)
WHOLE_CHUNKS = (8, 32)
#: How often a waiting request checks on its job and its deadline (seconds).
POLL_S = 0.25
#: The queue item that ends a job's chunks.
END = None


@dataclass
class Note:
    """What the middleware learns about the request being handled (id, its generation, error code)."""

    rid: str
    run: Run | None = None
    error: str | None = None


#: The note of the request the current task is handling.
CURRENT: contextvars.ContextVar[Note] = contextvars.ContextVar("csm_request")


class Run:
    """One request's generation: its jobs in order on the engine loop, chunks through an asyncio queue."""

    def __init__(self, server: SpeechServer, req: SpeechRequest) -> None:
        self.server = server
        self.req = req
        self.jobs: list[Job] = []
        self.started = time.perf_counter()
        self.deadline = self.started + server.config.request_timeout
        self.first_audio_at: float | None = None
        self.finished_at: float | None = None
        self.frames = 0
        self.samples = 0
        self.buffered = 0
        self.outcome = "running"
        self.rid = CURRENT.get().rid
        self.transport: Any = None  # set while streaming, so a reader that falls behind can be cut
        self.warnings: list[str] = []  # what the answer's Warning header says (context clips trimmed)

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio produced so far."""
        return self.samples / self.server.sample_rate

    @property
    def stop_reason(self) -> str:
        """Why the last job stopped (eos, budget, cancelled, error) or the request's outcome."""
        last = self.jobs[-1].stats.stop_reason if self.jobs else ""
        return self.outcome if self.outcome in ("timeout", "slow_client") else last or self.outcome

    def summary(self) -> str:
        """frames, audio length, time to first audio and real-time factor, for the log line."""
        end = self.finished_at or time.perf_counter()
        ttfa = f"{self.first_audio_at - self.started:.3f}s" if self.first_audio_at else "-"
        rtf = real_time_factor(end - self.started, self.audio_seconds)
        return (
            f"speaker={self.req.speaker} frames={self.frames} audio={self.audio_seconds:.2f}s "
            f"ttfa={ttfa} rtf={rtf} stop={self.stop_reason} seed={self.req.options.seed}"
        )

    def _remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def _timeout(self) -> ApiError:
        self.outcome = "timeout"
        limit = self.server.config.request_timeout
        return ApiError(504, f"the request took longer than the server's {limit:g} s limit", "timeout")

    async def _in_time(self, work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, max(self._remaining(), 0.001))
        except asyncio.TimeoutError:
            raise self._timeout() from None

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Float32 audio as it is generated; closing the iterator early cancels the generation."""
        aloop = asyncio.get_running_loop()
        queue: asyncio.Queue[AudioChunk | None] = asyncio.Queue()
        synth = self.server.synth
        first, later = (
            WHOLE_CHUNKS if self.req.mode == "whole" else stream_chunks(self.req.fmt, self.server.sample_rate)
        )
        # the voice or the request's clips are read and encoded in a worker thread, off the engine loop
        context = await self._in_time(asyncio.to_thread(self._context))
        jobs = synth.jobs(
            self.req.text,
            self.req.speaker,
            context=context,
            options=self.req.options,
            first_chunk_frames=first,
            chunk_frames=later,
            sink=lambda chunk: aloop.call_soon_threadsafe(self.arrive, queue, chunk),
        )
        job = None
        try:
            while (job := await self._in_time(asyncio.to_thread(self._advance, jobs))) is not None:
                self.jobs.append(job)
                self.server.submit(job)
                async for samples in self.drain(job, queue):
                    yield samples
            self.outcome = "done"
        finally:
            self.finished_at = time.perf_counter()
            if job is not None and not job.stats.stop_reason:
                job.cancel()
                if self.outcome == "running":
                    self.outcome = "cancelled"

    def _context(self) -> list[Segment]:
        """The request's own context clips (they replace the voice, as ``--context-audio`` does), else its voice."""
        if self.req.context is None:
            return self.server.synth.voice_context(self.req.speaker, self.req.voice)
        segments, self.warnings = context_segments(self.server.synth, self.req.context)
        return segments

    def _advance(self, jobs: Iterator[Job]) -> Job | None:
        """The next piece's job (its prompt is built while the engine is between frames)."""
        return next(jobs, None)

    def arrive(self, queue: asyncio.Queue[AudioChunk | None], chunk: AudioChunk) -> None:
        """A chunk from the engine (on the event loop): queue it, its job's end after a final one, and
        cut the request if its reader lets more than ``max_buffered_s`` of audio pile up."""
        queue.put_nowait(chunk)
        if chunk.final:
            queue.put_nowait(END)
        self.buffered += len(chunk.samples)
        limit = self.server.config.max_buffered_s * self.server.sample_rate
        if self.buffered > limit and self.outcome == "running":
            self.outcome = "slow_client"
            behind = self.buffered / self.server.sample_rate
            log.warning("%s: cut: the client fell %.0f s of audio behind", self.rid, behind)
            for job in self.jobs:
                job.cancel()
            if self.transport is not None:
                self.transport.abort()

    async def drain(self, job: Job, queue: asyncio.Queue[AudioChunk | None]) -> AsyncIterator[np.ndarray]:
        """``job``'s audio from ``queue`` until its end item; raises the job's error, or 504 past the deadline."""
        end_queued = False
        while True:
            remaining = self._remaining()
            if remaining <= 0:
                raise self._timeout()
            try:
                chunk = await asyncio.wait_for(queue.get(), min(POLL_S, remaining))
            except asyncio.TimeoutError:
                if job.done.is_set() and not end_queued:
                    # a job that ends without a final chunk (cancelled, failed): its end goes in the
                    # queue behind every chunk the engine handed over before it set ``done``
                    asyncio.get_running_loop().call_soon(queue.put_nowait, END)
                    end_queued = True
                continue
            if chunk is END:
                break
            self.buffered -= len(chunk.samples)
            if self.outcome == "slow_client":
                raise ConnectionResetError("the client fell behind")
            if self.first_audio_at is None and chunk.frames:
                self.first_audio_at = time.perf_counter()
            self.frames += chunk.frames
            self.samples += len(chunk.samples)
            yield chunk.samples
        if job.error is not None:
            self.outcome = "error"
            raise self.server.job_failure(job.error)


def stream_chunks(fmt: str, sample_rate: int) -> tuple[int, int]:
    """Frames in a stream's first and later chunks: the first holds what ``fmt``'s encoder needs before
    its first bytes leave (one frame, two for AAC), so they leave after the first chunk."""
    first, later = STREAM_CHUNKS
    frame = sample_rate * FRAME_MS // 1000
    return max(first, -(-formats.lookup(fmt).holds // frame)), later


# -- answers ------------------------------------------------------------------------------------


def audio_headers(run: Run, sample_rate: int, whole: bool) -> dict[str, str]:
    """Content type, file name, seed and rate; for a whole answer also frames, stop reason and audio length."""
    fmt = run.req.fmt
    sse = run.req.mode == "sse"
    headers = {
        "Content-Type": "text/event-stream" if sse else formats.mime(fmt, sample_rate),
        **({} if sse else {"Content-Disposition": f'attachment; filename="speech{formats.extension(fmt)}"'}),
        "X-Seed": str(run.req.options.seed),
        "X-Sample-Rate": str(sample_rate),
        "Cache-Control": "no-store",
    }
    if run.warnings:
        headers["Warning"] = ", ".join(f'299 csm "{warning}"' for warning in run.warnings)
    if whole:
        headers["X-Frames"] = str(run.frames)
        headers["X-Stop-Reason"] = run.stop_reason
        headers["X-Audio-Seconds"] = f"{run.audio_seconds:.3f}"
    return headers


async def answer_whole(run: Run, chunks: AsyncIterator[np.ndarray], sample_rate: int) -> web.Response:
    """Encode every chunk as it arrives (in a worker thread) into one file with exact headers, then answer it."""
    out = io.BytesIO()
    encoder = formats.Encoder(run.req.fmt, sample_rate, run.req.bitrate, out=out)
    async for samples in chunks:
        await asyncio.to_thread(encoder.feed, samples)
    await asyncio.to_thread(encoder.finish)
    return web.Response(body=out.getvalue(), headers=audio_headers(run, sample_rate, whole=True))


async def answer_stream(
    request: web.Request, run: Run, chunks: AsyncIterator[np.ndarray], sample_rate: int
) -> web.StreamResponse:
    """Send audio (or SSE events) as it is generated.  Chunked over HTTP/1.1; over HTTP/1.0 the body
    ends when the connection closes.  A failure after the headers cuts the connection (audio) or
    sends an ``error`` event (SSE), so no client takes a partial answer for a whole one."""
    sse = run.req.mode == "sse"

    def frame(data: bytes) -> bytes:
        return _sse({"type": "speech.audio.delta", "audio": _b64(data)}) if sse else data

    encoder = formats.Encoder(run.req.fmt, sample_rate, run.req.bitrate)
    response: web.StreamResponse | None = None
    run.transport = request.transport
    try:
        async for samples in chunks:
            if response is None:
                response = await _open(request, run, sample_rate)
            if data := await asyncio.to_thread(encoder.feed, samples):
                await response.write(frame(data))
        if response is None:
            response = await _open(request, run, sample_rate)
        if data := await asyncio.to_thread(encoder.finish):
            await response.write(frame(data))
        if sse:
            await response.write(_sse({"type": "speech.audio.done"}))
    except ConnectionError:
        if run.outcome == "running":
            run.outcome = "cancelled"
        return response if response is not None else web.Response(status=499)
    except Exception as exc:  # after the headers went out, the stream can only end early
        if response is None:
            raise
        detail, trace = f"{type(exc).__name__}: {exc}", not isinstance(exc, (ApiError, CsmError))
        if not sse:
            log.warning("%s: stream cut before its end: %s", run.rid, detail, exc_info=trace)
            cut(request, response)
            return response
        log.warning("%s: stream ended early: %s", run.rid, detail, exc_info=trace)
        code = getattr(exc, "code", "generation_failed")
        await response.write(_sse({"type": "error", "error": {"message": str(exc), "code": code}}))
    finally:
        run.transport = None
    await response.write_eof()
    return response


def cut(request: web.Request, response: web.StreamResponse) -> None:
    """End a response that has begun without its terminator: the client sees an incomplete body."""
    response.force_close()
    if request.transport is not None:
        request.transport.abort()


async def _open(request: web.Request, run: Run, sample_rate: int) -> web.StreamResponse:
    headers = {**audio_headers(run, sample_rate, whole=False), "X-Request-Id": run.rid}
    response = web.StreamResponse(headers=headers)  # no length: chunked on HTTP/1.1, close-delimited on 1.0
    await response.prepare(request)
    return response


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"
