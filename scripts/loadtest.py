"""Load-test a running ``csm serve``: N concurrent streaming clients for T seconds, on loopback only.

Usage: ``python scripts/loadtest.py [--url http://127.0.0.1:8000] [-n 4] [-t 30] [--max-audio-ms 4000]``.

Each client posts streaming ``/generate`` requests (or OpenAI ``/v1/audio/speech`` ones) back to back
until the time is up, then waits for its last request (up to ``--grace`` seconds).  A busy server's
503 is counted as rejected and its ``Retry-After`` honoured (doubling on each refusal in a row); a
stream whose body ends before its end (the server cuts it) counts as ``truncated``, a failure.
Reported per request: time to first audio (request sent -> first PCM byte), real-time factor (wall
time / audio length, below 1 is faster than real time) and errors by kind; overall: audio seconds
produced per wall-clock second.  The server must be on this machine: the script refuses other hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import numpy as np

SAMPLE_RATE = 24_000
WAV_HEADER_BYTES = 44
#: Longest wait between retries of a refused request (seconds).
MAX_BACKOFF_S = 30.0
TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Streaming speech should start quickly and keep ahead of playback.",
    "How many requests can one model serve at the same time?",
    "Every sentence here is short, so each request measures a single piece.",
)


@dataclass
class Result:
    """One request: when its audio began, how much came, how long it took, or what went wrong."""

    ttfa: float | None = None
    audio_seconds: float = 0.0
    wall: float = 0.0
    error: str | None = None
    retry_after: float | None = None  # set on a 503 that said when to retry

    @property
    def rtf(self) -> float | None:
        """Wall time over audio length."""
        return self.wall / self.audio_seconds if self.audio_seconds else None


def check_loopback(url: str) -> None:
    """Exit with a message unless every address ``url``'s host resolves to is a loopback address."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        sys.exit(f"loadtest: cannot resolve {host!r}: {exc}")
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        sys.exit(f"loadtest: {host} is not a loopback address; this script only tests a local server")


def request_for(args: argparse.Namespace, n: int) -> tuple[str, dict]:
    """The endpoint and JSON body of the ``n``-th request."""
    text = TEXTS[n % len(TEXTS)]
    if args.endpoint == "openai":
        body = {"model": "csm-1b", "input": text, "voice": "alloy", "response_format": "pcm"}
        path = "/v1/audio/speech"
    else:
        body = {"text": text, "speaker": n % 2, "streaming": True, "format": "pcm"}
        path = "/generate"
    if args.max_audio_ms:
        body["max_audio_ms"] = args.max_audio_ms
    return args.url.rstrip("/") + path, body


async def one_request(session: aiohttp.ClientSession, url: str, body: dict) -> Result:
    """Send one streaming request and time its audio."""
    result = Result()
    started = time.perf_counter()
    received = 0
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                text = await response.text()
                try:
                    code = json.loads(text)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = text[:40]
                result.error = f"HTTP {response.status} {code}"
                if response.status == 503 and "Retry-After" in response.headers:
                    result.retry_after = retry_after(response.headers["Retry-After"])
                return result
            skip = WAV_HEADER_BYTES if response.content_type == "audio/wav" else 0
            async for data in response.content.iter_any():
                received += len(data)
                if result.ttfa is None and received > skip:
                    result.ttfa = time.perf_counter() - started
            received -= skip
    except aiohttp.ClientPayloadError:  # the body stopped before its end: a cut stream, not a short one
        result.error = "truncated"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.error = type(exc).__name__
    result.wall = time.perf_counter() - started
    result.audio_seconds = received / 2 / SAMPLE_RATE
    return result


async def client(
    session: aiohttp.ClientSession, args: argparse.Namespace, index: int, stop_at: float, results: list[Result]
) -> None:
    """Send requests back to back until ``stop_at``."""
    n = index
    refusals = 0
    while time.perf_counter() < stop_at:
        url, body = request_for(args, n)
        result = await one_request(session, url, body)
        results.append(result)
        if result.retry_after is not None:
            refusals += 1
            await asyncio.sleep(backoff(result.retry_after, refusals))
            continue  # the same request again
        refusals = 0
        n += args.clients


def retry_after(value: str) -> float:
    """Seconds from a ``Retry-After`` header (a number of seconds; anything else means 1)."""
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0


