"""``--threads N|auto``: parsing, one-line errors, ``auto`` under a competing load, and the spinning
processes ``csm bench --busy-cores`` starts (none may outlive the run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_cli_say import BASE, csm

from csmcli.errors import OptionsError
from csmcli.threads import SPIN_CODE, auto_threads, check_threads, physical_cores, resolve_threads, spinners


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (reaped, or a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _spinner_children(parent: int) -> list[int]:
    """Running spinner processes whose parent is ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == parent and SPIN_CODE.encode() in cmdline and not _gone(int(entry)):
            found.append(int(entry))
    return found


def _wait_until(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("3", 3), (2, 2), (None, None)])
def test_thread_settings_are_checked(value, expected) -> None:
    assert check_threads(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "", 0, True])
def test_bad_thread_settings_are_one_line_errors(value) -> None:
    with pytest.raises(OptionsError, match="threads must be 'auto' or a whole number of at least 1"):
        check_threads(value)


def test_a_number_of_threads_is_taken_as_given() -> None:
    assert resolve_threads(3) == 3 and resolve_threads("1") == 1 and resolve_threads(None) is None


@pytest.mark.parametrize(
    "command", [["say", "hi", "-o", "{tmp}/x.wav"], ["bench", "--frames", "2"], ["play", "hi"], ["serve"]]
)
@pytest.mark.parametrize("value", ["0", "many"])
def test_bad_threads_flag_is_a_one_line_error(tiny_dir, cli_env, tmp_path, command, value) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    r = csm([*args, "-m", str(tiny_dir), "--device", "cpu", "--threads", value], cli_env)
    err = r.stderr.decode()
    assert r.returncode != 0 and "threads must be 'auto' or a whole number of at least 1" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_say_runs_on_the_threads_asked_for(tiny_dir, cli_env, tmp_path) -> None:
    out = tmp_path / "x.wav"
    r = csm(["say", "Hello.", "-m", str(tiny_dir), "-o", str(out), "--threads", "1", *BASE], cli_env)
    assert r.returncode == 0 and out.stat().st_size > 44, r.stderr.decode()


def test_bench_reports_the_threads_and_busy_cores(tiny_dir, cli_env) -> None:
    args = ["bench", "-m", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--frames", "2"]
    r = csm(
        [*args, "--batch-sizes", "1", "--prompt-rows", "8", "--threads", "1", "--busy-cores", "1", "--json"], cli_env
    )
    assert r.returncode == 0, r.stderr.decode()
    result = json.loads(r.stdout)
    assert result["threads"] == 1 and result["threads_setting"] == 1 and result["busy_cores"] == 1
    assert result["openmp_wait_policy"] == "PASSIVE"  # under load waiting OpenMP threads sleep (openmp_waits)
    assert result["floor_ms_per_frame"] > 0 and result["memory_read_gb_s"] > 0


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="auto measures the load through Linux's /proc")
def test_auto_leaves_a_core_to_a_busy_process() -> None:
    cores = physical_cores()
    if cores < 2:
        pytest.skip("only one usable core: auto cannot choose fewer than one thread")
    with spinners(1):
        time.sleep(0.3)  # the interpreter starts before it spins
        assert auto_threads() < cores


def test_spinners_spin_until_the_block_ends_however_it_ends() -> None:
    with spinners(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(_gone(p.pid) for p in procs)
    with pytest.raises(KeyboardInterrupt), spinners(1) as procs:
        raise KeyboardInterrupt
    assert all(_gone(p.pid) for p in procs)


@pytest.mark.skipif(not os.path.exists("/proc"), reason="finds the spinners through /proc")
def test_spinners_stop_when_their_parent_is_killed() -> None:
    code = (
        "import time\nfrom csmcli.threads import spinners\n"
        "with spinners(1) as p:\n    print(p[0].pid, flush=True)\n    time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    pid = int(parent.stdout.readline())
    assert not _gone(pid)
    parent.kill()
    parent.wait()
    assert _wait_until(lambda: _gone(pid), 10), "a spinner outlived its parent"


@pytest.mark.skipif(not os.path.exists("/proc"), reason="finds the spinners through /proc")
def test_interrupted_bench_leaves_no_spinners(tiny_dir, cli_env) -> None:
    """Ctrl-C during ``csm bench --busy-cores 2`` (here while the full-size random model is drawn):
    status 130 and every spinner gone."""
    cmd = ["csm", "bench", "--random-weights", "--device", "cpu", "--busy-cores", "2", "--frames", "2", "--json"]
    bench = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait_until(lambda: len(_spinner_children(bench.pid)) == 2, 60), "the spinners did not start"
        spinning = _spinner_children(bench.pid)
        bench.send_signal(signal.SIGINT)
        _, err = bench.communicate(timeout=120)
    finally:
        bench.kill()
    assert bench.returncode == 130, err.decode()
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    assert all(_gone(pid) for pid in spinning)


def test_a_failing_bench_stops_its_spinners(tmp_path) -> None:
    from csmcli.bench import BenchSetup, run_bench

    with pytest.raises(Exception, match="not"):
        run_bench(str(tmp_path / "missing"), BenchSetup(busy_cores=2), 1, device="cpu")
    assert _spinner_children(os.getpid()) == []


def test_the_users_openmp_wait_policy_is_kept(tiny_dir, cli_env) -> None:
    args = ["bench", "-m", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--frames", "2"]
    cli_env["OMP_WAIT_POLICY"] = "active"
    r = csm([*args, "--batch-sizes", "1", "--prompt-rows", "8", "--json"], cli_env)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["openmp_wait_policy"] == "active"


def test_the_loader_sets_the_threads_it_is_given(tiny_dir) -> None:
    import torch

    from csmcli.loader import load_parts

    before = torch.get_num_threads()
    try:
        load_parts(str(tiny_dir), device="cpu", dtype="float32", threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(OptionsError, match="threads must be"):
            load_parts(str(tiny_dir), device="cpu", threads="none")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("busy", "expect_load", "policy"), [(0.0, False, "None"), (1.0, False, "PASSIVE"), (0.0, True, "PASSIVE")]
)
def test_waiting_threads_sleep_only_under_load(busy, expect_load, policy) -> None:
    code = (
        "import os, sys\nfrom csmcli import threads\nfrom csmcli.cli.common import openmp_waits\n"
        f"threads.busy_cores = lambda: {busy}\nopenmp_waits(expect_load={expect_load})\n"
        "assert 'torch' not in sys.modules\nprint(os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == policy
