"""The `csm` command as a whole: start-up cost, help, version, usage errors, shared flags, messages."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from test_cli_say import BASE, csm

from csmcli.cli.common import GenerationFlags
from csmcli.options import OPTION_FIELDS, GenerationOptions, format_rtf, real_time_factor

HEAVY = ("torch", "transformers")

#: Runs ``csm ARGS`` in-process, then prints which heavy modules it imported.
PROBE = """
import sys
from csmcli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("IMPORTED", *[m for m in {heavy!r} if m in sys.modules], "EXIT", code, file=sys.stderr)
"""


def probe(args: list[str], env: dict) -> tuple[list[str], str]:
    """The heavy modules ``csm ARGS`` imported, and the exit status."""
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True, env=env, timeout=120
    )
    last = r.stderr.strip().splitlines()[-1].split()
    assert last[0] == "IMPORTED", r.stderr
    return last[1 : last.index("EXIT")], last[-1]


def test_importing_the_cli_does_not_import_torch(cli_env) -> None:
    code = "import csmcli.cli, sys; assert not [m for m in ('torch', 'transformers') if m in sys.modules]"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["--help"], "0"),
        (["say", "--help"], "0"),
        (["batch", "--help"], "0"),
        (["--version"], "0"),
        (["say", "--tempreature", "1", "hi"], "2"),
        (["say", "hi", "--speaker", "3", "-o", "x.wav"], "1"),
        (["say", "hi", "--temperature", "-1", "-o", "x.wav"], "1"),
        (["voices", "remove", "conversational_b"], "1"),
        (["voices", "remove", "nobody"], "1"),
        (["voices", "list"], "0"),
    ],
)
def test_help_usage_errors_and_argument_checks_do_not_import_torch(cli_env, args, status) -> None:
    imported, code = probe(args, cli_env)
    assert imported == [] and code == status


def test_listing_a_checkpoints_voices_does_not_import_torch(cli_env, tiny_dir) -> None:
    """Finding the presets reads the checkpoint's config and tensor names, never its tensors."""
    imported, code = probe(["voices", "list", "-m", str(tiny_dir)], cli_env)
    assert imported == [] and code == "0"


def test_version_comes_from_the_package_metadata(cli_env) -> None:
    r = csm(["--version"], cli_env)
    assert r.returncode == 0 and r.stdout.decode().strip() == f"csm {version('csmcli')}"


def test_help_shows_defaults_and_switches_take_no_value(cli_env) -> None:
    r = csm(["say", "--help"], cli_env)
    text = " ".join(r.stdout.decode().split())
    assert r.returncode == 0
    assert "[default: stdout when piped]" in text and "[default: from the extension, else wav]" in text
    assert "[default: 0.9]" in text and "[default: 90000]" in text and "default: sesame/csm-1b]" in text
    assert "<bool>" not in text and "--compile Compile" in text and "-q, --quiet No progress" in text


def test_usage_errors_are_one_line(cli_env) -> None:
    for args in (["say", "--tempreature", "1", "hi"], ["sya", "hi"], ["say", "--top-k", "many", "hi"]):
        r = csm(args, cli_env)
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("csm: error: "), err


def test_generation_flags_are_the_option_fields_with_the_api_defaults() -> None:
    fields = dataclasses.fields(GenerationFlags)
    assert tuple(f.name for f in fields) == OPTION_FIELDS
    assert GenerationFlags().options() == GenerationOptions()


@pytest.mark.parametrize("command", ["say", "play", "batch", "serve"])
def test_every_generating_command_takes_every_generation_flag(cli_env, command) -> None:
    text = csm([command, "--help"], cli_env).stdout.decode()
    for name in OPTION_FIELDS:
        assert f"--{name.replace('_', '-')}" in text, (command, name)
    for flag in ("--model", "--device", "--dtype", "--quantize", "--compile"):
        assert flag in text, (command, flag)


