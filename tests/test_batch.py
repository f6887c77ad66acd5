"""``csm batch``: the script parser, and the real command on the tiny checkpoint (via subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audiocheck import SLACK, check_decodes

from csmcli.dialog import parse_jsonl, parse_script, parse_speakers, parse_text, slug, turn_file
from csmcli.errors import InputError

CSM = [sys.executable, "-m", "csmcli"]
DIALOG = """\
# a short dialogue
Alice: Hello there, Bob.
Bob: Hi Alice! How are you?

alice: Fine, thanks. And you?
[1] Great, thank you.
"""
FAST = ["--device", "cpu", "--dtype", "float32", "--max-audio-ms", "240"]
RATE = 24000


# -- the parser -------------------------------------------------------------------------------


def test_text_names_in_order_of_appearance_with_comments_and_ids() -> None:
    turns, problems = parse_text(DIALOG, "d.txt")
    assert problems == []
    assert [(t.number, t.line, t.speaker, t.name) for t in turns] == [
        (1, 2, 0, "Alice"),
        (2, 3, 1, "Bob"),
        (3, 5, 0, "Alice"),
        (4, 6, 1, "Bob"),
    ]
    assert turns[2].text == "Fine, thanks. And you?"


def test_text_speakers_mapping() -> None:
    turns, problems = parse_text(DIALOG, "d.txt", parse_speakers("Bob=0, alice=1"))
    assert problems == []
    assert [(t.speaker, t.name) for t in turns] == [(1, "alice"), (0, "Bob"), (1, "alice"), (1, "alice")]
    assert parse_speakers(None) is None
    for bad in ("Alice", "Alice=2", "=0", "Alice=0,"):
        with pytest.raises(InputError, match="--speakers"):
            parse_speakers(bad)


def test_text_problems_have_line_numbers() -> None:
    source = "Alice: hi\nBob:\nCarol: hey\n\nno speaker here\n[2] nope\n# fine\nDr. Who: x\n"
    _, problems = parse_text(source, "d.txt")
    assert [p.split(":")[1] for p in problems] == ["2", "3", "5", "6", "8"]
    assert "nothing to say for Bob" in problems[0]
    assert "third speaker 'Carol'" in problems[1] and "--speakers Alice=0,Bob=1,Carol=0" in problems[1]
    assert "expected 'NAME: text' or '[0] text'" in problems[2]
    assert "must be 0 or 1" in problems[3]
    _, problems = parse_text("Alice: hi\nEve: hi\n", "d.txt", {"Alice": 0, "Bob": 1})
    assert problems == ["d.txt:2: speaker 'Eve' is not in --speakers (Alice, Bob)"]


def test_the_suggested_mapping_for_many_speakers_is_valid() -> None:
    source = "Ann: a\nBen: b\nCy: c\nDee: d\nCy: e\n"
    for parse, text in ((parse_text, source), (parse_jsonl, _as_jsonl(source))):
        _, problems = parse(text, "d")
        assert [p.split(":")[1] for p in problems] == ["3", "4", "5"]
        suggested = {p.rsplit("--speakers ", 1)[1] for p in problems}
        assert suggested == {"Ann=0,Ben=1,Cy=0,Dee=1"}
        turns, problems = parse(text, "d", parse_speakers(suggested.pop()))
        assert problems == [] and [t.speaker for t in turns] == [0, 1, 0, 1, 0]


def _as_jsonl(source: str) -> str:
    """A ``NAME: text`` script as JSON Lines."""
    lines = [line.split(": ", 1) for line in source.splitlines()]
    return "\n".join(json.dumps({"text": text, "speaker": name}) for name, text in lines)


def test_jsonl_turns_and_problems() -> None:
    source = "\n".join(
        [
            '{"text": "One.", "speaker": "Ann"}',
            '{"text": "Two.", "speaker": 1, "voice": "none", "out": "b/two.flac", "temperature": 0.5}',
            '{"text": "", "speaker": 0}',
            '{"text": "x", "speaker": 2}',
            "not json",
            '{"text": "x", "speaker": 0, "colour": "red"}',
            '{"text": "x", "speaker": 0, "top_k": 0}',
            '{"text": "x", "speaker": 0, "out": "../x.wav"}',
            '{"text": "x"}',
        ]
    )
    turns, problems = parse_jsonl(source, "d.jsonl")
    assert [(t.speaker, t.name, t.voice, t.out, t.options) for t in turns] == [
        (0, "Ann", None, None, {}),
        (1, "speaker1", "none", "b/two.flac", {"temperature": 0.5}),
    ]
    assert [p.split(":")[1] for p in problems] == ["3", "4", "5", "6", "7", "8", "9"]
    assert "unknown field 'colour'" in problems[3]
    assert "top_k must be between 1 and 2051" in problems[4]
    assert "'speaker' is missing" in problems[6]


def test_file_names_and_clashes(tmp_path: Path) -> None:
    assert slug("Dr. Who") == "dr_who" and slug("Zoë") == "zoe" and slug("...") == ""
    turns, _ = parse_text("Zoë: hi\n[1] yo\n", "d.txt")
    assert [turn_file(t, "flac") for t in turns] == ["0001_zoe.flac", "0002_speaker1.flac"]
    script = tmp_path / "d.jsonl"
    script.write_text(
        '{"text": "a", "speaker": 0, "out": "x.wav"}\n'
        '{"text": "b", "speaker": 0, "out": "X.wav"}\n'
        '{"text": "c", "speaker": 0, "out": "all.wav"}\n'
    )
    _, problems = parse_script(script, reserved={"all.wav": "combined file"})
    assert problems == [
        f"{script}:2: file 'X.wav' is also used by line 1",
        f"{script}:3: file 'all.wav' is the combined file",
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    _, problems = parse_script(empty)
    assert len(problems) == 1 and "no turns" in problems[0]


# -- the command ------------------------------------------------------------------------------


def csm(env: dict[str, str], cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``csm batch ARGS`` in ``cwd``."""
    proc = subprocess.run([*CSM, "batch", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def manifest(folder: Path) -> list[dict]:
    """The manifest entries of an output folder."""
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def audio_files(folder: Path) -> dict[str, bytes]:
    """Every audio file under ``folder`` (relative name -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.wav"))}


@pytest.fixture(scope="module")
def env(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Offline environment with a private CSM_HOME (like ``cli_env``, but for the whole module)."""
    home = tmp_path_factory.mktemp("home")
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
        "CSM_HOME": str(home / "csm"),
        "PYTHONUNBUFFERED": "1",
        "CSM_MODEL": str(tiny_dir),
    }


@pytest.fixture(scope="module")
def reference(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete seeded run of DIALOG with context: the folder every other run is compared with."""
    work = tmp_path_factory.mktemp("ref")
    (work / "dialog.txt").write_text(DIALOG)
    csm(env, work, "dialog.txt", "--seed", "7", *FAST)
    return work / "dialog"


def test_outputs_manifest_and_combined(reference: Path, tiny_dir: Path) -> None:
    names = ["0001_alice.wav", "0002_bob.wav", "0003_alice.wav", "0004_bob.wav"]
    assert sorted(audio_files(reference)) == sorted([*names, "dialog.wav"])
    entries = manifest(reference)
    assert [(e["turn"], e["speaker"], e["name"], e["file"]) for e in entries] == [
        (1, 0, "Alice", names[0]),
        (2, 1, "Bob", names[1]),
        (3, 0, "Alice", names[2]),
        (4, 1, "Bob", names[3]),
    ]
    assert entries[2]["text"] == "Fine, thanks. And you?"
    assert [e["seed"] for e in entries] == [7, 8, 9, 10]
    assert all(e["options"]["max_audio_ms"] == 240 and e["context_turns"] == 3 for e in entries)
    assert entries[0]["model"] == str(tiny_dir.resolve())
    turns = [sf.read(reference / n, dtype="int16")[0] for n in names]
    assert all(len(t) == 3 * 1920 for t in turns)  # a random model runs to its 240 ms budget
    assert [e["duration"] for e in entries] == [0.24] * 4
    joined, rate = sf.read(reference / "dialog.wav", dtype="int16")
    gap = round(0.4 * RATE)
    assert rate == RATE and len(joined) == sum(map(len, turns)) + 3 * gap
    np.testing.assert_array_equal(
        joined,
        np.concatenate(
            [
                turns[0],
                np.zeros(gap, np.int16),
                turns[1],
                np.zeros(gap, np.int16),
                turns[2],
                np.zeros(gap, np.int16),
                turns[3],
            ]
        ),
    )
    assert len({t.tobytes() for t in turns}) == 4
    assert sorted(p.name for p in (reference / ".codes").iterdir()) == ["0001.npy", "0002.npy", "0003.npy", "0004.npy"]
    assert not list(reference.rglob("*.part"))


def test_rerun_keeps_finished_turns_and_redoes_changed_ones(
    reference: Path, env: dict[str, str], tmp_path: Path
) -> None:
    shutil.copytree(reference, tmp_path / "dialog")
    (tmp_path / "dialog.txt").write_text(DIALOG)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dialog").glob("000*.wav")}
    proc = csm(env, tmp_path, "dialog.txt", "--seed", "7", *FAST)
    assert "all 4 turns are already done" in proc.stderr
    (tmp_path / "dialog.txt").write_text(DIALOG.replace("Fine, thanks.", "Fine, thank you."))
    (tmp_path / "dialog" / ".codes" / "0002.npy").unlink()  # turn 2 is then heard from its audio file
    proc = csm(env, tmp_path, "dialog.txt", "--seed", "7", *FAST)
    assert "generated 2 turns" in proc.stderr and "kept 2" in proc.stderr
    assert "no codes for turn 2: re-encoding 0002_bob.wav" in proc.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dialog").glob("000*.wav")}
    assert [after[n] == before[n] for n in sorted(before)] == [True, True, False, False]
    assert manifest(tmp_path / "dialog")[2]["text"] == "Fine, thank you. And you?"
    assert audio_files(tmp_path / "dialog")["0004_bob.wav"] != audio_files(reference)["0004_bob.wav"]


def test_a_shorter_changed_script_replaces_the_earlier_runs_files(
    reference: Path, env: dict[str, str], tmp_path: Path
) -> None:
    shutil.copytree(reference, tmp_path / "dialog")
    lines = DIALOG.splitlines()
    (tmp_path / "dialog.txt").write_text("\n".join([*lines[:4], "alice: Fine."]) + "\n")
    proc = csm(env, tmp_path, "dialog.txt", "--seed", "7", *FAST)
    assert "generated 1 turn (" in proc.stderr and "kept 2" in proc.stderr
    assert "3 turns joined" in proc.stderr
    out = tmp_path / "dialog"
    assert sorted(audio_files(out)) == ["0001_alice.wav", "0002_bob.wav", "0003_alice.wav", "dialog.wav"]
    assert sorted(p.name for p in (out / ".codes").iterdir()) == ["0001.npy", "0002.npy", "0003.npy"]
    assert [e["turn"] for e in manifest(out)] == [1, 2, 3]
    assert len(sf.read(out / "dialog.wav")[0]) == 3 * 3 * 1920 + 2 * round(0.4 * RATE)


def test_force_redoes_everything_the_same_way(reference: Path, env: dict[str, str], tmp_path: Path) -> None:
    shutil.copytree(reference, tmp_path / "dialog")
    (tmp_path / "dialog.txt").write_text(DIALOG)
    proc = csm(env, tmp_path, "dialog.txt", "--seed", "7", "--force", *FAST)
    assert "generated 4 turns" in proc.stderr and "kept" not in proc.stderr
    assert audio_files(tmp_path / "dialog") == audio_files(reference)


def test_resume_after_interrupt_equals_an_uninterrupted_run(
    reference: Path, env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "dialog.txt").write_text(DIALOG)
    proc = subprocess.Popen(
        [*CSM, "batch", "dialog.txt", "--seed", "7", *FAST], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:
        if line.startswith("csm: [1/4]"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(60) == 130, rest
    assert "stopped after" in rest
    out = tmp_path / "dialog"
    entries = manifest(out)
    assert 1 <= len(entries) < 4
    assert all((out / e["file"]).is_file() for e in entries)
    assert not list(out.rglob("*.part"))
    (out / ".0004_bob.wav.dead.part").write_bytes(b"left by a killed run")
    proc = csm(env, tmp_path, "dialog.txt", "--seed", "7", *FAST)
    assert f"kept {len(entries)} finished earlier" in proc.stderr
    assert audio_files(out) == audio_files(reference)
    assert manifest(out) == manifest(reference)
    assert not list(out.rglob("*.part"))


def test_several_scripts_run_side_by_side(reference: Path, env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "dialog.txt").write_text(DIALOG)
    (tmp_path / "other.jsonl").write_text(
        '{"text": "First.", "speaker": "Ann"}\n'
        "# a comment\n"
        '{"text": "Second.", "speaker": 1, "voice": "none", "out": "parts/second.flac"}\n'
        '{"text": "Third.", "speaker": "ann", "temperature": 0.5, "seed": 99}\n'
    )
    csm(env, tmp_path, "dialog.txt", "other.jsonl", "-d", "out", "--seed", "7", *FAST)
    assert audio_files(tmp_path / "out" / "dialog") == audio_files(reference)
    other = tmp_path / "out" / "other"
    entries = manifest(other)
    assert [(e["name"], e["voice"], e["file"], e["seed"]) for e in entries] == [
        ("Ann", None, "0001_ann.wav", 7),
        ("speaker1", "none", "parts/second.flac", 8),
        ("Ann", None, "0003_ann.wav", 99),
    ]
    assert entries[2]["options"]["temperature"] == 0.5
    assert sf.info(other / "parts" / "second.flac").format == "FLAC"
    assert not (other / "dialog.wav").exists()  # the combined file is named after the script
    assert len(sf.read(other / "other.wav")[0]) == 3 * 3 * 1920 + 2 * round(0.4 * RATE)


def test_batched_equals_sequential_for_seeded_independent_turns(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "dialog.txt").write_text(DIALOG)
    csm(env, tmp_path, "dialog.txt", "--no-context", "--batch-size", "1", "-d", "one", "--seed", "5", *FAST)
    csm(env, tmp_path, "dialog.txt", "--no-context", "--batch-size", "3", "-d", "three", "--seed", "5", *FAST)
    one, three = audio_files(tmp_path / "one"), audio_files(tmp_path / "three")
    assert len(one) == 5 and one == three
    assert [e["context_turns"] for e in manifest(tmp_path / "three")] == [None] * 4


def test_invalid_scripts_report_every_line_and_generate_nothing(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "dialog.txt").write_text("Alice: hi\nBob:\nCarol: hey\nno speaker here\n")
    (tmp_path / "turns.jsonl").write_text('{"text": "hi", "speaker": 0}\n{"text": "x", "speaker": 5}\n[]\n')
    proc = csm(env, tmp_path, "dialog.txt", "turns.jsonl", "missing.txt", check=False)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert [line.split(":", 2)[:2] for line in lines[:-1]] == [
        ["dialog.txt", "2"],
        ["dialog.txt", "3"],
        ["dialog.txt", "4"],
        ["turns.jsonl", "2"],
        ["turns.jsonl", "3"],
        ["missing.txt", " cannot read it"],
    ]
    assert lines[-1] == "csm: error: 6 problems found; nothing was generated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dialog.txt", "turns.jsonl"]


def test_bad_options_fail_before_loading(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "dialog.txt").write_text(DIALOG)
    for args, message in [
        (["--combined", "x.mp4"], "--combined needs an audio extension"),
        (["--voices", "Zed=none"], "--voices: no speaker 'zed'"),
    ]:
        proc = csm(env, tmp_path, "dialog.txt", *args, check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(("fmt", "other"), [("mp3", "aac"), ("aac", "mp3")])
def test_lossy_turns_and_combined_files_decode_also_after_a_resume(
    env: dict[str, str], tmp_path: Path, fmt: str, other: str
) -> None:
    """Lossy turn files are never read back: the combined file joins this run's samples, or the codes
    of turns kept from an earlier run (libsndfile cannot even read AAC)."""
    (tmp_path / "dialog.txt").write_text(DIALOG)
    csm(env, tmp_path, "dialog.txt", "--seed", "7", "--format", fmt, "--bitrate", "64k", *FAST)
    out, turn = tmp_path / "dialog", 3 * 1920
    entries = manifest(out)
    assert [e["file"][-4:] for e in entries] == [f".{fmt}"] * 4 and {e["bitrate"] for e in entries} == {64000}
    for entry in entries:
        check_decodes((out / entry["file"]).read_bytes(), fmt, turn, SLACK[fmt])
    check_decodes((out / f"dialog.{fmt}").read_bytes(), fmt, 4 * turn + 3 * round(0.4 * RATE), SLACK[fmt])

    # every turn kept, a new combined file in the other format: the turns come from their codes
    args = ["--pause", "0.2", "--combined", f"dialog/joined.{other}", "--bitrate", "64k"]
    proc = csm(env, tmp_path, "dialog.txt", "--seed", "7", "--format", fmt, *args, *FAST)
    assert "all 4 turns are already done" in proc.stderr
    joined = (out / f"joined.{other}").read_bytes()
    check_decodes(joined, other, 4 * turn + 3 * round(0.2 * RATE), SLACK[other])

    # two turns redone, two kept
    (tmp_path / "dialog.txt").write_text(DIALOG.replace("Fine, thanks.", "Fine, thank you."))
    proc = csm(env, tmp_path, "dialog.txt", "--seed", "7", "--format", fmt, "--bitrate", "64k", *FAST)
    assert "generated 2 turns" in proc.stderr and "kept 2" in proc.stderr
    check_decodes((out / f"dialog.{fmt}").read_bytes(), fmt, 4 * turn + 3 * round(0.4 * RATE), SLACK[fmt])


def test_bad_batch_format_or_bitrate_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "dialog.txt").write_text(DIALOG)
    for args, message in (
        (["--format", "mp4"], "unknown audio format 'mp4': use one of wav, raw, flac, ogg, mp3, opus, aac"),
        (["--format", "mp3", "--bitrate", "97k"], "bad mp3 bitrate '97k'"),
        (["--bitrate", "64k"], "bitrate does not apply to wav"),
    ):
        proc = subprocess.run(
            [*CSM, "batch", "dialog.txt", *args, *FAST], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dialog").exists()
