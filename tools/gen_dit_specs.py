"""Derive the on-disk tensor layout of DiT diffusion models (Flux, Chroma, Qwen-Image, Wan,
HiDream, Lumina 2, Z-Image, SD3.5) from ComfyUI.

    bash .ci/setup_comfyui.sh && python tools/gen_dit_specs.py

Writes deltasvd/specs/<name>.json.gz in the format of tools/gen_arch_spec.py,
{"family", "source", "tensors": [[key, [shape...], "BF16"], ...]} sorted by key, plus
"blocks": {prefix: count} naming the repeated top-level blocks (e.g. {"double_blocks.": 19}).
Only the diffusion model is described, in ComfyUI's checkpoint layout ("model.diffusion_model."
prefix), i.e. what `BaseModel.state_dict_for_saving` gives without text encoders or VAE.

Nothing here is a hand-typed key list. Each family gets a small probe state dict of meta tensors
holding only the signature keys (and shapes) that ComfyUI's `detect_unet_config` reads for it,
plus one key per block where detection counts blocks. ComfyUI turns that into the unet_config
and picks the model config class (`model_config_from_unet_config`), whose model is then built on
the meta device (no memory, no init). Every probe key must come back from the built model with
the same shape, so a probe that does not describe the real model fails here.
"""

import functools
import logging
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_arch_spec  # noqa: E402  (puts the repo and tests/ on sys.path)
from gen_arch_spec import SPEC_DIR, REPO, _meta, comfy_version, write_spec  # noqa: E402,F401

import comfy_env  # noqa: E402
from deltasvd.safetensors_io import DTYPE_TO_ST  # noqa: E402

PREFIX = "model.diffusion_model."
BF16, FP16 = torch.bfloat16, torch.float16


def _blocks(template, n, shape):
    """One probe key per block, for detection's count_blocks (template has a {} for the index)."""
    return [(template.format(i), shape) for i in range(n)]


def _flux_probe(guidance):
    # detect_unet_config: double_blocks.0.img_attn.norm.key_norm.scale and img_in.weight -> flux
    # family; no double_stream_modulation_img -> "flux" (not flux2); img_in/txt_in/vector_in give
    # in_channels, hidden_size, context_in_dim, vec_in_dim; guidance_in.in_layer.weight decides
    # guidance_embed (Flux vs FluxSchnell); blocks are counted.
    sig = [("double_blocks.0.img_attn.norm.key_norm.scale", (128,)),
           ("img_in.weight", (3072, 64)),
           ("txt_in.weight", (3072, 4096)),
           ("vector_in.in_layer.weight", (3072, 768))]
    if guidance:
        sig.append(("guidance_in.in_layer.weight", (3072, 256)))
    return sig, (_blocks("double_blocks.{}.img_attn.norm.key_norm.scale", 19, (128,))
                 + _blocks("single_blocks.{}.norm.key_norm.scale", 38, (128,)))


def _chroma_probe():
    # Flux's signature plus distilled_guidance_layer.norms.0.scale -> image_model "chroma";
    # no vector_in, no guidance_in (the approximator replaces both).
    sig = [("double_blocks.0.img_attn.norm.key_norm.scale", (128,)),
           ("img_in.weight", (3072, 64)),
           ("txt_in.weight", (3072, 4096)),
           ("distilled_guidance_layer.norms.0.scale", (5120,))]
    return sig, (_blocks("double_blocks.{}.img_attn.norm.key_norm.scale", 19, (128,))
                 + _blocks("single_blocks.{}.norm.key_norm.scale", 38, (128,)))


def _qwen_probe():
    # txt_norm.weight -> qwen_image; img_in.weight gives in_channels; blocks are counted.
    sig = [("txt_norm.weight", (3584,)), ("img_in.weight", (3072, 64))]
    return sig, _blocks("transformer_blocks.{}.attn.norm_q.weight", 60, (128,))


def _wan_probe(dim, ffn, layers, in_dim, out_dim):
    # head.modulation -> wan2.1 family (dim = its last axis); head.head.weight / 4 = out_dim
    # (patch 1x2x2); blocks.0.ffn.0.weight = ffn_dim; patch_embedding.weight = in_dim; no
    # img_emb / vace / control keys -> model_type "t2v"; blocks are counted.
    sig = [("head.modulation", (1, 2, dim)),
           ("head.head.weight", (out_dim * 4, dim)),
           ("blocks.0.ffn.0.weight", (ffn, dim)),
           ("patch_embedding.weight", (dim, in_dim, 1, 2, 2))]
    return sig, _blocks("blocks.{}.ffn.0.weight", layers, (ffn, dim))


def _hidream_probe():
    # caption_projection.0.linear.weight -> hidream; the whole config is fixed in ComfyUI's table.
    return [("caption_projection.0.linear.weight", (2560, 4096))], []


