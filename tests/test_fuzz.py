"""Random byte mutations of a valid checkpoint and a valid delta (fixed seeds): whatever the
bytes, `compress`, `inspect` and `apply` exit 0 or 1 with a message (never a traceback), never
hang, never write a non-finite value, never leave a temporary file, never change an input."""

import os
import signal
import struct

import numpy as np
import pytest
import torch

from conftest import fine_tune, save, tiny_state
from deltasvd.cli import main
from deltasvd.safetensors_io import SafeTensorsFile

CASES = 150          # per target; about 0.1 s each on one core
PER_CASE_S = 20


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    base = tiny_state()
    b = save(folder / "base.safetensors", base)
    t = save(folder / "tuned.safetensors", fine_tune(base))
    d = str(folder / "delta.safetensors")
    assert main(["compress", b, t, "-o", d, "--energy", "0.9", "--dtype", "fp32"]) == 0
    return {"base": b, "tuned": t, "delta": d}


def mutate(data, rng):
    """1-4 edits: flipped bits (half of them inside the header), overwritten bytes, a cut, an
    inserted run, a changed header length."""
    data = bytearray(data)
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    for _ in range(int(rng.integers(1, 5))):
        op = rng.integers(0, 6)
        if op <= 1:
            hi = 8 + n if rng.random() < 0.5 else len(data)
            i = int(rng.integers(0, hi))
            data[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:
            i = int(rng.integers(0, len(data)))
            data[i] = int(rng.integers(0, 256))
        elif op == 3:
            del data[int(rng.integers(1, len(data))):]
        elif op == 4:
            i = int(rng.integers(0, len(data)))
            data[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
        else:
            data[:8] = struct.pack("<Q", max(0, n + int(rng.integers(-64, 64))))
    return bytes(data)


def all_finite(path):
    with SafeTensorsFile(path) as f:
        for k in f.keys():
            t = f.get(k)
            if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
                return False
    return True


def _timeout(signum, frame):
    raise TimeoutError("a case ran too long (a hang?)")


@pytest.mark.parametrize("target", ["tuned", "delta"])
def test_mutated_files(originals, tmp_path, capsys, target):
    original = open(originals[target], "rb").read()
    old = signal.signal(signal.SIGALRM, _timeout)
    outcomes = {0: 0, 1: 0}
    try:
        for seed in range(CASES):
            rng = np.random.default_rng(seed)
            bad = str(tmp_path / f"m{seed}.safetensors")
            data = mutate(original, rng)
            with open(bad, "wb") as f:
                f.write(data)
            out = str(tmp_path / "out.safetensors")
            if target == "tuned":
                args = ["compress", originals["base"], bad, "-o", out, "--energy", "0.5"]
            else:
                args = ["apply", originals["base"], bad, "-o", out]
                if seed % 2:
                    args.append("--no-verify")      # past the hash, to the deeper checks
            signal.alarm(PER_CASE_S)
            try:
                rc = main(args)
            except SystemExit as e:
                rc = e.code
            finally:
                signal.alarm(0)
            err = capsys.readouterr().err
            assert rc in (0, 1), (seed, rc, err)
            if rc == 1:
                assert bad in err or "out.safetensors" in err or originals["base"] in err, \
                    (seed, err)
            if rc == 0:
                assert all_finite(out), seed
            assert open(bad, "rb").read() == data, seed
            assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")], seed
            outcomes[rc] += 1
            for path in (out, bad):
                if os.path.exists(path):
                    os.remove(path)
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"\n{target}: {outcomes[0]} accepted, {outcomes[1]} refused")
    assert outcomes[1] > CASES // 4         # the mutations do reach the checks
