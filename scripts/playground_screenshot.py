"""Screenshot the playground (``csm serve``'s page at ``/``) for the README: docs/playground.png.

Usage: ``python scripts/playground_screenshot.py [--model DIR] [--out docs/playground.png] [--width 1000]``.

Without ``--model`` it serves a tiny random checkpoint (made here by tests/tiny_checkpoint.py), so the
page shows its controls, voices and the figures of one short utterance; the audio is noise.  Needs
Chromium (Debian: ``apt-get install chromium``) and Playwright's Python package (no browser download).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync"]


def start_server(model: str, home: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """``csm serve`` on a free port; returns the process and its URL once it listens."""
    env = {**os.environ, "CSM_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "wb")  # noqa: SIM115 (the child writes it until it is stopped)
    args = ["csm", "serve", "--model", model, "--device", "cpu", "--port", "0", "-q", "--max-audio-ms", "2400"]
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://\S+)", log_path.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"csm serve did not start:\n{log_path.read_text(errors='replace')}")


def shoot(url: str, out: Path, width: int) -> None:
    """Open the page, speak one sentence, and save a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium is not installed (Debian: apt-get install chromium)")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(url)
        page.wait_for_function("() => window.csmPlayground && window.csmPlayground.ready", timeout=60_000)
        page.click("#sampling summary")
        page.click("#speak")
        page.wait_for_function("() => ['done', 'error'].includes(window.csmPlayground.phase)", timeout=300_000)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint to serve (default: a tiny random one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    parser.add_argument("--width", type=int, default=1000, help="viewport width in CSS pixels")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="csm-shot-") as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_checkpoint import make_tiny_checkpoint

            model = str(make_tiny_checkpoint(Path(tmp) / "csm-tiny", seed=0))
        proc, url = start_server(model, Path(tmp) / "home", Path(tmp) / "serve.log")
        try:
            shoot(url, args.out, args.width)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
