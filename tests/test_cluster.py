"""``csm batch --ray``: a local two-CPU Ray cluster on loopback writes exactly what a local run writes.

The command runs in this process (it joins the module's cluster), so Ray starts once for the file.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csmcli.cli import app, main
from csmcli.cluster import WORKER_NAME, ClusterJob, WorkerState

SCRIPTS = {
    "dialog.txt": "Alice: Hello there, Bob.\nBob: Hi Alice! How are you?\nalice: Fine, thanks. And you?\n"
    "[1] Great, thank you.\n",
    "other.jsonl": '{"text": "First.", "speaker": "Ann"}\n{"text": "Second.", "speaker": 1, "voice": "none"}\n'
    '{"text": "Third.", "speaker": "ann", "temperature": 0.5, "seed": 99}\n',
    "third.txt": "Carol: One more.\nDave: And another.\nCarol: The last one.\n",
}
CSM = [sys.executable, "-m", "csmcli"]
FAST = ["--device", "cpu", "--dtype", "float32", "--max-audio-ms", "160", "--seed", "7"]


@pytest.fixture(scope="module")
def cluster() -> str:
    """A two-CPU Ray cluster on loopback for the whole module (its start-up is paid once)."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture()
def work(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the scripts, and the environment the command (and its workers) run with."""
    for name, text in SCRIPTS.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CSM_MODEL", str(tiny_dir))
    monkeypatch.setenv("CSM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CSM_RAY", raising=False)
    return tmp_path


def batch(*args: str) -> None:
    """``csm batch ARGS`` in this process."""
    app(args=["batch", *args], standalone_mode=False)


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file a run leaves under ``folder`` but the lock (relative name -> bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local run of the scripts with context, the same seed: what every cluster run must write."""
    folder = tmp_path_factory.mktemp("local")
    for name, text in SCRIPTS.items():
        (folder / name).write_text(text)
    scripts = [str(folder / name) for name in sorted(SCRIPTS)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSM_HOME", str(folder / "home"))
        batch(*scripts, "-d", str(folder / "out"), "-m", str(tiny_dir), "-q", *FAST)
    return folder / "out"


def test_cluster_run_equals_local_run(cluster: str, reference: Path, work: Path, capfd: pytest.CaptureFixture) -> None:
    scripts = sorted(SCRIPTS)
    batch(*scripts, "-d", "ray", *FAST, "--ray", cluster, "--ray-cpus", "1")
    err = capfd.readouterr().err
    assert "generated 10 turns" in err and "on 2 Ray workers" in err, err
    local, remote = outputs(reference), outputs(work / "ray")
    assert len(local) == 3 * 2 + 2 * (4 + 3 + 3) and remote == local
    assert not list((work / "ray").rglob("*.part")) and not list((work / "ray").rglob(".csm-probe-*"))
    batch("dialog.txt", "-d", "local1", "--no-context", *FAST)
    batch("dialog.txt", "-d", "ray1", "--no-context", *FAST, "--ray", cluster, "--ray-cpus", "1")
    assert outputs(work / "ray1") == outputs(work / "local1")
    assert outputs(work / "ray1")["0002_bob.wav"] != local["dialog/0002_bob.wav"]


def kill_worker_0_when_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill worker 0 once it holds scripts with turns left and some turn is done: the driver's own answer
    handling does it, so the kill cannot come too early (no scripts yet) or too late (all of them done)."""
    import ray

    handle = ClusterJob.handle

    def handle_then_kill(job: ClusterJob, state: WorkerState, reply: object) -> int:
        finished = handle(job, state, reply)
        done = any(w.dialogue.records for w in job.work.values())
        if state.index == 0 and state.ready and state.lanes and done and not job.lost:
            ray.kill(state.actor)
        return finished

    monkeypatch.setattr(ClusterJob, "handle", handle_then_kill)


def test_killed_worker_loses_nothing_and_a_rerun_resumes(
    cluster: str, reference: Path, work: Path, capfd: pytest.CaptureFixture
) -> None:
    scripts = sorted(SCRIPTS)
    with pytest.MonkeyPatch.context() as mp:
        kill_worker_0_when_busy(mp)
        batch(*scripts, "-d", "ray", *FAST, "--ray", cluster, "--ray-cpus", "1")
    err = capfd.readouterr().err
    assert re.search(r"worker 0 on \S+ died; its [12] unfinished scripts start over", err), err
    assert "workers lost and replaced: 1" in err
    assert outputs(work / "ray") == outputs(reference)

    dialog = work / "ray" / "dialog"
    entries = (dialog / "manifest.jsonl").read_text().splitlines()
    (dialog / "manifest.jsonl").write_text("\n".join(entries[:2]) + "\n")  # as if stopped after turn 2
    (dialog / "0004_bob.wav").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in dialog.glob("000[12]_*.wav")}
    batch(*scripts, "-d", "ray", *FAST, "--ray", cluster, "--ray-cpus", "1")
    err = capfd.readouterr().err
    assert "generated 2 turns" in err and "kept 8 finished earlier" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in dialog.glob("000[12]_*.wav")} == kept
    assert outputs(work / "ray") == outputs(reference)
    batch(*scripts, "-d", "ray", *FAST, "--ray", cluster)
    assert "all 10 turns are already done" in capfd.readouterr().err


def test_ctrl_c_stops_the_job_and_a_rerun_resumes(cluster: str, reference: Path, work: Path) -> None:
    import ray

    scripts = sorted(SCRIPTS)
    command = [*CSM, "batch", *scripts, "-d", "ray", *FAST, "--ray", cluster, "--ray-cpus", "1"]
    proc = subprocess.Popen(command, cwd=work, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("csm: [1/10]"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(60) == 130, rest
    assert "stopped after" in rest and "run the same command again to continue" in rest
    deadline = time.monotonic() + 30  # the job's workers go with it
    while [a for a in ray.util.list_named_actors() if a.startswith(WORKER_NAME)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [a for a in ray.util.list_named_actors() if a.startswith(WORKER_NAME)]
    finished = sum(len((work / "ray" / s.split(".")[0] / "manifest.jsonl").read_text().splitlines()) for s in scripts)
    assert 1 <= finished < 10
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    assert f"kept {finished} finished earlier" in proc.stderr, proc.stderr
    assert outputs(work / "ray") == outputs(reference)


def test_missing_extra_and_bad_addresses_are_one_line_errors(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for address, message in [
        ("nowhere", "--ray: expected auto, local, ray://HOST:PORT or HOST:PORT, got 'nowhere'"),
        ("ray://host", "--ray: expected auto, local, ray://HOST:PORT or HOST:PORT, got 'ray://host'"),
        ("", "--ray-cpus must be at least 1, got 0"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["batch", "dialog.txt", *(["--ray", address] if address else ["--ray-cpus", "0"])])
        assert exit_.value.code == 1
        assert capsys.readouterr().err == f"csm: error: {message}\n"
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    monkeypatch.setenv("CSM_RAY", "auto")
    with pytest.raises(SystemExit) as exit_:
        main(["batch", "dialog.txt"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == 'csm: error: --ray needs Ray: pip install "csmcli[ray]"\n'
    assert sorted(p.name for p in work.iterdir()) == sorted(SCRIPTS)  # nothing was planned or written
