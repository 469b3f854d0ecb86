"""The ComfyUI nodes on a DiT family, with real models loaded by ComfyUI itself.

A Wan 2.1 1.3B diffusion model cut to one block (real names and widths, ~70 M parameters,
what `comfy.sd.load_diffusion_model` -- the UNETLoader node -- loads and detects as Wan) and its
fine-tune, in a `diffusion_models` folder. Checked: Compress (models) gives the family and the
file Compress (files) gives; Compress (files) lists the diffusion_models folder; Apply's patches
equal LoraLoaderModelOnly's on the saved file, for every weight; Apply refuses a delta of
another family before anything is patched.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import comfy_env
from conftest import fine_tune

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def wan_state(seed):
    """Every tensor of ComfyUI's Wan 1.3B (dim 1536) with one block, random, bf16."""
    comfy_env.import_comfy()
    spec = importlib.util.spec_from_file_location("gen_dit_specs",
                                                  REPO / "tools" / "gen_dit_specs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    import comfy.model_detection as md
    sig, blocks = gen._wan_probe(1536, 8960, 1, 16, 16)
    probe = {k: torch.empty(s, device="meta") for k, s in sig + blocks}
    config = md.model_config_from_unet_config(md.detect_unet_config(probe, ""), probe)
    model = config.get_model({}, "", device=torch.device("meta"))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.diffusion_model.state_dict().items():
        scale = 1 / max(v.shape[-1], 1) ** 0.5 if v.ndim >= 2 else 0.02
        out[k] = (torch.randn(tuple(v.shape), generator=g) * scale).to(torch.bfloat16)
    return out


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    comfy_env.require_comfy()
    comfy = comfy_env.import_comfy()
    import folder_paths
    import nodes as comfy_nodes
    pack = comfy_env.load_pack(REPO)
    folder = tmp_path_factory.mktemp("diffusion_models")
    from deltasvd.safetensors_io import write_tensors
    base = wan_state(0)
    tuned = fine_tune(base, seed=3, rank=6, scale=0.05)
    tuned = {k: v.to(torch.bfloat16) for k, v in tuned.items()}
    write_tensors(str(folder / "wan_base.safetensors"), base)
    write_tensors(str(folder / "wan_tuned.safetensors"), tuned)
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)

    class Host:
        pass
    h = Host()
    h.comfy, h.folder = comfy, folder
    h.node = lambda name: comfy_nodes.NODE_CLASS_MAPPINGS[name]()
    h.core = pack.deltasvd     # the pack's own copy of the core
    h.base = comfy.sd.load_diffusion_model(str(folder / "wan_base.safetensors"))
    h.tuned = comfy.sd.load_diffusion_model(str(folder / "wan_tuned.safetensors"))
    return h


def test_compress_models_and_files_agree(host):
    assert type(host.base.model).__name__ == "WAN21"
    out = host.node("DeltaSVDCompress").compress(host.tuned, host.base, "energy", 0.5, "fp32")
    delta, text = out["result"]
    assert delta.family == "wan_1.3b" and "Wan 2.1 1.3B" in delta_title(host, delta)
    names = host.node("DeltaSVDCompressFiles").INPUT_TYPES()["required"]["ckpt_tuned"][0]
    assert "diffusion_models/wan_tuned.safetensors" in names
    files = host.node("DeltaSVDCompressFiles").compress(
        "diffusion_models/wan_tuned.safetensors", "diffusion_models/wan_base.safetensors",
        "energy", 0.5, "fp32")
    fdelta, _ = files["result"]
    assert fdelta.family == "wan_1.3b"
    assert [(r.name, r.rank) for r in delta.records] == [(r.name, r.rank) for r in fdelta.records]
    assert any(r.kind == "svd" for r in delta.records)


def delta_title(host, delta):
    return host.core.families.title(delta.family)


def test_apply_equals_loraloader_and_refuses_other_families(host, tmp_path):
    delta = host.node("DeltaSVDCompressFiles").compress(
        "diffusion_models/wan_tuned.safetensors", "diffusion_models/wan_base.safetensors",
        "energy", 0.5, "fp16")["result"][0]
    out = host.node("DeltaSVDApply").apply(host.base, delta, 0.7)
    model = out["result"][0]
    assert "NOT APPLIED" not in out["ui"]["text"][0]
    path = tmp_path / "wan_delta.safetensors"
    host.core.api.save_delta(delta, path)
    lora = host.comfy.utils.load_torch_file(str(path), safe_load=True)
    ref, _ = host.comfy.sd.load_lora_for_models(host.base, None, lora, 0.7, 0)
    assert set(model.patches) == set(ref.patches) and len(ref.patches) > 10
    calc = host.comfy.lora.calculate_weight
    states = host.base.model.state_dict()
    for key in ref.patches:
        w = states[key].float()
        assert torch.equal(calc(model.patches[key], w.clone(), key),
                           calc(ref.patches[key], w.clone(), key)), key
    # the patched weights are the fine-tune's, up to the compression
    tuned = host.tuned.model.state_dict()
    key = next(k for k in ref.patches if k.endswith("self_attn.q.weight"))
    w = states[key].float()
    full = calc(host.node("DeltaSVDApply").apply(host.base, delta, 1.0)["result"][0]
                .patches[key], w.clone(), key)
    assert (full - tuned[key].float()).norm() < 0.9 * (w - tuned[key].float()).norm()
    other = delta.__class__(**{**delta.__dict__, "family": "flux"})
    before = dict(host.base.patches)
    with pytest.raises(host.core.errors.DeltaError,
                       match="this delta is for Flux.1 .*, the model is Wan 2.1 1.3B"):
        host.node("DeltaSVDApply").apply(host.base, other, 1.0)
    assert dict(host.base.patches) == before
