"""Fused tensors: is a Flux fused weight (double blocks' `img_attn.qkv`, single blocks' `linear1`
= q, k, v and the MLP input) smaller compressed as stored, or split into its row blocks?

    python bench/fused_split.py [--pair BASE TUNED] [--blocks N]

For each fused tensor and each target relative error e, the bytes (fp16 factors) the best
truncation needs: fused, one SVD of the whole delta; split, one SVD per row block with ranks
allocated over the blocks greedily by s^2 / (rows + cols) (the Frobenius-optimal allocation).
Two kinds of delta, at Flux's real shapes:
* `pair`: the deltas of a real pair's fused tensors, if given (e.g. the full Flux.1-dev fixture
  pair of bench/family_bench.py: one low-rank update across all fused rows);
* `independent`: q, k, v (and MLP) blocks each given their own low-rank update, as separate
  LoRA-style adapters on q / k / v would move them (a power-law spectrum per block).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ERRORS = (0.5, 0.3, 0.2, 0.1)
HIDDEN = 3072
SHAPES = {"img_attn.qkv": [HIDDEN] * 3, "linear1": [HIDDEN] * 3 + [4 * HIDDEN]}


def bytes_for(svals, rows, cols, err):
    """Fewest fp16 factor bytes whose truncation of blocks (svals[j], rows[j]) reaches
    relative error `err`: components taken greedily by s^2 per byte."""
    total2 = sum(float((s.double() ** 2).sum()) for s in svals)
    items = sorted(((float(v) ** 2 / (r + cols), float(v) ** 2, r + cols)
                    for s, r in zip(svals, rows) for v in s), reverse=True)
    left2, spent = total2, 0
    for _, gain, cost in items:
        if left2 <= err * err * total2:
            break
        left2 -= gain
        spent += 2 * cost
    return spent


def independent_delta(rows, g, rank=48):
    blocks = []
    for r in rows:
        s = torch.arange(1, rank + 1, dtype=torch.float32) ** -1.0
        u = torch.linalg.qr(torch.randn(r, rank, generator=g))[0]
        v = torch.linalg.qr(torch.randn(HIDDEN, rank, generator=g))[0]
        blocks.append((u * s) @ v.T + 1e-3 * torch.randn(r, HIDDEN, generator=g) / HIDDEN ** .5)
    return torch.cat(blocks)


def compare(name, delta, rows):
    fused = [torch.linalg.svdvals(delta)]
    split = [torch.linalg.svdvals(b) for b in torch.split(delta, rows)]
    out = []
    for e in ERRORS:
        f = bytes_for(fused, [delta.shape[0]], delta.shape[1], e)
        s = bytes_for(split, rows, delta.shape[1], e)
        out.append(f"| {name} | {e} | {f / 2**20:.2f} | {s / 2**20:.2f} | {s / max(f, 1):.2f} |")
    return out


def pair_deltas(base, tuned, blocks):
    from deltasvd.checkpoint import Checkpoint
    b, t = Checkpoint(base), Checkpoint(tuned)
    for key in b.keys():
        for kind, rows in SHAPES.items():
            if key.endswith(f"{kind}.weight") and \
                    int(key.split("blocks.")[1].split(".")[0]) < blocks:
                yield key, (t.get(key).float() - b.get(key).float()), rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", nargs=2, metavar=("BASE", "TUNED"))
    p.add_argument("--blocks", type=int, default=1, help="pair: the first N blocks of each kind")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = ["| tensor | rel. error | fused MiB | split MiB | split / fused |",
             "|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for kind, rows in SHAPES.items():
        lines += compare(f"independent {kind}", independent_delta(rows, g), rows)
    if args.pair:
        for key, delta, rows in pair_deltas(*args.pair, args.blocks):
            lines += compare(f"pair {key.split('diffusion_model.')[-1]}", delta, rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
