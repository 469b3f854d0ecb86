"""The threshold explorer's model (host-free; the Gradio page is ui.py).

One analysis of a checkpoint pair (`api.analyse_pair`: every layer's float64 spectrum, factors
at rank 1 only) is kept; any setting (energy, Frobenius, rank or size in MiB) is then answered
in milliseconds without touching the checkpoints: the ranks are picked by the same code and on
the same float64 values as `compress` (resize.new_rank, ranks.allocate_budget), and the file is
sized by the same code that sizes a real file (delta_file.file_size) on a *skeleton*: the
records at their new ranks with shape-only ("meta") tensors, so nothing is allocated.

What is exact and what is estimated:
* ranks, dense/factored choice and bytes per layer: what `compress` gives for the setting
  (size mode: `resize`'s allocation, which may differ from `compress`'s by a few components);
* file size: exact up to the zlib-compressed metadata, whose length depends on values the
  analysis does not have (errors after rounding, factors of coded extras): a few bytes, or
  about 4/3 of their raw size for coded extras;
* relative error: the truncation error sum(s[t:]^2) only; storage rounding of the factors
  (about 3e-4 relative for fp16) is what `compress` adds on top.
"""

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .api import analyse_pair, host_meta_fn
from .delta_file import RANDOMIZED, STORAGE_DTYPES, file_size, lora_parts, tensor_names
from .groups import format_table, group_of, group_rows, rel_error
from .measures import has_base_norms, weighted_error
from .plot import layer_values
from .ranks import RankRule, is_dense
from .resize import copy_delta, new_rank, resize_to_size
from .summary import record_bytes

MODES = {"energy": "energy", "Frobenius": "fro", "rank": "rank", "size (MiB)": "size_mb"}
LAYER_HEADERS = ["group", "layer", "shape", "kind", "rank", "of", "kept (sum s)", "KiB",
                 "rel. error"]
# The plot's thresholds: denser below 0.3, where the size changes little and users look.
CURVE_GRID = np.unique(np.round(np.concatenate([np.linspace(0.02, 0.3, 8),
                                                 np.linspace(0.35, 1.0, 14)]), 4))


@dataclass
class Preview:
    """What the file for one setting would be."""
    rule: RankRule
    delta: object            # the skeleton Delta (meta tensors)
    file_bytes: int
    params: int              # stored values
    rel_error: float         # estimated (truncation only)
    kept: float              # kept energy, the paper's measure: sum(s[:t]) / sum(s)
    seconds: float           # how long answering took
    weight_error: float = None  # weight-relative error (measures.py); None: no base norms

    @property
    def kept_fro(self):
        """Kept Frobenius energy (sum of s^2 over every changed piece): 1 - rel_error^2."""
        return 1.0 - self.rel_error ** 2


