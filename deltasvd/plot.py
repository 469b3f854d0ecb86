"""The numbers behind a spectrum plot of a delta (host-free: no drawing here).

* `energy_curves`: per layer group (the paper's Table-2 groups), the fraction of the group's
  energy kept at rank r, for r = 1 .. the largest layer's full rank: sum over the group's layers
  of sum(v[:r]) / sum over the layers of sum(v), with v = s (energy rule) or s^2 (Frobenius).
* `size_curve`: the file size a threshold would give, from the stored spectra.

The file keeps every layer's full spectrum in float16 and the first `rank` values in float64,
so curves cover every rank: exact up to the stored rank, float16-accurate beyond it (enough for
a plot; `resize` itself only ever needs the exact part).
"""

from dataclasses import dataclass

import numpy as np

from .delta_file import STORAGE_DTYPES, head_only_layers
from . import families
from .ranks import RankRule, is_dense
from .resize import new_rank


@dataclass
class Curve:
    group: str
    ranks: np.ndarray       # 1 .. R
    kept: np.ndarray        # fraction of the group's energy kept at each rank
    chosen: int             # median stored rank of the group's layers
    layers: int


def measure_of(delta):
    """'fro' for a delta made with the Frobenius rule, or one whose layers keep only the head
    of their spectrum (the energy rule needs sum(s), which they lack); else 'energy'."""
    return "fro" if delta.info.get("mode") == "fro" or head_only_layers(delta) else "energy"


def layer_values(delta, i):
    """float64 singular values of record i: the exact head, then the float16 tail."""
    rec = delta.records[i]
    full, head = delta.spectra[i]
    s = np.asarray(full, dtype=np.float64).copy()
    s[: len(head)] = np.asarray(head, dtype=np.float64)
    return s[: rec.n]


def coded(delta):
    return [i for i, r in enumerate(delta.records) if r.n and i in delta.spectra]


def energy_curves(delta, measure=None):
    measure = measure or measure_of(delta)
    fam = families.family(delta.family)
    acc = {}
    for i in coded(delta):
        rec = delta.records[i]
        s = layer_values(delta, i)
        v = s if measure == "energy" else s * s
        total = rec.sum_s if measure == "energy" else rec.sum_s2
        if total <= 0:
            continue
        g = acc.setdefault(fam.group_of(rec.key), {"cums": [], "total": 0.0, "ranks": []})
        g["cums"].append(np.cumsum(v))
        g["total"] += total
        g["ranks"].append(rec.rank if rec.kind == "svd" else rec.n)
    curves = []
    order = [g for g in fam.group_order if g in acc]
    for group in order + [g for g in acc if g not in order]:
        g = acc[group]
        n = max(len(c) for c in g["cums"])
        kept = np.zeros(n)
        for c in g["cums"]:
            kept[: len(c)] += c
            kept[len(c):] += c[-1] if len(c) else 0.0
        kept = np.clip(kept / g["total"], 0.0, 1.0)
        curves.append(Curve(group, np.arange(1, n + 1), kept, int(np.median(g["ranks"])),
                            len(g["ranks"])))
    return curves


def record_cost(rec, t, esize):
    """Bytes the factors (or dense delta) of a record take at rank t."""
    d, k = rec.matrix_shape
    return d * k * esize if is_dense(t, d, k) else t * (d + k) * esize


def size_curve(delta, file_bytes, measure=None, thresholds=None):
    """(thresholds, file bytes at each) for the energy / Frobenius rule, all layers at once.

    `file_bytes` is the size of the delta as it is; parts that do not depend on the ranks
    (header, 1-D tensors, extras) are taken from it."""
    measure = measure or measure_of(delta)
    if thresholds is None:
        grid = [np.linspace(0.01, 0.95, 48), [0.97, 0.99, 1.0]]
        own = current_threshold(delta) if measure == measure_of(delta) else None
        thresholds = np.unique(np.concatenate(grid + ([[own]] if own else [])))
    esize = STORAGE_DTYPES[delta.info.get("dtype", "fp16")].itemsize
    idx = coded(delta)
    recs = [delta.records[i] for i in idx]
    values = [layer_values(delta, i) for i in idx]
    fixed = file_bytes - sum(record_cost(r, r.rank if r.kind == "svd" else r.n, esize)
                             for r in recs)
    sizes = []
    for t in thresholds:
        rule = RankRule(measure, float(t), min_rank=1)
        sizes.append(fixed + sum(record_cost(r, new_rank(rule, r, v), esize)
                                 for r, v in zip(recs, values)))
    return np.asarray(thresholds, dtype=np.float64), np.asarray(sizes, dtype=np.float64)


def current_threshold(delta):
    """The delta's own threshold when it was made by an energy / Frobenius rule, else None."""
    if delta.info.get("mode") in ("energy", "fro"):
        try:
            return float(delta.info.get("value"))
        except (TypeError, ValueError):
            return None
    return None
