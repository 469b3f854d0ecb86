"""Fidelity in pictures: what each setting's file does to the images, against the full fine-tune.

    python bench/fidelity.py [--out bench/out/fidelity] [--docs] [--steps 25] [--only NAME ...]

The pair is the project's own small text-to-image model and its DreamBooth fine-tune
(deltasvd/t2i/, shipped). For every setting the bench runs the real command line:
`deltasvd compress base tuned -o FILE <options>`, then `deltasvd apply base FILE -o MERGED`,
loads MERGED and samples it on fixed prompts and seeds (3 subject prompts, 5 of the base's
own), and scores the pictures against the full fine-tune's from the same seeds:

* SSIM and PSNR (deltasvd/image_metrics.py; SSIM as scikit-image computes it), all pictures,
  and SSIM on the subject prompts and the other prompts apart;
* subject: the mean probability that a subject-prompt picture shows the fine-tune's subject,
  by a small classifier trained on drawings (deltasvd/t2i/judge.py); the full fine-tune's own
  pictures give its ceiling, the base's the floor;
* two weight-level errors, from MERGED's weights: the relative error of the delta and the
  weight-relative error (deltasvd/measures.py).

Rows: the paper's energy rule at its Table 1 thresholds; --size-mb at the same sizes, with
today's weight-relative allocation and with the plain Frobenius one it replaced (the library's
RankRule(objective="fro"), written by the same writer; not a command line option); fixed
ranks, and --size-mb at their sizes; --max-error; int8 factors; Delta-DCT at 1-4 bits; and a
1-bit sign baseline (sign(dW) times mean |dW| per matrix, BitDelta's initialisation; not a
deltasvd codec, built here: its size is 1 bit per matrix value + one fp16 scale per matrix + the
1-D deltas in fp32).
The base model and the full fine-tune are the floor and the ceiling.

Writes table.md, rows.json and, with --docs, docs/fidelity_rd.png (image-space rate-distortion)
and docs/fidelity_grid.png (base / full fine-tune / settings, same seeds). One thread: the
pictures are then the same on every run. About 13 minutes on one core.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from deltasvd.image_metrics import mean_psnr, psnr, ssim  # noqa: E402
from deltasvd.measures import layer_weight  # noqa: E402
from deltasvd.t2i import weights  # noqa: E402
from deltasvd.t2i.grid import to_unit  # noqa: E402
from deltasvd.t2i.sampler import sample  # noqa: E402

SUBJECT_PROMPTS = ["a big sks circle at center on gray", "a sks circle at left on blue",
                   "a small sks circle at right on black"]
OTHER_PROMPTS = ["a big red circle at left on black", "a small blue square at right on white",
                 "a big yellow triangle at center on blue", "a big green cross at top on gray",
                 "a small purple circle at bottom on green"]
SEEDS = [0, 1, 2, 3]
ENERGIES = (0.06, 0.2, 0.5, 0.8)


def settings():
    """(name, curve, how): how is a CLI option list, ("size", row, objective) for a size row
    at the size of another row's file, or "sign" / "base" / "full"."""
    rows = [("base model", "floor", "base"), ("full fine-tune", "ceiling", "full")]
    rows += [(f"energy {t}", "energy rule", ["--energy", t]) for t in ENERGIES]
    rows += [(f"size-mb = energy {t}'s", "--size-mb (weight-relative)", ("size", f"energy {t}", "weight"))
             for t in ENERGIES]
    rows += [(f"size-mb = energy {t}'s, Frobenius", "--size-mb (Frobenius, before)",
              ("size", f"energy {t}", "fro")) for t in ENERGIES]
    rows += [(f"rank {r}", "fixed rank", ["--rank", r]) for r in (2, 8, 32)]
    rows += [(f"size-mb = rank {r}'s", "--size-mb (weight-relative)",
              ("size", f"rank {r}", "weight")) for r in (2, 8)]
    rows += [(f"max-error {e}", "--max-error", ["--max-error", e]) for e in (0.4, 0.2, 0.1)]
    rows += [(f"energy {t} int8", "int8 factors", ["--energy", t, "--factor-bits", 8])
             for t in ENERGIES]
    rows += [(f"dct {b} bits", "Delta-DCT", ["--codec", "dct", "--bits", b]) for b in (1, 2, 3, 4)]
    rows += [("sign 1 bit", "1-bit sign (baseline)", "sign")]
    return rows


def prompts_and_seeds(quick=False):
    subj, other = (SUBJECT_PROMPTS[:1], OTHER_PROMPTS[:1]) if quick else (SUBJECT_PROMPTS,
                                                                          OTHER_PROMPTS)
    seeds = SEEDS[:2] if quick else SEEDS
    prompts = [p for p in subj + other for _ in seeds]
    return prompts, seeds * (len(subj) + len(other)), len(subj) * len(seeds)


