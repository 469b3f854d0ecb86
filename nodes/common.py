"""Shared glue: the DELTA type, rank-rule inputs, progress with Cancel, what the nodes show."""

from contextlib import contextmanager


import comfy.model_management as mm
import comfy.utils

from ..deltasvd.api import host_meta_fn
from ..deltasvd.measures import relative_error
from ..deltasvd.delta_file import FACTORED_KINDS, file_size
from ..deltasvd.errors import DeltaError
from ..deltasvd.ranks import RankRule
from ..deltasvd.summary import ratio_reference

DELTA = "DELTA"          # a deltasvd.delta_file.Delta, in memory
CATEGORY = "deltasvd"
MODES = {"energy": "energy", "frobenius": "fro", "rank": "rank", "size_mb": "size_mb"}
DTYPES = ["fp16", "bf16", "fp32"]

MODE_TOOLTIP = (
    "How each layer's rank is chosen. energy: the paper's rule, keep the smallest rank whose "
    "singular values reach `value` (0-1) of their sum. frobenius: the same on squared singular "
    "values (retained Frobenius energy). rank: the same rank `value` for every layer. "
    "size_mb: a total file size of `value` MiB, ranks allocated over all layers to minimise "
    "the weight-relative error (each layer's lost change against its own weights).")
VALUE_TOOLTIP = ("The threshold (energy, frobenius: 0 < value <= 1, 1 is exact), the rank "
                 "(rank: a whole number >= 1) or the file size in MiB (size_mb).")
DTYPE_TOOLTIP = ("Storage precision of the factors. fp16 (default) is what LoRA files use; "
                 "fp32 doubles the size; bf16 keeps range but only 8 significant bits.")


def mode_inputs(default_mode="energy", default_value=0.5):
    return {
        "mode": (list(MODES), {"default": default_mode, "tooltip": MODE_TOOLTIP}),
        "value": ("FLOAT", {"default": default_value, "min": 0.0, "max": 1.0e6, "step": 0.01,
                            "round": 0.0001, "tooltip": VALUE_TOOLTIP}),
    }


CLI_WORDS = (("--size-mb", "value (size_mb)"), ("--energy", "value (energy)"),
             ("--fro", "value (frobenius)"), ("--rank", "value (rank)"),
             ("--min-rank", "min_rank"), ("--max-rank", "max_rank"))


def node_words(message):
    """The core's messages name CLI options; in a node they are the node's inputs."""
    for cli, node in CLI_WORDS:
        message = message.replace(cli, node)
    return message


def make_rule(mode, value):
    """The core's RankRule for a node's (mode, value); errors in the node's words."""
    if mode not in MODES:
        raise DeltaError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    try:
        return RankRule(MODES[mode], float(value))
    except DeltaError as e:
        raise DeltaError(node_words(str(e))) from None


@contextmanager
def host_state():
    """Core errors come out in the node's words. (TF32: the core restores the host's flags
    itself after its CUDA math.)"""
    try:
        yield
    except DeltaError as e:
        raise DeltaError(node_words(str(e))) from None


def rule_problem(mode, value):
    """None if (mode, value) make a rule, else the message (for VALIDATE_INPUTS)."""
    if mode is None or value is None:
        return None   # linked inputs: checked when the node runs
    try:
        make_rule(mode, value)
    except DeltaError as e:
        return str(e)
    return None


class Progress:
    """The core's progress callback as a ComfyUI ProgressBar; checks Cancel on every tensor.

    `passes`: how many stages the job has (size mode scans every layer first, then codes)."""

    def __init__(self, passes=1, node_id=None):
        self.passes = passes
        self.node_id = node_id
        self.bar = None
        self.stages = {}
        self.last = -1

    def check(self):
        mm.throw_exception_if_processing_interrupted()

    def __call__(self, stage, done, total, key):
        self.check()
        total = max(int(total), 1)
        i = self.stages.setdefault(stage, len(self.stages))
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total * self.passes, node_id=self.node_id)
        value = min(i, self.passes - 1) * total + done
        percent = 100 * value // (total * self.passes)
        if percent != self.last or done == total:
            self.last = percent
            self.bar.update_absolute(value, total * self.passes)


def delta_bytes(delta, name="delta"):
    """The size the delta's file has (or will have), exactly."""
    return file_size(delta, host_meta_fn(delta, name))


def stats(delta, size=None, name="delta"):
    """What the frontend extension shows on a node: size, ratio, error, ranks."""
    size = delta_bytes(delta, name) if size is None else size
    ranks = [r.rank for r in delta.records if r.kind in FACTORED_KINDS and r.n]
    out = {
        "size_mb": round(size / 2**20, 3),
        "rel_error": round(relative_error(delta.records), 5),
        "layers": sum(1 for r in delta.records if r.n),
        "family": delta.family,
        "mode": str(delta.info.get("mode", "")),
        "value": str(delta.info.get("value", "")),
    }
    if ranks:
        ranks.sort()
        out["rank_min"], out["rank_median"], out["rank_max"] = (
            ranks[0], ranks[len(ranks) // 2], ranks[-1])
    tuned = _float(delta.info.get("tuned_bytes"))
    if tuned:
        out["ratio"] = round(tuned / max(size, 1), 1)
        out["ratio_against"] = f"{ratio_reference(delta)} ({tuned / 2**20:.1f} MiB)"
    return out


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def ui(text, info=None):
    """A node's `ui` dict: the text (shown by the frontend extension) and its numbers."""
    out = {"text": [text]}
    if info is not None:
        out["deltasvd"] = [info]
    return out