def test_real_time_factor_is_generation_time_over_audio_time() -> None:
    assert real_time_factor(2.0, 4.0) == "0.50"
    assert format_rtf(2.0, 4.0) == "RTF 0.50 (faster than real time)"
    assert format_rtf(3.0, 2.0) == "RTF 1.50 (slower than real time)"
    assert format_rtf(1.0, 0.0) == "RTF -"


def test_batch_reports_speed_as_rtf(tiny_dir, cli_env, tmp_path) -> None:
    script = tmp_path / "d.txt"
    script.write_text("A: Hello there.\nB: Hi.\n")
    r = csm(["batch", str(script), "-m", str(tiny_dir), "--device", "cpu", "--max-audio-ms", "240"], cli_env)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "than real time" in err and "RTF " in err and "x real time" not in err, err


def test_output_under_a_file_says_it_is_not_a_directory(tiny_dir, cli_env, tmp_path) -> None:
    (tmp_path / "hello.wav").write_bytes(b"")
    r = csm(["say", "hi", "-m", str(tiny_dir), "-o", str(tmp_path / "hello.wav" / "x.wav"), *BASE], cli_env)
    err = r.stderr.decode()
    assert r.returncode == 1 and "is a file, not a directory" in err and "does not exist" not in err, err


def test_removing_a_preset_says_presets_stay(cli_env) -> None:
    r = csm(["voices", "remove", "conversational_b"], cli_env)
    err = r.stderr.decode()
    assert r.returncode == 1 and "preset" in err and "cannot be removed" in err and "no user voice" not in err, err


def test_listing_voices_without_the_model_says_presets_come_with_it(cli_env) -> None:
    r = csm(["voices", "list"], cli_env)
    err = r.stderr.decode()
    assert r.returncode == 0 and "presets" in err and "csm download" in err, err


def test_compile_on_a_cpu_is_refused_before_the_model_is_touched(cli_env, tmp_path) -> None:
    args = ["say", "hi", "-m", str(tmp_path / "no-such-model"), "--device", "cpu", "--dtype", "float32", "--compile"]
    args += ["-o", "x.wav"]
    r = csm(args, cli_env)
    err = r.stderr.decode()
    assert r.returncode == 1 and "--quantize int8" in err and "not found" not in err, err


def test_a_reader_that_stops_early_ends_csm_quietly(tiny_dir, cli_env) -> None:
    """``csm say -o - | head -c 100``: status 141 (as if killed by SIGPIPE), nothing on stderr."""
    args = ["csm", "say", "A long sentence.", "-m", str(tiny_dir), "-o", "-", "--format", "raw"]
    proc = subprocess.Popen(
        [*args, "--device", "cpu", "--max-audio-ms", "4000", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env,
    )
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "16-bit" in err and len(err.strip().splitlines()) == 1, err


def test_checkpoint_without_weights_names_what_is_missing(cli_env, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    r = csm(["say", "hi", "-m", str(tmp_path), "-o", str(tmp_path / "o.wav"), *BASE], cli_env)
    err = r.stderr.decode()
    assert r.returncode == 1 and "not a CSM checkpoint: no weights (model.safetensors, ckpt.pt" in err, err


def test_the_cli_logs_to_the_current_stderr_once_however_often_it_runs(monkeypatch, capsys) -> None:
    """Commands run in one process (tests, embedders) share one log handler, which writes to
    ``sys.stderr`` as it is when a line is logged: never to a stream closed since."""
    import io
    import logging

    from csmcli import cli

    for _ in range(3):
        cli._setup_logging()
    log = logging.getLogger("csmcli")
    assert sum(isinstance(h, cli.StderrHandler) for h in log.handlers) == 1
    gone = io.StringIO()
    monkeypatch.setattr(sys, "stderr", gone)
    gone.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    log.warning("a warning")
    assert now.getvalue() == "csm: WARNING: a warning\n"