def cli(*args):
    """The command line, as a user runs it; a failure stops the bench with its message."""
    r = subprocess.run([sys.executable, "-m", "deltasvd", *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"deltasvd {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stdout


def pictures(path, prompts, seeds, steps):
    """(N, H, W, 3) in [0, 1] from a checkpoint file, and the (N, 3, H, W) [-1, 1] originals."""
    unet, text_encoder = weights.load(path)
    x = sample(unet, text_encoder, prompts, seeds, steps=steps)
    return to_unit(x), x


def weight_errors(base, tuned, merged):
    """(relative error, weight-relative error) of MERGED's change against the full one."""
    from safetensors.torch import load_file
    b, t, m = load_file(base), load_file(tuned), load_file(merged)
    num = den = num_w = den_w = 0.0
    for key in t:
        d = t[key].double() - b[key].double()
        n2 = float(d.pow(2).sum())
        if not n2:
            continue
        e2 = float((m[key].double() - t[key].double()).pow(2).sum())
        # weight-relative: matrices only (1-D changes are stored exactly, measures.py)
        w = layer_weight(float(b[key].double().pow(2).sum()), n2) if d.ndim >= 2 else 0.0
        num, den, num_w, den_w = num + e2, den + n2, num_w + w * e2, den_w + w * n2
    return (num / den) ** 0.5, (num_w / den_w) ** 0.5


def stored_values(path):
    from deltasvd.safetensors_io import read_header
    header, _, _ = read_header(path)
    return sum(int(np.prod(v["shape"])) for v in header.values())


def sign_baseline(base, tuned, out):
    """A merged checkpoint of the 1-bit sign baseline, and its would-be file size in bytes."""
    from safetensors.torch import load_file, save_file
    b, t = load_file(base), load_file(tuned)
    merged, size, values = {}, 0, 0
    for key, bv in b.items():
        d = t[key].float() - bv.float()
        if d.ndim >= 2:
            d = torch.sign(d) * d.abs().mean()
            size += (d.numel() + 7) // 8 + 2
        else:
            size += 4 * d.numel()
        values += d.numel()
        merged[key] = (bv.float() + d).to(bv.dtype)
    save_file(merged, out)
    return size, values


def build(name, how, work, files):
    """The checkpoint to sample for one setting, and its delta file's (bytes, stored values)."""
    base, tuned = weights.BASE, weights.FINETUNE
    if how == "base":
        return base, 0, 0
    if how == "full":
        return tuned, os.path.getsize(tuned), stored_values(tuned)
    merged = os.path.join(work, "merged.safetensors")
    if os.path.exists(merged):
        os.remove(merged)
    if how == "sign":
        size, values = sign_baseline(base, tuned, merged)
        return merged, size, values
    delta = os.path.join(work, "delta.safetensors")
    if os.path.exists(delta):
        os.remove(delta)
    if isinstance(how, tuple):
        _, source, objective = how
        mib = files[source] / 2**20
        if objective == "weight":
            cli("compress", base, tuned, "-o", delta, "--size-mb", f"{mib:.6f}")
        else:   # the allocation --size-mb used before, through the same writer
            from deltasvd.api import compress_files
            from deltasvd.ranks import RankRule
            compress_files(base, tuned, delta, RankRule("size_mb", mib, objective="fro"))
    else:
        cli("compress", base, tuned, "-o", delta, *how)
    cli("apply", base, delta, "-o", merged)
    files[name] = os.path.getsize(delta)
    return merged, os.path.getsize(delta), stored_values(delta)


def score(got, ref, n_subject):
    s, p = ssim(got, ref), psnr(got, ref)
    return {"ssim": float(s.mean()), "ssim_subject": float(s[:n_subject].mean()),
            "ssim_other": float(s[n_subject:].mean()), "psnr": mean_psnr(p.tolist())}


def add_subject(rows, images, n_subject):
    """The subject score of each row, from its subject prompts' pictures (kept, so a retrained
    judge can score them again: --rescore)."""
    from deltasvd.t2i import judge
    if not os.path.exists(judge.PATH):
        print(f"no subject scores: {judge.PATH} is missing (tools/train_t2i.py judge)")
        return
    for r in rows:
        x = images[r["setting"]][:n_subject].permute(0, 3, 1, 2) * 2 - 1
        r["subject"] = float(judge.subject_probability(x.float()).mean())


def run(names=None, steps=25, quick=False, log=print, keep=None):
    """Score every setting (or those named). Returns the rows, and the pictures per setting."""
    torch.set_num_threads(1)
    prompts, seeds, n_subject = prompts_and_seeds(quick)
    ref, _ = pictures(weights.FINETUNE, prompts, seeds, steps)
    work = tempfile.mkdtemp(prefix="deltasvd-fidelity-")
    rows, images, files = [], {}, {}
    try:
        options = {name: how for name, _, how in settings()}
        for name, curve, how in settings():
            if names and name not in names:
                continue
            needs = how[1] if isinstance(how, tuple) else None
            if needs and needs not in files:       # a size row needs its source file's size
                build(needs, options[needs], work, files)
            start = time.perf_counter()
            path, size, values = build(name, how, work, files)
            got, _ = pictures(path, prompts, seeds, steps)
            rel, wrel = weight_errors(weights.BASE, weights.FINETUNE, path)
            row = {"setting": name, "curve": curve, "mib": size / 2**20,
                   "params_m": values / 1e6, "rel_error": rel, "weight_rel_error": wrel,
                   **score(got, ref, n_subject), "subject": float("nan"),
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            images[name] = got
            if keep and how not in ("base", "full"):
                shutil.copy(path, os.path.join(keep, name.replace(" ", "_") + ".safetensors"))
            log(f"{name:34s} {row['mib']:7.3f} MiB  SSIM {row['ssim']:.4f}  PSNR "
                f"{row['psnr']:6.2f}  rel.err {rel:.4f}  "
                f"w.rel.err {wrel:.4f}  ({row['seconds']:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_subject(rows, images, n_subject)
    return rows, images, n_subject


def table(rows):
    """Markdown, in the shape of the paper's Table 1 (parameters, size, scores)."""
    head = ("| setting | params (M) | MiB | SSIM | SSIM subject | SSIM other | PSNR (dB) | "
            "subject | rel. error | weight-rel. error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['params_m']:.3f} | {r['mib']:.3f} | {r['ssim']:.4f} "
                     f"| {r['ssim_subject']:.4f} | {r['ssim_other']:.4f} | {r['psnr']:.2f} | "
                     f"{r['subject']:.3f} | {r['rel_error']:.4f} | {r['weight_rel_error']:.4f} |")
    return "\n".join(lines)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def tracking(rows):
    """How well each weight-level error orders the settings as SSIM does (Spearman, over the
    compressed rows): the measure --max-error and --size-mb use should be the better one."""
    rs = [r for r in rows if r["curve"] not in ("floor", "ceiling")]
    ssims = [-r["ssim"] for r in rs]
    return {m: spearman([r[m] for r in rs], ssims) for m in ("rel_error", "weight_rel_error")}


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    curves = [c for c in dict.fromkeys(r["curve"] for r in rows) if c not in ("floor", "ceiling")]
    floor = next((r for r in rows if r["curve"] == "floor"), None)
    for ax, key, title in ((axes[0], "ssim", "SSIM to the full fine-tune's pictures"),
                           (axes[1], "subject", "subject score (classifier)")):
        for c in curves:
            pts = sorted((r["mib"], r[key]) for r in rows if r["curve"] == c)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", label=c, ms=4)
        if floor:
            ax.axhline(floor[key], color="gray", ls=":", label="base model (no delta)")
        top = next((r for r in rows if r["curve"] == "ceiling"), None)
        if top and key == "subject":
            ax.axhline(top[key], color="black", ls="--", label="full fine-tune")
        ax.set_xscale("log")
        ticks = [0.2, 0.3, 0.5, 1, 2, 3]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("file size (MiB)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


GRID_COLUMNS = ("base model", "full fine-tune", "energy 0.06", "energy 0.2", "energy 0.5",
                "size-mb = energy 0.2's", "size-mb = energy 0.2's, Frobenius", "rank 8",
                "dct 2 bits", "sign 1 bit")


def grid(images, path, n_pictures=8, per_prompt=4):
    """Rows: the first seed's picture of each prompt; columns: GRID_COLUMNS, same seeds."""
    from deltasvd.t2i import png
    from deltasvd.t2i.grid import row, stack
    cols = [c for c in GRID_COLUMNS if c in images]
    picks = list(range(0, len(next(iter(images.values()))), per_prompt))[:n_pictures]
    strips = []
    for i in picks:
        tiles = []
        for c in cols:
            tiles.append((images[c][i].numpy() * 255).round().astype(np.uint8))
            if c == "full fine-tune":
                tiles.append(None)
        strips.append(row(tiles))
    png.write(path, stack(strips), {"Description": "columns: " + " | ".join(cols)})
    return cols


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "fidelity"))
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--only", nargs="*", help="setting names (see rows.json) to run")
    p.add_argument("--quick", action="store_true", help="2 prompts x 2 seeds")
    p.add_argument("--rescore", action="store_true",
                   help="score the pictures of the last run again (pictures.pt), no sampling")
    p.add_argument("--docs", action="store_true",
                   help="also write docs/fidelity_rd.png and docs/fidelity_grid.png")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    saved = os.path.join(a.out, "pictures.pt")
    if a.rescore:
        last = torch.load(saved)
        rows, images, n_subject = last["rows"], last["images"], last["n_subject"]
        add_subject(rows, images, n_subject)
    else:
        rows, images, n_subject = run(a.only, a.steps, a.quick)
    torch.save({"rows": rows, "images": images, "n_subject": n_subject}, saved)
    text = table(rows)
    corr = tracking(rows) if len(rows) > 3 else {}
    text += "\n\nSpearman correlation with SSIM over the compressed rows: " + ", ".join(
        f"{k} {v:.3f}" for k, v in corr.items())
    print("\n" + text)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "rows.json"), "w") as f:
        json.dump({"rows": rows, "tracking": corr, "steps": a.steps}, f, indent=1)
    if a.docs:
        plot(rows, os.path.join(ROOT, "docs", "fidelity_rd.png"))
        cols = grid(images, os.path.join(ROOT, "docs", "fidelity_grid.png"))
        print("grid columns: " + " | ".join(cols))


if __name__ == "__main__":
    main()
