"""Every job of the CLI on a non-SD family: compress (svd, qsvd, dct), inspect, resize,
convert and apply on a tiny pair with Flux.1 key names (bare, as a diffusion-model-only file),
and the generic family on an architecture no family knows. Merged weights are checked against
base + the delta the file describes, in float64."""

import contextlib
import io

import pytest
import torch

from deltasvd.apply import records_by_key, delta_for
from deltasvd.checkpoint import Checkpoint
from deltasvd.cli import main
from deltasvd.delta_file import read_delta
from deltasvd.safetensors_io import SafeTensorsFile, write_tensors
from test_fp8_inputs import base_state, fine_tuned


def run(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue()


@pytest.fixture
def flux_pair(tmp_path):
    base = base_state()
    b, t = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    write_tensors(str(b), base)
    write_tensors(str(t), {k: v.to(torch.bfloat16) for k, v in fine_tuned(base).items()})
    return b, t


def check_merged(base_path, delta_path, merged_path, strength=1.0):
    delta, base = read_delta(str(delta_path)), Checkpoint(str(base_path))
    merged = SafeTensorsFile(str(merged_path))
    by_key = records_by_key(delta)
    assert by_key
    for key, raw in base.key_map.items():
        want = base.get(key).double()
        if key in by_key:
            want = want + strength * delta_for(delta, by_key[key], want.shape).double()
        want = want.to(merged.dtype(raw)).double()          # as stored: bf16 rounding
        got = merged.get(raw).double()
        assert torch.allclose(got, want, rtol=2 ** -7, atol=1e-6), key


@pytest.mark.parametrize("codec", [[], ["--factor-bits", "8"]], ids=["svd", "qsvd"])
def test_cli_jobs_on_flux(flux_pair, tmp_path, codec):
    b, t = flux_pair
    d = tmp_path / "d.safetensors"
    rc, text = run("compress", b, t, "-o", d, "--energy", "0.9", *codec)
    assert rc == 0 and "double_blocks" in text and "final_layer" in text
    rc, text = run("inspect", d)
    assert rc == 0 and "Flux.1 (dev / Krea / Kontext)" in text and "Flux.1 D" in text
    if codec:
        rc, _ = run("convert", d, "-o", tmp_path / "c.safetensors", "--energy", "0.9")
        assert rc == 0 and read_delta(str(tmp_path / "c.safetensors")).family == "flux"
    else:
        rc, _ = run("resize", d, "-o", tmp_path / "r.safetensors", "--energy", "0.5")
        assert rc == 0
        r = read_delta(str(tmp_path / "r.safetensors"))
        assert r.family == "flux" and r.info.get("mode") == "energy"
        meta = SafeTensorsFile(str(d)).metadata
        assert meta["modelspec.architecture"] == "flux-1-dev/lora"
        assert meta["ss_base_model_version"] == "flux1"
    rc, _ = run("apply", b, d, "-o", tmp_path / "m.safetensors", "--strength", "0.5")
    assert rc == 0
    check_merged(b, d, tmp_path / "m.safetensors", 0.5)


def test_cli_dct_on_flux(flux_pair, tmp_path):
    b, t = flux_pair
    d = tmp_path / "d.safetensors"
    assert run("compress", b, t, "-o", d, "--codec", "dct", "--bits", "3")[0] == 0
    assert run("apply", b, d, "-o", tmp_path / "m.safetensors")[0] == 0
    check_merged(b, d, tmp_path / "m.safetensors")


def test_generic_family(tmp_path):
    """An architecture nobody registered: compressed per tensor under generic names, grouped by
    the first part of the key; refused only when the files do not match."""
    g = torch.Generator().manual_seed(0)
    base = {"encoder.layers.0.proj.weight": torch.randn(48, 32, generator=g),
            "encoder.layers.0.proj.bias": torch.randn(48, generator=g),
            "decoder.head.weight": torch.randn(16, 48, generator=g),
            "decoder.gain": torch.randn(16, generator=g)}
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    b, t = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    write_tensors(str(b), base)
    write_tensors(str(t), tuned)
    d = tmp_path / "d.safetensors"
    rc, text = run("compress", b, t, "-o", d, "--energy", "1.0", "--dtype", "fp32")
    assert rc == 0 and "encoder" in text and "decoder" in text
    delta = read_delta(str(d))
    assert delta.family == "generic"
    names = {r.name for r in delta.records}
    assert names == {"lora_unet_encoder_layers_0_proj", "lora_unet_decoder_head",
                     "diffusion_model.decoder.gain"}
    assert run("apply", b, d, "-o", tmp_path / "m.safetensors")[0] == 0
    merged = SafeTensorsFile(str(tmp_path / "m.safetensors"))
    for k, v in tuned.items():
        assert torch.allclose(merged.get(k), v, atol=1e-5), k
    bad = dict(tuned, **{"decoder.head.weight": torch.zeros(16, 40)})
    write_tensors(str(tmp_path / "bad.safetensors"), bad)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, _ = run("compress", b, tmp_path / "bad.safetensors", "-o", tmp_path / "x.safetensors",
                    "--energy", "0.5")
    assert rc == 1 and "shape mismatch" in err.getvalue() and "decoder.head.weight" in err.getvalue()


def test_two_families_are_refused(flux_pair, tmp_path):
    b, _ = flux_pair
    qwen = tmp_path / "qwen.safetensors"
    write_tensors(str(qwen), {"txt_norm.weight": torch.ones(64), "img_in.weight": torch.ones(32, 64),
                              "transformer_blocks.0.attn.to_q.weight": torch.ones(32, 32)})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, _ = run("compress", b, qwen, "-o", tmp_path / "x.safetensors", "--energy", "0.5")
    assert rc == 1
    assert "family mismatch: base is Flux.1 (dev / Krea / Kontext), tuned is Qwen-Image" \
        in err.getvalue() and str(qwen) in err.getvalue()
    assert not (tmp_path / "x.safetensors").exists()