class Explorer:
    """A cached analysis and the answers to every setting."""

    def __init__(self, analysis, counts=None, name="delta"):
        self.analysis = analysis
        self.counts = counts
        self.name = name
        self.esize = STORAGE_DTYPES[analysis.info.get("dtype", "fp16")].itemsize
        self.coded = [i for i, r in enumerate(analysis.records) if r.n and i in analysis.spectra]
        # float64 values of each coded layer: an analysis holds them all; a file read back
        # holds the exact head and a float16 tail (enough for the tables of Inspect)
        self.values = {i: layer_values(analysis, i) for i in self.coded}
        self.tuned_bytes = int(analysis.info.get("tuned_bytes") or 0) or None
        self.paths = None   # (base, tuned) when analysed from files: what Save compresses
        self._curves = {}

    @classmethod
    def from_files(cls, base, tuned, dtype="fp16", device="cpu", progress=None,
                   allow_pickle=False, name="delta"):
        delta, counts, _ = analyse_pair(base, tuned, dtype, device, progress, allow_pickle)
        explorer = cls(delta, counts, name)
        explorer.paths = (base, tuned)
        return explorer

    # -- settings -> ranks ---------------------------------------------------------------------

    def max_rank(self):
        return max((self.analysis.records[i].n for i in self.coded), default=1)

    def ranks(self, rule):
        """{record index: rank} for a per-layer rule, as compress would pick them."""
        return {i: new_rank(rule, self.analysis.records[i], self.values[i]) for i in self.coded}

    def skeleton(self, ranks):
        """A Delta shaped like the file at these ranks: meta tensors (coded extras: zeros, as
        their bytes are packed into the metadata, which needs real tensors)."""
        out = copy_delta(self.analysis)
        for i, t in ranks.items():
            rec = out.records[i]
            src = out.extras if rec.extra else out.tensors
            for name in tensor_names(rec).values():
                src.pop(name, None)
            d, k = rec.matrix_shape
            rec.kind = "dense" if is_dense(t, d, k) else "svd"
            rec.rank = t
            s = self.values[i]
            rec.err2 = 0.0 if rec.kind == "dense" else float(np.sum(s[t:] ** 2))
            out.spectra[i] = (s, s[:t])  # like a file: the head ends at the rank
            device = "cpu" if rec.extra else "meta"
            dtype = STORAGE_DTYPES[out.info.get("dtype", "fp16")]
            if rec.kind == "dense":
                parts = {"diff": torch.zeros(rec.shape, dtype=dtype, device=device)}
            else:
                parts = lora_parts(rec, torch.zeros(d, t, dtype=dtype, device=device),
                                   torch.zeros(t, k, dtype=dtype, device=device))
            names = tensor_names(rec)
            src.update({names[p]: v for p, v in parts.items() if p in names})
        return out

    def file_size(self, skel):
        """Bytes of the file of `skel`; coded extras are random data zlib cannot shrink."""
        extra = sum(record_bytes(skel, skel.records[i]) for i in self.coded
                    if skel.records[i].extra)
        return file_size(skel, host_meta_fn(skel, self.name)) + math.ceil(extra * 4 / 3)

    def max_ranks(self):
        """The largest rank at which each layer is still stored factored (resize only cuts)."""
        out = {}
        for i in self.coded:
            rec = self.analysis.records[i]
            d, k = rec.matrix_shape
            out[i] = max(min((d * k - 1) // (d + k), rec.n), 1)
        return out

    def preview(self, mode, value, min_rank=1, max_rank=None):
        """The numbers of the file one setting gives. `mode`: energy, fro, rank, size_mb."""
        start = time.perf_counter()
        rule = RankRule(mode, float(value), min_rank, max_rank)
        if rule.per_layer:
            skel = self.skeleton(self.ranks(rule))
            size = self.file_size(skel)
        else:
            skel = resize_to_size(self.skeleton(self.max_ranks()), rule, self.file_size)
            size = self.file_size(skel)
        skel.info.update({"mode": rule.mode, "value": repr(float(rule.value))})
        skel.info.pop("resized_from", None)
        recs = skel.records
        params = sum(t.numel() for t in skel.tensors.values())
        return Preview(rule, skel, size, params,
                       rel_error(sum(r.err2 for r in recs), sum(r.norm2 for r in recs)),
                       self._kept(skel), time.perf_counter() - start,
                       weighted_error(recs) if has_base_norms(recs) else None)

    def _kept(self, skel):
        """sum(s[:t]) / sum(s) over every coded layer (the energy rule's measure)."""
        kept = total = 0.0
        for i in self.coded:
            s = self.values[i]
            t = skel.records[i].rank if skel.records[i].kind == "svd" else s.size
            kept += float(np.sum(s[:t]))
            total += float(np.sum(s))
        return kept / total if total > 0 else 1.0

    # -- reports -------------------------------------------------------------------------------

    def group_table(self, preview):
        """The per-group table, in the layout `compress` prints (the paper's Table 2)."""
        rows = group_rows(preview.delta.records, lambda r: record_bytes(preview.delta, r),
                          preview.delta.family)
        return format_table(rows, preview.file_bytes, self.tuned_bytes)

    def layer_rows(self, delta, sort="size"):
        """One row per coded layer of `delta` (a preview's skeleton, or the analysed delta
        itself), LAYER_HEADERS, largest first by `sort`."""
        rows = []
        for i in self.coded:
            rec = delta.records[i]
            s = self.values[i]
            t = rec.rank if rec.kind == "svd" else rec.n
            kept = float(np.sum(s[:t]) / np.sum(s)) if np.sum(s) > 0 else 1.0
            d, k = rec.matrix_shape
            rows.append([group_of(rec.key, delta.family), rec.name, f"{d}x{k}", rec.kind, t,
                         rec.n,
                         # the head alone (a randomized SVD's) has no sum(s) to be a share of
                         "" if rec.precision == RANDOMIZED else round(kept, 4),
                         round(record_bytes(delta, rec) / 1024, 1),
                         round(rel_error(rec.err2, rec.norm2), 4)])
        col = {"size": 7, "rank": 4, "error": 8, "name": 1}.get(sort, 7)
        return sorted(rows, key=lambda r: r[col], reverse=sort != "name")

    def curve(self, measure):
        """(thresholds, MiB, kept Frobenius energy) for an energy / Frobenius rule: the plot."""
        if measure not in self._curves:
            points = [self.preview(measure, t) for t in CURVE_GRID]
            self._curves[measure] = (CURVE_GRID,
                                     np.array([p.file_bytes / 2**20 for p in points]),
                                     np.array([p.kept_fro for p in points]))
        return self._curves[measure]

    def range_of(self, mode):
        """(minimum, maximum, step) of the value for a mode, for the slider."""
        if mode == "rank":
            return 1, self.max_rank(), 1
        if mode == "size_mb":
            low = self.preview("rank", 1).file_bytes / 2**20
            high = self.file_size(self.skeleton(self.max_ranks())) / 2**20
            return math.ceil(low * 100) / 100, math.ceil(high * 100) / 100, 0.01
        return 0.01, 1.0, 0.01
