"""`deltasvd demo` as a new user runs it: in some folder, no options. It must leave exactly one
picture there (base / full fine-tune / base + delta), say where it is, print scores that tell
the three apart, and leave nothing in the temporary folder."""

import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np

from deltasvd import demo
from deltasvd.t2i import scenes
from deltasvd.t2i.grid import GAP, SCALE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_png(path):
    """(H, W, 3) uint8 of an 8-bit RGB PNG with filter 0 rows (what the demo writes)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    i, chunks = 8, {}
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        chunks.setdefault(kind, b"")
        chunks[kind] += data[i + 8:i + 8 + n]
        i += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()
    return rows[:, 1:].reshape(h, w, 3)


def tiles(grid, block, prompt):
    """The demo's samples of one model (0 base, 1 full fine-tune, 2 base + delta), one prompt."""
    size = scenes.SIZE * SCALE
    first = size + GAP + 3 * GAP + GAP           # reference, gap, spacer, gap
    x0 = first + block * (len(demo.SEEDS) * (size + GAP) + 3 * GAP + GAP)
    y0 = prompt * (size + 4)
    return grid[y0:y0 + size, x0:x0 + len(demo.SEEDS) * (size + GAP) - GAP].astype(float)


def test_demo_writes_one_picture_and_scores(tmp_path):
    work, temp = tmp_path / "here", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "deltasvd", "demo"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    png = work / demo.PICTURE
    assert sorted(os.listdir(work)) == [demo.PICTURE]
    assert os.listdir(temp) == []                        # the temporary folder went
    assert f"pictures: {png}" in run.stdout

    scores = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^\s+(base \+ delta|full fine-tune|base)\s+([\d.]+)\s+"
                                   r"\S+\s+([\d.]+)$", run.stdout, re.M)}
    assert scores["full fine-tune"][0] == 1.0
    assert scores["base + delta"][0] > 0.85 > 0.7 > scores["base"][0]
    assert scores["base + delta"][1] > 0.3 > 0.05 > scores["base"][1]   # the subject is there

    grid = read_png(png)
    size = scenes.SIZE * SCALE
    assert grid.shape[0] == len(demo.PROMPTS) * (size + 4) - 4
    for j in range(demo.N_SUBJECT):           # in the picture too: delta ~ fine-tune != base
        base, tuned, ours = (tiles(grid, k, j) for k in range(3))
        assert np.abs(ours - tuned).mean() < 0.5 * np.abs(base - tuned).mean()


def test_demo_never_overwrites_a_picture(tmp_path):
    (tmp_path / demo.PICTURE).write_bytes(b"mine")
    (tmp_path / "deltasvd_demo_1.png").write_bytes(b"mine too")
    assert demo._free_name(str(tmp_path)) == str(tmp_path / "deltasvd_demo_2.png")
