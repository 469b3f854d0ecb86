"""What every family says about itself, and the defaults most families share.

A family is recognised from the canonical keys of a file (the diffusion model under
`model.diffusion_model.`, text encoders, VAE; see checkpoint.py) and says:
- `recognise(view)`: whether a file is of this family (signature keys and shapes);
- `targets(key, shape, keys)`: where a checkpoint tensor goes in a LoRA file;
- `group_of(key)` / `group_order`: its summary groups (the paper's Table 2 idea);
- `architecture`, `base_model_version`, `civitai`: the names hosts and sites use for it.

The defaults are ComfyUI's generic LoRA names, which its stock loader maps for every model it
loads (`comfy.lora.model_lora_keys_unet` / `model_lora_keys_clip`), and Forge's copy of it:
- a diffusion-model weight `model.diffusion_model.<path>.weight` -> `lora_unet_<path, '.' ->
  '_'>` (lora_up / lora_down / alpha, `.diff` for 1-D and dense ones), its bias -> `.diff_b`;
- any other diffusion-model tensor (`.scale`, Wan's `modulation`, pad tokens) ->
  `diffusion_model.<path>.diff` (ComfyUI maps the bare key of every non-weight tensor);
- a text-encoder weight of an all-in-one file `text_encoders.<path>.weight` ->
  `text_encoders.<path>` (its bias `.diff_b`);
- anything else (the VAE, text-encoder buffers) has no name a loader maps: an extra.
"""

import re
from dataclasses import dataclass

UNET = "model.diffusion_model."
TEXT = "text_encoders."


@dataclass(frozen=True)
class Target:
    """Where (part of) one checkpoint tensor goes in a LoRA file."""
    module: str             # LoRA module name, e.g. lora_unet_input_blocks_1_1_proj_in
    param: str              # "weight" or "bias"
    rows: tuple = None      # (start, stop) rows of the checkpoint tensor, for split q/k/v
    mha: str = None         # the A1111 MultiheadAttention group this module belongs to


class Family:
    name = "generic"            # deltasvd.family in the file
    title = "an unregistered architecture"
    architecture = ""           # modelspec.architecture, before "/lora"
    base_model_version = ""     # ss_base_model_version (kohya, A1111's extra networks)
    civitai = ""                # Civitai's base-model name, for uploads
    implementation = "https://github.com/comfyanonymous/ComfyUI"   # modelspec.implementation
    a1111 = False               # A1111's LoRA rules apply (names, whole modules, norm pairs)
    signature = ()              # bare diffusion-model keys that must all be present
    detection_keys = ()         # further bare keys shapes_match looks at (fixtures keep them)
    blocks = {}                 # repeated-block prefix -> summary group
    embedders = ()              # bare key prefixes of input embedders
    finals = ()                 # bare key prefixes of the output layers

    # -- recognition ---------------------------------------------------------------------

    def recognise(self, view):
        keys = view.key_map
        return bool(self.signature) and all(UNET + k in keys for k in self.signature) \
            and self.shapes_match(view)

    def shapes_match(self, view):
        """Extra checks on the signature's shapes, where keys alone are ambiguous."""
        return True

    def from_diffusers(self, keys):
        """The diffusers layout of this family, converted as ComfyUI's loader converts it:
        {bare canonical key: (diffusers keys fused along the rows, swap halves)}, or None
        when `keys` are not this family's diffusers layout (or it needs no conversion)."""
        return None

    # -- LoRA names ------------------------------------------------------------------------

    def targets(self, key, shape, keys):
        """The LoRA targets of checkpoint `key`, or None if no loader maps it (an extra).
        `keys`: the base's canonical keys (a bias is `.diff_b` only beside its weight)."""
        if key.startswith(UNET):
            return [_unet_target(key[len(UNET):], key, keys)]
        if key.startswith(TEXT):
            return _text_target(key, keys)
        return None

    # -- summary groups --------------------------------------------------------------------

    @property
    def group_order(self):
        return ["embedders", *dict.fromkeys(self.blocks.values()), "final_layer", "other",
                "text_encoders", "vae"]

    def group_of(self, key):
        if key.startswith(UNET):
            return self.unet_group(key[len(UNET):])
        if key.startswith(TEXT):
            return "text_encoders"
        if key.startswith("vae."):
            return "vae"
        return "other"

    def unet_group(self, path):
        for prefix, group in self.blocks.items():
            if path.startswith(prefix):
                return group
        if path.startswith(self.embedders):
            return "embedders"
        if path.startswith(self.finals):
            return "final_layer"
        return "other"

    # -- metadata --------------------------------------------------------------------------

    def host_metadata(self):
        """The ss_* / modelspec.* values hosts and sites read, beside the common ones."""
        return {"ss_base_model_version": self.base_model_version,
                "ss_v2": str(self.name == "sd2"),
                "modelspec.architecture": f"{self.architecture}/lora",
                "modelspec.implementation": self.implementation}


def _unet_target(path, key, keys):
    """ComfyUI's generic name for the diffusion-model tensor `key` (`path` without prefix)."""
    module, _, param = path.rpartition(".")
    if param == "weight" and module:
        return Target("lora_unet_" + module.replace(".", "_"), "weight")
    if param == "bias" and module and key[: -len("bias")] + "weight" in keys:
        return Target("lora_unet_" + module.replace(".", "_"), "bias")
    return Target("diffusion_model." + path, "weight")


def _text_target(key, keys):
    module, _, param = key.rpartition(".")
    if param == "weight":
        return [Target(module, "weight")]
    if param == "bias" and module + ".weight" in keys:
        return [Target(module, "bias")]
    return None


def count_blocks(keys, prefix):
    """How many `prefix<N>.` blocks the keys hold (0 if none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys for m in [pattern.match(k)] if m}
    return max(found) + 1 if found else 0
