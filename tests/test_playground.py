"""The playground page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

The page reports what it did on ``window.csmPlayground`` (when the first audio buffer was scheduled,
when the response ended, how many samples arrived), so the tests check streaming, stopping and
recording from inside the browser.  Skipped only when Chromium or Playwright is absent.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from csmcli.options import GenerationOptions

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

from test_voices_http import LiveServer, live_server  # noqa: E402 (after the skips)

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
API_KEY = "playground-key"
SAMPLES_PER_FRAME = 1920
READY = "() => window.csmPlayground && window.csmPlayground.ready"


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tiny_dir, tmp_path_factory.mktemp("home"), defaults=GenerationOptions(max_audio_ms=800)) as live:
        yield live


@pytest.fixture(scope="module")
def guarded(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tiny_dir, tmp_path_factory.mktemp("guarded-home"), api_key=API_KEY) as live:
        yield live


@pytest.fixture(scope="module")
def playwright() -> Iterator[object]:
    driver = sync_api.sync_playwright().start()
    yield driver
    driver.stop()


@pytest.fixture(scope="module")
def browser(playwright: object) -> Iterator[object]:
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def mic_browser(playwright: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Chromium whose microphone is a fake device playing a wav file (a 300 Hz tone, looped)."""
    wav = tmp_path_factory.mktemp("mic") / "speech.wav"
    t = np.arange(3 * 48000) / 48000
    sf.write(wav, (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 48000, subtype="PCM_16")
    fake = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
    ]
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[*FLAGS, *fake])
    yield chromium
    chromium.close()


class Page:
    """A browser page on the playground that remembers console errors and uncaught exceptions."""

    def __init__(self, browser: object, url: str) -> None:
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1000, "height": 1100})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto(url)

    def state(self) -> dict:
        return self.page.evaluate("JSON.parse(JSON.stringify(window.csmPlayground))")

    def wait_phase(self, *phases: str, timeout: float = 90) -> dict:
        self.page.wait_for_function(
            f"() => {json.dumps(list(phases))}.includes(window.csmPlayground.phase)", timeout=timeout * 1000
        )
        return self.state()


@pytest.fixture()
def page(browser: object, server: LiveServer) -> Iterator[Page]:
    opened = Page(browser, server.base)
    opened.page.wait_for_function(READY, timeout=30_000)
    opened.page.click("#sampling summary")  # show the sampling controls
    yield opened
    opened.context.close()


def stats(live: LiveServer) -> dict:
    return requests.get(live.url("/v1/stats"), timeout=10).json()


def test_the_page_loads_without_errors_with_the_server_defaults_and_labelled_controls(page: Page) -> None:
    p = page.page
    assert p.input_value("#max_audio_ms") == "800" and p.input_value("#temperature") == "0.9"
    assert p.input_value("#seed") == ""
    voices = p.eval_on_selector_all("#voice option", "els => els.map(e => e.value)")
    assert {"conversational_a", "conversational_b", "none", "alloy"} <= set(voices)
    assert p.eval_on_selector_all("#format option", "els => els.map(e => e.value)")[:2] == ["wav", "flac"]
    unlabelled = p.evaluate(
        "[...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels.length).map(e => e.id)"
    )
    assert unlabelled == []
    p.focus("#text")
    for _ in range(10):  # the Speak button is reached by keyboard
        p.keyboard.press("Tab")
        if p.evaluate("document.activeElement.id") == "speak":
            break
    else:
        pytest.fail("Tab never reached the Speak button")
    assert page.errors == []


def test_speak_starts_playing_before_the_response_ends_and_downloads_the_same_audio(
    page: Page, server: LiveServer, tmp_path: Path
) -> None:
    p = page.page
    p.select_option("#voice", "conversational_b")
    assert p.input_value("#speaker") == "1"  # the voice's speaker is picked with it
    p.fill("#max_audio_ms", "3200")
    p.fill("#seed", "1234")
    p.click("#speak")
    state = page.wait_phase("done", "error")
    assert state["phase"] == "done", state
    last = state["last"]
    assert last["samples"] == 40 * SAMPLES_PER_FRAME and last["seed"] == 1234
    took = last["fetchDoneAt"] - last["requestStart"]
    # The first buffer was scheduled early: well before the response (40 frames) had ended.
    assert last["firstScheduledAt"] - last["requestStart"] < 0.5 * took, last
    assert p.text_content("#ttfa").endswith("ms") and float(p.text_content("#rtf")) > 0
    assert p.text_content("#last-seed") == "1234"

    for fmt in ("wav", "flac"):
        p.select_option("#format", fmt)
        with p.expect_download() as info:
            p.click("#download")
        saved = tmp_path / info.value.suggested_filename
        info.value.save_as(saved)
        assert saved.suffix == f".{fmt}"
        audio, rate = sf.read(saved)
        assert rate == 24000 and len(audio) == last["samples"]
    p.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert page.errors == []


