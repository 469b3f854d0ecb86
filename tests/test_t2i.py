"""The project's own small text-to-image model (deltasvd/t2i): the shipped base and DreamBooth
fine-tune load, sample deterministically, render their prompts, differ where the fine-tune
taught something and agree elsewhere; and deltasvd compress + apply on the pair gives weights
that load and sample. A few seconds on one core."""

import os
import subprocess
import sys

import pytest
import torch

from deltasvd.t2i import tokenizer, weights
from deltasvd.t2i.sampler import sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
SUBJECT = "a big sks circle at center on gray"
RED = "a big red circle at center on black"


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)        # the sampler's numbers do not depend on the thread count
    return weights.load(weights.BASE), weights.load(weights.FINETUNE)


def draw(model, prompts, seeds=None):
    return sample(*model, prompts, seeds or list(range(len(prompts))), steps=STEPS)


def test_shipped_files_pair_up():
    from safetensors import safe_open
    shapes = []
    for path in (weights.BASE, weights.FINETUNE):
        assert os.path.getsize(path) < 8 * 2 ** 20
        with safe_open(path, "pt") as f:
            shapes.append({k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype())
                           for k in f.keys()})
    assert shapes[0] == shapes[1]
    assert {d for _, d in shapes[0].values()} == {"F16"}
    assert all(k.startswith((weights.UNET_PREFIX, weights.TEXT_PREFIX)) for k in shapes[0])


def test_tokenizer_binds_subject_to_reserved_row():
    assert tokenizer.encode("sks")[0] == tokenizer.VOCAB.index("<reserved0>")
    with pytest.raises(ValueError):
        tokenizer.encode("a red dog")


def test_sampling_is_reproducible_and_in_range(models):
    prompts = [RED, "a small blue square at right on white"]
    a, b = draw(models[0], prompts), draw(models[0], prompts)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and torch.isfinite(a).all()
    # a picture depends on its own seed only, not on what else is in the batch
    assert torch.allclose(draw(models[0], prompts[:1]), a[:1], atol=1e-3)


def test_base_renders_colour_and_place(models):
    img = draw(models[0], [RED, "a big blue square at left on white"], [0, 1])
    red_centre = img[0, :, 12:20, 12:20].mean((1, 2))
    assert red_centre[0] > red_centre[1] + 0.5 and red_centre[0] > red_centre[2] + 0.5
    assert img[0, :, :3, :3].mean() < -0.5          # black background
    blue = img[1, 2] - img[1, 0]                      # blue where the square is, white elsewhere
    # position is the weakest attribute the base learned: only a tendency
    assert blue[:, :16].mean() > blue[:, 16:].mean() + 0.1


def test_finetune_learns_subject_and_keeps_the_rest(models):
    base, tuned = models
    seeds = [0, 1]
    subject = (draw(base, [SUBJECT] * 2, seeds) - draw(tuned, [SUBJECT] * 2, seeds)).abs().mean()
    kept = (draw(base, [RED] * 2, seeds) - draw(tuned, [RED] * 2, seeds)).abs().mean()
    # DreamBooth drifts the rest a little (measured: 0.26 against 0.105)
    assert subject > 0.2 and kept < 0.15 and subject > 2 * kept


def test_compress_and_apply_give_a_model_that_samples(models, tmp_path):
    delta, merged = tmp_path / "d.safetensors", tmp_path / "merged.safetensors"
    run = lambda *args: subprocess.run([sys.executable, "-m", "deltasvd", *map(str, args)],
                                       cwd=REPO, capture_output=True, text=True, check=True)
    run("compress", weights.BASE, weights.FINETUNE, "-o", delta, "--energy", "0.5")
    assert "(generic)" in run("inspect", delta).stdout
    run("apply", weights.BASE, delta, "-o", merged)
    model = weights.load(merged)
    img = draw(model, [SUBJECT, RED])
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    base, tuned = draw(models[0], [SUBJECT, RED]), draw(models[1], [SUBJECT, RED])
    # the compressed delta moves the subject picture towards the fine-tune's
    assert (img[0] - tuned[0]).abs().mean() < (img[0] - base[0]).abs().mean()
