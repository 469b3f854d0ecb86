"""DeltaSVDCompare: how close base + delta's pictures come to the full fine-tune's.

A delta is judged by its pictures, so this scores them in the user's own graph and on their
own models: the full fine-tune's images (reference) against base + delta's (candidate), made
with the same prompts and seeds, picture by picture. The scores are deltasvd.image_metrics'."""

import math

import comfy.model_management as mm
import torch

from ..deltasvd.errors import DeltaError
from ..deltasvd.image_metrics import mean_psnr, psnr, ssim
from .common import CATEGORY, ui


def _describe(images):
    shape = tuple(images.shape)
    if len(shape) != 4:
        return f"shape {shape}"
    n, h, w, c = shape
    return f"{n} picture{'s' if n != 1 else ''} of {w} x {h}, {c} channels (shape {shape})"


def check_inputs(reference, candidate):
    """Refuses what cannot be compared picture by picture, naming both inputs. A batch of one
    is not broadcast against a larger one: with the same seeds and latent the two batches
    match, so a difference in count is a wiring mistake, not a comparison."""
    if tuple(reference.shape) != tuple(candidate.shape):
        raise DeltaError(f"reference and candidate must be the same number of pictures of the "
                         f"same size (same seeds, same latent): reference is "
                         f"{_describe(reference)}, candidate is {_describe(candidate)}")
    if reference.shape[0] == 0:
        raise DeltaError("reference and candidate hold no pictures")
    for name, images in (("reference", reference), ("candidate", candidate)):
        # a NaN score would pass silently into averages and graphs
        if not bool(torch.isfinite(images).all()):
            raise DeltaError(f"{name} holds NaN or infinite pixels (a failed decode?); "
                             f"nothing to compare")


def score(reference, candidate):
    """[(SSIM, PSNR)] per picture, one picture at a time: the float64 copies the scores work on
    would take gigabytes for a whole batch of large pictures. Cancel is checked between them."""
    out = []
    for i in range(reference.shape[0]):
        mm.throw_exception_if_processing_interrupted()
        a, b = reference[i:i + 1], candidate[i:i + 1]
        try:
            out.append((float(ssim(a, b)[0]), float(psnr(a, b)[0])))
        except ValueError as e:     # too small for the SSIM window
            raise DeltaError(str(e)) from None
    return out


def _db(value):
    return f"{value:.2f}" if math.isfinite(value) else "inf"


def report(scores, mean_s, mean_p, size):
    n = len(scores)
    lines = [f"{n} picture{'s' if n != 1 else ''} of {size}, candidate vs reference",
             f"{'picture':>7}  {'SSIM':>7}  {'PSNR dB':>7}"]
    lines += [f"{i:>7}  {s:7.4f}  {_db(p):>7}" for i, (s, p) in enumerate(scores, 1)]
    lines.append(f"{'mean':>7}  {mean_s:7.4f}  {_db(mean_p):>7}")
    identical = sum(1 for _, p in scores if not math.isfinite(p))
    if identical == n:
        lines.append("every picture is identical to its reference (PSNR inf)")
    elif identical:
        lines.append(f"the mean PSNR leaves out {identical} identical picture"
                     f"{'s' if identical != 1 else ''} (PSNR inf)")
    return "\n".join(lines)


def numbers(scores, mean_s, mean_p):
    """What the frontend extension shows on the node. Strict JSON carries no infinity, so an
    infinite PSNR goes as the string "inf"."""
    worst = min(range(len(scores)), key=lambda i: scores[i][0])
    return {"pictures": len(scores), "ssim_mean": mean_s,
            "psnr_mean": mean_p if math.isfinite(mean_p) else "inf",
            "ssim_min": scores[worst][0], "ssim_min_picture": worst + 1}


class DeltaSVDCompare:
    DESCRIPTION = (
        "Score base + delta's pictures against the full fine-tune's, made with the same "
        "prompts and seeds: SSIM (1 = identical) and PSNR (dB, higher is closer) per picture "
        "and on average. Both batches must hold the same number of pictures of the same size.")
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT")
    RETURN_NAMES = ("summary", "mean_ssim", "mean_psnr")
    OUTPUT_TOOLTIPS = ("Per picture SSIM and PSNR, and their means.",
                       "Mean SSIM over the pictures (1 = identical).",
                       "Mean PSNR in dB over the pictures that differ (inf if none does).")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference": ("IMAGE", {"tooltip": "The full fine-tune's pictures (the VAE Decode "
                                    "after its sampler)."}),
            "candidate": ("IMAGE", {"tooltip": "Base + delta's pictures: same prompts, seeds, "
                                    "sampler settings and batch size as the reference."}),
        }}

    def compare(self, reference, candidate):
        check_inputs(reference, candidate)
        scores = score(reference, candidate)
        mean_s = sum(s for s, _ in scores) / len(scores)
        mean_p = mean_psnr([p for _, p in scores])
        size = f"{reference.shape[2]} x {reference.shape[1]}"
        text = report(scores, mean_s, mean_p, size)
        return {"ui": ui(text, numbers(scores, mean_s, mean_p)),
                "result": (text, mean_s, mean_p)}