def _lumina_probe(dim, cap_feat_dim, layers, pad_token):
    # cap_embedder.1.weight -> lumina2, its shape gives dim (2304 Lumina 2, 3840 Z-Image) and
    # cap_feat_dim; cap_pad_token (Z-Image) turns on pad_tokens_multiple; layers are counted.
    sig = [("cap_embedder.1.weight", (dim, cap_feat_dim))]
    if pad_token:
        sig.append(("cap_pad_token", (1, dim)))
    return sig, _blocks("layers.{}.attention_norm1.weight", layers, (dim,))


def _sd35_probe(hidden, pos_embed_max, x_attn2_layers):
    # joint_blocks.0.context_block.attn.qkv.weight -> mmdit; x_embedder.proj.weight gives
    # in_channels, patch size and depth (= hidden / 64); final_layer = out_channels; y_embedder
    # and context_embedder give the pooled / context widths; pos_embed the patch grid; ln_q the
    # RMS qk-norm of SD3.5; x_block.attn2 keys list the MMDiT-X dual-attention layers (Medium).
    sig = [("joint_blocks.0.context_block.attn.qkv.weight", (3 * hidden, hidden)),
           ("x_embedder.proj.weight", (hidden, 16, 2, 2)),
           ("final_layer.linear.weight", (64, hidden)),
           ("y_embedder.mlp.0.weight", (hidden, 2048)),
           ("context_embedder.weight", (hidden, 4096)),
           ("pos_embed", (1, pos_embed_max ** 2, hidden)),
           ("joint_blocks.0.context_block.attn.ln_q.weight", (64,))]
    return sig, _blocks("joint_blocks.{}.x_block.attn2.qkv.weight", x_attn2_layers,
                        (3 * hidden, hidden))


# Per family: the ComfyUI config class detection must pick, the probe, the dtype of the
# released file (justified by its size: params x 2 bytes for 16-bit), the published size, and
# the exact element count measured here (tests/test_dit_specs.py pins the same numbers).
FAMILIES = {
    # flux1-dev.safetensors 23.8 GB = 11.9 B x 2 bytes, BF16 (Black Forest Labs release).
    "flux_dev": dict(config="Flux", probe=lambda: _flux_probe(True), dtype=BF16,
                     published=11.9e9),
    # flux1-schnell.safetensors 23.8 GB, BF16; the same model without guidance_in.
    "flux_schnell": dict(config="FluxSchnell", probe=lambda: _flux_probe(False), dtype=BF16,
                         published=11.9e9),
    # Chroma1-HD.safetensors 17.8 GB = 8.9 B x 2 bytes, BF16.
    "chroma": dict(config="Chroma", probe=_chroma_probe, dtype=BF16, published=8.9e9),
    # qwen_image_bf16.safetensors 40.9 GB = 20.4 B x 2 bytes (Qwen/Qwen-Image ships BF16 too).
    "qwen_image": dict(config="QwenImage", probe=_qwen_probe, dtype=BF16, published=20.4e9),
    # Wan 2.1 T2V 14B: trained with param_dtype bf16; ComfyUI's repackaged
    # wan2.1_t2v_14B_bf16.safetensors is 28.6 GB = 14.3 B x 2 bytes (an fp16 copy also exists).
    "wan21_14b": dict(config="WAN21_T2V",
                      probe=lambda: _wan_probe(5120, 13824, 40, 16, 16),
                      dtype=BF16, published=14e9),
    # Wan 2.2 TI2V 5B: the repackaged wan2.2_ti2v_5B_fp16.safetensors (10.0 GB = 5.0 B x 2
    # bytes) is FP16, the only 16-bit release of it, so FP16 here.
    "wan22_5b": dict(config="WAN22_T2V",
                     probe=lambda: _wan_probe(3072, 14336, 30, 48, 48),
                     dtype=FP16, published=5e9),
    # HiDream-I1-Full: the official transformer shards are BF16 (~34 GB = 17 B x 2 bytes).
    "hidream_i1": dict(config="HiDream", probe=_hidream_probe, dtype=BF16, published=17e9),
    # lumina_2_model_bf16.safetensors 5.2 GB = 2.6 B x 2 bytes, BF16.
    "lumina2": dict(config="Lumina2", probe=lambda: _lumina_probe(2304, 2304, 26, False),
                    dtype=BF16, published=2.6e9),
    # z_image_turbo_bf16.safetensors 12.3 GB = 6.15 B x 2 bytes, BF16.
    "zimage": dict(config="ZImage", probe=lambda: _lumina_probe(3840, 2560, 30, True),
                   dtype=BF16, published=6e9),
    # sd3.5_medium.safetensors 5.1 GB = 2.5 B (MMDiT-X) + VAE, x 2 bytes; Stability's SD3.5
    # checkpoints are BF16 (diffusers: "torch.bfloat16 ... the format used in the original
    # checkpoint"); pos_embed_max_size 384, dual attention in blocks 0-12.
    "sd35_medium": dict(config="SD3", probe=lambda: _sd35_probe(1536, 384, 13), dtype=BF16,
                        published=2.5e9),
    # sd3.5_large.safetensors 16.5 GB = 8.1 B MMDiT (+ VAE) x 2 bytes, BF16; pos_embed 192^2.
    "sd35_large": dict(config="SD3", probe=lambda: _sd35_probe(2432, 192, 0), dtype=BF16,
                       published=8.1e9),
}


