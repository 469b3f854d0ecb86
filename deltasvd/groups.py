"""Layer groups in the layout of the paper's Table 2, and the per-group summary table."""

import math
import re
from collections import OrderedDict

import numpy as np

from .delta_file import FACTORED_KINDS

UNET = "model.diffusion_model."
GROUP_ORDER = ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "down_blocks.2",
               "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2",
               "up_blocks.3", "conv_out", "text_encoder", "text_encoder_1", "text_encoder_2",
               "vae", "other"]


def group_of(key):
    """Table-2 group of a checkpoint key (diffusers block names, as the paper uses)."""
    if key.startswith(UNET):
        rest = key[len(UNET):]
        m = re.match(r"input_blocks\.(\d+)\.", rest)
        if m:
            n = int(m.group(1))
            return "conv_in" if n == 0 else f"down_blocks.{(n - 1) // 3}"
        m = re.match(r"output_blocks\.(\d+)\.", rest)
        if m:
            return f"up_blocks.{int(m.group(1)) // 3}"
        if rest.startswith("middle_block."):
            return "mid_block"
        if rest.startswith("out."):
            return "conv_out"
        if rest.startswith(("time_embed.", "label_emb.")):
            return "time_embedding"
        return "other"
    if key.startswith("cond_stage_model."):
        return "text_encoder"
    if key.startswith("conditioner.embedders.0."):
        return "text_encoder_1"
    if key.startswith("conditioner.embedders.1."):
        return "text_encoder_2"
    if key.startswith("first_stage_model."):
        return "vae"
    return "other"


def group_rows(records, nbytes_of):
    """Aggregate records per group: layers, rank stats, bytes, relative error."""
    acc = OrderedDict((g, None) for g in GROUP_ORDER)
    for rec in records:
        g = group_of(rec.key)
        row = acc[g] or {"group": g, "pieces": 0, "ranks": [], "dense": 0, "exact": 0,
                         "bytes": 0, "err2": 0.0, "norm2": 0.0}
        row["pieces"] += 1
        if rec.kind in FACTORED_KINDS and rec.n:
            row["ranks"].append(rec.rank)
        row["dense"] += rec.kind == "dense"
        row["exact"] += rec.kind == "exact"
        row["bytes"] += nbytes_of(rec)
        row["err2"] += rec.err2
        row["norm2"] += rec.norm2
        acc[g] = row
    return [r for r in acc.values() if r is not None]


def rel_error(err2, norm2):
    return math.sqrt(err2 / norm2) if norm2 > 0 else 0.0


def format_table(rows, total_bytes=None, reference_bytes=None):
    """Plain-text table: group, layers, rank min/median/max, dense, MB, relative error."""
    head = f"{'group':<16}{'layers':>7}{'rank min':>9}{'median':>8}{'max':>6}{'dense':>6}" \
           f"{'MB':>9}{'rel.err':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ranks = r["ranks"]
        rmin, rmed, rmax = ((min(ranks), int(np.median(ranks)), max(ranks)) if ranks
                            else ("-", "-", "-"))
        lines.append(f"{r['group']:<16}{r['pieces']:>7}{rmin:>9}{rmed:>8}{rmax:>6}"
                     f"{r['dense']:>6}{r['bytes'] / 2**20:>9.2f}"
                     f"{rel_error(r['err2'], r['norm2']):>9.4f}")
    err2 = sum(r["err2"] for r in rows)
    norm2 = sum(r["norm2"] for r in rows)
    lines.append("-" * len(head))
    size = total_bytes if total_bytes is not None else sum(r["bytes"] for r in rows)
    total = (f"{'total':<16}{sum(r['pieces'] for r in rows):>7}{'':>29}"
             f"{size / 2**20:>9.2f}{rel_error(err2, norm2):>9.4f}")
    lines.append(total)
    if reference_bytes:
        lines.append(f"compression ratio {reference_bytes / max(size, 1):.1f}x against "
                     f"{reference_bytes / 2**20:.1f} MB of tuned weights")
    return "\n".join(lines)
