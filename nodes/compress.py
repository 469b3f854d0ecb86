"""DeltaSVDCompress (two loaded models) and DeltaSVDCompressFiles (two checkpoint files)."""

import logging
import os
import torch

import comfy.model_management as mm
import folder_paths

from ..deltasvd.api import compress_to_delta
from ..deltasvd.sources import compress_sources
from ..deltasvd.summary import compress_summary
from . import comfy_models, provenance
from .common import (CATEGORY, DELTA, DTYPE_TOOLTIP, DTYPES, Progress, delta_bytes,
                     host_state, make_rule, mode_inputs, rule_problem, stats, ui)

log = logging.getLogger("deltasvd")

# Working set of one layer's math on the compute device, beyond the weights themselves.
MATH_BYTES = 1 << 30
BIG_MODEL_BYTES = 8e9   # beyond SDXL's size: a model the models node should not load twice


def _passes(rule):
    return 1 if rule.per_layer else 2


class DeltaSVDCompress:
    DESCRIPTION = (
        "Compress a fine-tuned model against its base into a delta (Delta-SVD): per layer, the "
        "difference of the weights, truncated by SVD to the rank the rule picks. Runs on "
        "ComfyUI's device, with a progress bar; Cancel stops it. Works on the weights as "
        "ComfyUI holds them (usually fp16/bf16): the summary warns when that is less precise "
        "than the files, in which case use 'Delta-SVD Compress (files)'.")
    CATEGORY = CATEGORY
    FUNCTION = "compress"
    RETURN_TYPES = (DELTA, "STRING")
    RETURN_NAMES = ("delta", "summary")
    OUTPUT_TOOLTIPS = ("The delta, in memory: save it with 'Delta-SVD Save', apply it with "
                       "'Delta-SVD Apply'.",
                       "Per layer group: ranks, size, relative error; the file size and the "
                       "compression ratio.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_tuned": ("MODEL", {"tooltip": "The fine-tuned model (DreamBooth, a full "
                                          "fine-tune) whose changes the delta stores."}),
                "model_base": ("MODEL", {"tooltip": "The model it was fine-tuned from (e.g. "
                                         "SD1.5 for an SD1.5 fine-tune). Same family required."}),
                **mode_inputs(),
                "dtype": (DTYPES, {"default": "fp16", "tooltip": DTYPE_TOOLTIP}),
            },
            "optional": {
                "clip_tuned": ("CLIP", {"tooltip": "The fine-tune's text encoder; connect it "
                                        "and clip_base to include text-encoder changes."}),
                "clip_base": ("CLIP", {"tooltip": "The base model's text encoder (connect both "
                                       "CLIPs or neither)."}),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, mode=None, value=None):
        return rule_problem(mode, value) or True

    def compress(self, model_tuned, model_base, mode, value, dtype, clip_tuned=None,
                 clip_base=None, prompt=None, unique_id=None):
        rule = make_rule(mode, value)
        if (clip_tuned is None) != (clip_base is None):
            raise ValueError("connect both clip_tuned and clip_base, or neither")
        progress = Progress(_passes(rule), unique_id)
        progress.check()
        device = mm.get_torch_device()
        patchers = [model_tuned, model_base] + [c.patcher for c in (clip_tuned, clip_base)
                                                if c is not None]
        comfy_models.release(patchers)
        comfy_models.free_for_math(device, MATH_BYTES)
        files = {side: _file_of(prompt, unique_id, side) for side in ("tuned", "base")}
        try:
            with torch.inference_mode(), host_state():
                base = comfy_models.model_source(model_base, clip_base, "model_base", device)
                tuned = comfy_models.model_source(model_tuned, clip_tuned, "model_tuned", device)
                loaded = {"tuned": provenance.st_name(comfy_models.loaded_dtype(tuned)),
                          "base": provenance.st_name(comfy_models.loaded_dtype(base))}
                delta, counts, tuned_bytes = compress_sources(
                    base, tuned, rule, dtype, device, progress,
                    base_name=(files["base"] or ("MODEL",))[0],
                    tuned_name=(files["tuned"] or ("MODEL",))[0])
                note = None
                if provenance.precision_note(loaded, files, None):  # worth a note: measure
                    note = provenance.precision_note(loaded, files,
                                                     _rounding_ratio(delta, tuned, loaded))
        finally:
            comfy_models.cleanup()
        size = delta_bytes(delta)
        text = compress_summary(delta, counts, size, tuned_bytes)
        parts = "UNet and text encoder" if clip_tuned is not None else "UNet"
        text += (f"\ninputs: the weights ComfyUI holds in memory ({parts}; the VAE is not "
                 "compared)")
        if note:
            text += "\n" + note
            log.warning("DeltaSVDCompress: %s", note)
        if tuned_bytes > BIG_MODEL_BYTES:
            text += (f"\nnote: a {tuned_bytes / 2**30:.0f} GiB model had to be loaded twice for "
                     "this node; 'Delta-SVD Compress (files)' streams both files tensor by "
                     "tensor in a few GiB of memory")
        info = stats(delta, size)
        info["precision_warning"] = bool(note)
        return {"ui": ui(text, info), "result": (delta, text)}


