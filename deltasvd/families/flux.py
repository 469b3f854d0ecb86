"""Flux.1 (dev, Krea and Kontext share dev's layout; schnell has no guidance embedder).

Recognised as ComfyUI does: double blocks with q/k norms and an `img_in`, no Flux.2 modulation,
no Chroma guidance layer. The fused tensors (`img_attn.qkv`, single blocks' `linear1` = qkv +
MLP) are compressed as stored, since ComfyUI patches the fused weight."""

from .base import UNET, Family

EMBEDDERS = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")


class FluxDev(Family):
    name = "flux"
    title = "Flux.1 (dev / Krea / Kontext)"
    architecture = "flux-1-dev"
    base_model_version = "flux1"
    civitai = "Flux.1 D"
    implementation = "https://github.com/black-forest-labs/flux"
    signature = ("double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight",
                 "guidance_in.in_layer.weight")
    blocks = {"double_blocks.": "double_blocks", "single_blocks.": "single_blocks"}
    detection_keys = ("guidance_in.in_layer.weight", "vector_in.in_layer.weight")
    embedders = EMBEDDERS
    finals = ("final_layer.",)

    def shapes_match(self, view):
        keys = view.key_map
        return UNET + "double_stream_modulation_img.lin.weight" not in keys and not any(
            k.startswith(UNET + "distilled_guidance_layer.") for k in keys)

    def from_diffusers(self, keys):
        return flux_from_diffusers(keys)


class FluxSchnell(FluxDev):
    name = "flux_schnell"
    title = "Flux.1 schnell"
    architecture = "flux-1-schnell"
    civitai = "Flux.1 S"
    signature = ("double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight",
                 "vector_in.in_layer.weight")

    def shapes_match(self, view):
        return super().shapes_match(view) and \
            UNET + "guidance_in.in_layer.weight" not in view.key_map


# -- diffusers layout -------------------------------------------------------------------------
# Flux.1 as diffusers saves it (FluxTransformer2DModel) -> ComfyUI's keys, as ComfyUI's own
# loader converts it: q, k, v (and a single block's MLP input) are fused along the rows, and
# the final modulation's halves are swapped (diffusers keeps scale, shift; BFL shift, scale).
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_DOUBLE_RENAMED = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                   "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                   "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                   "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                 "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                 "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                 "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_SINGLE_RENAMED = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight",
                 "norm.key_norm.scale": "attn.norm_k.weight"}
_TOP_RENAMED = {"img_in": "x_embedder", "txt_in": "context_embedder",
                "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
                "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
                "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
                "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
                "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
                "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
                "final_layer.linear": "proj_out"}
_SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}


def flux_from_diffusers(keys):
    """{ComfyUI bare key: (diffusers keys fused along the rows, swap halves)} for a diffusers
    Flux transformer's `keys`, or None when they are not one."""
    keys = set(keys)
    if "x_embedder.weight" not in keys or not any(
            k.startswith("single_transformer_blocks.") for k in keys):
        return None
    out = {}
    for ours, theirs in _TOP_RENAMED.items():
        _modules(out, keys, ours, (theirs,), False)
    for ours, theirs in _SWAPPED.items():
        _modules(out, keys, ours, (theirs,), True)
    for prefix, ours_prefix, fused, renamed, norms in (
            ("transformer_blocks.", "double_blocks.", _DOUBLE_FUSED, _DOUBLE_RENAMED,
             _DOUBLE_NORMS),
            ("single_transformer_blocks.", "single_blocks.", _SINGLE_FUSED, _SINGLE_RENAMED,
             _SINGLE_NORMS)):
        for i in sorted({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)}):
            src, dst = f"{prefix}{i}.", f"{ours_prefix}{i}."
            for ours, parts in fused.items():
                _modules(out, keys, dst + ours, tuple(src + p for p in parts), False)
            for ours, theirs in renamed.items():
                _modules(out, keys, dst + ours, (src + theirs,), False)
            for ours, theirs in norms.items():
                if src + theirs in keys:
                    out[dst + ours] = ((src + theirs,), False)
    return out


def _modules(out, keys, ours, parts, swap):
    """The weight and bias of module `ours` from the diffusers modules `parts`, where present."""
    for param in ("weight", "bias"):
        names = tuple(f"{p}.{param}" for p in parts)
        if any(n in keys for n in names):
            out[f"{ours}.{param}"] = (names, swap)
