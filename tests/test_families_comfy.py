"""Every DiT family, end to end through the real ComfyUI: a small pair with the real key names
and widths (block 0 of each repeated block, deltasvd/fixtures.py), compressed by deltasvd, then
loaded through ComfyUI 0.3.75's own LoRA path into the real model class built on the meta
device (`comfy.lora.model_lora_keys_unet` + `load_lora`, what LoraLoaderModelOnly does).

Checked per family: the family deltasvd detects; no "lora key not loaded" warning and no
module of the file that ComfyUI's key map does not know; every patched weight, computed by
`comfy.lora.calculate_weight` from the real base tensor, equals base + the delta our records
describe (float64 from the file's tensors); every changed tensor of the pair is patched or
(non-diffusion tensors only) an extra. One family at a time: its pair is made, checked and
deleted (the biggest is ~0.6 GB).
"""

import logging
import os

import pytest
import torch
from safetensors import safe_open

from deltasvd import fixtures
from deltasvd.api import compress_files
from deltasvd.apply import delta_for
from deltasvd.checkpoint import Checkpoint
from deltasvd.delta_file import read_delta, tensor_names
from deltasvd.ranks import RankRule

import comfy_env
from test_host_compat import capture_warnings

FAMILY_OF = {"flux_dev": "flux", "flux_schnell": "flux_schnell", "chroma": "chroma",
             "qwen_image": "qwen_image", "wan21_14b": "wan_14b", "wan22_5b": "wan_5b",
             "hidream_i1": "hidream", "lumina2": "lumina2", "zimage": "zimage",
             "sd35_medium": "sd35_medium", "sd35_large": "sd35_large"}
RULE = RankRule("energy", 0.5)
REL_TOL = 1e-5
EPS32 = torch.finfo(torch.float32).eps


def _gen_dit_specs():
    comfy_env.require_comfy()
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "tools" / "gen_dit_specs.py"
    spec = importlib.util.spec_from_file_location("gen_dit_specs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    module = _gen_dit_specs()
    comfy_env.import_comfy()
    return module


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def comfy_model(gen, name):
    """ComfyUI's BaseModel of the family, built on the meta device."""
    config = gen.model_config(name)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return config.get_model({}, "", device=torch.device("meta"))
    finally:
        logging.disable(previous)


def expected_deltas(delta, tensors, shapes):
    """{checkpoint key: float64 delta} that the file's LoRA tensors describe, by our records."""
    out = {}
    for rec in delta.records:
        if rec.extra:
            continue
        names = tensor_names(rec)
        if rec.kind == "svd":
            up, down = tensors[names["up"]], tensors[names["down"]]
            assert tensors[names["alpha"]].item() == down.shape[0] == rec.rank
            piece = up.double().reshape(up.shape[0], -1) @ down.double().reshape(rec.rank, -1)
        else:
            piece = tensors[names["diff"]].double()
        full = out.setdefault(rec.key, torch.zeros(shapes[rec.key], dtype=torch.float64))
        full += piece.reshape(shapes[rec.key])
    return out


def comfy_problems(gen, name, base_path, delta_path):
    import comfy.lora
    problems = []
    model = comfy_model(gen, name)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    delta = read_delta(delta_path)
    with safe_open(delta_path, "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
               for k in lora}
    problems += [f"module unknown to ComfyUI's key map: {m}" for m in sorted(modules - set(key_map))]
    with capture_warnings() as logs:
        patches = comfy.lora.load_lora(lora, key_map)
    problems += [f"log: {m}" for m in logs]
    with safe_open(base_path, "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    expected = expected_deltas(delta, lora, shapes)
    seen = set()
    for key, patch in patches.items():
        host_key = key if isinstance(key, str) else key[0]
        ckpt_key = "model." + host_key
        if ckpt_key not in base:
            problems.append(f"ComfyUI patches {host_key}, which the base does not have")
            continue
        seen.add(ckpt_key)
        w = base[ckpt_key].float()
        with capture_warnings() as logs:
            patched = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)]
                                                  if not isinstance(patch, list) else patch,
                                                  w.clone(), host_key)
        problems += [f"calculate_weight log: {m}" for m in logs]
        want = expected.get(ckpt_key)
        if want is None:
            problems.append(f"{ckpt_key}: ComfyUI patches it, our records do not")
            continue
        target = w.double() + want
        err = (patched.double() - target).norm().item()
        tol = REL_TOL * want.norm().item() + EPS32 * target.norm().item()
        if err > tol:
            problems.append(f"{ckpt_key}: patched weight off by {err:.3e} > {tol:.3e}")
        own = delta_for(delta, [r for r in delta.records if r.key == ckpt_key],
                        shapes[ckpt_key]).double()
        if (own - want).norm().item() > REL_TOL * want.norm().item():
            problems.append(f"{ckpt_key}: deltasvd.apply.delta_for differs from the file")
    missing = sorted(set(expected) - seen)
    problems += [f"{k}: in our records, never patched by ComfyUI" for k in missing]
    return problems, delta, len(seen)