def test_stop_cancels_the_request_and_the_server_stops_generating(page: Page, server: LiveServer) -> None:
    p = page.page
    before = stats(server)["requests"]["cancelled"]
    p.fill("#max_audio_ms", "60000")
    p.click("#speak")
    p.wait_for_function("() => window.csmPlayground.live && window.csmPlayground.live.samples > 0", timeout=60_000)
    p.click("#stop")
    state = page.wait_phase("stopped", "done", "error", timeout=30)
    assert state["phase"] == "stopped", state
    assert p.text_content("#status") == "Stopped."
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = stats(server)
        if now["requests"]["cancelled"] > before and now["engine"]["active"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the server did not cancel the generation: {now}")
    assert state["live"]["samples"] < 750 * SAMPLES_PER_FRAME
    assert p.is_enabled("#speak") and not p.is_enabled("#stop")


def test_server_errors_are_shown_as_readable_messages(page: Page) -> None:
    p = page.page
    p.fill("#text", "   ")  # passes the form's own checks, not the server's
    p.click("#speak")
    page.wait_phase("error")
    status = p.text_content("#status")
    assert status == "input is empty: give some words to speak (400)", status
    assert "error" in p.get_attribute("#status", "class")


def test_a_recorded_voice_is_saved_listed_and_spoken_with_behind_an_api_key(
    mic_browser: object, guarded: LiveServer
) -> None:
    page = Page(mic_browser, guarded.base)
    p = page.page
    try:
        p.wait_for_selector("#key-dialog[open]", timeout=30_000)  # the page asks for the key once
        p.fill("#api-key", API_KEY)
        p.click("#key-form button[value=ok]")
        p.wait_for_function(READY, timeout=30_000)

        p.click("#record")
        p.wait_for_function("() => !document.getElementById('record-stop').disabled")
        p.wait_for_timeout(2500)
        p.click("#record-stop")
        p.wait_for_function("() => !document.getElementById('save-voice').disabled", timeout=10_000)
        p.fill("#voice-name", "mic-voice")
        p.select_option("#voice-speaker", "1")
        p.click("#save-voice")
        p.wait_for_function("() => window.csmPlayground.savedVoice || window.csmPlayground.error", timeout=30_000)
        saved = page.state()["savedVoice"]
        assert saved and saved["name"] == "mic-voice" and saved["source"] == "user", page.state()
        assert 1.5 < saved["duration_s"] < 4.0 and saved["speaker"] == 1
        meta = json.loads((guarded.home / "voices" / "mic-voice" / "voice.json").read_text())
        assert meta["source"].endswith(".webm")  # Chromium's MediaRecorder: webm/opus, decoded by PyAV
        assert p.is_visible("tr[data-voice=mic-voice]")
        assert p.input_value("#voice") == "mic-voice" and p.input_value("#speaker") == "1"

        p.click("#sampling summary")
        p.fill("#max_audio_ms", "400")
        with p.expect_request("**/v1/audio/speech") as sent:
            p.click("#speak")
        assert json.loads(sent.value.post_data)["voice"] == "mic-voice"
        state = page.wait_phase("done", "error")
        assert state["phase"] == "done" and state["last"]["samples"] == 5 * SAMPLES_PER_FRAME, state

        p.fill("#voice-name", "alloy")  # an upload error is shown from the server's JSON
        p.click("#save-voice")
        p.wait_for_function("() => window.csmPlayground.error !== null", timeout=30_000)
        assert "OpenAI voice name" in p.text_content("#status")

        p.click("button[aria-label='Delete voice mic-voice']")
        p.wait_for_selector("tr[data-voice=mic-voice]", state="detached", timeout=10_000)
        assert not (guarded.home / "voices" / "mic-voice").exists()

        p.reload()  # the key is kept for the session: no second prompt
        p.wait_for_function(READY, timeout=30_000)
        assert not p.is_visible("#key-dialog")
        # Only the answers provoked above: the 401 before the key was given and the 400 for "alloy".
        statuses = [e.split("status of ")[-1] for e in page.errors]
        assert statuses == ["401 (Unauthorized)", "400 (Bad Request)"], page.errors
    finally:
        page.context.close()
