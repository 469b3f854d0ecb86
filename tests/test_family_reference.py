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
the same tensor data, errors within 1e-13 relative). For each SD family, a small fixture pair compressed
under three settings. A file is compared by its whole header (metadata included, only
`modelspec.date` left out) and the sha256 of its tensor data. The fixture pair's own hashes are
recorded too: a CPU that rounds the fixture's matrix products differently makes other inputs,
and the test says so instead of comparing files of different inputs.
"""

import hashlib
import json
import os

import pytest

from deltasvd import api
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


def family_digests(family, folder):
    base, tuned = make_pair(folder, family, "small", seed=3)
    out = {"inputs": [tensor_data_sha256(base), tensor_data_sha256(tuned)]}
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
    for name in SETTINGS:
        assert got[name] == want[name], f"{family} {name}: the file differs from the reference"
