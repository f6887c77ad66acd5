"""Shared fixtures: tiny random checkpoints made by :mod:`tiny_checkpoint` (beside this file), once per session."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import tiny_checkpoint as tiny


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal delivers it, also when the suite runs as a background job (where the shell
    ignores SIGINT, the commands it starts inherit that, and the tests that stop them would hang)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint in the real repository layout: both weight formats, codec, tokenizer, prompts."""
    return tiny.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "csm-tiny", seed=0, formats="both")


@pytest.fixture(scope="session")
def tiny_original_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights, original (Sesame) format only, without codec weights in the checkpoint."""
    return tiny.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-orig") / "csm-tiny", seed=0, formats="original")


@pytest.fixture(scope="session")
def synth(tiny_dir: Path):
    """A Synthesizer on the tiny checkpoint (float32, CPU), shared by API-level tests."""
    from csmcli import Synthesizer

    return Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", max_batch_size=4)


@pytest.fixture()
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the real ``csm`` command: offline, isolated user dirs."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"),
            "CSM_HOME": str(tmp_path / "csm-home"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("CSM_MODEL", None)
    return env
