"""bench/fidelity.py's numbers come from the files the command line writes: one row, end to
end on a few prompts, against the same steps done here by hand (compress, apply, sample,
SSIM / PSNR against the full fine-tune's pictures)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from deltasvd.image_metrics import psnr, ssim
from deltasvd.t2i import weights
from deltasvd.t2i.sampler import sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity",
                                                  os.path.join(REPO, "bench", "fidelity.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def by_hand(path, prompts, seeds):
    x = sample(*weights.load(path), prompts, seeds, steps=STEPS)
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def test_one_row_end_to_end(fidelity, tmp_path):
    torch.set_num_threads(1)
    keep = tmp_path / "kept"
    keep.mkdir()
    rows, images, n_subject = fidelity.run(["base model", "energy 0.5"], steps=STEPS, quick=True,
                                           log=lambda line: None, keep=str(keep))
    base_row, row = rows
    prompts, seeds, _ = fidelity.prompts_and_seeds(quick=True)
    # the same file from the command line, applied by the command line
    # named as the bench names them: the name is in the metadata
    delta, merged = tmp_path / "delta.safetensors", tmp_path / "merged.safetensors"
    for args in (["compress", weights.BASE, weights.FINETUNE, "-o", delta, "--energy", "0.5"],
                 ["apply", weights.BASE, delta, "-o", merged]):
        r = subprocess.run([sys.executable, "-m", "deltasvd", *map(str, args)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert row["mib"] == os.path.getsize(delta) / 2**20
    assert (keep / "energy_0.5.safetensors").read_bytes() == merged.read_bytes()
    ref = by_hand(weights.FINETUNE, prompts, seeds)
    got = by_hand(str(merged), prompts, seeds)
    assert torch.equal(images["energy 0.5"], got)
    assert row["ssim"] == pytest.approx(float(ssim(got, ref).mean()), abs=1e-12)
    assert row["ssim_subject"] == pytest.approx(float(ssim(got, ref)[:n_subject].mean()), abs=1e-12)
    assert row["psnr"] == pytest.approx(float(psnr(got, ref).mean()), abs=1e-9)
    # the delta brings the pictures towards the fine-tune's: the base is the floor
    assert base_row["ssim"] < row["ssim"] < 1.0
    assert 0.0 < row["weight_rel_error"] < 1.0 and base_row["weight_rel_error"] == 1.0


def test_table_has_the_papers_columns(fidelity):
    row = {"setting": "energy 0.5", "curve": "energy rule", "params_m": 0.25, "mib": 0.9,
           "ssim": 0.93, "ssim_subject": 0.95, "ssim_other": 0.92, "psnr": 29.5,
           "subject": 0.8, "rel_error": 0.44, "weight_rel_error": 0.45}
    lines = fidelity.table([row]).splitlines()
    assert lines[0].startswith("| setting | params (M) | MiB | SSIM")
    assert lines[2].count("|") == lines[0].count("|")
