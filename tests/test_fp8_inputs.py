"""fp8 and ComfyUI's scaled-fp8 checkpoints through the whole job: compress, inspect, apply.

Pairs are real safetensors files with Flux key names (bare, as ComfyUI's "Load Diffusion Model"
reads them): a bf16 base and a fine-tune stored as plain fp8, as legacy scaled fp8 (marker
`scaled_fp8` + `<module>.scale_weight`), or with per-layer `comfy_quant` configs +
`weight_scale`. Every delta is checked against a float64 reference computed here from the
stored bytes: tuned_real - base rounded to the tuned file's format.
"""

import json

import pytest
import torch

from deltasvd import api
from deltasvd.apply import apply_file
from deltasvd.checkpoint import Checkpoint
from deltasvd.delta_file import read_delta, reconstruct
from deltasvd.errors import DeltaError
from deltasvd.ranks import RankRule
from deltasvd.safetensors_io import SafeTensorsFile, write_tensors

E4M3 = torch.float8_e4m3fn
MATRICES = {"double_blocks.0.img_attn.qkv.weight": (96, 32),
            "double_blocks.0.img_mlp.0.weight": (64, 32),
            "final_layer.linear.weight": (16, 32)}
OTHERS = {"double_blocks.0.img_attn.qkv.bias": (96,),
          "double_blocks.0.img_attn.norm.key_norm.scale": (8,),
          "double_blocks.0.img_attn.norm.query_norm.scale": (8,),
          "img_in.weight": (32, 16), "guidance_in.in_layer.weight": (32, 8)}
FULL = RankRule("energy", 1.0)


def base_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {k: (torch.randn(s, generator=g) / s[1] ** 0.5).to(torch.bfloat16)
           for k, s in MATRICES.items()}
    out.update({k: (1 + 0.1 * torch.randn(s, generator=g)).to(torch.bfloat16)
                for k, s in OTHERS.items()})
    return out


def fine_tuned(base, seed=1, scale=0.05):
    """float32 real weights: a rank-4 change on every matrix, a nudge on the 1-D tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in base.items():
        w = w.float()
        if w.ndim == 2 and k in MATRICES:
            u, v = torch.randn(w.shape[0], 4, generator=g), torch.randn(4, w.shape[1], generator=g)
            w = w + scale * (u @ v) / w.shape[1] ** 0.5
        elif w.ndim == 1:
            w = w + 0.01 * torch.randn(w.shape, generator=g)
        out[k] = w
    return out


def scaled(real, dtype=E4M3):
    """(fp8 weight, float32 scalar scale) as ComfyUI's converters make them: amax / fp8 max."""
    scale = (real.abs().max() / torch.finfo(dtype).max).float().reshape(())
    return (real / scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype), scale


def legacy_file(path, real):
    """Legacy scaled fp8: matrices scaled, everything else bf16, the marker names e4m3."""
    out = {"scaled_fp8": torch.empty(0, dtype=E4M3)}
    for k, w in real.items():
        if k in MATRICES:
            out[k], out[k[: -len("weight")] + "scale_weight"] = scaled(w)
        else:
            out[k] = w.to(torch.bfloat16)
    write_tensors(str(path), out)
    return str(path)


