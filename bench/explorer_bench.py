"""How fast the threshold explorer answers a setting, on the small SD1.5 pair and on its
analysis replicated `--copies` times (12 copies: about 400 factored layers and 157k singular
values, the size of a full SD1.5 UNet + text encoder), without building a full pair.

    python bench/explorer_bench.py [--copies 12]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltasvd.delta_file import tensor_names  # noqa: E402
from deltasvd.explorer import Explorer  # noqa: E402
from deltasvd.fixtures import make_pair  # noqa: E402


def replicate(analysis, copies):
    """The analysis with every non-extra record repeated under new names (the extras once)."""
    records, tensors, spectra = [], {}, {}
    for j in range(copies):
        for i, rec in enumerate(analysis.records):
            if rec.extra and j:
                continue
            new = rec if rec.extra else replace(rec, name=f"{rec.name}_{j}",
                                                key=rec.key + (f".{j}" if j else ""))
            if not rec.extra:
                old_names, new_names = tensor_names(rec), tensor_names(new)
                tensors.update({new_names[p]: analysis.tensors[n]
                                for p, n in old_names.items() if n in analysis.tensors})
            if i in analysis.spectra:
                spectra[len(records)] = analysis.spectra[i]
            records.append(new)
    return replace(analysis, records=records, tensors=tensors, spectra=spectra)


def timings(explorer, settings):
    explorer.curve("energy")   # computed once per analysis, as the page does
    return [explorer.preview(mode, value).seconds for mode, value in settings]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=12)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        small = Explorer.from_files(*make_pair(folder, "sd15", "small"))
        print(f"analysis of the small pair: {time.perf_counter() - start:.1f} s")
    settings = [("energy", v / 20) for v in range(1, 21)] + [("fro", 0.9), ("rank", 8)]
    for name, explorer in (("small pair", small),
                           (f"x{args.copies}", Explorer(replicate(small.analysis, args.copies)))):
        t = timings(explorer, settings)
        size = timings(explorer, [("size_mb", explorer.range_of("size_mb")[1] / 3)])
        print(f"{name}: {len(explorer.coded)} factored layers; per setting median "
              f"{statistics.median(t) * 1000:.0f} ms, max {max(t) * 1000:.0f} ms; "
              f"size mode {size[0] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
