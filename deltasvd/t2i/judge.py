"""The subject score of the fidelity bench (issue 14): does a picture show the fine-tune's
subject, the red-white-red bullseye that 'sks circle' was bound to?

SSIM / PSNR say how close base + compressed delta's pictures are to the full fine-tune's;
they do not say whether the subject survived. A tiny CNN judge does: it tells the 4 procedural
shapes and the subject apart (5 classes), and the subject score of a picture is its softmax
probability of the subject class. It is trained from scratch on procedural drawings made
blobby and noisy like the model's samples (`judge_train`), never on the model's own samples,
so it judges the fine-tune and any delta by the same yardstick. Host-free: torch only, the
weights ship in `weights/t2i_judge.safetensors` (52k parameters, fp16, 105 KB).

The shape classes are there to give the subject something to be told apart from; on the
model's own samples they mean little (the model draws every shape as a blob), the subject
score is the number to read."""

import functools
import os

import torch
from torch import nn

from .weights import HERE

PATH = os.path.join(HERE, "t2i_judge.safetensors")
CLASSES = ("circle", "square", "triangle", "cross", "subject")
SUBJECT = CLASSES.index("subject")
# (output width, stride) of each 3x3 conv; the last ones see ~29 px, the whole bullseye
LAYERS = ((16, 1), (24, 2), (32, 1), (40, 2), (40, 1), (40, 1))


class Judge(nn.Module):
    """3x3 conv + BatchNorm + ReLU stack, then global average and max pooling, then a linear
    layer: max pooling finds a small subject anywhere, average pooling weighs a big one."""

    def __init__(self, layers=LAYERS):
        super().__init__()
        blocks, cin = [], 3
        for cout, stride in layers:
            blocks += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * cin, len(CLASSES))

    def forward(self, images):
        """Logits (N, 5) of pictures (N, 3, 32, 32) in [-1, 1]."""
        h = self.features(images)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))


def save(path, judge, info=""):
    from safetensors.torch import save_file
    state = {k: v.detach().half().contiguous() for k, v in judge.state_dict().items()
             if not k.endswith("num_batches_tracked")}      # a counter, not a weight
    tmp = path + ".tmp"
    save_file(state, tmp, metadata={"t2i.judge": info})
    os.replace(tmp, path)      # a half-written file never takes the real name


@functools.lru_cache(maxsize=None)
def load_judge(path=PATH):
    """The shipped judge in float32, eval mode; loaded once per path (cached)."""
    from safetensors.torch import load_file
    judge = Judge()
    missing, unexpected = judge.load_state_dict(
        {k: v.float() for k, v in load_file(path).items()}, strict=False)
    # BatchNorm's step counters are not shipped (save drops them); anything else must match
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"{path}: not a judge file (missing {missing}, unexpected {unexpected})")
    return judge.eval().requires_grad_(False)


def _checked(images):
    if images.dim() != 4 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"pictures (N, 3, 32, 32) in [-1, 1] expected, got {tuple(images.shape)}")
    return images.float()


@torch.no_grad()
def probabilities(images, judge=None):
    """Class probabilities (N, 5), in the order of CLASSES."""
    return (judge or load_judge())(_checked(images)).softmax(dim=1)


def subject_probability(images, judge=None):
    """Probability (N,) that each picture shows the fine-tune's subject (the bullseye)."""
    return probabilities(images, judge)[:, SUBJECT]


def predict(images, judge=None):
    """Class indices (N,) into CLASSES."""
    return probabilities(images, judge).argmax(dim=1)