def comfy_quant_file(path, real):
    out = {}
    for k, w in real.items():
        if k in MATRICES:
            module = k[: -len(".weight")]
            out[k], out[module + ".weight_scale"] = scaled(w)
            conf = json.dumps({"format": "float8_e4m3fn"}).encode()
            out[module + ".comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        else:
            out[k] = w.to(torch.bfloat16)
    write_tensors(str(path), out)
    return str(path)


def plain_fp8_file(path, real, dtype=E4M3):
    write_tensors(str(path), {k: w.to(dtype) for k, w in real.items()})
    return str(path)


def stored_scale(f, k):
    """The float64 scale a file stores weight `k` with (either scaled-fp8 form), or None."""
    module = k.rsplit(".", 1)[0]
    for scale_key in (module + ".scale_weight", module + ".weight_scale"):
        if k.endswith(".weight") and scale_key in f.keys():
            return f.get(scale_key).to(torch.float64)
    return None


def stored_real(path):
    """float64 real weights of a file, from its bytes: weight * scale where scaled."""
    f = SafeTensorsFile(path)
    out = {}
    for k in f.keys():
        if not k.endswith((".weight", ".bias", ".scale")):
            continue
        scale = stored_scale(f, k)
        w = f.get(k).to(torch.float64)
        out[k] = w if scale is None else w * scale
    f.close()
    return out


def reference_delta(base_path, tuned_path):
    """float64 tuned_real - base rounded to the tuned format (its scale for scaled layers)."""
    from test_quantized import ref_round
    b, t = stored_real(base_path), stored_real(tuned_path)
    f = SafeTensorsFile(tuned_path)
    out = {}
    for k, tv in t.items():
        dtype, bv, scale = f.dtype(k), b[k], stored_scale(f, k)
        if dtype in (E4M3, torch.float8_e5m2):
            bv = ref_round(bv / scale, dtype) * scale if scale is not None else ref_round(bv, dtype)
        out[k] = tv - bv
    f.close()
    return out


def compress(tmp_path, base, tuned, rule=FULL, name="d"):
    out = tmp_path / f"{name}.safetensors"
    delta, summary = api.compress_files(base, tuned, str(out), rule, "fp32")
    return read_delta(str(out)), summary, str(out)


def check_against_reference(delta, ref, tol=1e-5):
    by_key = {}
    for rec in delta.records:
        by_key.setdefault(rec.key, []).append(rec)
    for k, want in ref.items():
        key = "model.diffusion_model." + k
        if not want.any():
            assert key not in by_key, f"{k}: stored although nothing changed"
            continue
        got = sum(reconstruct(r, delta.stored(r)).double() for r in by_key[key])
        err = (got - want).norm().item()
        assert err <= tol * want.norm().item() + 1e-12, (k, err, want.norm().item())


@pytest.mark.parametrize("writer", [legacy_file, comfy_quant_file, plain_fp8_file],
                         ids=["legacy", "comfy_quant", "plain"])
def test_fp8_fine_tune_gives_the_reference_delta(tmp_path, writer):
    base = base_state()
    base_path = str(tmp_path / "base.safetensors")
    write_tensors(base_path, base)
    tuned_path = writer(tmp_path / "tuned.safetensors", fine_tuned(base))
    delta, summary, _ = compress(tmp_path, base_path, tuned_path)
    assert delta.family == "flux"
    # scales, markers and configs are never weights
    assert not any(r.key.endswith(("scale_weight", "weight_scale", "comfy_quant", "scaled_fp8"))
                   for r in delta.records)
    check_against_reference(delta, reference_delta(base_path, tuned_path))
    assert "rounded to the tuned file's precision" in summary and "norm went from" in summary


@pytest.mark.parametrize("writer", [legacy_file, comfy_quant_file, plain_fp8_file],
                         ids=["legacy", "comfy_quant", "plain"])
def test_base_merely_cast_to_fp8_is_refused_as_unchanged(tmp_path, writer):
    """A cast copy is no fine-tune: after the dtype-aware rounding nothing is left, and an
    empty delta is refused rather than written."""
    base = base_state()
    base_path = str(tmp_path / "base.safetensors")
    write_tensors(base_path, {k: v.float() for k, v in base.items()})   # fp32 base
    tuned_path = writer(tmp_path / "tuned.safetensors", {k: v.float() for k, v in base.items()})
    with pytest.raises(DeltaError, match="nothing changed.*cast copy") as e:
        compress(tmp_path, base_path, tuned_path)
    assert "tuned.safetensors" in str(e.value)
    assert not (tmp_path / "d.safetensors").exists()


def test_scaled_fp8_base_warns(tmp_path):
    base = base_state()
    real = {k: v.float() for k, v in base.items()}
    base_path = legacy_file(tmp_path / "base.safetensors", real)
    tuned_path = str(tmp_path / "tuned.safetensors")
    write_tensors(tuned_path, {k: v.to(torch.bfloat16) for k, v in fine_tuned(base).items()})
    delta, summary, _ = compress(tmp_path, base_path, tuned_path)
    assert "less precision than the fine-tune" in summary
    check_against_reference(delta, reference_delta(base_path, tuned_path))


def test_apply_onto_a_scaled_fp8_base_keeps_its_format(tmp_path):
    """base (legacy scaled fp8) + delta -> the same layout: scales and marker kept, each patched
    weight the fp8 rounding, with the base's scale, of base_real + delta."""
    from test_quantized import ref_round
    base = base_state()
    base_path = legacy_file(tmp_path / "base.safetensors", {k: v.float() for k, v in base.items()})
    tuned_path = legacy_file(tmp_path / "tuned.safetensors", fine_tuned(base))
    delta, _, delta_path = compress(tmp_path, base_path, tuned_path)
    out = str(tmp_path / "merged.safetensors")
    apply_file(base_path, delta_path, out)
    fb, fo = SafeTensorsFile(base_path), SafeTensorsFile(out)
    assert fo.keys() == fb.keys() and all(fo.dtype(k) == fb.dtype(k) for k in fb.keys())
    assert torch.equal(fo.get("scaled_fp8"), fb.get("scaled_fp8"))
    b_real, ref = stored_real(base_path), reference_delta(base_path, tuned_path)
    for k in MATRICES:
        scale = fb.get(k[: -len("weight")] + "scale_weight").to(torch.float64)
        assert torch.equal(fo.get(k[: -len("weight")] + "scale_weight"),
                           fb.get(k[: -len("weight")] + "scale_weight"))
        want = ref_round((b_real[k] + ref[k]) / scale, E4M3)
        got = fo.get(k).to(torch.float64)
        # the float32 sum may land on the other side of a rounding midpoint: one fp8 step
        step = (want.abs() * 2 ** -3).clamp(min=2 ** -9)
        assert ((got - want).abs() <= step + 1e-12).all(), k
        assert (got == want).float().mean() > 0.99, k
    fb.close()
    fo.close()


def test_all_in_one_pairs_with_a_diffusion_model_only_file(tmp_path):
    """A base that is an all-in-one checkpoint (diffusion model + text encoder + VAE) and a
    fine-tune holding the diffusion model alone, and the other way round."""
    base = base_state()
    tuned = {k: v.to(torch.bfloat16) for k, v in fine_tuned(base).items()}
    extra = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight":
             torch.ones(8, dtype=torch.bfloat16), "vae.decoder.conv_in.weight":
             torch.ones(4, 4, 3, 3, dtype=torch.bfloat16)}
    aio = {"model.diffusion_model." + k: v for k, v in base.items()} | extra
    aio_path, bare_path = str(tmp_path / "aio.safetensors"), str(tmp_path / "bare.safetensors")
    write_tensors(aio_path, aio)
    write_tensors(bare_path, tuned)
    assert Checkpoint(aio_path).family == Checkpoint(bare_path).family == "flux"
    delta, summary, _ = compress(tmp_path, aio_path, bare_path, name="a")
    assert "2 tensors only in the base" in summary
    tuned_aio = {"model.diffusion_model." + k: v for k, v in tuned.items()} | extra
    aio_path, bare_path = str(tmp_path / "aio2.safetensors"), str(tmp_path / "bare2.safetensors")
    write_tensors(aio_path, tuned_aio)
    write_tensors(bare_path, base)
    delta2, summary2, _ = compress(tmp_path, bare_path, aio_path, name="b")
    assert "2 tensors of model parts only the tuned file has" in summary2
    assert sorted(r.key for r in delta.records) == sorted(r.key for r in delta2.records)