def _rounding_ratio(delta, tuned, loaded):
    """Estimated load-time rounding noise relative to the delta, from the norms of the tuned
    weights that changed (read again: only when a note is due)."""
    norm2 = 0.0
    for key in {r.key for r in delta.records if r.norm2 > 0}:
        if key in tuned.key_map:
            norm2 += float(tuned.get(key).float().square().sum())
    return provenance.rounding_ratio(norm2, sum(r.norm2 for r in delta.records),
                                     loaded["tuned"])


def _file_of(prompt, node_id, side):
    """(file name, stored dtype) of the checkpoint feeding model_<side>, if the graph says."""
    found = provenance.upstream_file(prompt, node_id, f"model_{side}", ("model",))
    if not found:
        return None
    return found[1], provenance.stored_dtype(*found)


DIFFUSION_MODELS = "diffusion_models/"   # label prefix of files in that folder


def model_files():
    """Labels of the files Compress (files) offers: the checkpoints folder's names as they
    are (saved workflows keep working), then the diffusion_models folder's (Flux, Qwen-Image,
    Wan, ... fine-tunes are shared as diffusion models alone) behind DIFFUSION_MODELS."""
    names = list(folder_paths.get_filename_list("checkpoints"))
    names += [DIFFUSION_MODELS + n for n in folder_paths.get_filename_list("diffusion_models")]
    return names


def model_path(label):
    """The file behind a label of model_files() (raises when it is gone)."""
    if label.startswith(DIFFUSION_MODELS):
        name = label[len(DIFFUSION_MODELS):]
        if name in folder_paths.get_filename_list("diffusion_models"):
            return folder_paths.get_full_path_or_raise("diffusion_models", name)
    return folder_paths.get_full_path_or_raise("checkpoints", label)


class DeltaSVDCompressFiles:
    DESCRIPTION = (
        "Compress a fine-tuned model against its base, both read from the checkpoints or "
        "diffusion_models folder at their stored precision (tensor by tensor, no model loaded: "
        "a few GB of memory even for a 24 GB Flux or a 41 GB Qwen-Image). The clean way to "
        "make a delta: nothing is rounded to the precision ComfyUI runs models in. Any family "
        "ComfyUI loads; an all-in-one checkpoint pairs with a diffusion-model-only file.")
    CATEGORY = CATEGORY
    FUNCTION = "compress"
    RETURN_TYPES = (DELTA, "STRING")
    RETURN_NAMES = ("delta", "summary")
    OUTPUT_TOOLTIPS = DeltaSVDCompress.OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        names = model_files()
        return {
            "required": {
                "ckpt_tuned": (names, {"tooltip": "The fine-tuned model (.safetensors, bf16 / "
                                       "fp16 / fp32 / fp8 / scaled fp8; .ckpt is read with "
                                       "weights_only=True)."}),
                "ckpt_base": (names, {"tooltip": "The model it was fine-tuned from."}),
                **mode_inputs(),
                "dtype": (DTYPES, {"default": "fp16", "tooltip": DTYPE_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, mode=None, value=None):
        return rule_problem(mode, value) or True

    @classmethod
    def IS_CHANGED(cls, ckpt_tuned, ckpt_base, **kwargs):
        out = []
        for name in (ckpt_tuned, ckpt_base):
            try:
                path = model_path(name)
            except Exception:  # noqa: BLE001  (gone: ComfyUI reports it when the node runs)
                path = None
            out.append(f"{name}:{os.path.getmtime(path) if path else None}")
        return "|".join(out)

    def compress(self, ckpt_tuned, ckpt_base, mode, value, dtype, unique_id=None):
        rule = make_rule(mode, value)
        tuned, base = model_path(ckpt_tuned), model_path(ckpt_base)
        progress = Progress(_passes(rule), unique_id)
        progress.check()
        device = mm.get_torch_device()
        comfy_models.free_for_math(device, MATH_BYTES)
        try:
            with torch.inference_mode(), host_state():
                delta, counts, tuned_bytes = compress_to_delta(
                    base, tuned, rule, dtype, device, progress, allow_pickle=True)
        finally:
            comfy_models.cleanup()
        size = delta_bytes(delta)
        text = compress_summary(delta, counts, size, tuned_bytes)
        return {"ui": ui(text, stats(delta, size)), "result": (delta, text)}
