"""Soak-test ``csm serve``: start one server on loopback, hit it with a mix of well- and badly-behaved
clients for a bounded time, and print what happened.

Usage: ``python scripts/soak.py --model /tmp/csm-tiny [-n 64] [-t 600] [-- extra csm serve flags]``.

Client ``i`` plays role ``i % 7``: a streaming ``/generate`` reader, an SSE reader (which must end with
``speech.audio.done``), a whole-file reader (whose samples must match its ``X-Frames``), a client that
hangs up mid-stream, one that sends malformed bodies, one that sends its headers too slowly, and one
that reads its stream slowly.  Refusals (503) are retried after ``Retry-After`` with backoff.

Reported: requests sent, succeeded, rejected (503), failed (any 5xx other than 503, an unexpected
status, a broken connection), truncated (a cut the client could see), truncated answers that looked
complete (the count that must be 0), p50/p99 time to first audio, and the server's RSS at the start
and the end.  The server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from loadtest import as_ms, backoff, percentile, retry_after

TEXT = "The quick brown fox jumps over the lazy dog."
MALFORMED = (
    b'{"text": ',
    b'{"text": "hi", "speaker": "\\u00b2"}',
    b'{"text": "hi \\ud800"}',
    b'{"text": "hi", "top_k": 1e20}',
    b"[1, 2, 3]",
    b"\xff\xfe\x00garbage",
    b'{"text": "hi", "max_audio_ms": "lots"}',
)
ROLES = ("stream", "sse", "whole", "hangup", "malformed", "slow_headers", "slow_reader")


@dataclass
class Tally:
    """What every client saw, summed."""

    counts: Counter = field(default_factory=Counter)
    first_audio: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)  # the server's, once a minute


class Server:
    """A ``csm serve`` child on 127.0.0.1 with a free port; its log goes to a file."""

    def __init__(self, model: str, extra: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        args = ["csm", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0", *extra]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = ""

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log_path.read_text(errors="replace"))
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None:
                sys.exit(f"soak: csm serve exited with {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.2)
        sys.exit(f"soak: csm serve did not start in {timeout:g} s; see {self.log_path}")

    def rss_mb(self) -> float:
        """Resident memory of the server process (MiB), from /proc."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def stop(self) -> int:
        self.proc.terminate()
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


async def one(session: aiohttp.ClientSession, url: str, role: str, budget_ms: int, tally: Tally) -> float | None:
    """One request of ``role``; returns the Retry-After of a refusal, else None."""
    c = tally.counts
    started = time.perf_counter()
    c["sent"] += 1
    if role == "malformed":
        body = random.choice(MALFORMED)
        async with session.post(url + "/generate", data=body, headers={"Content-Type": "application/json"}) as r:
            await r.read()
            ok = 400 <= r.status < 500 and r.content_type == "application/json"
            c["succeeded" if ok else "server_errors" if r.status >= 500 else "failed"] += 1
        await asyncio.sleep(0.1)  # malformed bodies are cheap: do not let them crowd out the rest
        return None
    speech = role == "sse"
    path = "/v1/audio/speech" if speech else "/generate"
    fields = {"input": TEXT, "stream_format": "sse", "response_format": "pcm"} if speech else {"text": TEXT}
    if role != "whole" and not speech:
        fields.update(streaming=True, format="pcm")
    fields["max_audio_ms"] = budget_ms
    async with session.post(url + path, json=fields) as r:
        if r.status == 503:
            await r.read()
            c["rejected"] += 1
            return retry_after(r.headers.get("Retry-After", "1"))
        if r.status != 200:
            await r.read()
            c["server_errors" if r.status >= 500 else "failed"] += 1
            return None
        received, tail = 0, b""
        try:
            if role == "whole":
                data = await r.read()
                tally.first_audio.append(time.perf_counter() - started)
                samples = (len(data) - 44) // 2
                if samples != int(r.headers["X-Frames"]) * 1920:
                    c["truncated_as_complete"] += 1
                    return None
                c["succeeded"] += 1
                return None
            async for chunk in r.content.iter_any():
                if not received:
                    tally.first_audio.append(time.perf_counter() - started)
                received += len(chunk)
                if role == "hangup" and received > 4000:
                    r.close()
                    c["hung_up"] += 1
                    return None
                if role == "slow_reader":
                    await asyncio.sleep(0.5)
                tail = (tail + chunk)[-200:]
            if speech and b'"speech.audio.done"' not in tail:  # SSE must end with its done event
                c["truncated" if b'"error"' in tail else "truncated_as_complete"] += 1
                return None
            c["succeeded"] += 1
        except aiohttp.ClientPayloadError:
            c["truncated"] += 1
    return None


