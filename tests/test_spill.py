"""Factors kept in a scratch file while a delta is built (spill.py): the same values, the same
file, nothing left behind."""

import os

import pytest
import torch

from deltasvd import api, spill
from deltasvd.errors import DeltaError
from deltasvd.ranks import RankRule


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float8_e4m3fn, torch.uint8])
def test_spilled_tensor_has_the_same_values_and_bytes(dtype, monkeypatch):
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 1)
    g = torch.Generator().manual_seed(7)
    store = spill.SpillFile()
    kept = []
    for shape in [(37, 5, 3, 3), (1, 1000), (333,)]:   # unaligned sizes: each is page-aligned
        t = (torch.randn(shape, generator=g) * 40).to(dtype)
        s = store.keep(t)
        assert getattr(s, spill._ATTR, None) is not None
        kept.append((t, s))
    for t, s in kept:                      # earlier tensors survive the later writes
        assert s.dtype == t.dtype and s.shape == t.shape
        assert torch.equal(s.view(torch.uint8), t.view(torch.uint8))
        raw = b"".join(bytes(c) for c in spill.chunks(s))
        assert raw == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_small_and_empty_tensors_stay_in_memory():
    store = spill.SpillFile()
    small = torch.randn(8, 8)
    assert store.keep(small) is small
    empty = torch.empty(0, 4)
    assert store.keep(empty).numel() == 0


def test_compressed_file_is_the_same_spilled_or_not(tiny_pair, tmp_path, monkeypatch):
    rule = RankRule("energy", 0.5)
    held = tmp_path / "held"
    spilled = tmp_path / "spilled"
    held.mkdir()
    spilled.mkdir()
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 1 << 40)
    api.compress_files(*tiny_pair, str(held / "d.safetensors"), rule)
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 1)
    delta, _ = api.compress_files(*tiny_pair, str(spilled / "d.safetensors"), rule)
    assert any(getattr(t, spill._ATTR, None) for t in delta.tensors.values())
    a = (held / "d.safetensors").read_bytes()
    b = (spilled / "d.safetensors").read_bytes()
    assert a == b
    assert os.listdir(spilled) == ["d.safetensors"]   # the scratch file had no name


def test_size_mode_trims_spilled_factors(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 1)
    rule = RankRule("size_mb", 0.05)
    out = tmp_path / "d.safetensors"
    delta, _ = api.compress_files(*tiny_pair, str(out), rule)
    assert 0 < os.path.getsize(out) <= 0.05 * 2**20
    back = api.read_delta(str(out))
    for name, t in delta.tensors.items():
        assert torch.equal(back.tensors[name], t), name


def test_scratch_folder_missing_is_a_clear_error(tmp_path):
    with pytest.raises(DeltaError, match="scratch file") as e:
        spill.SpillFile(str(tmp_path / "nowhere"))
    assert "nowhere" in str(e.value)