def probe_state_dict(name):
    """(signature [(key, shape)] in the order detect_unet_config checks them, full probe dict)."""
    sig, blocks = FAMILIES[name]["probe"]()
    sd = {k: _meta(s) for k, s in sig}
    sd.update({k: _meta(s) for k, s in blocks})
    return sig, sd


def model_config(name):
    """ComfyUI's model config object for the family, as its own detection picks it."""
    comfy_env.import_comfy()
    import comfy.model_detection as md
    fam = FAMILIES[name]
    _, probe = probe_state_dict(name)
    unet_config = md.detect_unet_config(probe, "")
    config = md.model_config_from_unet_config(unet_config, probe) if unet_config else None
    if type(config).__name__ != fam["config"]:
        raise RuntimeError(f"{name}: ComfyUI detected {type(config).__name__}, "
                           f"expected {fam['config']} (unet_config {unet_config})")
    config.set_inference_dtype(fam["dtype"], None)
    return config


@functools.lru_cache(maxsize=None)
def _built(name):
    """{key: (shape tuple, built dtype)} of the model built on meta, in checkpoint layout."""
    comfy_env.import_comfy()
    config = model_config(name)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model = config.get_model({}, "", device=torch.device("meta"))
    finally:
        logging.disable(previous)
    sd = model.state_dict_for_saving()
    # A v-prediction marker would be an empty tensor that no release carries.
    sd.pop("v_pred", None)
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def checkpoint_layout(name):
    """{key: (shape, stored dtype)}: every float tensor in the released dtype (ComfyUI builds
    Wan's patch_embedding in fp32 for compute; the released files store it like the rest)."""
    dtype = FAMILIES[name]["dtype"]
    built = _built(name)
    bad = [k for k in built if not k.startswith(PREFIX)]
    if bad:
        raise RuntimeError(f"{name}: keys outside {PREFIX}: {bad[:3]}")
    _, probe = probe_state_dict(name)
    for k, v in probe.items():
        got = built.get(PREFIX + k)
        if got is None or got[0] != tuple(v.shape):
            raise RuntimeError(f"{name}: probe key {k} {tuple(v.shape)} but model has {got}")
    return {k: (s, dtype if d.is_floating_point else d) for k, (s, d) in built.items()}


def repeated_blocks(keys):
    """{"prefix.": count} for the top-level ModuleLists of composite blocks: bare keys
    "<prefix>.<i>.<module>.<...>" with indices 0..n-1, n >= 2. A numbered entry holding only a
    leaf layer ("cap_embedder.1.weight", nn.Sequential) is not a block."""
    found = {}
    for key in keys:
        parts = key[len(PREFIX):].split(".")
        if len(parts) >= 4 and parts[1].isdigit():
            found.setdefault(parts[0] + ".", set()).add(int(parts[1]))
    return {p: len(idx) for p, idx in sorted(found.items())
            if len(idx) >= 2 and idx == set(range(len(idx)))}


@functools.lru_cache(maxsize=None)
def derive_spec(name):
    """The spec dict written to deltasvd/specs/<name>.json.gz."""
    layout = checkpoint_layout(name)
    tensors = [[k, list(layout[k][0]), DTYPE_TO_ST[layout[k][1]]] for k in sorted(layout)]
    return {"family": name, "source": f"ComfyUI {comfy_version()} model classes",
            "blocks": repeated_blocks(layout), "tensors": tensors}


def param_count(spec):
    return sum(math.prod(shape) for _, shape, _ in spec["tensors"])


def main():
    SPEC_DIR.mkdir(exist_ok=True)
    for name, fam in FAMILIES.items():
        spec = derive_spec(name)
        path = SPEC_DIR / f"{name}.json.gz"
        write_spec(spec, path)
        n = param_count(spec)
        ratio = n / fam["published"]
        flag = "" if 0.95 < ratio < 1.05 else "  <-- MISMATCH with the published size"
        print(f"{name}: {fam['config']}, {DTYPE_TO_ST[fam['dtype']]}, {len(spec['tensors'])} "
              f"tensors, {n:,} params ({n / 1e9:.2f} B vs published "
              f"{fam['published'] / 1e9:.1f} B){flag}, blocks {spec['blocks']} "
              f"-> {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
