"""DeltaSVDApply (a delta onto a MODEL / CLIP, as patches) and DeltaSVDResize."""

import logging

from ..deltasvd.api import resize_delta
from ..deltasvd.summary import inspect_text
from . import comfy_models
from .common import (CATEGORY, DELTA, delta_bytes, host_state, make_rule, mode_inputs,
                     rule_problem, stats, ui)

log = logging.getLogger("deltasvd")
SHOW = 8   # names listed in a report before "and N more"


def _names(items):
    items = list(items)
    more = f" and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


class DeltaSVDApply:
    DESCRIPTION = (
        "Apply a delta to a model (and its text encoder): W = W_base + strength * A B. The "
        "inputs are cloned, never changed; the delta is added as factored patches that ComfyUI "
        "rebuilds on its own device when it loads the model (lowvram included), exactly as "
        "LoraLoader does with the same file, plus the deltas LoRA loaders cannot apply "
        "(text-encoder norms and embeddings). Deltas of the smaller codecs (quantized factors, "
        "Delta-DCT), which LoraLoader cannot read, are decoded first. Refuses a delta made for "
        "another model family.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The model with the delta patched in.",
                       "The text encoder with the delta patched in (None if no CLIP was "
                       "connected).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model the delta was made against."}),
                "delta": (DELTA, {"tooltip": "From Delta-SVD Load, Compress or Resize."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0,
                                             "step": 0.01, "tooltip": "Scale of the UNet "
                                             "delta: 1 reproduces the fine-tune, 0 the base."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The base model's text encoder; without it the "
                                  "text-encoder part of the delta is not applied."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0,
                                            "step": 0.01, "tooltip": "Scale of the "
                                            "text-encoder delta."}),
            },
        }

    def apply(self, model, delta, strength_model, clip=None, strength_clip=1.0):
        comfy_models.check_family(delta, model)
        plan = comfy_models.delta_patches(delta, model, clip)
        new_model = model.clone()
        added = set(new_model.add_patches(plan.model_patches, strength_model))
        new_clip = None
        if clip is not None:
            new_clip = clip.clone()
            added |= set(new_clip.add_patches(plan.clip_patches, strength_clip))
        not_loaded = [str(k) for k in list(plan.model_patches) + list(plan.clip_patches)
                      if k not in added]
        text = self._report(delta, plan, not_loaded, strength_model,
                            strength_clip if clip is not None else None)
        info = stats(delta)
        info.update(applied=len(plan.applied), modules=plan.modules,
                    unmatched=len(plan.unmatched) + len(not_loaded),
                    extras_applied=len(plan.extras_applied),
                    extras_unmatched=len(plan.extras_unmatched))
        return {"ui": ui(text, info), "result": (new_model, new_clip)}

    @staticmethod
    def _report(delta, plan, not_loaded, strength_model, strength_clip):
        lines = [f"applied {len(plan.applied)} of {plan.modules} LoRA modules "
                 f"(strength model {strength_model:g}"
                 + (f", clip {strength_clip:g})" if strength_clip is not None else ")")]
        if plan.extras_applied:
            lines.append(f"applied {len(plan.extras_applied)} extras (deltas no LoRA loader "
                         f"applies): {_names(plan.extras_applied)}")
        if plan.no_clip:
            lines.append(f"{len(plan.no_clip)} text-encoder modules not applied: no CLIP "
                         "connected")
        problems = []
        if plan.unmatched:
            problems.append(f"{len(plan.unmatched)} LoRA modules matched no weight of the "
                            f"model: {_names(plan.unmatched)}")
        if not_loaded:
            problems.append(f"{len(not_loaded)} patches were not taken by the model: "
                            f"{_names(not_loaded)}")
        for key, why in plan.extras_unmatched:
            problems.append(f"extra {key} not applied: {why}")
        for p in problems:
            log.warning("DeltaSVDApply: %s", p)
        lines += ["NOT APPLIED: " + p for p in problems]
        return "\n".join(lines)


class DeltaSVDResize:
    DESCRIPTION = (
        "Cut a delta to a smaller threshold, rank or file size, without the checkpoints. Exact: "
        "the factors are ordered by singular value and the file keeps each layer's spectrum, "
        "so this gives what compressing at the new setting would. It can only cut: a larger "
        "setting than the delta was made with needs the checkpoints again.")
    CATEGORY = CATEGORY
    FUNCTION = "resize"
    RETURN_TYPES = (DELTA, "STRING")
    RETURN_NAMES = ("delta", "summary")
    OUTPUT_TOOLTIPS = ("The smaller delta (the input is not changed).",
                       "Per layer group: ranks, size, relative error.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"delta": (DELTA, {"tooltip": "The delta to cut."}),
                             **mode_inputs("energy", 0.3)}}

    @classmethod
    def VALIDATE_INPUTS(cls, mode=None, value=None):
        return rule_problem(mode, value) or True

    def resize(self, delta, mode, value):
        with host_state():
            out = resize_delta(delta, make_rule(mode, value))
        out.info["file"] = "(in memory, resized; save it with Delta-SVD Save)"
        size = delta_bytes(out)
        text = inspect_text(out, size)
        return {"ui": ui(text, stats(out, size)), "result": (out, text)}
