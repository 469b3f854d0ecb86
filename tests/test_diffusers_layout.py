"""A diffusers-layout Flux.1 transformer is read as ComfyUI reads it.

The diffusers files are made here from a ComfyUI-layout pair with ComfyUI's own key table
(`comfy.utils.flux_to_diffusers`: fused q/k/v and MLP rows, swapped final-modulation halves),
independently of deltasvd's conversion. Compressing the diffusers pair must give the very file
the ComfyUI-layout pair gives, and a diffusers file pairs with a ComfyUI-layout one.
"""

import pytest
import torch
from safetensors import safe_open

import comfy_env
from deltasvd import api, fixtures
from deltasvd.apply import apply_file
from deltasvd.checkpoint import Checkpoint
from deltasvd.delta_file import read_delta
from deltasvd.errors import DeltaError
from deltasvd.ranks import RankRule
from deltasvd.safetensors_io import write_tensors

UNET = "model.diffusion_model."


def to_diffusers(path, out, prefix=""):
    """ComfyUI-layout Flux file -> diffusers layout, by ComfyUI's flux_to_diffusers table."""
    comfy_env.require_comfy()
    comfy_env.import_comfy()
    import comfy.utils
    with safe_open(path, "pt") as f:
        sd = {k[len(UNET):]: f.get_tensor(k) for k in f.keys()}
    hidden = sd["img_in.weight"].shape[0]
    table = comfy.utils.flux_to_diffusers({"depth": 19, "depth_single_blocks": 38,
                                           "hidden_size": hidden})
    diff = {}
    for theirs, ours in table.items():
        if isinstance(ours, str):
            if ours in sd:
                diff[prefix + theirs] = sd[ours]
            continue
        key, offset = ours[0], ours[1]
        if key not in sd:
            continue
        t = sd[key]
        if offset is not None:
            t = t.narrow(offset[0], offset[1], offset[2])
        if len(ours) > 2:
            t = ours[2](t)
        diff[prefix + theirs] = t.contiguous()
    covered = {o if isinstance(o, str) else o[0] for o in table.values()}
    assert set(sd) <= covered, set(sd) - covered
    write_tensors(str(out), diff)
    return str(out)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers")
    b, t = fixtures.make_pair(folder, "flux_dev", "small", seed=4, base_dtype=torch.bfloat16,
                              tuned_dtype=torch.bfloat16)
    return folder, b, t


def test_diffusers_pair_gives_the_comfyui_pair_file(pairs):
    folder, b, t = pairs
    db = to_diffusers(b, folder / "db.safetensors")
    dt = to_diffusers(t, folder / "dt.safetensors", prefix="transformer.")
    base, dbase = Checkpoint(b), Checkpoint(db)
    assert dbase.family == base.family == "flux"
    assert sorted(dbase.keys()) == sorted(base.keys())
    for k in base.keys():
        assert dbase.shape(k) == base.shape(k)
        assert torch.equal(dbase.get(k), base.get(k)), k
    rule = RankRule("energy", 0.5)
    api.compress_files(b, t, str(folder / "c.safetensors"), rule)
    api.compress_files(db, dt, str(folder / "d.safetensors"), rule)
    api.compress_files(b, dt, str(folder / "m.safetensors"), rule)   # mixed layouts
    c, d, m = (read_delta(str(folder / f"{n}.safetensors")) for n in "cdm")
    assert [r.name for r in c.records] == [r.name for r in d.records] == [r.name for r in m.records]
    for name, tensor in c.tensors.items():
        assert torch.equal(d.tensors[name], tensor) and torch.equal(m.tensors[name], tensor), name


def test_a_fused_part_missing_is_refused(pairs, tmp_path):
    folder, b, _ = pairs
    db = to_diffusers(b, tmp_path / "x.safetensors")
    with safe_open(db, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    victim = next(k for k in sd if ".attn.to_k." in k and k.startswith("transformer_blocks."))
    del sd[victim]
    write_tensors(str(tmp_path / "y.safetensors"), sd)
    with pytest.raises(DeltaError, match="fused from 3 diffusers tensors") as e:
        Checkpoint(str(tmp_path / "y.safetensors"))
    assert victim in str(e.value)


def test_apply_refuses_a_diffusers_base(pairs, tmp_path):
    folder, b, t = pairs
    db = to_diffusers(b, tmp_path / "db.safetensors")
    out = tmp_path / "delta.safetensors"
    api.compress_files(b, t, str(out), RankRule("rank", 2))
    with pytest.raises(DeltaError, match="diffusers layout"):
        apply_file(db, str(out), str(tmp_path / "merged.safetensors"))
    assert not (tmp_path / "merged.safetensors").exists()


def test_other_diffusers_layouts_are_refused_clearly(tmp_path):
    path = str(tmp_path / "unet.safetensors")
    write_tensors(path, {"down_blocks.0.resnets.0.conv1.weight": torch.randn(4, 4, 3, 3)})
    with pytest.raises(DeltaError, match="diffusers-layout"):
        Checkpoint(path)


def test_a_pipeline_prefix_is_dropped(tmp_path):
    """Qwen-Image's diffusers names are ComfyUI's own: `transformer.`-prefixed keys (a
    diffusers pipeline's) pair with the bare file."""
    g = torch.Generator().manual_seed(0)
    sd = {"txt_norm.weight": torch.randn(64, generator=g), "img_in.weight": torch.randn(32, 64),
          "transformer_blocks.0.attn.to_q.weight": torch.randn(32, 32, generator=g)}
    write_tensors(str(tmp_path / "bare.safetensors"), sd)
    write_tensors(str(tmp_path / "pipe.safetensors"),
                  {"transformer." + k: v + 0.01 for k, v in sd.items()})
    bare, pipe = Checkpoint(str(tmp_path / "bare.safetensors")), \
        Checkpoint(str(tmp_path / "pipe.safetensors"))
    assert bare.family == pipe.family == "qwen_image"
    assert sorted(bare.keys()) == sorted(pipe.keys())
    api.compress_files(str(tmp_path / "bare.safetensors"), str(tmp_path / "pipe.safetensors"),
                       str(tmp_path / "d.safetensors"), RankRule("rank", 1))
    assert read_delta(str(tmp_path / "d.safetensors")).family == "qwen_image"
