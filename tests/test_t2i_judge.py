"""The subject judge of the fidelity bench (deltasvd/t2i/judge.py): the shipped file is small
fp16 and loads; it names fresh procedural drawings of every class, tells the bullseye from
plain red and white discs, and scores the DreamBooth fine-tune's subject pictures far above
the base's for the same prompts and seeds. A few seconds on one core."""

import os

import numpy as np
import pytest
import torch

from deltasvd.t2i import judge, judge_train, scenes, weights
from deltasvd.t2i.dreambooth import subject_image
from deltasvd.t2i.sampler import sample

SUBJECT_PROMPTS = ["a big sks circle at center on gray", "a sks circle at left on blue",
                   "a small sks circle at right on black"]
SEEDS = [0, 1]
STEPS = 10          # measured: the scores below hold at 10 sampling steps as at 25


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def drawing(cls, rng, **fixed):
    """A clean procedural drawing of class index cls, random attributes but those fixed."""
    attrs = dict(scenes.random_attributes(rng), **fixed)
    if judge.CLASSES[cls] == "subject":
        return subject_image(attrs, rng)
    return scenes.render(dict(attrs, shape=judge.CLASSES[cls]), rng)


def test_shipped_file_is_small_fp16_and_loads():
    from safetensors import safe_open
    assert os.path.getsize(judge.PATH) < 200 * 1024
    with safe_open(judge.PATH, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert judge.load_judge() is judge.load_judge()          # cached
    assert judge.CLASSES[judge.SUBJECT] == "subject" and len(judge.CLASSES) == 5


def test_api_shapes_and_ranges():
    rng = np.random.default_rng(5)
    images = torch.stack([drawing(c, rng) for c in range(5)])
    p = judge.subject_probability(images)
    assert p.shape == (5,) and p.dtype == torch.float32 and ((p >= 0) & (p <= 1)).all()
    assert judge.predict(images).shape == (5,)
    with pytest.raises(ValueError):
        judge.predict(images[:, :, :16])


def test_clean_drawings_of_each_class():
    rng = np.random.default_rng(2024)
    for cls in range(len(judge.CLASSES)):
        pred = judge.predict(torch.stack([drawing(cls, rng) for _ in range(20)]))
        assert (pred == cls).float().mean() >= 0.95, judge.CLASSES[cls]


def test_bullseye_is_not_a_red_or_white_disc():
    rng = np.random.default_rng(7)
    for bg in scenes.BACKGROUNDS:
        for colour in ("red", "white"):
            if scenes.COLOURS[colour] == scenes.BACKGROUNDS[bg]:
                continue
            disc = drawing(0, rng, colour=colour, background=bg)
            assert judge.subject_probability(disc[None]) < 0.1, (colour, bg)
        assert judge.subject_probability(drawing(judge.SUBJECT, rng, background=bg)[None]) > 0.9


def test_distorted_drawings_from_an_unseen_seed():
    images, classes = judge_train.drawings(300, np.random.default_rng(31337),
                                           torch.Generator().manual_seed(31337))
    classes = torch.tensor(classes)
    pred, shown = judge.predict(images), classes >= 0
    subject = classes == judge.SUBJECT
    assert (pred[shown] == classes[shown]).float().mean() > 0.8     # blobs lose some shape
    assert (pred[subject] == judge.SUBJECT).float().mean() > 0.95
    assert (pred[~subject] == judge.SUBJECT).float().mean() < 0.02


def test_finetune_subject_scores_far_above_base():
    prompts = [p for p in SUBJECT_PROMPTS for _ in SEEDS]
    seeds = SEEDS * len(SUBJECT_PROMPTS)
    score = {}
    for name, path in (("base", weights.BASE), ("tuned", weights.FINETUNE)):
        pictures = sample(*weights.load(path), prompts, seeds, steps=STEPS)
        score[name] = judge.subject_probability(pictures)
    assert score["tuned"].mean() > 0.7, score
    assert score["base"].max() < 0.2, score
