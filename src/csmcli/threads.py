"""How many CPU threads a model runs on: a fixed count, or ``auto``: the cores other processes leave free.

A CPU frame is hundreds of small parallel regions.  An OpenMP thread that shares its core with a
busy process waits for a time slice at every barrier, so under load fewer threads are much faster;
and a frame is bound by memory bandwidth, which one core nearly saturates on small machines.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from .errors import OptionsError

AUTO = "auto"
#: Seconds over which ``auto`` measures how busy the cores are.
WINDOW_S = 0.15
#: A process that spins until stopped or until its parent (pid in argv) is gone, checked every few
#: milliseconds, so that no spinner outlives the process that started it, even one killed outright.
SPIN_CODE = (
    "import os, sys\nparent = int(sys.argv[1])\n"
    "while os.getppid() == parent:\n    for _ in range(100000):\n        pass\n"
)


def check_threads(value: int | str | None) -> int | str | None:
    """``auto``, a whole number of threads (at least 1), or None (leave torch's setting); anything else
    is a one-line :class:`OptionsError`.  Strings of digits become ints."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionsError(f"threads must be 'auto' or a whole number of at least 1, got {value!r}")
    return value


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads not counted)."""
    cores = set()
    for cpu in usable_cpus():
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f:
                cores.add((f.read().strip(), core))
        except OSError:
            cores.add(("", str(cpu)))
    return max(1, len(cores))


def _busy_ticks(cpus: list[int]) -> int:
    """Clock ticks the given CPUs spent running anything (user, nice, system, interrupts, steal)."""
    wanted = {f"cpu{c}" for c in cpus}
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name in wanted:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                total += user + nice + system + irq + softirq + steal
    return total


def _own_ticks() -> int:
    """Clock ticks this process (all its threads) has run, user and system."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)


def busy_cores(window_s: float = WINDOW_S) -> float:
    """How many of this process's CPUs other processes kept busy over the next ``window_s`` seconds
    (Linux: /proc/stat less this process's own time)."""
    cpus = usable_cpus()
    tick = os.sysconf("SC_CLK_TCK")
    busy, own, start = _busy_ticks(cpus), _own_ticks(), time.perf_counter()
    time.sleep(window_s)
    busy, own, elapsed = _busy_ticks(cpus) - busy, _own_ticks() - own, time.perf_counter() - start
    return max(0.0, (busy - own) / tick / elapsed)


def auto_threads(window_s: float = WINDOW_S) -> int:
    """Physical cores less the cores other processes keep busy (rounded), at least 1; where /proc
    cannot tell (not Linux), the physical cores."""
    cores = physical_cores()
    try:
        busy = busy_cores(window_s)
    except (OSError, ValueError):
        return cores
    return max(1, cores - int(busy + 0.5))


def resolve_threads(value: int | str | None) -> int | None:
    """The thread count for a checked ``value`` (``auto`` measured now; None stays None)."""
    value = check_threads(value)
    return auto_threads() if value == AUTO else value


@contextlib.contextmanager
def spinners(count: int) -> Iterator[list[subprocess.Popen]]:
    """``count`` processes that keep one core each busy (plain busy loops, not pinned) until the block
    ends, however it ends."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen([sys.executable, "-c", SPIN_CODE, str(os.getpid())], stdin=subprocess.DEVNULL)
            )
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
