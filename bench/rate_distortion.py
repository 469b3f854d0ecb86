"""Rate-distortion map: which codec gives the smallest error at each file size.

    python bench/rate_distortion.py [--data DIR | --base B --tuned T] [--out DIR] [--samples N]

One pass over a checkpoint pair (default: the full-size SD1.5-format fp32 pair of
`deltasvd.fixtures.make_pair(dir, "sd15", "full", seed=0)`, built in --data if missing). Each
changed layer's delta is read once and coded with every setting, through the library's own
functions (spectrum.gram_spectrum + factors, quant.encode_factors, dct_codec.encode / decode,
RankRule, allocate_budget, trim_to_size):

* svd energy T     the paper's rule (fp16 factors, LoRA-loadable)
* svd size M MiB   ranks allocated over all layers for a file of M MiB, fitted exactly
* svd int8 / int4  --factor-bits 8 / 4 at an energy threshold
* dct B bits       --codec dct --bits B
* bitdelta         1 bit per value: sign(dW) times one float16 scale per matrix (mean |dW|),
                   BitDelta's initialisation (its scale distillation needs data)

Sizes: each setting's Delta is built with the real records and metadata, the large tensors as
`meta` tensors of the real shapes and dtypes, and measured with delta_file.file_size: the size
`deltasvd compress` writes, header included. (bitdelta is not a deltasvd codec: its size is the
packed signs + scales + the same 1-D deltas + the dct 1-bit file's header.) Bits per parameter
= 8 * size / changed values.

Errors: the relative Frobenius error of the whole delta, sqrt(sum ||dW - dW^||^2 / sum ||dW||^2)
(1-D deltas included, stored exactly), and per matrix layer the relative error of its output on
random inputs, ||(dW - dW^) X||_F / ||dW X||_F, X = N(0, 1) of in x --samples (Conv: the unfolded
in*kh*kw input), reported as the mean (and max) over layers. For the SVD rows the residuals come
from the Gram spectrum (tail sums of s^2, and of the components of dW X), i.e. without
the fp16 rounding of the factors (~1e-3 relative); quantized factors, DCT and bitdelta are
decoded and measured directly.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deltasvd import dct_codec, fixtures, quant, spectrum  # noqa: E402
from deltasvd.api import host_meta_fn  # noqa: E402
from deltasvd.checkpoint import open_pair  # noqa: E402
from deltasvd.compress import (Counts, _complete_modules, _module_index, code_exact,  # noqa: E402
                               plan_keys, read_deltas, split_pieces, trim_to_size)
from deltasvd.delta_file import Delta, file_size, lora_parts, tensor_names  # noqa: E402
from deltasvd.measures import layer_weight  # noqa: E402
from deltasvd.ranks import RankRule, allocate_budget, is_dense  # noqa: E402

ENERGY = (0.06, 0.2, 0.35, 0.5, 0.7, 0.85)
SIZE_MB = (16, 32, 64, 128, 256, 400)
QSVD = ((8, 0.2), (8, 0.35), (8, 0.5), (8, 0.7), (8, 0.85), (8, 0.95),
        (4, 0.5), (4, 0.7), (4, 0.85), (4, 0.95))
DCT = (0.5, 1, 2, 3, 4)
FP16 = torch.float16
HASH = "0" * 64


def meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


class Setting:
    """One codec setting: its records and (meta) tensors as the file would hold them, and the
    error sums."""

    def __init__(self, curve, label, codec_info):
        self.curve, self.label, self.info = curve, label, codec_info
        self.records, self.tensors, self.extras, self.spectra = [], {}, {}, {}
        self.out_rel = []      # per matrix layer: ||(dW - dW^) X|| / ||dW X||
        self.encode_s = 0.0

    def add(self, rec, parts, s=None):
        names = tensor_names(rec)
        dst = self.extras if rec.extra else self.tensors
        if s is not None:
            self.spectra[len(self.records)] = (s, s)
        self.records.append(rec)
        for part, t in parts.items():
            if part in names:
                # extras of the svd codec go into the zlib'd blob: its size needs the values
                keep = rec.extra and self.info["codec"] == "svd"
                dst[names[part]] = t if keep or t.device.type == "meta" else meta(t)

    def delta(self, family):
        info = {"mode": "energy", "value": "0.5", "min_rank": 1, "max_rank": "", "dtype": "fp16",
                "base_sha256": HASH, "tuned_sha256": HASH, "base_name": "base.safetensors",
                "tuned_name": "tuned.safetensors", "tuned_bytes": 4265097092}
        info.update(self.info)
        return Delta(family=family, records=self.records, tensors=self.tensors,
                     extras=self.extras, spectra=self.spectra, info=info)


class Layer:
    """What the SVD rows need after the pass: spectrum, output-error tail sums, factors of
    extras (their values go into the file's blob)."""

    def __init__(self, rec, dec, proj_cum, y2):
        self.rec, self.s, self.proj_cum, self.y2 = rec, dec.s, proj_cum, y2
        self.norm2 = dec.fro2
        self.tail2 = np.concatenate([np.cumsum((dec.s ** 2)[::-1])[::-1], [0.0]])
        self.extra_parts = None

    def fro_err2(self, t):
        return float(self.tail2[t]) if t < len(self.tail2) else 0.0

    def out_rel(self, t):
        kept = float(self.proj_cum[t - 1]) if t > 0 else 0.0
        return math.sqrt(max(self.y2 - kept, 0.0) / self.y2) if self.y2 > 0 else 0.0


def svd_record(layer, t):
    """(record, parts) of an SVD layer at rank t (fp16 factors or a dense fp16 delta)."""
    rec = replace(layer.rec)
    d, k = rec.matrix_shape
    rec.n, rec.sum_s, rec.sum_s2 = len(layer.s), float(layer.s.sum()), float((layer.s ** 2).sum())
    rec.norm2 = layer.norm2
    if is_dense(t, d, k):
        rec.kind, rec.rank, rec.err2 = "dense", t, 0.0
        parts = {"diff": layer.extra_parts["dense"] if layer.extra_parts else
                 torch.empty(rec.shape, dtype=FP16, device="meta")}
        return rec, parts
    rec.kind, rec.rank, rec.err2 = "svd", t, layer.fro_err2(t)
    if layer.extra_parts:
        a, b = layer.extra_parts["a"][:, :t], layer.extra_parts["b"][:t]
    else:
        a = torch.empty(d, t, dtype=FP16, device="meta")
        b = torch.empty(t, k, dtype=FP16, device="meta")
    return rec, lora_parts(rec, a, b)


def analyse(m, x):
    """Spectrum, basis and the per-component split of ||m x||^2 (float64)."""
    dec = spectrum.gram_spectrum(m)
    y = m @ x
    y2 = float(y.double().pow(2).sum())
    q = spectrum.top_vectors(dec, m, dec.s.size)   # the whole basis
    if dec.tall:         # q = V: component i of m x is u_i s_i (v_i^T x)
        proj = (dec.s ** 2) * (q.T @ x).double().pow(2).sum(dim=1).numpy()
    else:                # q = U: component i is u_i (u_i^T m x)
        proj = (q.T @ y).double().pow(2).sum(dim=1).numpy()
    return dec, y, y2, np.cumsum(proj)


def prefix_err2(m, a, b, norm2):
    """||m - a[:, :r] b[:r]||^2 for every r (float64), from one product m b^T:
    ||m||^2 - 2 sum_{i<r} a_i^T m b_i + sum_{i,j<r} (a_i^T a_j)(b_i^T b_j)."""
    c = (a.double() * (m @ b.T).double()).sum(dim=0)
    g = (a.double().T @ a.double()) * (b.double() @ b.double().T)
    r = g.shape[0]
    quad = torch.zeros(r + 1, dtype=torch.float64)
    # sum over the leading r x r block: add row/column r-1 at each step
    rows = torch.cumsum(torch.tril(g), dim=1)            # rows[i, j] = sum_{l<=j, l<=i} g[i, l]
    diag_block = torch.cumsum(2 * rows.diagonal() - g.diagonal(), dim=0)
    quad[1:] = diag_block
    lin = torch.zeros(r + 1, dtype=torch.float64)
    lin[1:] = torch.cumsum(c, dim=0)
    return (norm2 - 2 * lin + quad).clamp(min=0).numpy()


def out_rel(y, residual_x):
    den = float(y.double().pow(2).sum())
    return math.sqrt(float(residual_x.double().pow(2).sum()) / den) if den > 0 else 0.0


def run(base_path, tuned_path, samples, log):
    base, tuned = open_pair(base_path, tuned_path)
    family = base.family
    settings = {}
    for b in DCT:
        settings[("dct", b)] = Setting("Delta-DCT", f"dct {b:g} bits",
                                       {"codec": "dct", "bits": f"{b:g}", "patch": 16,
                                        "mode": "bits", "value": f"{b:g}"})
    for f, t in QSVD:
        settings[("qsvd", f, t)] = Setting(f"SVD int{f} factors (energy T)",
                                           f"svd int{f} T={t:g}",
                                           {"codec": "qsvd", "factor_bits": f,
                                            "value": f"{t:g}"})
    for t in ENERGY:
        settings[("svd", t)] = Setting("SVD fp16, energy T (paper)", f"svd energy T={t:g}",
                                       {"codec": "svd", "value": f"{t:g}"})
    bitdelta = {"bytes": 0, "err2": 0.0, "out_rel": []}
    layers, exact, totals = [], [], {"norm2": 0.0, "params": 0}
    counts = Counts()
    keys = plan_keys(base, tuned, counts)
    modules = _module_index(base)
    t_read = time.perf_counter()
    compute = 0.0
    for key, delta, rows2 in read_deltas(base, tuned, keys, counts):
        t0 = time.perf_counter()
        for j, piece in enumerate(split_pieces(key, delta, base, family, rows2)):
            rec = piece.rec
            totals["params"] += int(np.prod(rec.shape))
            if rec.kind == "exact":
                parts, _ = code_exact(piece)
                totals["norm2"] += rec.norm2
                exact.append((rec, parts))
                for st in settings.values():
                    st.add(replace(rec), parts)
                bitdelta["bytes"] += 4 * parts["diff"].numel()
                continue
            m = spectrum.as_matrix(piece.data).float()
            d, k = m.shape
            g = torch.Generator().manual_seed(len(layers) + 1)
            x = torch.randn(k, samples, generator=g)
            dec, y, y2, proj_cum = analyse(m, x)
            layer = Layer(rec, dec, proj_cum, y2)
            totals["norm2"] += dec.fro2
            n = len(dec.s)
            if rec.extra:   # their factors are stored in the blob: the bytes depend on values
                a, b = spectrum.factors(dec, m, n)
                layer.extra_parts = {"a": a.to(FP16), "b": b.to(FP16), "dense": m.to(FP16)}
            layers.append(layer)
            # quantized factors: the rank of the energy rule, then quantize and measure. A row's
            # codes depend on its own values and bit-width only, so the codes of rank r are the
            # first r rows of those of the largest rank: quantize once per bit-width F.
            for f in sorted({f for f, _ in QSVD}):
                ranks = {}
                for ff, t in QSVD:
                    if ff == f:
                        rule = RankRule("energy", t)
                        ranks[t] = rule.clamp(rule.raw_rank(dec.s), n)
                tmax = max((r for r in ranks.values() if not is_dense(r, d, k)), default=0)
                if tmax:
                    fa, fb = spectrum.factors(dec, m, tmax)
                    bits = quant.component_bits(dec.s[:tmax], f)
                    _, ah, bh = quant.encode_factors(fa, fb, dec.s[:tmax], f)
                    err2s = prefix_err2(m, ah, bh, dec.fro2)
                    bx = bh @ x
                for t, r in ranks.items():
                    st = settings[("qsvd", f, t)]
                    if is_dense(r, d, k):
                        q, parts = svd_record(layer, r)
                        st.add(q, parts, dec.s)
                        st.out_rel.append(0.0)
                        continue
                    q = replace(rec, kind="qsvd", rank=r, n=n, sum_s=float(dec.s.sum()),
                                sum_s2=float((dec.s ** 2).sum()), norm2=dec.fro2,
                                err2=float(err2s[r]))
                    parts = {"q_bits": torch.empty(r, dtype=torch.uint8, device="meta")}
                    for side, size in (("up", d), ("down", k)):
                        parts[side + "_codes"] = torch.empty(
                            quant.code_bytes(bits[:r], size), dtype=torch.uint8, device="meta")
                        parts[side + "_scales"] = torch.empty(r, dtype=quant.STEP_DTYPE,
                                                              device="meta")
                    st.add(q, parts, dec.s)
                    st.out_rel.append(out_rel(y, y - ah[:, :r] @ bx[:r]))
            # Delta-DCT
            for b in DCT:
                st = settings[("dct", b)]
                t1 = time.perf_counter()
                parts, err2, norm2 = dct_codec.encode(m, b)
                st.encode_s += time.perf_counter() - t1
                q = replace(rec, kind="dct", patch=dct_codec.PATCH, err2=err2, norm2=norm2)
                st.add(q, {"dct_" + p: v for p, v in parts.items()})
                mh = dct_codec.decode(parts, d, k)
                st.out_rel.append(out_rel(y, y - mh @ x))
            # BitDelta: sign times the mean magnitude
            alpha = float(m.abs().mean())
            r = m - alpha * torch.sign(m)
            bitdelta["err2"] += float(r.double().pow(2).sum())
            bitdelta["out_rel"].append(out_rel(y, r @ x))
            bitdelta["bytes"] += (d * k + 7) // 8 + 2
            # SVD by energy: analytic from the spectrum
            for t in ENERGY:
                rule = RankRule("energy", t)
                r = rule.clamp(rule.raw_rank(dec.s), n)
                q, parts = svd_record(layer, r)
                settings[("svd", t)].add(q, parts, dec.s)
                settings[("svd", t)].out_rel.append(0.0 if q.kind == "dense" else
                                                    layer.out_rel(r))
        compute += time.perf_counter() - t0
        log(f"  {counts.read}/{len(keys)} {key}")
    t_read = time.perf_counter() - t_read
    base.close()
    tuned.close()

    rows = []

    def finish(st):
        _complete_modules(st.records, st.tensors, modules, FP16)
        dl = st.delta(family)
        size = file_size(dl, host_meta_fn(dl, "delta"))
        err2 = sum(r.err2 for r in dl.records)
        rows.append(row(st.curve, st.label, size, err2, st.out_rel, totals, st.encode_s))
        return size

    dct1_header = None
    for key, st in settings.items():
        size = finish(st)
        if key == ("dct", 1):
            data = sum(t.numel() * t.element_size() for t in st.delta(family).tensors.values())
            data += sum(t.numel() * t.element_size() for t in st.extras.values())
            dct1_header = size - data
    # SVD by size budget: the library's allocation on the same spectra, then fitted exactly
    for mb in SIZE_MB:
        st = Setting("SVD fp16, size budget", f"svd size {mb} MiB",
                     {"codec": "svd", "mode": "size_mb", "value": str(mb)})
        fixed = file_size(Setting("", "", {"codec": "svd"}).delta(family), lambda h: {})
        n_vals = sum(len(ly.s) for ly in layers)
        reserved = fixed + sum(4 * p["diff"].numel() for _, p in exact) + n_vals * 2 * 4 / 3 \
            + 250 * (len(layers) + len(exact))
        budget = (mb * 2**20 - reserved) * 1.05
        alloc = allocate_budget([(ly.s, sum(ly.rec.matrix_shape) * 2 + 11,
                                  layer_weight(ly.rec.base2, float(np.sum(ly.s ** 2))))
                                 for ly in layers], budget)
        for rec, parts in exact:
            st.add(replace(rec), parts)
        kept = []
        for ly, r in zip(layers, alloc):
            if r == 0:
                continue        # the budget gave this layer nothing: no record (as compress)
            q, parts = svd_record(ly, int(r))
            st.add(q, parts, ly.s)
            kept.append((len(st.records) - 1, ly))
        _complete_modules(st.records, st.tensors, modules, FP16)
        dl = st.delta(family)
        trim_to_size(dl, mb * 2**20, lambda dd: file_size(dd, host_meta_fn(dd, "delta")))
        size = file_size(dl, host_meta_fn(dl, "delta"))
        by_layer = {id(ly): dl.records[i] for i, ly in kept}
        err2, outs = 0.0, []
        for ly in layers:
            q = by_layer.get(id(ly))
            if q is None:
                err2 += ly.norm2
                outs.append(1.0)
            elif q.kind == "dense":
                outs.append(0.0)
            else:
                err2 += ly.fro_err2(q.rank)
                outs.append(ly.out_rel(q.rank))
        rows.append(row(st.curve, st.label, size, err2, outs, totals, 0.0))
    rows.append(row("BitDelta 1-bit (sign x scale)", "bitdelta",
                    bitdelta["bytes"] + (dct1_header or 0), bitdelta["err2"],
                    bitdelta["out_rel"], totals, 0.0))
    return rows, {"read_and_code_s": t_read, "compute_s": compute, "layers": len(layers),
                  "params": totals["params"], "family": family,
                  "changed_tensors": counts.changed}


def row(curve, label, size, err2, outs, totals, encode_s):
    return {"curve": curve, "setting": label, "bytes": int(size), "mb": size / 2**20,
            "bpp": 8 * size / totals["params"], "rel_fro": math.sqrt(err2 / totals["norm2"]),
            "out_mean": float(np.mean(outs)) if outs else 0.0,
            "out_max": float(np.max(outs)) if outs else 0.0, "encode_s": encode_s}


def table(rows, meta):
    lines = [f"{meta['family']}: {meta['changed_tensors']} changed tensors, "
             f"{meta['params']:,} changed values, {meta['layers']} matrix layers", "",
             "| codec | setting | MiB | bits/param | rel. Frobenius error | layer output error, "
             "mean | max |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["curve"], r["bytes"])):
        lines.append(f"| {r['curve']} | {r['setting']} | {r['mb']:.1f} | {r['bpp']:.3f} | "
                     f"{r['rel_fro']:.4f} | {r['out_mean']:.4f} | {r['out_max']:.4f} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    curves = sorted({r["curve"] for r in rows})
    for ax, key, title in ((axes[0], "rel_fro", "relative Frobenius error of the delta"),
                           (axes[1], "out_mean", "layer output error (mean over layers)")):
        for c in curves:
            pts = sorted((r["mb"], r[key]) for r in rows if r["curve"] == c)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-" if len(xs) > 1 else "*", label=c, ms=5 if len(xs) > 1 else 12)
        ax.set_xscale("log")
        ax.set_xlabel("file size (MiB)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)


def ensure_pair(data):
    stem = Path(data) / "sd15_full_seed0"
    base, tuned = Path(str(stem) + "_base.safetensors"), Path(str(stem) + "_tuned.safetensors")
    if not (base.is_file() and tuned.is_file()):
        print(f"making the full SD1.5 fp32 pair in {data} (2 x 4.3 GB) ...", flush=True)
        Path(data).mkdir(parents=True, exist_ok=True)
        fixtures.make_pair(data, "sd15", "full", seed=0, base_dtype=torch.float32,
                           tuned_dtype=torch.float32)
    return str(base), str(tuned)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO / "bench" / "data"),
                   help="folder of the fixture pair (made there if missing)")
    p.add_argument("--base", help="base checkpoint (with --tuned: use these instead)")
    p.add_argument("--tuned")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "rate_distortion"))
    p.add_argument("--samples", type=int, default=16, help="random inputs per layer")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--replot", action="store_true",
                   help="only draw the PNG again from --out's results.json")
    args = p.parse_args()
    if args.replot:
        rows = json.loads(Path(args.out, "results.json").read_text())["rows"]
        plot(rows, Path(args.out, "rate_distortion.png"))
        return
    if bool(args.base) != bool(args.tuned):
        p.error("--base and --tuned go together")
    base, tuned = (args.base, args.tuned) if args.base else ensure_pair(args.data)
    os.makedirs(args.out, exist_ok=True)
    print(f"pair: {base}\n      {tuned}\nload: {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    rows, meta = run(base, tuned, args.samples,
                     (lambda s: None) if args.quiet else (lambda s: print(s, flush=True)))
    meta["wall_s"] = time.perf_counter() - t0
    meta["dct_encode_s"] = {r["setting"]: round(r["encode_s"], 1) for r in rows
                            if r["curve"] == "Delta-DCT"}
    text = table(rows, meta)
    text += (f"\n\nwall {meta['wall_s']:.0f} s (one pass: reading + every setting: "
             f"{meta['compute_s']:.0f} s of coding and measuring); DCT encode time over all "
             f"layers per setting: {meta['dct_encode_s']}; load at the end "
             f"{os.getloadavg()}\n")
    Path(args.out, "table.md").write_text(text)
    Path(args.out, "results.json").write_text(json.dumps({"rows": rows, "meta": meta},
                                                         indent=1))
    plot(rows, Path(args.out, "rate_distortion.png"))
    print(text)
    print(f"wrote {args.out}/table.md, results.json, rate_distortion.png")


if __name__ == "__main__":
    main()
