"""Plain baseline for the benchmark: a full float32 SVD per layer, nothing clever.

    python bench/baseline_fullsvd.py BASE TUNED -o OUT [--energy 0.5 | --rank R [--lowrank-iters N]]

* both checkpoints are loaded whole into memory (`safetensors.torch.load_file`);
* every UNet / text-encoder matrix (Linear, Conv reshaped out x in*kh*kw) that differs between
  them: dW = tuned - base in float32, `torch.linalg.svd(dW, full_matrices=False)` (economy),
  rank by the paper's energy rule on those float32 values (smallest t with
  sum(s[:t]) / sum(s) >= T, at least 1), A = U_t S_t and B = V_t^T stored fp16;
* OpenCLIP's fused `in_proj_weight` is split into q, k, v rows (as ComfyUI and A1111 name them);
* `--lowrank-iters N` (with `--rank`): `torch.svd_lowrank(dW, q=R, niter=N)` instead, the
  randomized fixed-rank route of KJNodes' LoRA extractor (its standard mode, lowrank_iters 7);
* kohya LoRA names (`deltasvd.families`, the names ComfyUI and A1111 both load), alpha = rank;
  SDXL's `text_projection` goes under ComfyUI's `lora_te2_text_projection` (transposed, as
  ComfyUI holds it); a changed matrix with no LoRA name is skipped and counted;
* 1-D tensors (biases, norms) are not stored: this baseline is about the matrix layers.

No dense fallback, no precision ladder, no streaming: the point is the cost of the obvious way.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deltasvd import families  # noqa: E402

PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.")
TEXT_PROJECTION = {"conditioner.embedders.1.model.text_projection": "lora_te2_text_projection"}


def family_of(sd):
    """'sd1', 'sd2' or 'sdxl' from the keys and the cross-attention width."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        return "sdxl"
    for k, v in sd.items():
        if k.endswith("attn2.to_k.weight") and k.startswith("model.diffusion_model."):
            return "sd2" if v.shape[1] == 1024 else "sd1"
    return "sd1"


def energy_rank(s, target):
    s = s.astype(np.float64)
    total = s.sum()
    if total <= 0:
        return 1
    if target >= 1.0:
        return s.size
    hit = np.nonzero(np.cumsum(s) / total >= target)[0]
    return max(1, int(hit[0]) + 1 if hit.size else s.size)


def factor(m, args):
    """(A, B) of the float32 matrix m under the rule, by economy SVD."""
    if args.lowrank_iters is not None:
        u, s, v = torch.svd_lowrank(m, q=min(args.rank, *m.shape), niter=args.lowrank_iters)
        return (u * s).contiguous(), v.T.contiguous()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if args.rank:
        t = min(args.rank, s.numel())
    else:
        t = energy_rank(s.numpy(), args.energy)
    return (u[:, :t] * s[:t]).contiguous(), vh[:t].contiguous()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("-o", "--out", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--energy", type=float, default=0.5)
    g.add_argument("--rank", type=int, default=None)
    p.add_argument("--lowrank-iters", type=int, default=None,
                   help="with --rank: torch.svd_lowrank with this many power iterations")
    args = p.parse_args(argv)
    if args.lowrank_iters is not None and not args.rank:
        p.error("--lowrank-iters needs --rank")

    t0 = time.perf_counter()
    base = load_file(args.base)
    tuned = load_file(args.tuned)
    family = family_of(base)
    t_load = time.perf_counter() - t0

    out, ranks, skipped, layers = {}, {}, [], 0
    for key in sorted(base):
        b = base[key]
        if not key.startswith(PREFIXES) or not b.is_floating_point() or b.ndim < 2:
            continue
        t = tuned.get(key)
        if t is None or torch.equal(b, t):
            continue
        delta = (t.float() - b.float()).reshape(b.shape[0], -1)
        if key in TEXT_PROJECTION:
            pieces = [(TEXT_PROJECTION[key], delta.T.contiguous(), None)]
        else:
            tg = families.family(family).targets(key, tuple(b.shape), base)
            if not tg:
                skipped.append(key)
                continue
            pieces = [(x.module, delta[x.rows[0]: x.rows[1]] if x.rows else delta, x.rows)
                      for x in tg if x.param == "weight"]
        for name, m, rows in pieces:
            a, bb = factor(m, args)
            r = a.shape[1]
            if b.ndim == 4 and rows is None:
                a = a.reshape(a.shape[0], r, 1, 1)
                bb = bb.reshape(r, *b.shape[1:])
            out[name + ".lora_up.weight"] = a.half()
            out[name + ".lora_down.weight"] = bb.half()
            out[name + ".alpha"] = torch.tensor(float(r))
            ranks[name] = r
            layers += 1
    del base, tuned
    meta = {"baseline": ("torch.svd_lowrank per layer" if args.lowrank_iters is not None
                         else "full float32 economy SVD per layer"),
            "rule": f"rank={args.rank}" if args.rank else f"energy={args.energy}",
            "skipped_no_lora_name": json.dumps(skipped)}
    tmp = args.out + ".tmp"
    save_file(out, tmp, metadata=meta)
    os.replace(tmp, args.out)
    print(f"baseline: {layers} layers, load {t_load:.1f}s, total {time.perf_counter() - t0:.1f}s, "
          f"{os.path.getsize(args.out) / 2**20:.1f} MB, skipped (no LoRA name): {len(skipped)}")


if __name__ == "__main__":
    main()