@pytest.mark.parametrize("name", fixtures.DIT_FAMILIES)
def test_family_loads_whole_in_comfyui(name, gen, tmp_path):
    dtype = fixtures.spec_dtype(name)    # both files in the released dtype (bf16 mostly)
    base, tuned = fixtures.make_pair(tmp_path, name, "small", seed=1, base_dtype=dtype,
                                     tuned_dtype=dtype)
    try:
        assert Checkpoint(base).family == FAMILY_OF[name]
        out = str(tmp_path / f"{name}_delta.safetensors")
        compress_files(base, tuned, out, RULE)
        problems, delta, patched = comfy_problems(gen, name, base, out)
        assert not problems, "\n".join(problems[:20])
        assert delta.family == FAMILY_OF[name]
        # every changed tensor of the pair is in the file, and under a name ComfyUI loads
        with safe_open(base, "pt") as fb, safe_open(tuned, "pt") as ft:
            changed = {k for k in fb.keys()
                       if not torch.equal(fb.get_tensor(k), ft.get_tensor(k))}
        stored = {r.key for r in delta.records}
        assert changed == stored
        assert not any(r.extra for r in delta.records)  # a diffusion model has no extras
        assert any(r.kind == "svd" for r in delta.records)  # factors, not just diffs
        assert patched == len(stored)
    finally:
        for p in (base, tuned):
            if os.path.exists(p):
                os.remove(p)


TE_LAYER0 = ("clip_l.transformer.text_model.encoder.layers.0.", "t5xxl.transformer.encoder.block.0.",
             "qwen25_7b.transformer.model.layers.0.", "qwen3_4b.transformer.model.layers.0.")
TE_OTHERS = ("clip_l.transformer.text_model.final_layer_norm.",
             "clip_l.transformer.text_model.embeddings.position_embedding.")


@pytest.mark.parametrize("name", ["flux_dev", "qwen_image", "zimage"])
def test_all_in_one_text_encoders_load_in_comfyui(name, gen, tmp_path):
    """An all-in-one checkpoint (diffusion model + text encoders, as ComfyUI saves one): the
    text encoders' layer 0 (real keys and shapes from ComfyUI's CLIP of the family, built on
    meta: CLIP-L + T5-XXL, Qwen2.5-VL 7B, Qwen3 4B) compressed under `text_encoders.<key>` names, which ComfyUI's key map loads into its
    CLIP: every module known, no warning, and each patched weight base + our delta."""
    import comfy.lora
    import comfy.sd
    config = gen.model_config(name)
    meta = torch.device("meta")
    clip = comfy.sd.CLIP(config.clip_target(), model_options={"dtype": torch.bfloat16,
                                                             "initial_device": meta})
    clip_sd = clip.get_sd()
    saved = config.process_clip_state_dict_for_saving(dict(clip_sd))
    te = {}
    for prefix in TE_LAYER0 + TE_OTHERS:   # per encoder: its 1-D tensors, its cheapest matrix
        found = {k: tuple(v.shape) for k, v in saved.items()
                 if k.startswith("text_encoders." + prefix) and v.is_floating_point()}
        matrices = sorted((fixtures._gram_flops(sh), k) for k, sh in found.items()
                          if len(sh) >= 2)
        chosen = {k for _, k in matrices[:1]} | {k for k, sh in found.items()
                                                  if len(sh) < 2 and k.endswith(".weight")}
        chosen |= {k for k in found if k.endswith(".bias") and k[:-4] + "weight" in chosen}
        te.update({k: found[k] for k in chosen})
    assert te, sorted(saved)[:5]
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) * 0.02 for k, s in te.items()}
    for k, shape, _ in fixtures.pair_spec(name, "small"):
        if k.endswith(("img_in.weight", "x_embedder.proj.weight")) or "norm" in k:
            base[k] = torch.randn(shape, generator=g).to(torch.bfloat16)
    base["vae.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3).to(torch.bfloat16)
    from conftest import fine_tune, save
    tuned = {k: v.to(torch.bfloat16) for k, v in fine_tune(base, seed=6, rank=4).items()}
    b, t = save(tmp_path / "b.safetensors", base), save(tmp_path / "t.safetensors", tuned)
    out = str(tmp_path / "d.safetensors")
    compress_files(b, t, out, RULE)
    delta = read_delta(out)
    te_records = [r for r in delta.records if r.key.startswith("text_encoders.")]
    assert te_records and not any(r.extra for r in te_records)
    assert any(r.kind == "svd" for r in te_records)
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    with safe_open(out, "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys() if k.startswith("text_encoders.")}
    with capture_warnings() as logs:
        patches = comfy.lora.load_lora(lora, key_map)
    assert not logs, logs
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    delta.records = te_records
    te_expected = expected_deltas(delta, lora, shapes)
    assert {"text_encoders." + k for k in patches} == set(te_expected)
    for key, patch in patches.items():
        ck = "text_encoders." + key
        assert clip_sd[key].shape == base[ck].shape      # ComfyUI's key is ours less the prefix
        w = base[ck].float()
        got = comfy.lora.calculate_weight(patch if isinstance(patch, list)
                                          else [(1.0, patch, 1.0, None, None)], w.clone(), key)
        want = w.double() + te_expected[ck]
        err = (got.double() - want).norm().item()
        assert err <= REL_TOL * te_expected[ck].norm().item() + EPS32 * want.norm().item(), key
