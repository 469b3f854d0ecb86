"""Hostile files and hostile conditions (README, "What deltasvd promises"). Every case checks
the exit code, that the message names the file (and the tensor where there is one), that no
output or temporary file is left, and that the inputs are unchanged; the slow ones a bound on
time and memory."""

import base64
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from deltasvd import compress as compress_mod
from deltasvd.cli import main
from deltasvd.safetensors_io import SafeTensorsFile
from hostile_files import (files_in, get_tensor, layers, raw_file, read_all, rewrite,
                           set_layers, set_tensor, valid_layout)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(capsys, *args):
    """(exit code, stderr) of the CLI in this process; a usage error's SystemExit included."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture
def made(tiny_pair, tmp_path, capsys):
    """A tiny pair, its delta (svd, fp32 factors) and its quantized-factor (qsvd) delta."""
    base, tuned = tiny_pair
    delta, qsvd = tmp_path / "delta.safetensors", tmp_path / "q.safetensors"
    assert cli(capsys, "compress", base, tuned, "-o", delta, "--energy", "0.9",
               "--dtype", "fp32")[0] == 0
    assert cli(capsys, "compress", base, tuned, "-o", qsvd, "--energy", "0.9",
               "--factor-bits", "8")[0] == 0
    return {"base": base, "tuned": tuned, "delta": str(delta), "qsvd": str(qsvd),
            "dir": tmp_path}


def untouched(*paths):
    """Snapshot of files; call the result to assert they are byte-for-byte unchanged."""
    before = {p: open(p, "rb").read() for p in paths}

    def check():
        for p, b in before.items():
            assert open(p, "rb").read() == b, f"{p} changed"
    return check


def expect_refused(capsys, args, out, *words, code=1):
    rc, err = cli(capsys, *args)
    assert rc == code, err
    for w in words:
        assert str(w) in err, (w, err)
    assert "Traceback" not in err
    if out is not None:
        assert not os.path.exists(out)
        folder = os.path.dirname(str(out))
        assert not [f for f in os.listdir(folder) if f.endswith(".part")]
    return err


def first_svd(header):
    return next(r for r in layers(header) if r["kind"] == "svd")


# 1. Bad numbers never reach a model silently

@pytest.mark.parametrize("strength", ["nan", "inf", "-inf"])
def test_non_finite_strength_is_a_usage_error(made, capsys, strength):
    out = made["dir"] / "m.safetensors"
    expect_refused(capsys, ("apply", made["base"], made["delta"], "-o", out,
                            f"--strength={strength}"), out, "finite", code=2)


def test_overflowing_strength_writes_nothing(made, capsys):
    """1e40 is finite, but base + 1e40 * delta is not: refused before the file is published."""
    out = made["dir"] / "m.safetensors"
    expect_refused(capsys, ("apply", made["base"], made["delta"], "-o", out, "--strength",
                            "1e40"), out, "delta.safetensors", "NaN or Inf", "tensor '")


@pytest.mark.parametrize("which,part", [("delta", "lora_up.weight"),
                                        ("qsvd", "up_scales")])
def test_non_finite_stored_values_are_refused(made, capsys, which, part):
    src = made[which]
    bad = str(made["dir"] / "bad.safetensors")

    def poison(header, data):
        name = next(k for k in header if k.endswith(part))
        t = get_tensor(header, data, name)
        t.view(-1)[0] = float("nan") if which == "delta" else float("inf")
        poison.name = name
        return set_tensor(header, data, name, t)

    rewrite(src, bad, edit_data=poison)     # the recorded hash matches: the values must fail
    check = untouched(bad, made["base"])
    out = made["dir"] / "m.safetensors"
    for args in (("inspect", bad), ("apply", made["base"], bad, "-o", out)):
        expect_refused(capsys, args, out, "bad.safetensors", poison.name, "NaN or Inf")
    check()


def test_a_flipped_bit_is_caught_by_the_recorded_hash(made, capsys):
    bad = str(made["dir"] / "flipped.safetensors")

    def flip(header, data):
        name = next(k for k in header if k.endswith("lora_down.weight"))
        begin = header[name]["data_offsets"][0]
        b = bytearray(data)
        b[begin] ^= 0x01               # lowest mantissa bit: the value stays finite
        return bytes(b)

    rewrite(made["delta"], bad, edit_data=flip, rehash=False)
    expect_refused(capsys, ("inspect", bad), None, "flipped.safetensors", "sha256")
    out = made["dir"] / "m.safetensors"
    expect_refused(capsys, ("apply", made["base"], bad, "-o", out), out, "sha256")
    rc, err = cli(capsys, "inspect", bad, "--no-verify")        # the documented opt-out
    assert rc == 0, err


def test_a_delta_without_base_fingerprint_warns_when_applied(made, capsys):
    loose = str(made["dir"] / "loose.safetensors")
    rewrite(made["delta"], loose,
            edit_header=lambda h: h["__metadata__"].update({"deltasvd.base_sha256": ""}))
    out = made["dir"] / "m.safetensors"
    rc, err = cli(capsys, "apply", made["base"], loose, "-o", out)
    assert rc == 0 and "no fingerprint of its base" in err and "loose.safetensors" in err


def test_a_qsvd_file_decoding_to_absurd_values_is_refused_by_convert(made, capsys):
    """Finite but huge quantiser steps: the decoded change is no fine-tune; convert says so,
    naming the file and module, instead of reaching LAPACK or writing Inf."""
    bad = str(made["dir"] / "huge.safetensors")

    def huge(header, data):
        for name in [k for k in header if k.endswith(("up_scales", "down_scales"))]:
            t = get_tensor(header, data, name)
            data = set_tensor(header, data, name, torch.full_like(t, 60000.0))
        return data

    rewrite(made["qsvd"], bad, edit_data=huge)
    out = made["dir"] / "c.safetensors"
    expect_refused(capsys, ("convert", bad, "-o", out, "--energy", "0.5"), out,
                   "huge.safetensors", "tensor 'lora_", "singular value")


# 2. Delta records are checked against their tensors and spectra

def _edit_first_svd(edit):
    def go(header):
        records = layers(header)
        rec = next(r for r in records if r["kind"] == "svd")
        edit(rec)
        set_layers(header, records)
    return go


@pytest.mark.parametrize("edit,words", [
    (lambda r: r.update(rank=r["rank"] + 1), ["lora_up.weight", "the record says"]),
    (lambda r: r.update(shape=[r["shape"][0] + 1, *r["shape"][1:]]), ["lora_unet_"]),
    (lambda r: r.update(rows=[0, 10 ** 6]), ["rows"]),
    (lambda r: r.update(rank="3"), ["rank is '3'"]),
    (lambda r: r.update(kind="magic"), ["unknown kind"]),
    (lambda r: r.update(err2=float("nan")), ["err2"]),
], ids=["rank", "shape", "rows", "rank-type", "kind", "err2"])
def test_records_that_lie_are_refused(made, capsys, edit, words):
    bad = str(made["dir"] / "lie.safetensors")
    rewrite(made["delta"], bad, edit_header=_edit_first_svd(edit))
    out = made["dir"] / "r.safetensors"
    expect_refused(capsys, ("inspect", bad), None, "lie.safetensors", *words)
    expect_refused(capsys, ("resize", bad, "-o", out, "--energy", "0.5"), out, *words)
    expect_refused(capsys, ("apply", made["base"], bad, "-o", out), out, *words)


def _edit_spectra(edit):
    def go(header):
        raw = zlib.decompress(base64.b64decode(header["__metadata__"]["deltasvd.spectra"]))
        n = int.from_bytes(raw[:8], "little")
        full = np.frombuffer(raw[8: 8 + n], dtype=np.float16).copy()
        edit(full)
        header["__metadata__"]["deltasvd.spectra"] = base64.b64encode(zlib.compress(
            raw[:8] + full.tobytes() + raw[8 + n:])).decode()
    return go


@pytest.mark.parametrize("edit", [
    lambda f: f.__setitem__(0, np.nan),
    lambda f: f.__setitem__(1, -1.0),
    lambda f: f.__setitem__(slice(0, 3), f[:3][::-1].copy()),
], ids=["nan", "negative", "increasing"])
def test_spectra_that_are_not_singular_values_are_refused(made, capsys, edit):
    bad = str(made["dir"] / "spectrum.safetensors")
    rewrite(made["delta"], bad, edit_header=_edit_spectra(edit))
    expect_refused(capsys, ("inspect", bad), None, "spectrum.safetensors", "singular values")


def test_a_metadata_zip_bomb_is_refused_fast_and_small(made, tmp_path):
    """1 GiB of JSON whitespace in 1 MB of deltasvd.layers: refused without inflating it,
    in a separate process whose peak memory is measured."""
    packer = zlib.compressobj(9)
    packed = [packer.compress(b"[")]
    chunk = b" " * (16 << 20)
    for _ in range(64):
        packed.append(packer.compress(chunk))
    packed.append(packer.compress(b"]") + packer.flush())
    blob = base64.b64encode(b"".join(packed)).decode()
    assert len(blob) < 2 << 20
    bomb = str(tmp_path / "bomb.safetensors")
    rewrite(made["delta"], bomb,
            edit_header=lambda h: h["__metadata__"].update({"deltasvd.layers": blob}))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_RUNNER, "inspect", bomb], cwd=ROOT,
                          capture_output=True, text=True)
    elapsed = time.time() - start
    assert proc.returncode == 1, proc.stderr
    assert "bomb.safetensors" in proc.stderr and "inflates beyond" in proc.stderr
    peak_kib = int(proc.stderr.rsplit("peak-rss-kib ", 1)[1].split()[0])
    assert peak_kib < 900 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert elapsed < 60


# `python -m deltasvd ...` that reports its own peak RSS at exit. VmHWM, not the parent's
# wait4 ru_maxrss: that counts the pages of the (large) test process it was forked from.
PEAK_RSS_RUNNER = """
import atexit, runpy, sys
def peak():
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    sys.stderr.write(f"peak-rss-kib {hwm}\\n")
atexit.register(peak)
sys.argv[0] = "deltasvd"
runpy.run_module("deltasvd", run_name="__main__")
"""


# 3. The safetensors reader is as strict as safetensors

def _tensors():
    g = torch.Generator().manual_seed(11)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.weight": torch.randn(5, generator=g)}


def _malformed(kind):
    header, data = valid_layout(_tensors())
    if kind == "overlap":
        header["b.weight"]["data_offsets"] = [0, 20]
        return header, data[:48] + data[48:68]
    if kind == "negative-offset":
        header["a.weight"]["data_offsets"] = [-8, 40]
    elif kind == "gap":
        header["b.weight"]["data_offsets"] = [52, 72]
        data += b"\0" * 4
    elif kind == "out-of-bounds":
        header["b.weight"]["data_offsets"] = [48, 68]
        data = data[:60]
    elif kind == "trailing-bytes":
        data += b"\0" * 16
    elif kind == "dtype-list":
        header["a.weight"]["dtype"] = ["F32"]
    elif kind == "dtype-unknown":
        header["a.weight"]["dtype"] = "F128"
    elif kind == "offsets-strings":
        header["a.weight"]["data_offsets"] = ["0", "48"]
    elif kind == "metadata-list":
        header["__metadata__"] = ["x"]
    elif kind == "metadata-values":
        header["__metadata__"] = {"k": 3}
    elif kind == "negative-shape":
        header["a.weight"]["shape"] = [-4, -3]
    elif kind == "float-shape":
        header["a.weight"]["shape"] = [4.0, 3]
    elif kind == "entry-not-dict":
        header["a.weight"] = [1, 2]
    elif kind == "header-list":
        header = [header]
    return header, data


MALFORMED = ["overlap", "negative-offset", "gap", "out-of-bounds", "trailing-bytes",
             "dtype-list", "dtype-unknown", "offsets-strings", "metadata-list",
             "metadata-values", "negative-shape", "float-shape", "entry-not-dict",
             "header-list"]


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_headers_are_refused(tmp_path, capsys, kind):
    header, data = _malformed(kind)
    bad = raw_file(tmp_path / f"{kind}.safetensors", header, data)
    good = raw_file(tmp_path / "good.safetensors", *valid_layout(_tensors()))
    out = tmp_path / "d.safetensors"
    for args in (("compress", good, bad, "-o", out, "--energy", "0.5"), ("inspect", bad)):
        expect_refused(capsys, args, out, f"{kind}.safetensors")


@pytest.mark.parametrize("raw", [b"[" * 100000 + b"]" * 100000, b'{"a": 1, "a": 2}',
                                 b"\xff\xfe{}"], ids=["deep", "duplicate-key", "not-utf8"])
def test_malformed_json_is_refused(tmp_path, capsys, raw):
    bad = raw_file(tmp_path / "json.safetensors", None, b"", header_bytes=raw)
    expect_refused(capsys, ("inspect", bad), None, "json.safetensors")


def test_an_extras_blob_that_is_not_safetensors(made, capsys):
    bad = str(made["dir"] / "extras.safetensors")
    junk = base64.b64encode(zlib.compress(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"))
    rewrite(made["delta"], bad, edit_header=lambda h: h["__metadata__"].update(
        {"deltasvd.extras": junk.decode()}))
    expect_refused(capsys, ("inspect", bad), None, "extras.safetensors", "deltasvd.extras")


# 4. Special files and permissions

@pytest.fixture
def alarm():
    """Fail, rather than hang the suite, if a call blocks (a FIFO read would)."""
    def timeout(signum, frame):
        raise TimeoutError("blocked")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_fifo_as_a_checkpoint_is_refused_without_hanging(made, capsys, alarm):
    fifo = str(made["dir"] / "pipe.safetensors")
    os.mkfifo(fifo)
    out = made["dir"] / "d2.safetensors"
    expect_refused(capsys, ("compress", made["base"], fifo, "-o", out, "--energy", "0.5"),
                   out, "pipe.safetensors", "not a regular file")
    expect_refused(capsys, ("inspect", fifo), None, "pipe.safetensors", "not a regular file")


def test_an_existing_special_output_is_never_replaced(made, capsys, alarm):
    """A FIFO stands in for /dev/null: even --overwrite leaves it as it is."""
    fifo = str(made["dir"] / "special.safetensors")
    os.mkfifo(fifo)
    for args in (("compress", made["base"], made["tuned"], "-o", fifo, "--energy", "0.5",
                  "--overwrite"),
                 ("apply", made["base"], made["delta"], "-o", fifo, "--overwrite")):
        expect_refused(capsys, args, None, "special.safetensors", "not a regular file")
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not [f for f in files_in(made["dir"]) if f.endswith(".part")]


def test_an_unreadable_input_is_a_clear_error(made, capsys, monkeypatch):
    """Root reads anything, so the refusal of the operating system is simulated."""
    import deltasvd.safetensors_io as io
    real_open = os.open

    def deny(path, *a, **k):
        if str(path).endswith("tuned.safetensors"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(io.os, "open", deny)
    out = made["dir"] / "d2.safetensors"
    expect_refused(capsys, ("compress", made["base"], made["tuned"], "-o", out, "--energy",
                            "0.5"), out, "tuned.safetensors", "Permission denied")


# 5. Races and signals

def test_an_output_that_appears_meanwhile_is_not_replaced(made, monkeypatch):
    """Another run creates the output while we write ours: we fail, their file stays."""
    import deltasvd.safetensors_io as io
    from deltasvd import api
    out = str(made["dir"] / "race.safetensors")
    real = io.StreamingWriter.write

    def racing_write(self, name, tensor):
        if not os.path.exists(out):
            with open(out, "wb") as f:
                f.write(b"the other run's file")
        return real(self, name, tensor)

    monkeypatch.setattr(io.StreamingWriter, "write", racing_write)
    with pytest.raises(api.DeltaError, match="appeared while working") as e:
        api.compress_files(made["base"], made["tuned"], out, api.make_rule("energy", 0.5))
    assert "race.safetensors" in str(e.value)
    assert open(out, "rb").read() == b"the other run's file"
    assert not [f for f in files_in(made["dir"]) if f.endswith(".part")]


def test_sigterm_leaves_no_partial_file(tmp_path):
    """`timeout` / `docker stop` send SIGTERM: the half-written output goes, as on Ctrl-C."""
    from deltasvd.fixtures import make_pair
    base, tuned = make_pair(tmp_path, "sd15", "small", seed=4)
    delta = tmp_path / "d.safetensors"
    assert main(["compress", base, tuned, "-o", str(delta), "--rank", "4"]) == 0
    out = tmp_path / "merged.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "deltasvd", "apply", base, str(delta), "-o",
                             str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    end = time.time() + 120
    while not [f for f in files_in(tmp_path) if f.endswith(".part")]:
        assert proc.poll() is None, "apply finished before it could be stopped"
        assert time.time() < end
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert b"interrupted" in err
    assert not out.exists()
    assert not [f for f in files_in(tmp_path) if f.endswith(".part")]


def test_a_255_character_output_name_works(made, capsys):
    out = made["dir"] / ("n" * 243 + ".safetensors")
    assert len(out.name) == 255
    rc, err = cli(capsys, "compress", made["base"], made["tuned"], "-o", out, "--energy", "0.5")
    assert rc == 0, err and out.exists()


# 6. Resource failures

def test_a_tensor_too_large_for_memory_is_refused_before_any_hashing(made, capsys,
                                                                     monkeypatch):
    hashed = []
    monkeypatch.setattr(compress_mod, "_available_bytes", lambda: 1000)
    monkeypatch.setattr(compress_mod, "_fingerprint", lambda p: hashed.append(p) or "0" * 64)
    out = made["dir"] / "d2.safetensors"
    expect_refused(capsys, ("compress", made["base"], made["tuned"], "-o", out, "--energy",
                            "0.5"), out, "tuned.safetensors", "tensor '", "GiB of memory")
    assert hashed == []


def test_running_out_of_memory_midway_names_the_tensor(made, capsys, monkeypatch):
    def no_memory(key, *a):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(compress_mod, "pair_delta", no_memory)
    out = made["dir"] / "d2.safetensors"
    expect_refused(capsys, ("compress", made["base"], made["tuned"], "-o", out, "--energy",
                            "0.5"), out, "tuned.safetensors", "tensor '", "out of memory")


# 7. Small ones

def test_demo_with_a_bad_option_leaves_nothing(tmp_path, capsys, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rc, err = cli(capsys, "demo", "--energy", "5")
    assert rc == 2 and "energy" in err
    assert files_in(tmp_path) == []


def test_demo_dir_naming_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_bytes(b"keep me")
    expect_refused(capsys, ("demo", "--dir", f), None, "a_file", "not a folder")
    assert f.read_bytes() == b"keep me"


def test_an_output_linked_to_an_input_is_refused(made, capsys):
    link = made["dir"] / "link.safetensors"
    os.symlink(made["tuned"], link)
    check = untouched(made["tuned"])
    expect_refused(capsys, ("compress", made["base"], made["tuned"], "-o", link, "--energy",
                            "0.5", "--overwrite"), None, "one of the inputs")
    check()


def test_inputs_are_never_changed(made, capsys):
    """After every refusal above the inputs are intact; here the plain paths, once more."""
    check = untouched(made["base"], made["tuned"], made["delta"])
    for args in (("compress", made["base"], made["tuned"], "-o", made["tuned"], "--energy",
                  "0.5", "--overwrite"),
                 ("apply", made["base"], made["delta"], "-o", made["delta"], "--overwrite")):
        assert cli(capsys, *args)[0] == 1
    check()


def test_header_keys_are_read_once(made):
    """read_all (the helper) and the reader agree on a valid file: the editors start true."""
    header, data = read_all(made["delta"])
    with SafeTensorsFile(made["delta"]) as f:
        for name in f.keys():
            assert torch.equal(f.get(name), get_tensor(header, data, name))
    assert json.loads(json.dumps(first_svd(header)))["rank"] >= 1
