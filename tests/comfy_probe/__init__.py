"""A test-only ComfyUI node (installed by tests/test_comfyui_server.py into its temporary
custom_nodes folder): writes chosen weights of a MODEL / CLIP, as ComfyUI computes them when it
loads the model for sampling (patches applied by the host itself), to a .safetensors file in
the output folder."""

import os

import safetensors.torch

import comfy.model_management as mm
import folder_paths


class DeltaSVDTestProbe:
    CATEGORY = "testing"
    FUNCTION = "probe"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "keys": ("STRING", {"multiline": True}),
                             "filename": ("STRING", {"default": "probe.safetensors"})},
                "optional": {"clip": ("CLIP",)}}

    def probe(self, model, keys, filename, clip=None):
        wanted = keys.split()
        out = {}
        for patcher in [model] + ([clip.patcher] if clip is not None else []):
            mm.load_models_gpu([patcher], force_patch_weights=True, force_full_load=True)
            state = patcher.model.state_dict()
            for key in wanted:
                if key in state:
                    out[key] = state[key].detach().float().cpu().contiguous()
        missing = [k for k in wanted if k not in out]
        if missing:
            raise KeyError(f"probe: no such weights: {missing}")
        path = os.path.join(folder_paths.get_output_directory(), filename)
        safetensors.torch.save_file(out, path)
        return {"ui": {"text": [path]}}


NODE_CLASS_MAPPINGS = {"DeltaSVDTestProbe": DeltaSVDTestProbe}
