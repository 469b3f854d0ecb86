"""Where a MODEL / CLIP input came from, and whether ComfyUI holds it in less precision.

ComfyUI usually holds models in fp16 or bf16 whatever their files store. A delta taken from
weights rounded at load time contains that rounding: with bf16 (8 significant bits) it is
mostly noise, because a fine-tune moves weights by far less than bf16's step. The MODEL object
does not say which file it was loaded from, but the prompt does: the loader node upstream of
the input (following pass-through nodes such as LoraLoader) names it.
"""

import math

import folder_paths

from ..deltasvd.safetensors_io import ST_TO_DTYPE, read_header

MANTISSA = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7}
DTYPE_NAMES = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16"}
# input name of a loader node -> models folder it reads from
LOADER_INPUTS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models",
                 "clip_name": "text_encoders"}
# Mean of (rounding error / value)^2 for one rounding to a p-bit mantissa is about
# 2^-2p * E[1/m^2] / 12 with m log-uniform in [1, 2) (E = 0.54): 0.045 * 2^-2p. Base and tuned
# are each rounded, so the delta gets twice that.
ROUNDING_VARIANCE = 2 * 0.045


def upstream_file(prompt, node_id, input_name, follow):
    """(folder, file name) of the loader feeding `input_name` of node `node_id`, following
    inputs named in `follow` through other nodes; None if there is none (or no prompt)."""
    if not isinstance(prompt, dict) or node_id is None:
        return None
    link = prompt.get(str(node_id), {}).get("inputs", {}).get(input_name)
    for _ in range(64):
        if not (isinstance(link, list) and len(link) == 2):
            return None
        node = prompt.get(str(link[0]))
        if not isinstance(node, dict):
            return None
        inputs = node.get("inputs", {})
        for name, folder in LOADER_INPUTS.items():
            if isinstance(inputs.get(name), str):
                return folder, inputs[name]
        link = next((inputs[n] for n in follow if isinstance(inputs.get(n), list)), None)
    return None


def stored_dtype(folder, name):
    """The dtype ('F32', 'F16', 'BF16', ...) most of a .safetensors file's float data is in."""
    try:
        path = folder_paths.get_full_path(folder, name)
        if not path or not path.lower().endswith(".safetensors"):
            return None
        header, _, _ = read_header(path)
    except Exception:  # noqa: BLE001  (best effort: no note rather than a failed node)
        return None
    count = {}
    for info in header.values():
        st = info.get("dtype")
        if st in MANTISSA:
            b, e = info["data_offsets"]
            count[st] = count.get(st, 0) + (e - b)
    return max(count, key=count.get) if count else None


def st_name(dtype):
    """torch dtype -> safetensors dtype string."""
    for st, dt in ST_TO_DTYPE.items():
        if dt == dtype:
            return st
    return None


def precision_note(loaded, files, rounding_ratio):
    """A summary paragraph when the inputs are held in less precision than their files.

    loaded: {'tuned': 'BF16', 'base': 'BF16'}; files: {'tuned': ('name', 'F32') or None, ...};
    rounding_ratio: estimated |rounding noise| / |delta| at the loaded precision."""
    worse = []
    for side in ("tuned", "base"):
        st = loaded.get(side)
        f = files.get(side)
        if st and f and f[1] and MANTISSA.get(st, 99) < MANTISSA.get(f[1], 0):
            worse.append(f"model_{side} is held in {DTYPE_NAMES[st]} but '{f[0]}' stores "
                         f"{DTYPE_NAMES[f[1]]}")
    held = {loaded.get("tuned"), loaded.get("base")} - {None}
    # Without the files to compare with, only bf16 (or less) is worth a note: fp16 is what
    # most SD checkpoints are stored in.
    low = sorted((s for s in held if MANTISSA.get(s, 99) <= MANTISSA["BF16"]),
                 key=lambda s: MANTISSA[s])
    if not worse and not (low and not any(files.values())):
        return None
    estimate = ""
    if rounding_ratio is not None and math.isfinite(rounding_ratio):
        estimate = (f" Rounding at that precision is estimated at {rounding_ratio:.0%} of this "
                    "delta's norm" + (" - more than the fine-tuning itself." if
                                      rounding_ratio >= 1 else "."))
    if worse:
        head = "PRECISION WARNING: " + "; ".join(worse) + "."
    else:
        head = (f"PRECISION NOTE: the inputs are held in {DTYPE_NAMES[low[0]]}; if the "
                "checkpoint files store more precision, this delta includes load-time rounding.")
    return (head + estimate + " For a clean delta use 'Delta-SVD Compress (files)' "
            "(DeltaSVDCompressFiles), which reads the checkpoints at their stored precision.")


def rounding_ratio(tuned_norm2, delta_norm2, st):
    """Estimated rounding noise of a delta of weights with squared norm `tuned_norm2` held in
    `st`, relative to the delta's norm."""
    p = MANTISSA.get(st)
    if p is None or delta_norm2 <= 0:
        return None
    return math.sqrt(ROUNDING_VARIANCE * 2.0 ** (-2 * p) * tuned_norm2 / delta_norm2)