def backoff(retry_after_s: float, refusals: int) -> float:
    """The wait before retrying: ``Retry-After`` doubled for each refusal in a row, capped, with jitter
    so refused clients do not all come back at once."""
    return min(MAX_BACKOFF_S, max(retry_after_s, 0.05) * 2 ** (refusals - 1)) * random.uniform(1.0, 1.5)


async def run(args: argparse.Namespace) -> tuple[list[Result], float, int]:
    """All clients; returns the results, the wall time and how many requests were cut off."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: list[Result] = []
    connector = aiohttp.TCPConnector(limit=args.clients)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.duration + args.grace)
    started = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout) as session:
        tasks = [
            asyncio.create_task(client(session, args, i, started + args.duration, results)) for i in range(args.clients)
        ]
        _, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return results, time.perf_counter() - started, len(pending)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linearly interpolated; None without values."""
    return round(float(np.percentile(values, q)), 3) if values else None


def report(args: argparse.Namespace, results: list[Result], wall: float, cut_off: int) -> dict:
    """Summary figures of a run."""
    ok = [r for r in results if r.error is None and r.audio_seconds > 0]
    ttfa = [r.ttfa for r in ok if r.ttfa is not None]
    rtf = [r.rtf for r in ok if r.rtf is not None]
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None and r.retry_after is None:
            errors[r.error] = errors.get(r.error, 0) + 1
    audio = sum(r.audio_seconds for r in ok)
    return {
        "clients": args.clients,
        "duration_s": args.duration,
        "requests": len(results),
        "ok": len(ok),
        "rejected": sum(r.retry_after is not None for r in results),
        "errors": errors,
        "cut_off": cut_off,
        "audio_s": round(audio, 2),
        "wall_s": round(wall, 2),
        "audio_s_per_s": round(audio / wall, 3) if wall else 0.0,
        "ttfa_p50_s": percentile(ttfa, 50),
        "ttfa_p95_s": percentile(ttfa, 95),
        "rtf_p50": percentile(rtf, 50),
        "rtf_p95": percentile(rtf, 95),
    }


def print_table(args: argparse.Namespace, figures: dict) -> None:
    """The figures as a two-column table."""
    rows = [
        ("target", f"{args.url} ({args.endpoint}, streaming pcm)"),
        ("clients x duration", f"{figures['clients']} x {figures['duration_s']:g} s"),
        ("requests ok / total", f"{figures['ok']} / {figures['requests']}"),
        ("rejected (503, retried)", str(figures["rejected"])),
        ("errors", ", ".join(f"{k}: {v}" for k, v in figures["errors"].items()) or "none"),
        ("cut off at the end", str(figures["cut_off"])),
        ("time to first audio p50", as_ms(figures["ttfa_p50_s"])),
        ("time to first audio p95", as_ms(figures["ttfa_p95_s"])),
        ("real-time factor p50", _plain(figures["rtf_p50"])),
        ("real-time factor p95", _plain(figures["rtf_p95"])),
        (
            "audio produced",
            f"{figures['audio_s']:.1f} s in {figures['wall_s']:.1f} s "
            f"({figures['audio_s_per_s']:.2f} s of audio per second)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def as_ms(x: float | None) -> str:
    """Seconds shown as whole milliseconds ("-" for none)."""
    return "-" if x is None else f"{x * 1000:.0f} ms"


def _plain(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the clients, print the table (or JSON); exit 1 if any request failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    parser.add_argument("-n", "--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("-t", "--duration", type=float, default=30.0, help="seconds to keep sending")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds to wait for the last requests")
    parser.add_argument(
        "--max-audio-ms", type=int, default=4000, help="audio budget per request (0: the server's default)"
    )
    parser.add_argument("--endpoint", choices=("generate", "openai"), default="generate")
    parser.add_argument("--api-key", default=os.environ.get("CSM_API_KEY"), help="bearer key [env CSM_API_KEY]")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0:
        parser.error("--clients must be at least 1 and --duration more than 0")
    check_loopback(args.url)
    results, wall, cut_off = asyncio.run(run(args))
    figures = report(args, results, wall, cut_off)
    if args.json:
        print(json.dumps(figures))
    else:
        print_table(args, figures)
    return 1 if figures["errors"] or not figures["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
