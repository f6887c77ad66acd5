"""Voices: the `csm voices` commands, resampling, user voices used by `csm say`."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import soundfile as sf

from csmcli.errors import InputError
from csmcli.voices import VoiceLibrary


def csm(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["csm", *args], capture_output=True, env=env, timeout=300)


def test_add_list_use_remove(tiny_dir, cli_env, tmp_path) -> None:
    stereo_44k = np.stack([np.sin(np.arange(44100 * 2) * 0.05), np.cos(np.arange(44100 * 2) * 0.03)], 1) * 0.3
    src = tmp_path / "me.flac"
    sf.write(str(src), stereo_44k, 44100)
    r = csm(["voices", "add", "me", "--audio", str(src), "--text", "This is me talking."], cli_env)
    assert r.returncode == 0, r.stderr.decode()
    stored, rate = sf.read(str(tmp_path / "csm-home" / "voices" / "me" / "audio.wav"))
    assert rate == 24000 and stored.ndim == 1 and abs(len(stored) - 48000) <= 2

    r = csm(["voices", "list", "-m", str(tiny_dir)], cli_env)
    listing = r.stdout.decode()
    assert r.returncode == 0 and "me" in listing and "conversational_a" in listing and "preset" in listing

    out, other = tmp_path / "me.wav", tmp_path / "preset.wav"
    base = ["-m", str(tiny_dir), "--device", "cpu", "--max-audio-ms", "320", "--seed", "4", "-q"]
    assert csm(["say", "Hello.", "--voice", "me", "-o", str(out), *base], cli_env).returncode == 0
    assert csm(["say", "Hello.", "-o", str(other), *base], cli_env).returncode == 0
    assert not np.array_equal(sf.read(str(out))[0], sf.read(str(other))[0]), "the voice changed nothing"

    r = csm(["voices", "add", "me", "--audio", str(src), "--text", "Again."], cli_env)
    assert r.returncode == 1 and "exists" in r.stderr.decode()
    assert csm(["voices", "remove", "me"], cli_env).returncode == 0
    r = csm(["voices", "remove", "me"], cli_env)
    assert r.returncode == 1 and "no user voice" in r.stderr.decode() and "Traceback" not in r.stderr.decode()


def test_context_audio_flags(tiny_dir, cli_env, tmp_path) -> None:
    src = tiny_dir / "prompts" / "read_speech_a.wav"
    base = ["say", "Hi.", "-m", str(tiny_dir), "--device", "cpu", "--max-audio-ms", "240", "-q"]
    r = csm(
        [*base, "--context-audio", str(src), "--context-text", "Some words.", "-o", str(tmp_path / "a.wav")], cli_env
    )
    assert r.returncode == 0, r.stderr.decode()
    r = csm([*base, "--context-audio", str(src), "-o", str(tmp_path / "b.wav")], cli_env)
    assert r.returncode == 1 and "one --context-text per --context-audio" in r.stderr.decode()
    r = csm(
        [*base, "--context-audio", str(tmp_path / "missing.wav"), "--context-text", "x", "-o", str(tmp_path / "c.wav")],
        cli_env,
    )
    assert r.returncode == 1 and "cannot read audio" in r.stderr.decode()


def test_overlong_voice_audio_is_trimmed(tmp_path, caplog) -> None:
    src = tmp_path / "long.wav"
    sf.write(str(src), np.zeros(16000 * 40, dtype=np.float32) + 0.1, 16000)
    voice = VoiceLibrary(home=tmp_path).add("long", src, "Forty seconds.")
    assert "using its first 30 s" in caplog.text
    assert len(sf.read(str(voice.audio_path))[0]) == 30 * 24000


def test_the_voice_list_is_kept_until_a_folder_changes(tmp_path, caplog, monkeypatch) -> None:
    library = VoiceLibrary(home=tmp_path)
    src = tmp_path / "a.wav"
    sf.write(str(src), np.zeros(24000, dtype=np.float32) + 0.1, 24000)
    library.add("one", src, "One.")
    damaged = library.user_dir / "damaged"
    damaged.mkdir()
    (damaged / "voice.json").write_text("{not json")
    scans = []
    real_glob = type(tmp_path).glob
    monkeypatch.setattr(type(tmp_path), "glob", lambda self, pattern: scans.append(pattern) or real_glob(self, pattern))
    for _ in range(5):
        assert [v.name for v in library.list()] == ["one"]
    assert len(scans) == 1 and caplog.text.count("ignoring damaged voice") == 1  # read once, warned once
    library.add("two", src, "Two.")
    assert [v.name for v in library.list()] == ["one", "two"]
    library.remove("one")
    assert [v.name for v in library.list()] == ["two"]


def test_a_long_voice_file_is_cut_before_it_is_decoded(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "voices" / "long"
    folder.mkdir(parents=True)
    sf.write(str(folder / "audio.wav"), np.zeros(8000 * 600, dtype=np.float32) + 0.1, 8000)  # ten minutes at 8 kHz
    (folder / "voice.json").write_text('{"text": "A long one."}')
    read_frames = []
    real_read = sf.read

    def read(*args, **kwargs):
        data, rate = real_read(*args, **kwargs)
        read_frames.append(len(data))
        return data, rate

    monkeypatch.setattr(sf, "read", read)
    audio = VoiceLibrary(home=tmp_path).get("long").load()
    assert len(audio) == 30 * 24000 and read_frames == [30 * 8000]


def test_an_unreadable_voice_names_the_voice_not_the_file(tmp_path) -> None:
    folder = tmp_path / "voices" / "broken"
    folder.mkdir(parents=True)
    (folder / "audio.wav").write_bytes(b"not audio")
    (folder / "voice.json").write_text('{"text": "Broken."}')
    with pytest.raises(InputError) as caught:
        VoiceLibrary(home=tmp_path).get("broken").load()
    assert "'broken'" in str(caught.value) and str(tmp_path) not in str(caught.value)
