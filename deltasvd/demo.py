"""`deltasvd demo`: the main job on the project's own small text-to-image model, end to end,
judged by its pictures.

The shipped pair (deltasvd/t2i/): a 2M-parameter SD-like model and its DreamBooth fine-tune,
which bound 'sks circle' to a red-white-red bullseye. The demo compresses the fine-tune
against the base, applies the file back onto the base, samples base, full fine-tune and base +
delta on the same prompts and seeds, and writes them side by side into one PNG, with SSIM /
PSNR to the full fine-tune's pictures and the subject score (t2i/judge.py)."""

import os
import shutil
import tempfile
import time

from .api import compress_files
from .apply import apply_file
from .errors import DeltaError
from .ranks import RankRule

PROMPTS = ["a big sks circle at center on gray", "a sks circle at left on blue",
           "a big red circle at left on black", "a small blue square at right on white"]
N_SUBJECT = 2          # the first prompts are the subject's
SEEDS = [0, 1, 2, 3]
STEPS = 20
PICTURE = "deltasvd_demo.png"


def run_demo(folder=None, energy=0.5):
    """The demo in `folder` (kept), or in a temporary folder removed at the end; the picture
    goes into `folder`, or else the current folder."""
    rule = RankRule("energy", energy)         # a bad value fails before anything is written
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        raise DeltaError("--dir names a file, not a folder", folder)
    made = folder is None
    work = folder or tempfile.mkdtemp(prefix="deltasvd-demo-")
    try:
        _run(work, rule, energy, folder or os.getcwd())
    finally:
        if made:                  # a temporary demo leaves nothing behind, failed or not
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work} (keep the files with --dir FOLDER)")


class _Steps:
    """Numbered steps, each timed."""

    def __init__(self):
        self.n, self.t0 = 0, None

    def start(self, text):
        self.done()
        self.n += 1
        self.t0 = time.perf_counter()
        print(f"{self.n}. {text}", flush=True)

    def done(self):
        if self.t0 is not None:
            print(f"   ({time.perf_counter() - self.t0:.1f} s)", flush=True)
            self.t0 = None


def _run(work, rule, energy, picture_dir):
    from .t2i import weights
    try:
        os.makedirs(work, exist_ok=True)
    except OSError as e:
        raise DeltaError(f"cannot make the folder ({e.strerror})", work) from None
    base, tuned = weights.BASE, weights.FINETUNE
    out = os.path.join(work, "delta.safetensors")
    merged = os.path.join(work, "merged.safetensors")
    for path in (out, merged):
        if os.path.exists(path):
            os.remove(path)
    step = _Steps()
    print("the pair: the project's small text-to-image model (2.0M parameters, 32x32 pictures) "
          "and its DreamBooth fine-tune, which taught it 'sks circle' = a red-white bullseye")
    step.start(f"compressing the fine-tune at energy {energy} (the paper's rule)")
    _, summary = compress_files(base, tuned, out, rule)
    print(summary)
    step.start("applying the delta back onto the base")
    apply_file(base, out, merged)
    step.start(f"sampling base, full fine-tune and base + delta: {len(PROMPTS)} prompts x "
               f"{len(SEEDS)} seeds each, same seeds")
    pictures = [_sample(path) for path in (base, tuned, merged)]
    step.start("scoring against the full fine-tune's pictures")
    _report(pictures)
    png = _free_name(picture_dir)
    _write_grid(pictures, png)
    step.done()
    print("files:")
    for path in (base, tuned, out, merged):
        print(f"   {path}  ({os.path.getsize(path) / 2**20:.2f} MiB)")
    print(f"pictures: {png}\n   one row per prompt ({' | '.join(PROMPTS)}); columns: the prompt "
          f"drawn by hand, then base, full fine-tune and base + delta, seeds {SEEDS} each")
    print("load the delta with any LoRA loader (ComfyUI LoraLoader, A1111 <lora:...>), or run "
          "`deltasvd inspect` on it")


def _sample(path):
    from .t2i import weights
    from .t2i.sampler import sample
    unet, text_encoder = weights.load(path)
    prompts = [p for p in PROMPTS for _ in SEEDS]
    return sample(unet, text_encoder, prompts, SEEDS * len(PROMPTS), steps=STEPS)


def _report(pictures):
    from .image_metrics import mean_psnr, psnr, ssim
    from .t2i.grid import to_unit
    from .t2i.judge import subject_probability
    n = N_SUBJECT * len(SEEDS)
    ref = to_unit(pictures[1])
    print(f"   {'':16s} {'SSIM':>6s} {'PSNR':>8s}  subject score")
    for label, x in zip(("base", "full fine-tune", "base + delta"), pictures):
        got = to_unit(x)
        s, p = float(ssim(got, ref).mean()), mean_psnr(psnr(got, ref).tolist())
        subject = float(subject_probability(x[:n]).mean())
        print(f"   {label:16s} {s:6.3f} {p:8.2f}  {subject:.3f}")
    print("   SSIM / PSNR (dB): against the full fine-tune's pictures (1 and inf: the same "
          "pictures); subject score: how sure a small classifier is that the subject prompts' "
          "pictures show the bullseye")


def _free_name(folder):
    """PICTURE in `folder`, numbered if that name is taken: the demo never overwrites a file."""
    stem, ext = os.path.splitext(PICTURE)
    path, i = os.path.join(folder, PICTURE), 1
    while os.path.exists(path):
        path, i = os.path.join(folder, f"{stem}_{i}{ext}"), i + 1
    return path


def _write_grid(pictures, path):
    from .t2i import png
    from .t2i.grid import prompt_row, stack
    n = len(SEEDS)
    grid = stack([prompt_row(prompt, [x[j * n:(j + 1) * n] for x in pictures])
                  for j, prompt in enumerate(PROMPTS)])
    data = png.encode(grid,
                      {"Description": "rows: " + " | ".join(PROMPTS) + ". Columns: the prompt "
                       "drawn; base; full fine-tune; base + delta; seeds " + str(SEEDS)})
    try:
        with open(path, "xb") as f:       # "x": a name that appeared meanwhile is left alone
            f.write(data)
    except OSError as e:
        if not isinstance(e, FileExistsError) and os.path.exists(path):
            os.remove(path)               # no half-written picture
        raise DeltaError(f"cannot write the picture ({e.strerror})", path) from None