async def slow_headers(host: str, port: int, tally: Tally) -> None:
    """Send a request's headers a few bytes a second; the server must close the connection."""
    tally.counts["sent"] += 1
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for piece in (b"POST /generate HTTP/1.1\r\nHost: x\r\n", *(f"X-Slow-{i}: 1\r\n".encode() for i in range(120))):
            writer.write(piece)
            await writer.drain()
            if await _closed(reader, 1.0):
                tally.counts["slow_cut_by_server"] += 1
                return
        tally.counts["failed"] += 1  # 120 s of headers and still open
    except ConnectionError:
        tally.counts["slow_cut_by_server"] += 1
    finally:
        writer.close()


async def _closed(reader: asyncio.StreamReader, wait: float) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(65536), wait)
    except asyncio.TimeoutError:
        return False
    return data == b"" or data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.1 503")


async def client(index: int, url: str, args: argparse.Namespace, stop_at: float, tally: Tally) -> None:
    role = ROLES[index % len(ROLES)]
    host, port = url.removeprefix("http://").split(":")
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        refusals = 0
        while time.perf_counter() < stop_at:
            wait = None
            try:
                if role == "slow_headers":
                    await slow_headers(host, int(port), tally)
                else:
                    wait = await one(session, url, role, args.max_audio_ms, tally)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                tally.counts["failed"] += 1
                tally.counts[f"failed:{type(exc).__name__}"] += 1
            refusals = refusals + 1 if wait is not None else 0
            if wait is not None:
                await asyncio.sleep(backoff(wait, refusals))


def print_table(args: argparse.Namespace, tally: Tally, rss: tuple[float, float], wall: float, code: int) -> None:
    c = tally.counts
    p50, p99 = percentile(tally.first_audio, 50), percentile(tally.first_audio, 99)
    rows = [
        ("clients x duration", f"{args.clients} x {args.duration:g} s (wall {wall:.0f} s)"),
        ("requests sent", c["sent"]),
        ("succeeded", c["succeeded"]),
        ("rejected (503, retried after Retry-After)", c["rejected"]),
        ("failed (client side)", c["failed"]),
        ("server errors (5xx other than 503)", c["server_errors"]),
        ("truncated (cut, visible to the client)", c["truncated"]),
        ("truncated but looking complete", c["truncated_as_complete"]),
        ("hung up mid-stream (on purpose)", c["hung_up"]),
        ("slow headers closed by the server", c["slow_cut_by_server"]),
        ("first audio p50 / p99", f"{as_ms(p50)} / {as_ms(p99)}"),
        ("server RSS start / end", f"{rss[0]:.0f} MiB / {rss[1]:.0f} MiB"),
        ("server RSS each minute (MiB)", " ".join(f"{x:.0f}" for x in tally.rss_mb)),
        ("server exit code after SIGTERM", code),
    ]
    rows += [(k, v) for k, v in sorted(c.items()) if k.startswith("failed:")]
    width = max(len(name) for name, _ in rows)
    print(f"| {'metric':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


async def watch_memory(server: Server, tally: Tally) -> None:
    """Sample the server's RSS once a minute (flat after warm-up, or growing?)."""
    while True:
        tally.rss_mb.append(server.rss_mb())
        await asyncio.sleep(60)


async def soak(args: argparse.Namespace, server: Server, tally: Tally) -> None:
    url = server.url
    stop_at = time.perf_counter() + args.duration
    watcher = asyncio.create_task(watch_memory(server, tally))
    tasks = [asyncio.create_task(client(i, url, args, stop_at, tally)) for i in range(args.clients)]
    done, pending = await asyncio.wait(tasks, timeout=args.duration + args.request_timeout + 30)
    for task in (*pending, watcher):
        task.cancel()
    for task in done:
        if task.exception() is not None:
            tally.counts["failed"] += 1
            tally.counts[f"failed:client crashed: {type(task.exception()).__name__}"] += 1


def main(argv: list[str] | None = None) -> int:
    """Start the server, run the clients, print the table; exit 1 on any server error or hidden truncation."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint for csm serve (e.g. a tiny one)")
    parser.add_argument("-n", "--clients", type=int, default=64)
    parser.add_argument("-t", "--duration", type=float, default=600.0, help="seconds to keep sending")
    parser.add_argument("--max-audio-ms", type=int, default=800, help="audio budget per request")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="client-side limit per request")
    parser.add_argument("--log", type=Path, default=Path("soak-server.log"), help="where the server log goes")
    parser.add_argument("serve_args", nargs="*", help="extra csm serve flags (after --)")
    args = parser.parse_args(argv)
    server = Server(args.model, ["--device", "cpu", "-q", *args.serve_args], args.log)
    try:
        server.wait_ready()
        rss_start = server.rss_mb()
        tally = Tally()
        started = time.perf_counter()
        asyncio.run(soak(args, server, tally))
        wall = time.perf_counter() - started
        rss_end = server.rss_mb()
    finally:
        code = server.stop()
    print_table(args, tally, (rss_start, rss_end), wall, code)
    bad = tally.counts["server_errors"] + tally.counts["truncated_as_complete"]
    return 1 if bad or code != 0 else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