def test_a_new_tensor_inside_a_shared_part_is_refused(tmp_path):
    base = base_state()
    tuned = {k: v.to(torch.bfloat16) for k, v in fine_tuned(base).items()}
    tuned["double_blocks.0.img_attn.extra.weight"] = torch.ones(4, 4, dtype=torch.bfloat16)
    write_tensors(str(tmp_path / "b.safetensors"), base)
    write_tensors(str(tmp_path / "t.safetensors"), tuned)
    with pytest.raises(DeltaError, match="only in the tuned model") as e:
        compress(tmp_path, str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    assert "double_blocks.0.img_attn.extra.weight" in str(e.value)


def test_a_scale_no_config_names_is_reported_and_ignored(tmp_path):
    """ComfyUI ignores a `weight_scale` without its `comfy_quant` config (the weight loads as
    stored); so does deltasvd, and the summary says so, naming the file and the tensor."""
    base = base_state()
    base_path = str(tmp_path / "base.safetensors")
    write_tensors(base_path, base)
    tuned_path = comfy_quant_file(tmp_path / "tuned.safetensors", fine_tuned(base))
    ref = reference_delta(base_path, tuned_path)     # before the stray scale is added
    with SafeTensorsFile(tuned_path) as f:
        tensors = {k: f.get(k) for k in f.keys()}
    tensors["img_in.weight_scale"] = torch.tensor(4.0)          # no img_in.comfy_quant
    write_tensors(tuned_path, tensors, overwrite=True)
    delta, summary, _ = compress(tmp_path, base_path, tuned_path)
    assert "warning: 1 scale tensors" in summary
    assert "img_in.weight_scale in tuned.safetensors" in summary
    check_against_reference(delta, ref)
