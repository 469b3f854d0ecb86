"""Layer groups in the layout of the paper's Table 2 (each family names its own, families/),
and the per-group summary table."""

import math
from collections import OrderedDict

import numpy as np

from . import families
from .delta_file import FACTORED_KINDS


def group_of(key, family):
    """Summary group of a checkpoint key in `family` (a name, as in a delta file)."""
    return families.family(family).group_of(key)


def group_rows(records, nbytes_of, family):
    """Aggregate records per group: layers, rank stats, bytes, relative error."""
    fam = families.family(family)
    acc = OrderedDict((g, None) for g in fam.group_order)
    for rec in records:
        g = fam.group_of(rec.key)
        row = acc.get(g) or {"group": g, "pieces": 0, "ranks": [], "dense": 0, "exact": 0,
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


def format_table(rows, total_bytes=None, reference_bytes=None, reference="the tuned weights"):
    """Plain-text table: group, pieces, rank min/median/max, dense, MiB, relative error."""
    w = max([16] + [len(r["group"]) + 1 for r in rows])   # DiT block names run long
    head = f"{'group':<{w}}{'pieces':>7}{'rank min':>9}{'median':>8}{'max':>6}{'dense':>6}" \
           f"{'MiB':>9}{'rel.err':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ranks = r["ranks"]
        rmin, rmed, rmax = ((min(ranks), int(np.median(ranks)), max(ranks)) if ranks
                            else ("-", "-", "-"))
        lines.append(f"{r['group']:<{w}}{r['pieces']:>7}{rmin:>9}{rmed:>8}{rmax:>6}"
                     f"{r['dense']:>6}{r['bytes'] / 2**20:>9.2f}"
                     f"{rel_error(r['err2'], r['norm2']):>9.4f}")
    err2 = sum(r["err2"] for r in rows)
    norm2 = sum(r["norm2"] for r in rows)
    lines.append("-" * len(head))
    size = total_bytes if total_bytes is not None else sum(r["bytes"] for r in rows)
    total = (f"{'total':<{w}}{sum(r['pieces'] for r in rows):>7}{'':>29}"
             f"{size / 2**20:>9.2f}{rel_error(err2, norm2):>9.4f}")
    lines.append(total)
    if reference_bytes:
        lines.append(f"compression ratio {reference_bytes / max(size, 1):.1f}x against "
                     f"{reference} ({reference_bytes / 2**20:.1f} MiB)")
    return "\n".join(lines)
