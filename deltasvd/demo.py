"""`deltasvd demo`: the main job on a built-in small pair, end to end."""

import os
import shutil
import tempfile
import time

from .api import compress_files
from .apply import apply_file
from .errors import DeltaError
from .fixtures import make_pair
from .ranks import RankRule
from .safetensors_io import SafeTensorsFile


def run_demo(folder=None, energy=0.5):
    """The demo in `folder` (kept), or in a temporary folder removed at the end."""
    rule = RankRule("energy", energy)         # a bad value fails before anything is written
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        raise DeltaError("--dir names a file, not a folder", folder)
    made = folder is None
    folder = folder or tempfile.mkdtemp(prefix="deltasvd-demo-")
    try:
        _run(folder, rule, energy)
    finally:
        if made:                  # a temporary demo leaves nothing behind, failed or not
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed {folder} (keep the files with --dir FOLDER)")


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


def _run(folder, rule, energy):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DeltaError(f"cannot make the folder ({e.strerror})", folder) from None
    step = _Steps()
    step.start(f"making a small SD1.5-layout pair (fp32 base, fp16 fine-tune) in {folder}")
    base, tuned = make_pair(folder, family="sd15", scale="small", seed=0)
    out = os.path.join(folder, "delta.safetensors")
    merged = os.path.join(folder, "merged.safetensors")
    for path in (out, merged):
        if os.path.exists(path):
            os.remove(path)
    step.start(f"compressing at energy {energy} (the paper's rule)")
    _, summary = compress_files(base, tuned, out, rule)
    print(summary)
    step.start("applying the delta back onto the base")
    apply_file(base, out, merged)
    step.start("measuring the merged model against the fine-tune")
    err = _merged_error(base, tuned, merged)
    print(f"   relative error of the fine-tuning delta: {err:.4f}")
    step.done()
    print("files:")
    for path in (base, tuned, out, merged):
        print(f"   {path}  ({os.path.getsize(path) / 2**20:.1f} MiB)")
    print("load the delta with any LoRA loader (ComfyUI LoraLoader, A1111 <lora:...>), or run "
          "`deltasvd inspect` on it")


def _merged_error(base, tuned, merged):
    """||merged - tuned|| / ||tuned - base|| over all tensors, the dtype-aware way."""
    num = den = 0.0
    with SafeTensorsFile(base) as b, SafeTensorsFile(tuned) as t, SafeTensorsFile(merged) as m:
        for key in t.keys():
            tv = t.get(key).double()
            if not t.dtype(key).is_floating_point:
                continue
            bv = b.get(key).to(t.dtype(key)).double()
            mv = m.get(key).to(t.dtype(key)).double()
            num += float((mv - tv).pow(2).sum())
            den += float((tv - bv).pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0
