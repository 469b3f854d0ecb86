"""Whole files through the CLI: round trips, the file's metadata, resize, and every bad input."""

import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY_KEYS, fine_tune, save, tiny_state
from deltasvd import cli
from deltasvd.delta_file import read_delta
from deltasvd.safetensors_io import SafeTensorsFile, tensor_data_sha256

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    """The CLI in-process: (exit code)."""
    return cli.main([str(a) for a in args])


def files_in(folder):
    return sorted(os.listdir(folder))


def test_python_m_works_from_checkout(tiny_pair, tmp_path):
    base, tuned = tiny_pair
    out = tmp_path / "d.safetensors"
    r = subprocess.run([sys.executable, "-m", "deltasvd", "compress", base, tuned, "-o", out,
                        "--energy", "0.5"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "rel.err" in r.stdout and out.exists()
    r = subprocess.run([sys.executable, "-m", "deltasvd", "inspect", out], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Stable Diffusion 1.x" in r.stdout


def test_energy_one_fp32_reconstructs_exactly(tiny_pair, tmp_path):
    base, tuned = tiny_pair
    out, merged = tmp_path / "d.safetensors", tmp_path / "m.safetensors"
    assert run("compress", base, tuned, "-o", out, "--energy", "1", "--dtype", "fp32") == 0
    assert run("apply", base, out, "-o", merged) == 0
    with SafeTensorsFile(tuned) as t, SafeTensorsFile(merged) as m:
        for key in t.keys():
            assert torch.allclose(m.get(key), t.get(key), rtol=0, atol=1e-6), key


def test_apply_round_trip_matches_reported_error(tiny_pair, tmp_path):
    base, tuned = tiny_pair
    out, merged = tmp_path / "d.safetensors", tmp_path / "m.safetensors"
    assert run("compress", base, tuned, "-o", out, "--energy", "0.5") == 0
    delta = read_delta(out)
    assert run("apply", base, out, "-o", merged, "--strength", "1") == 0
    num = den = 0.0
    with SafeTensorsFile(base) as b, SafeTensorsFile(tuned) as t, SafeTensorsFile(merged) as m:
        assert m.keys() == b.keys()
        for key in t.keys():
            assert m.dtype(key) == b.dtype(key)
            num += float((m.get(key).double() - t.get(key).double()).pow(2).sum())
            den += float((t.get(key).double() - b.get(key).double()).pow(2).sum())
    reported = sum(r.err2 for r in delta.records) / sum(r.norm2 for r in delta.records)
    assert np.isclose(num / den, reported, rtol=1e-3)
    assert 0 < num / den < 0.5


def test_strength_zero_gives_the_base(tiny_pair, tmp_path):
    base, tuned = tiny_pair
    out, merged = tmp_path / "d.safetensors", tmp_path / "m.safetensors"
    run("compress", base, tuned, "-o", out, "--energy", "0.5")
    assert run("apply", base, out, "-o", merged, "--strength", "0") == 0
    with SafeTensorsFile(base) as b, SafeTensorsFile(merged) as m:
        for key in b.keys():
            assert torch.equal(b.get(key), m.get(key))


def test_metadata_and_own_hash(tiny_pair, tmp_path):
    base, tuned = tiny_pair
    out = tmp_path / "subject.safetensors"
    run("compress", base, tuned, "-o", out, "--energy", "0.5")
    meta = SafeTensorsFile(out).metadata
    assert meta["deltasvd.format"] == "deltasvd" and meta["deltasvd.codec"] == "svd"
    assert meta["deltasvd.mode"] == "energy" and meta["deltasvd.value"] == "0.5"
    assert meta["deltasvd.base_sha256"] == tensor_data_sha256(base)
    assert meta["deltasvd.tuned_sha256"] == tensor_data_sha256(tuned)
    assert meta["deltasvd.base_name"] == "base.safetensors"
    assert meta["sshs_model_hash"] == tensor_data_sha256(out)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == meta["modelspec.title"] == "subject"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    ranks = json.loads(meta["deltasvd.ranks"])
    assert ranks and all(isinstance(v, int) for v in ranks.values())
    for name, rank in ranks.items():
        t = SafeTensorsFile(out)
        assert t.shape(name + ".lora_down.weight")[0] == rank
        assert float(t.get(name + ".alpha")) == rank


def test_dtype_aware_delta_ignores_storage_rounding(tmp_path, capsys):
    """An fp16 copy of an fp32 base is no fine-tune: every tensor is identical after rounding,
    and the empty delta is refused, not written."""
    base = tiny_state()
    b = save(tmp_path / "b.safetensors", base)
    t = save(tmp_path / "t.safetensors", {k: v.half() for k, v in base.items()})
    out = tmp_path / "d.safetensors"
    assert run("compress", b, t, "-o", out, "--energy", "0.5") == 1
    assert "nothing changed" in capsys.readouterr().err and not out.exists()


def test_the_same_file_twice_is_refused(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    out = tmp_path / "d.safetensors"
    assert run("compress", base, base, "-o", out, "--energy", "0.5") == 1
    assert "same file" in capsys.readouterr().err and not out.exists()
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(open(base, "rb").read())
    assert run("compress", base, copy, "-o", out, "--energy", "0.5") == 1
    assert "nothing changed" in capsys.readouterr().err and not out.exists()


def test_dtype_aware_delta_keeps_the_fine_tune(tmp_path, capsys):
    base = tiny_state()
    tuned16 = fine_tune(base, dtype=torch.float16)
    b = save(tmp_path / "b.safetensors", base)
    t = save(tmp_path / "t.safetensors", tuned16)
    out = tmp_path / "d.safetensors"
    assert run("compress", b, t, "-o", out, "--fro", "1", "--dtype", "fp32") == 0
    assert "dtype-aware delta" in capsys.readouterr().out
    delta = read_delta(out)
    from deltasvd.apply import delta_for, records_by_key
    for key, recs in records_by_key(delta).items():
        want = tuned16[key].float() - base[key].half().float()
        assert torch.allclose(delta_for(delta, recs, want.shape), want, atol=1e-6), key


def test_identical_and_untouched_tensors_are_skipped(tmp_path):
    base = tiny_state()
    tuned = dict(base)
    key = TINY_KEYS[1]
    tuned[key] = base[key] + 0.01 * torch.randn(base[key].shape)
    out = tmp_path / "d.safetensors"
    assert run("compress", save(tmp_path / "b.safetensors", base),
               save(tmp_path / "t.safetensors", tuned), "-o", out, "--energy", "0.5") == 0
    assert {r.key for r in read_delta(out).records} == {key}


def test_resize_is_exact(tiny_pair, tmp_path):
    base, tuned = tiny_pair
    big, small, direct = (tmp_path / n for n in ("big.safetensors", "small.safetensors",
                                                 "direct.safetensors"))
    run("compress", base, tuned, "-o", big, "--energy", "0.6")
    run("compress", base, tuned, "-o", direct, "--energy", "0.2")
    assert run("resize", big, "-o", small, "--energy", "0.2") == 0
    a, b, c = read_delta(big), read_delta(small), read_delta(direct)
    ranks_small = {r.name: r.rank for r in b.records if r.kind == "svd" and r.n}
    ranks_direct = {r.name: r.rank for r in c.records if r.kind == "svd" and r.n}
    assert ranks_small == ranks_direct
    for name, t in ranks_small.items():
        up_big = a.tensors[name + ".lora_up.weight"]
        assert torch.equal(b.tensors[name + ".lora_up.weight"], up_big[:, :t])
    assert run("resize", small, "-o", tmp_path / "grow.safetensors", "--energy", "0.6") == 1


def test_size_budget_is_met_and_beats_energy_at_equal_size(tmp_path):
    """Layers with different spectra: one threshold for all is not the best use of bytes."""
    base = tiny_state()
    tuned = {}
    for i, (key, w) in enumerate(base.items()):   # steep, medium and flat spectra in turn
        tuned.update(fine_tune({key: w}, seed=i, rank=64, noise=(1e-5, 1e-4, 6e-4)[i % 3]))
    b = save(tmp_path / "b.safetensors", base)
    t = save(tmp_path / "t.safetensors", tuned)
    e_out, s_out = tmp_path / "e.safetensors", tmp_path / "s.safetensors"
    assert run("compress", b, t, "-o", e_out, "--energy", "0.4") == 0
    size_mb = os.path.getsize(e_out) / 2**20
    assert run("compress", b, t, "-o", s_out, "--size-mb", f"{size_mb:.6f}") == 0
    assert os.path.getsize(s_out) <= size_mb * 2**20
    assert os.path.getsize(s_out) >= 0.99 * size_mb * 2**20      # and the budget is used
    err = {p: sum(r.err2 for r in read_delta(p).records) for p in (e_out, s_out)}
    assert err[s_out] < 0.95 * err[e_out]


def test_dense_fallback_when_factors_are_larger(tmp_path):
    keys = [TINY_KEYS[0], "model.diffusion_model.out.2.weight"]   # out.2: 4 x 2880 conv
    base = tiny_state(keys=keys)
    out = tmp_path / "d.safetensors"
    assert run("compress", save(tmp_path / "b.safetensors", base),
               save(tmp_path / "t.safetensors", fine_tune(base, noise=1e-2)),
               "-o", out, "--energy", "0.99") == 0
    rec = {r.key: r for r in read_delta(out).records}["model.diffusion_model.out.2.weight"]
    assert rec.kind == "dense"
    assert "lora_unet_out_2.diff" in SafeTensorsFile(out).keys()


# ---- bad input: a clear error naming the file (and tensor), exit 1, nothing written ----------

def expect_failure(args, tmp_path, capsys, *words):
    before = files_in(tmp_path)
    assert run(*args) == 1
    err = capsys.readouterr().err
    for w in words:
        assert str(w) in err, err
    assert files_in(tmp_path) == before, "a failure left a file behind"
    return err


def test_missing_file(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    missing = tmp_path / "nope.safetensors"
    expect_failure(("compress", base, missing, "-o", tmp_path / "o.safetensors", "--energy",
                    "0.5"), tmp_path, capsys, missing, "not found")


def test_not_a_safetensors_file(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"hello, I am a text file and not a model at all")
    expect_failure(("compress", base, bad, "-o", tmp_path / "o.safetensors", "--energy", "0.5"),
                   tmp_path, capsys, bad, "not a safetensors file")


def test_truncated_file(tiny_pair, tmp_path, capsys):
    base, tuned = tiny_pair
    cut = tmp_path / "cut.safetensors"
    data = open(tuned, "rb").read()
    cut.write_bytes(data[: len(data) - 1000])
    expect_failure(("compress", base, cut, "-o", tmp_path / "o.safetensors", "--energy", "0.5"),
                   tmp_path, capsys, cut, "truncated")


def test_wrong_family(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    sdxl = tmp_path / "xl.safetensors"
    save(sdxl, {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
                torch.randn(640, 2048),
                "model.diffusion_model.label_emb.0.0.weight": torch.randn(1280, 2816)})
    expect_failure(("compress", base, sdxl, "-o", tmp_path / "o.safetensors", "--energy",
                    "0.5"), tmp_path, capsys, "family mismatch", "Stable Diffusion XL")


def test_mismatched_shapes(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    state = tiny_state()
    key = TINY_KEYS[1]
    state[key] = torch.randn(320, 321, 1, 1)
    odd = save(tmp_path / "odd.safetensors", state)
    expect_failure(("compress", base, odd, "-o", tmp_path / "o.safetensors", "--energy", "0.5"),
                   tmp_path, capsys, "shape mismatch", key)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf(tiny_pair, tmp_path, capsys, value):
    base, _ = tiny_pair
    state = fine_tune(tiny_state())
    key = TINY_KEYS[3]
    state[key].view(-1)[17] = value
    bad = save(tmp_path / "nan.safetensors", state)
    expect_failure(("compress", base, bad, "-o", tmp_path / "o.safetensors", "--energy", "0.5"),
                   tmp_path, capsys, bad, key, "NaN or Inf")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/deltasvd_pwned",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused(tiny_pair, tmp_path, capsys, writer):
    base, _ = tiny_pair
    evil = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"x": _Evil()}}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(payload, f)
    if os.path.exists("/tmp/deltasvd_pwned"):
        os.remove("/tmp/deltasvd_pwned")
    args = ("compress", base, evil, "-o", tmp_path / "o.safetensors", "--energy", "0.5")
    expect_failure(args, tmp_path, capsys, evil, "--allow-pickle")
    expect_failure(args + ("--allow-pickle",), tmp_path, capsys, evil, "refused")
    assert not os.path.exists("/tmp/deltasvd_pwned")


def test_legacy_ckpt_with_flag_works(tiny_pair, tmp_path):
    base, _ = tiny_pair
    ckpt = tmp_path / "tuned.ckpt"
    torch.save({"state_dict": fine_tune(tiny_state())}, ckpt)
    assert run("compress", base, ckpt, "-o", tmp_path / "o.safetensors", "--energy", "0.5",
               "--allow-pickle") == 0


def test_output_equal_to_input_is_refused(tiny_pair, tmp_path, capsys):
    base, tuned = tiny_pair
    before = open(tuned, "rb").read()
    expect_failure(("compress", base, tuned, "-o", tuned, "--energy", "0.5", "--overwrite"),
                   tmp_path, capsys, "one of the inputs")
    assert open(tuned, "rb").read() == before


def test_existing_output_needs_overwrite(tiny_pair, tmp_path, capsys):
    base, tuned = tiny_pair
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    expect_failure(("compress", base, tuned, "-o", out, "--energy", "0.5"), tmp_path, capsys,
                   "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert run("compress", base, tuned, "-o", out, "--energy", "0.5", "--overwrite") == 0


def test_unwritable_output(tiny_pair, tmp_path, capsys):
    base, tuned = tiny_pair
    assert run("compress", base, tuned, "-o", "/proc/deltasvd.safetensors", "--energy",
               "0.5") == 1
    assert "deltasvd.safetensors" in capsys.readouterr().err
    assert run("compress", base, tuned, "-o", tmp_path / "no" / "dir.safetensors",
               "--energy", "0.5") == 1


def test_failure_mid_write_leaves_nothing(tiny_pair, tmp_path, monkeypatch):
    import deltasvd.safetensors_io as io
    base, tuned = tiny_pair
    calls = {"n": 0}
    real = io.StreamingWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(io.StreamingWriter, "write", failing)
    before = files_in(tmp_path)
    assert run("compress", base, tuned, "-o", tmp_path / "o.safetensors", "--energy", "0.5") == 1
    assert calls["n"] == 3 and files_in(tmp_path) == before


def test_apply_refuses_another_base(tiny_pair, tmp_path, capsys):
    base, tuned = tiny_pair
    out = tmp_path / "d.safetensors"
    run("compress", base, tuned, "-o", out, "--energy", "0.5")
    other = save(tmp_path / "other.safetensors", tiny_state(seed=7))
    expect_failure(("apply", other, out, "-o", tmp_path / "m.safetensors"), tmp_path, capsys,
                   "not the base", "--force")
    assert run("apply", other, out, "-o", tmp_path / "m.safetensors", "--force") == 0


def test_apply_refuses_a_plain_lora(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    lora = save(tmp_path / "lora.safetensors",
                {"lora_unet_x.lora_up.weight": torch.randn(4, 2)})
    expect_failure(("apply", base, lora, "-o", tmp_path / "m.safetensors"), tmp_path, capsys,
                   "not a deltasvd delta file")


def test_unknown_codec_is_refused(tiny_pair, tmp_path, capsys):
    base, tuned = tiny_pair
    out = tmp_path / "d.safetensors"
    run("compress", base, tuned, "-o", out, "--energy", "0.5")
    raw = bytearray(out.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8: 8 + n].replace(b'"deltasvd.codec":"svd"', b'"deltasvd.codec":"zzz"')
    out.write_bytes(bytes(raw[:8]) + bytes(header) + bytes(raw[8 + n:]))
    expect_failure(("inspect", out), tmp_path, capsys, "unknown codec 'zzz'")


@pytest.mark.parametrize("args", [("compress",), ("compress", "a", "b", "-o", "c"),
                                  ("compress", "a", "b", "-o", "c", "--energy", "x"),
                                  ("frobnicate",)])
def test_usage_errors_exit_2(args):
    with pytest.raises(SystemExit) as e:
        run(*args)
    assert e.value.code == 2


def test_bad_rule_value_exits_2_with_the_subcommand_usage(tiny_pair, tmp_path, capsys):
    """Checked with the options, before torch is imported: exit 2 and `compress`'s usage."""
    base, tuned = tiny_pair
    with pytest.raises(SystemExit) as e:
        run("compress", base, tuned, "-o", tmp_path / "o.safetensors", "--energy", "1.5")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: deltasvd compress") and "--energy must be in (0, 1]" in err
    assert files_in(tmp_path) == ["base.safetensors", "tuned.safetensors"]


def test_a_usage_error_comes_before_torch_is_imported(tmp_path):
    code = ("import sys; from deltasvd.cli import main\n"
            "try:\n    main(['compress', 'a', 'b', '-o', 'c', '--energy', '7'])\n"
            "except SystemExit as e:\n    assert e.code == 2\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)


def test_help_describes_every_argument():
    from deltasvd.cli_parser import build_parser
    for name, sub in build_parser().subcommands.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)


def test_inspect_into_a_closed_pipe_is_quiet(tiny_pair, tmp_path):
    base, tuned = tiny_pair
    out = tmp_path / "d.safetensors"
    assert run("compress", base, tuned, "-o", out, "--energy", "0.5") == 0
    proc = subprocess.run(f"{sys.executable} -m deltasvd inspect {out} | head -1", shell=True,
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "Error" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("file")


def test_unet_only_file_pairs_with_a_full_checkpoint(tiny_pair, tmp_path, capsys):
    """A UNet-only fine-tune (bare LDM keys, as ComfyUI's UNET loader reads) against a full
    base: the text encoder counts as unchanged."""
    base, _ = tiny_pair
    tuned = fine_tune(tiny_state())
    unet = {k[len("model.diffusion_model."):]: v for k, v in tuned.items()
            if k.startswith("model.diffusion_model.")}
    out = tmp_path / "d.safetensors"
    assert run("compress", base, save(tmp_path / "unet.safetensors", unet), "-o", out,
               "--energy", "0.5") == 0
    assert "only in the base" in capsys.readouterr().out
    keys = {r.key for r in read_delta(out).records}
    assert keys and all(k.startswith("model.diffusion_model.") for k in keys)
    assert run("inspect", out) == 0
    assert "compression ratio" in capsys.readouterr().out


def test_ema_and_non_float_tensors_are_ignored_and_counted(tiny_pair, tmp_path, capsys):
    base, _ = tiny_pair
    tuned = fine_tune(tiny_state())
    tuned["model_ema.diffusion_modelinput_blocks11proj_inweight"] = torch.randn(320, 320, 1, 1)
    tuned["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    tuned["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77).reshape(1, 77)
    out = tmp_path / "d.safetensors"
    assert run("compress", base, save(tmp_path / "t.safetensors", tuned), "-o", out,
               "--energy", "0.5") == 0
    assert "2 EMA and 1 non-float ignored" in capsys.readouterr().out
    assert not any("ema" in r.key for r in read_delta(out).records)


@pytest.mark.parametrize("ctx,label,family", [(768, False, "sd1"), (1024, False, "sd2"),
                                              (2048, True, "sdxl")])
def test_family_detection(tmp_path, ctx, label, family):
    from deltasvd.checkpoint import Checkpoint
    state = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
             torch.randn(8, ctx)}
    if label:
        state["model.diffusion_model.label_emb.0.0.weight"] = torch.randn(8, 4)
    assert Checkpoint(save(tmp_path / "m.safetensors", state)).family == family


@pytest.mark.parametrize("missing,words", [("numpy", "needs the package numpy"),
                                           ("safetensors", "needs the package safetensors")])
def test_a_missing_package_is_one_line(missing, words):
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from deltasvd.cli import main\nsys.exit(main(['inspect', 'x.safetensors']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_without_tqdm_there_are_no_bars_and_one_line(tiny_pair, tmp_path):
    out = tmp_path / "d.safetensors"
    code = ("import sys; sys.modules['tqdm'] = None\nfrom deltasvd.cli import main\n"
            f"sys.exit(main(['compress', {tiny_pair[0]!r}, {tiny_pair[1]!r}, '-o', {str(out)!r},"
            " '--energy', '0.5']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "deltasvd: no progress bars (pip install tqdm for them)"
    assert out.exists()
