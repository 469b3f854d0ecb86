"""Delta-DCT coding speed on every matrix of a model (compute only: no file reading).

    python bench/dct_speed.py [--family sd15] [--bits 1] [--repeat 3] [--decode]

For each distinct shape among the family's weights with 2 or more dimensions (UNet, text
encoders, VAE; `--unet-te` leaves the VAE out), a random matrix (Conv as out x in*kh*kw) is
coded with `dct_codec.encode`, its time counted once per weight of that shape; the total over
the model is measured `--repeat` times and the median printed. Reading the two
checkpoints (2 x 4.3 GB for SD1.5 fp32) and hashing them come on top in `deltasvd compress`.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltasvd import dct_codec  # noqa: E402
from deltasvd.fixtures import load_spec  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="sd15")
    p.add_argument("--bits", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--decode", action="store_true", help="time decode as well")
    p.add_argument("--unet-te", action="store_true", help="UNet and text encoder only")
    args = p.parse_args()
    shapes = [s for k, s, _ in load_spec(args.family) if len(s) >= 2 and
              (not args.unet_te or not k.startswith("first_stage_model."))]
    shapes = [(s[0], int(np.prod(s[1:]))) for s in shapes]
    values = sum(d * k for d, k in shapes)
    distinct = sorted(set(shapes))
    g = torch.Generator().manual_seed(0)
    mats = {s: torch.randn(s, generator=g) * 1e-3 for s in distinct}
    count = {s: shapes.count(s) for s in distinct}
    print(f"{args.family}: {len(shapes)} matrices, {values:,} values, {len(distinct)} shapes; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    enc, dec = [], []
    for _ in range(args.repeat):
        te = td = 0.0
        for s in distinct:
            t0 = time.perf_counter()
            parts, _, _ = dct_codec.encode(mats[s], args.bits)
            te += (time.perf_counter() - t0) * count[s]
            if args.decode:
                t0 = time.perf_counter()
                dct_codec.decode(parts, *s)
                td += (time.perf_counter() - t0) * count[s]
        enc.append(te)
        dec.append(td)
        print(f"  encode {te:.1f} s" + (f", decode {td:.1f} s" if args.decode else ""),
              flush=True)
    print(f"median over {args.repeat}: encode {statistics.median(enc):.1f} s "
          f"({statistics.median(enc) / values * 1e9:.1f} ns per value)" +
          (f", decode {statistics.median(dec):.1f} s" if args.decode else ""))


if __name__ == "__main__":
    main()
