"""Weights moved into 2 MiB pages: the same tensors and values in new memory, built on by the fused steps."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from csmcli import hugepages

needs_thp = pytest.mark.skipif(not hugepages.supported(), reason="no transparent huge pages here")


def _mapping(address: int) -> dict[str, str]:
    """The smaps fields of the mapping of this process that holds ``address``."""
    found: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            if found is not None:
                break
            start, end = (int(v, 16) for v in head.split("-"))
            found = {} if start <= address < end else None
        elif found is not None:
            found[head.rstrip(":")] = rest.strip()
    assert found is not None, f"no mapping holds {address:#x}"
    return found


def _vm_flags(address: int) -> list[str]:
    return _mapping(address)["VmFlags"].split()


@needs_thp
def test_adopt_moves_large_whole_tensors_in_place_into_memory_advised_for_huge_pages() -> None:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(1024, 768), requires_grad=False)  # 3 MiB
    codes = torch.randint(0, 255, (2048, 1100), dtype=torch.uint8)  # 2.1 MiB, not a multiple of 64
    small = torch.randn(3)
    base = torch.randn(2048, 1024)
    view = base[1:]  # part of a larger storage: moving it alone would copy the rest twice
    before = [t.clone() for t in (param, codes, small, view)]
    addresses = [t.data_ptr() for t in (param, codes, small, view)]
    moved = hugepages.adopt([param, codes, small, view])
    assert moved == param.numel() * 4 + codes.numel() + small.numel() * 4
    for t, want in zip((param, codes, small, view), before, strict=True):
        assert torch.equal(t, want)
    assert param.data_ptr() != addresses[0] and codes.data_ptr() != addresses[1] != small.data_ptr()
    assert view.data_ptr() == addresses[3]
    assert isinstance(param, torch.nn.Parameter) and param.data_ptr() % hugepages.PAGE == 0
    assert codes.data_ptr() % 64 == 0 and small.data_ptr() % 64 == 0
    assert "hg" in _vm_flags(param.data_ptr()) and "hg" in _vm_flags(codes.data_ptr())
    assert hugepages.bytes_in_arenas([param, codes, small, param]) == moved
    assert hugepages.adopt([param, codes]) == 0  # already there


@needs_thp
def test_adopt_keeps_a_weight_what_it_was_inside_inference_mode() -> None:
    """Moved inside inference mode (an engine built there), a model's parameter stays a normal tensor."""
    param = torch.nn.Parameter(torch.randn(1024, 1024), requires_grad=False)
    with torch.inference_mode():
        assert hugepages.adopt([param]) == param.numel() * 4
    assert not param.is_inference() and param.data_ptr() % hugepages.PAGE == 0


@needs_thp
def test_adopt_moves_tensors_that_share_storage_together() -> None:
    flat = torch.arange(768 * 1024, dtype=torch.float32)
    square = flat.view(768, 1024)
    as_int = flat.view(torch.int32)
    assert hugepages.adopt([flat, square, as_int]) == flat.numel() * 4
    assert flat.data_ptr() == square.data_ptr() == as_int.data_ptr()
    square[0, 0] = 7.0
    assert flat[0] == 7.0 and square.shape == (768, 1024) and as_int.dtype == torch.int32


@needs_thp
def test_a_moved_tensor_that_dies_gives_its_pages_back() -> None:
    """A model that drops weights for another layout (fbgemm, oneDNN) must not keep both copies."""
    big, kept = torch.ones(4 << 20), torch.ones(1024)  # 16 MiB and 4 KiB
    hugepages.adopt([big, kept])
    before = int(_mapping(kept.data_ptr())["Rss"].split()[0])
    del big
    gc.collect()
    after = int(_mapping(kept.data_ptr())["Rss"].split()[0])
    assert before - after >= 15 * 1024 and torch.equal(kept, torch.ones(1024))


def test_adopt_moves_nothing_where_huge_pages_are_off(tmp_path, monkeypatch) -> None:
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_MODE", mode)
    assert not hugepages.supported()
    weight = torch.randn(1024, 1024)
    address = weight.data_ptr()
    assert hugepages.adopt([weight]) == 0 and weight.data_ptr() == address
    monkeypatch.setattr(hugepages, "_MODE", tmp_path / "missing")
    assert not hugepages.supported()


@needs_thp
def test_adopt_moves_nothing_when_the_mapping_cannot_be_made(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hugepages.mmap, "mmap", refuse)
    weight = torch.randn(1024, 1024)
    address, before = weight.data_ptr(), weight.clone()
    assert hugepages.adopt([weight]) == 0
    assert weight.data_ptr() == address and torch.equal(weight, before)


def _kernel_settings() -> list:
    from csmcli import bf16kernel, qkernel

    cases = []
    if qkernel.kernel("avx2") is not None:
        cases.append(pytest.param({"quantize": "int4", "dtype": "float32"}, id="int4"))
        if bf16kernel.kernel("avx2") is not None:
            cases.append(pytest.param({"dtype": "bfloat16", "cpu_isa": "avx2"}, id="bf16-avx2"))
    return cases or [pytest.param({}, marks=pytest.mark.skip(reason="no C++ compiler or no AVX2"))]


@needs_thp
@pytest.mark.parametrize("settings", _kernel_settings())
def test_fused_steps_run_on_the_moved_weights(tiny_dir, monkeypatch, settings: dict) -> None:
    """Every weight a frame streams moves, and the fused
    steps, built after the move, give the greedy codes of the same model left in place: a step built
    on the old addresses would read freed memory."""
    from csmcli import GenerationOptions, Synthesizer
    from csmcli.model import held_weights

    options = GenerationOptions(temperature=0, max_audio_ms=6 * 80)
    synth = Synthesizer.load(str(tiny_dir), device="cpu", **settings)
    model = synth.model
    streamed = [t for part, _ in model.frame_parts() for t in held_weights(part)]
    assert hugepages.bytes_in_arenas(streamed) > 0
    for fused in (model.backbone.fused_step, model.decoder.fused_step):  # the weights' addresses now
        assert fused is not None and list(fused.weights) == [t.data_ptr() for t in fused.tensors]
    codes = synth.generate("Hello from CSM.", options=options).codes
    monkeypatch.setattr(hugepages, "supported", lambda: False)
    kept = Synthesizer.load(str(tiny_dir), device="cpu", **settings)
    assert hugepages.bytes_in_arenas(t for part, _ in kept.model.frame_parts() for t in held_weights(part)) == 0
    assert torch.equal(codes, kept.generate("Hello from CSM.", options=options).codes)
