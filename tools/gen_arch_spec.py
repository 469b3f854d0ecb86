"""Derive the on-disk tensor layout of SD1.5 / SD2.1 / SDXL single-file checkpoints from ComfyUI.

    bash .ci/setup_comfyui.sh && python tools/gen_arch_spec.py

Writes deltasvd/specs/{sd15,sd21,sdxl}.json.gz: every checkpoint key with its shape and stored
dtype, as {"family", "source", "tensors": [[key, [shape...], "F32"], ...]} sorted by key.
deltasvd.fixtures builds synthetic checkpoint pairs from these files (no weights are needed).

Nothing here is a hand-typed key list. The models are ComfyUI's own classes built on the meta
device (no memory, no init): the UNet config comes from ComfyUI's model-detection table, the text
encoders from the model config's clip target, the VAE from comfy.sd.VAE. The state dicts then
go through `BaseModel.state_dict_for_saving`, i.e. the model config's
process_{unet,clip,vae}_state_dict_for_saving, exactly as ComfyUI's CheckpointSave
(comfy.sd.save_checkpoint) does, which yields the LDM/SGM layout of the released files.
"""

import gzip
import json
import logging
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SPEC_DIR = REPO / "deltasvd" / "specs"
sys.path.insert(0, str(REPO / "tests"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import comfy_env  # noqa: E402
from deltasvd.safetensors_io import DTYPE_TO_ST  # noqa: E402

# Per family: the ComfyUI config class we expect, the few facts ComfyUI's model detection keys
# on (transformer depth per attention block of each diffusers down block, cross-attention width,
# ADM input width), and the dtype of the released file (sizes: v1-5-pruned-emaonly 4.27 GB =
# fp32, v2-1_768-ema-pruned 5.21 GB = fp32, sd_xl_base_1.0 6.94 GB = fp16).
FAMILIES = {
    "sd15": dict(config="SD15", down=[[1, 1], [1, 1], [1, 1], []], context_dim=768,
                 adm=None, dtype=torch.float32),
    # SD2.1 768-v and 512 base share every key; v-prediction only changes sampling.
    "sd21": dict(config="SD20", down=[[1, 1], [1, 1], [1, 1], []], context_dim=1024,
                 adm=None, dtype=torch.float32),
    "sdxl": dict(config="SDXL", down=[[], [2, 2], [10, 10]], context_dim=2048,
                 adm=2816, dtype=torch.float16),
}

# The SD1.x VAE as comfy.sd.VAE recognises it: latent channels 4, four levels (up.3 upsamples),
# a post_quant_conv. Shapes are checked by ComfyUI's load_state_dict, so a wrong one fails.
VAE_PROBE = {"decoder.conv_in.weight": (512, 4, 3, 3),
             "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
             "post_quant_conv.weight": (4, 4, 1, 1)}

# Released SD1.x checkpoints carry the CLIP text model's position_ids buffer (int64 [1, 77]);
# ComfyUI's SD15 saver does not write it back (its SDXL saver does, for clip_l), so we add it.
SD15_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _meta(shape):
    return torch.empty(shape, device="meta")


def comfy_version():
    comfy_env.import_comfy()
    import comfyui_version
    return comfyui_version.__version__


def unet_probe(fam):
    """The smallest diffusers-layout key set from which ComfyUI's model detection
    (`unet_config_from_diffusers_unet`) picks the family's full UNet config out of its table."""
    sd = {"conv_in.weight": _meta((320, 4, 3, 3))}
    for i, attn_depths in enumerate(fam["down"]):
        for r in range(2):
            sd[f"down_blocks.{i}.resnets.{r}.conv1.weight"] = _meta((1,))
        for a, depth in enumerate(attn_depths):
            for t in range(depth):
                key = f"down_blocks.{i}.attentions.{a}.transformer_blocks.{t}.attn2.to_k.weight"
                sd[key] = _meta((1, fam["context_dim"]))
    if fam["adm"]:
        sd["add_embedding.linear_1.weight"] = _meta((1, fam["adm"]))
    return sd


def model_config(family):
    """ComfyUI's model config object (comfy.supported_models.*) for the family, fp weights."""
    comfy_env.import_comfy()
    import comfy.model_detection as md
    fam = FAMILIES[family]
    unet_config = md.unet_config_from_diffusers_unet(unet_probe(fam), dtype=fam["dtype"])
    config = md.model_config_from_unet_config(unet_config) if unet_config else None
    if type(config).__name__ != fam["config"]:
        raise RuntimeError(f"{family}: ComfyUI detected {type(config).__name__}, "
                           f"expected {fam['config']}")
    config.set_inference_dtype(fam["dtype"], None)
    return config


def checkpoint_state_dict(family):
    """{key: meta (or tiny) tensor} in the on-disk checkpoint layout, via ComfyUI's saving path."""
    comfy_env.import_comfy()
    import comfy.sd
    fam = FAMILIES[family]
    meta = torch.device("meta")
    config = model_config(family)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the VAE probe makes ComfyUI list every "missing" key
    try:
        model = config.get_model({}, "", device=meta)
        clip = comfy.sd.CLIP(config.clip_target(),
                             model_options={"dtype": fam["dtype"], "initial_device": meta})
        with meta:
            vae = comfy.sd.VAE(sd={k: _meta(s) for k, s in VAE_PROBE.items()}, dtype=fam["dtype"])
    finally:
        logging.disable(previous)
    sd = model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
    return _match_release(family, sd, fam["dtype"])


def _match_release(family, sd, dtype):
    # ComfyUI marks v-prediction models with an empty "v_pred" tensor; the released files have
    # no such key (and our EPS-detected models do not get one, but be explicit).
    sd.pop("v_pred", None)
    if family == "sd15":
        sd[SD15_POSITION_IDS] = torch.arange(77).expand((1, -1))
    # ComfyUI creates CLIP's logit_scale in fp32 whatever the model dtype; the released files
    # store every float tensor in one dtype.
    return {k: (torch.empty(v.shape, dtype=dtype, device="meta") if v.is_floating_point() else v)
            for k, v in sd.items()}


def derive_spec(family):
    """The spec dict written to deltasvd/specs/<family>.json.gz."""
    sd = checkpoint_state_dict(family)
    tensors = [[k, list(sd[k].shape), DTYPE_TO_ST[sd[k].dtype]] for k in sorted(sd)]
    return {"family": family, "source": f"ComfyUI {comfy_version()} model classes",
            "tensors": tensors}


def write_spec(spec, path):
    # mtime=0 and no file name in the gzip header: regenerating gives identical bytes.
    raw = json.dumps(spec, indent=0).encode("utf-8")
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(raw)


def param_count(spec, prefix=""):
    total = 0
    for key, shape, _ in spec["tensors"]:
        if key.startswith(prefix):
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def main():
    SPEC_DIR.mkdir(exist_ok=True)
    for family in FAMILIES:
        spec = derive_spec(family)
        path = SPEC_DIR / f"{family}.json.gz"
        write_spec(spec, path)
        unet = param_count(spec, "model.diffusion_model.")
        vae = param_count(spec, "first_stage_model.")
        total = param_count(spec)
        print(f"{family}: {len(spec['tensors'])} tensors, UNet {unet:,} ({unet / 1e6:.2f} M), "
              f"text encoders {total - unet - vae:,}, VAE {vae:,}, total {total:,} "
              f"-> {os.path.relpath(path, REPO)}")


if __name__ == "__main__":
    main()
