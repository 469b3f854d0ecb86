"""The SD families write the same files as before (bit for bit): no change to what a file
holds goes by unnoticed.

tests/data/sd_reference.json was first written by the code before `deltasvd/families/` existed,
and rewritten (DELTASVD_WRITE_REFERENCE=1) only by changes meant to change files: the records'
base norms (`base2`, every header) and --size-mb's weight-relative allocation (the size2
tensors), issue 14; the energy and qsvd tensors stayed the same; the float32 route's setting
was added with it (issue 15), the others pinned to --exact-ranks; `base2` again when it came to
be taken in float32, and the factors when A came to be computed from the rounded B for a tall
layer (issue 15: same ranks; A within fp16 rounding), and B from the rounded A = U_t for a wide
one (issue 15: same ranks, errors within 5e-6 relative, A B within 7e-4, fp16 rounding); the
recorded errors' last digits when their float64 terms came to be summed by blocks (issue 15:
the same tensor data, errors within 1e-13 relative); the float32 route's files when its vectors
came by inverse iteration and a blocked back-transform (issue 15: same ranks, errors within
4e-7 relative, A B within 1.1e-3 of its largest entry, fp16 rounding; the --exact-ranks files
the same as the code before gave on this machine); every file's A when M B^T came to be
taken by numpy's BLAS instead of torch's (issue 15: same ranks, errors within 5e-6 relative,
A B within 3.1e-4 of its largest entry on the --exact-ranks files); SDXL's files when MRRR
came to give the vectors for over a quarter of a layer's width (issue 15: same ranks; a sign
flipped in one --exact-ranks layer, A B the same; float32 route errors within 8e-8 relative,
A B within 1.9e-4). For each SD family, a small fixture pair compressed under four
settings. A file is compared by its whole header (metadata included, only `modelspec.date`
left out) and the sha256 of its tensor data. The fixture pair's own hashes are
recorded too: a CPU that rounds the fixture's matrix products differently makes other inputs,
and the test says so instead of comparing files of different inputs. So is a fingerprint of how
this machine's BLAS, LAPACK and torch round the products the compressor uses (`platform`): the
same code gave other bits on another AMD EPYC VM than the one that wrote the reference (the
libraries pick their kernels by CPU), and the test skips, saying so, rather than fail there.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from deltasvd import api, lapack
from deltasvd.compress import Codec
from deltasvd.fixtures import make_pair
from deltasvd.ranks import RankRule
from deltasvd.safetensors_io import read_header, tensor_data_sha256

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "sd_reference.json")
SETTINGS = {   # the certified float64 route (--exact-ranks), and the default float32 one
    "energy0.5": (RankRule("energy", 0.5, exact=True), Codec()),
    "size2": (RankRule("size_mb", 2.0, exact=True), Codec()),
    "qsvd8": (RankRule("energy", 0.3, exact=True), Codec("svd", factor_bits=8)),
    "energy0.5-float32": (RankRule("energy", 0.5), Codec()),
}
FAMILIES = ("sd15", "sd21", "sdxl")


def file_digest(path):
    header, metadata, _ = read_header(path)
    metadata = dict(metadata)
    metadata.pop("modelspec.date", None)
    canon = json.dumps({"header": header, "metadata": metadata}, sort_keys=True)
    return {"header_sha256": hashlib.sha256(canon.encode()).hexdigest(),
            "data_sha256": tensor_data_sha256(path), "tensors": len(header)}


def platform_digest():
    """sha256 of the primitives the compressor's files depend on, on fixed inputs: torch's and
    numpy's float32 products (small and large), numpy's float32 and float64 syrk, and the
    tridiagonal reduction in both precisions."""
    rng = np.random.default_rng(7)
    h = hashlib.sha256()
    for d, k, t in ((96, 80, 7), (1300, 700, 150)):
        m = rng.standard_normal((d, k), dtype=np.float32)
        v = rng.standard_normal((k, t), dtype=np.float32)
        h.update((torch.from_numpy(m) @ torch.from_numpy(v)).numpy().tobytes())
        h.update((m @ v).tobytes())
        for dt in (np.float32, np.float64):
            g = m.astype(dt).T @ m.astype(dt)
            h.update(g.tobytes())
            if lapack.available():
                tri = lapack.tridiagonalize(g.copy())
                h.update(tri.diag.tobytes() + tri.off.tobytes())
    return h.hexdigest()


def family_digests(family, folder):
    base, tuned = make_pair(folder, family, "small", seed=3)
    out = {"inputs": [tensor_data_sha256(base), tensor_data_sha256(tuned)],
           "platform": platform_digest()}
    for name, (rule, codec) in SETTINGS.items():
        path = os.path.join(folder, f"{family}_{name}.safetensors")
        api.compress_files(base, tuned, path, rule, "fp16", "cpu", codec=codec)
        out[name] = file_digest(path)
        os.remove(path)
    os.remove(base)
    os.remove(tuned)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_sd_files_unchanged(family, tmp_path):
    got = family_digests(family, tmp_path)
    if os.environ.get("DELTASVD_WRITE_REFERENCE"):
        ref = json.load(open(REFERENCE)) if os.path.exists(REFERENCE) else {}
        ref[family] = got
        with open(REFERENCE, "w") as f:
            json.dump(ref, f, indent=1, sort_keys=True)
        return
    with open(REFERENCE) as f:
        want = json.load(f)[family]
    if got["inputs"] != want["inputs"]:
        pytest.skip("this CPU rounds the fixture pair differently: other inputs than the "
                    "reference's")
    if got["platform"] != want.get("platform"):
        pytest.skip("this machine's BLAS / LAPACK / torch round the compressor's products "
                    "differently from the machine that wrote the reference")
    for name in SETTINGS:
        assert got[name] == want[name], f"{family} {name}: the file differs from the reference"
