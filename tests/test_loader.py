"""The one loader (csmcli.loader): parameters instead of environment variables, shared by the
synthesizer and ``csm bench``, and compiled functions that belong to one engine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import csmcli
from csmcli.cli.loading import load_settings

PACKAGE = Path(csmcli.__file__).parent


def test_no_environment_variable_is_read_below_the_cli() -> None:
    readers = re.compile(r"""(environ|getenv)\b[^\n]*["']CSM_""")
    found = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if "cli" not in path.relative_to(PACKAGE).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if readers.search(line)
    ]
    assert found == []


def test_the_cli_passes_the_environment_as_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CSM_CPU_ISA", "CSM_CPU_KERNELS", "CSM_CUDA_GRAPHS", "CSM_MIMI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CSM_HOME", "/some/home")
    cache = Path("/some/home/cache")
    assert load_settings() == {"cpu_isa": None, "cpu_kernels": None, "cuda_graphs": True, "cache_dir": cache}
    monkeypatch.setenv("CSM_CPU_ISA", "avx2")
    monkeypatch.setenv("CSM_CPU_KERNELS", "packed")
    monkeypatch.setenv("CSM_CUDA_GRAPHS", "0")
    monkeypatch.setenv("CSM_MIMI", "/some/mimi")
    want = {"cpu_isa": "avx2", "cpu_kernels": "packed", "cuda_graphs": False, "mimi": "/some/mimi", "cache_dir": cache}
    assert load_settings() == want


def test_bench_loads_like_the_synthesizer(tiny_original_dir, synth, tmp_path) -> None:
    """A checkpoint without codec weights takes Mimi from ``mimi`` in ``csm bench`` too."""
    from csmcli.bench import BenchSetup, run_bench

    mimi = tmp_path / "mimi"
    synth.codec.model.save_pretrained(mimi)
    setup = BenchSetup(prompt_rows=16, frames=2, batch_sizes=(1,), warmup=1, voice_rows=24)
    r = run_bench(str(tiny_original_dir), setup, 1, device="cpu", dtype="float32", mimi=str(mimi))
    assert r["model"] == str(tiny_original_dir) and r["ms_per_frame"] > 0


def test_bad_cpu_kernels_fail_before_loading(tiny_dir) -> None:
    from csmcli import Synthesizer
    from csmcli.errors import OptionsError

    with pytest.raises(OptionsError, match="CPU kernels must be one of auto, packed, plain, got 'fast'"):
        Synthesizer.load(str(tiny_dir), device="cpu", cpu_kernels="fast")
