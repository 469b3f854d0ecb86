"""How much of the fine-tune a delta file loses, from weights only.

- relative error: ||dW - dW^|| / ||dW|| over the whole file (every element alike).
- weight-relative error: each matrix layer's lost change measured against that layer's own
  base weights, sqrt(sum_l err_l^2 / B_l) / sqrt(sum_l ||dW_l||^2 / B_l), B_l = ||W_l||^2,
  over the layers the codecs compress (1-D changes, biases and norms, are stored exactly and
  left out: their small weights would otherwise fill most of the sum). A change
  of a given size matters more to a layer with small weights (what a layer does to its input
  scales with its weights), and on the project's own text-to-image fine-tune this measure
  tracked the pictures (SSIM to the full fine-tune) better than the plain relative error
  (bench/fidelity.py; README, "Choosing a setting"). `--size-mb` shares ranks out to minimise
  it, and `--max-error` picks the smallest file that reaches it.

Both are 0 for a lossless file and 1 when nothing is kept.
"""

import math


def layer_weight(base2, norm2):
    """What one unit of squared error costs in a layer: 1 / ||W||^2. None (a file written before
    base norms were recorded): 1, i.e. the plain Frobenius measure. A layer whose base weight is
    zero (or smaller than its change) is measured against its change instead, so it is neither
    free nor infinitely dear."""
    if base2 is None:
        return 1.0
    scale = max(base2, norm2)
    return 1.0 / scale if scale > 0 else 0.0


def relative_error(records):
    err2 = sum(r.err2 for r in records)
    norm2 = sum(r.norm2 for r in records)
    return math.sqrt(err2 / norm2) if norm2 > 0 else 0.0


def weighted_error(records):
    """The weight-relative error of a delta's records (the module docstring)."""
    err2 = norm2 = 0.0
    for r in records:
        if r.kind == "exact":
            continue
        w = layer_weight(r.base2, r.norm2)
        err2 += w * r.err2
        norm2 += w * r.norm2
    return math.sqrt(err2 / norm2) if norm2 > 0 else 0.0


def has_base_norms(records):
    """Whether the file records its base norms (the weight-relative measure needs them)."""
    return all(r.base2 is not None for r in records if r.norm2 > 0)
