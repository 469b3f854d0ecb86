"""`--max-error E` and the weight-relative allocation of `--size-mb` (measures.py), on the
project's own text-to-image fine-tune: the error is measured again from the written file's
tensors against float64 deltas of the pair, not taken from the file's records."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deltasvd.apply import delta_for, records_by_key
from deltasvd.delta_file import read_delta
from deltasvd.ranks import allocate_error
from deltasvd.t2i import weights

BASE, TUNED = weights.BASE, weights.FINETUNE


def cli(*args):
    return subprocess.run([sys.executable, "-m", "deltasvd", *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def pair():
    return load_file(BASE), load_file(TUNED)


def measured_errors(path, pair):
    """(weight-relative, plain relative) error of the file, from its tensors."""
    base, tuned = pair
    delta = read_delta(str(path))
    by_key = records_by_key(delta)
    num_w = den_w = num = den = 0.0
    for key, b in base.items():
        d = tuned[key].double() - b.double()
        if not float(d.abs().max()):
            continue
        got = (delta_for(delta, by_key[key], tuple(b.shape)).double() if key in by_key
               else torch.zeros_like(d))
        e2, n2 = float((got - d).pow(2).sum()), float(d.pow(2).sum())
        # weight-relative: matrices only (1-D changes are stored exactly, measures.py)
        w = 1.0 / max(float(b.double().pow(2).sum()), n2) if d.ndim >= 2 else 0.0
        num_w, den_w, num, den = num_w + w * e2, den_w + w * n2, num + e2, den + n2
    return (num_w / den_w) ** 0.5, (num / den) ** 0.5


def test_allocate_error_is_the_cheapest_that_meets_the_target():
    rng = np.random.default_rng(1)
    layers = [(np.sort(rng.random(5))[::-1], c, w) for c, w in ((3, 1.0), (5, 2.0), (2, 0.5))]
    whole = sum(w * float(np.sum(s * s)) for s, _, w in layers)
    for frac in (0.05, 0.3, 0.7):
        ranks = allocate_error(layers, frac * whole)
        err = sum(w * float(np.sum(s[r:] ** 2)) for r, (s, _, w) in zip(ranks, layers))
        assert err <= frac * whole
        cost = sum(r * c for r, (_, c, _) in zip(ranks, layers))
        cheapest = min(sum(r * c for r, (_, c, _) in zip(rs, layers))
                       for rs in itertools.product(range(6), repeat=3)
                       if sum(w * float(np.sum(s[r:] ** 2))
                              for r, (s, _, w) in zip(rs, layers)) <= frac * whole)
        # greedy by value per byte: optimal up to the last component taken
        assert cost <= cheapest + max(c for _, c, _ in layers)
    assert allocate_error(layers, 0.01 * whole, floor=0.02 * whole) is None


@pytest.mark.parametrize("target", [0.3, 0.1])
def test_max_error_meets_its_target(tmp_path, pair, target):
    out = tmp_path / "d.safetensors"
    r = cli("compress", BASE, TUNED, "-o", out, "--max-error", target)
    assert r.returncode == 0, r.stderr
    weighted, _ = measured_errors(out, pair)
    # met, and not by a file much bigger than needed
    assert 0.8 * target < weighted <= target
    assert f"weight-relative error {weighted:.4f}"[:-1] in r.stdout


def test_a_smaller_error_costs_a_bigger_file(tmp_path):
    sizes = []
    for target in (0.4, 0.2, 0.05):
        out = tmp_path / f"d{target}.safetensors"
        assert cli("compress", BASE, TUNED, "-o", out, "--max-error", target).returncode == 0
        sizes.append(os.path.getsize(out))
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("args, code, words", [
    (["--max-error", "0.001"], 2, "below what fp16 factors can hold"),
    (["--max-error", "1"], 2, "must be in (0, 1)"),
    (["--max-error", "0"], 2, "must be in (0, 1)"),
    (["--max-error", "0.3", "--factor-bits", "8"], 2, "plain factors only"),
    (["--max-error", "0.2", "--max-rank", "1"], 1, "cannot be met with --max-rank 1"),
])
def test_impossible_targets_are_refused(tmp_path, args, code, words):
    out = tmp_path / "d.safetensors"
    r = cli("compress", BASE, TUNED, "-o", out, *args)
    assert r.returncode == code and words in r.stderr, r.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def test_size_mode_beats_the_energy_rule_on_its_measure(tmp_path, pair):
    """At the energy file's size, --size-mb's allocation has the smaller weight-relative error:
    the energy rule's ranks are one of the allocations it chooses among."""
    energy = tmp_path / "energy.safetensors"
    assert cli("compress", BASE, TUNED, "-o", energy, "--energy", 0.3).returncode == 0
    size = tmp_path / "size.safetensors"
    mib = os.path.getsize(energy) / 2**20
    assert cli("compress", BASE, TUNED, "-o", size, "--size-mb", mib).returncode == 0
    assert os.path.getsize(size) <= os.path.getsize(energy)
    assert measured_errors(size, pair)[0] < measured_errors(energy, pair)[0]


def test_explorer_shows_the_measure_of_the_file_compress_writes(tmp_path, pair):
    from deltasvd.explorer import Explorer
    from deltasvd.ui_actions import numbers
    explorer = Explorer.from_files(BASE, TUNED)
    preview = explorer.preview("energy", 0.5)
    out = tmp_path / "d.safetensors"
    assert cli("compress", BASE, TUNED, "-o", out, "--energy", 0.5).returncode == 0
    # the page's estimate leaves out the fp16 rounding of the factors (about 4e-4)
    assert preview.weight_error == pytest.approx(measured_errors(out, pair)[0], abs=2e-3)
    assert f"weight-rel. error     {preview.weight_error:.4f}" in numbers(explorer, preview)
