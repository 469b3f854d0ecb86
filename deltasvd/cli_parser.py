"""The `deltasvd` command line's options and their checks. Imports no torch: a usage error
(exit 2, with the subcommand's usage) comes at once, not after seconds of importing."""

import argparse
import math
import sys

from . import __version__
from .limits import DCT_MAX_BITS, FACTOR_MAX_BITS, STORAGE_ROUNDING
from .ranks import MODES, RankRule
from .errors import UsageError

EXIT_USAGE = 2
NO_VERIFY = ("skip checking the delta's tensor data against the sha256 it records (one hash "
             "of the data, for speed; its records and values are still checked)")
DTYPES = ["fp16", "bf16", "fp32"]


class _Help(argparse.HelpFormatter):
    """Help with each option's default where it has one (not "default: None / False")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **k):
        k.setdefault("formatter_class", _Help)
        super().__init__(*a, **k)

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"deltasvd: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def finite(text):
    """A float option: NaN and infinities are usage errors, not values (a strength of nan
    would write NaN into every patched weight)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


EXACT_RANKS = ("certify every rank equal to the rule's on float64 singular values (about "
               "1.3x the time; default: the rule on float32 values, README: Performance); "
               "with --rank, the exact truncated SVD and every layer's whole spectrum")


def _add_rule_args(p, required=True, size=True, error=False):
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--energy", type=finite, metavar="T",
                   help="smallest rank with sum(s[:t]) / sum(s) >= T (the paper's rule), 0<T<=1")
    g.add_argument("--fro", type=finite, metavar="F",
                   help="the same on s^2: retained Frobenius energy, 0<F<=1")
    g.add_argument("--rank", type=int, metavar="R",
                   help="a fixed rank for every layer (compress: a randomized SVD where that is "
                   "cheaper, keeping only those R singular values: resize by rank, --fro or "
                   "size, not --energy; --exact-ranks: the exact truncation, whole spectra)")
    if size:
        g.add_argument("--size-mb", type=finite, metavar="M",
                       help="a total file size in MiB; ranks shared out over all layers to "
                       "minimise the weight-relative error (README: Choosing a setting)")
    if error:
        g.add_argument("--max-error", type=finite, metavar="E",
                       help="the smallest file whose weight-relative error is at most E, "
                       "0<E<1 (README: Choosing a setting)")
    p.add_argument("--min-rank", type=int, default=1,
                   help="lower clamp on every rank of the per-layer rules (--size-mb and "
                   "--max-error allocate from rank 0)")
    p.add_argument("--max-rank", type=int, default=None,
                   help="upper clamp on every rank (none: no clamp)")


def rule_of(args):
    """The rule the options name (the option of each mode is named after it), or None."""
    for mode in MODES:
        value = getattr(args, mode, None)
        if value is not None:
            exact = getattr(args, "exact_ranks", False)
            sketch = mode == "rank" and not exact and getattr(args, "command", "") == "compress"
            return RankRule(mode, value, args.min_rank, args.max_rank, exact=exact,
                            sketch=sketch)
    return None


def codec_problem(args):
    """Why the options of `compress` do not name one codec setting, or None: svd needs a rank
    rule, dct a --bits budget and no rule."""
    has_rule = any(getattr(args, mode) is not None for mode in MODES)
    if args.codec == "dct":
        if args.bits is None:
            return "--codec dct needs --bits B (bits per parameter, e.g. 1)"
        if has_rule or args.factor_bits is not None:
            return "--codec dct takes --bits only (no rank rule, no --factor-bits)"
        if not 0 < args.bits <= DCT_MAX_BITS:
            return f"--bits must lie in (0, {DCT_MAX_BITS}]"
        return None
    if not has_rule:
        return "--codec svd needs one of --energy, --fro, --rank, --size-mb, --max-error"
    if args.bits is not None:
        return "--bits is for --codec dct; quantized factors: --factor-bits"
    if args.factor_bits is not None and not 1 <= args.factor_bits <= FACTOR_MAX_BITS:
        return f"--factor-bits must lie in 1..{FACTOR_MAX_BITS}"
    floor = STORAGE_ROUNDING.get(args.dtype, 0.0)
    if args.max_error is not None and 0 < args.max_error <= floor:
        return (f"--max-error {args.max_error:g} is below what {args.dtype} factors can hold "
                f"(their rounding alone is about {floor:g}); use --dtype fp32 or a larger target")
    for option, value in (("--size-mb", args.size_mb), ("--max-error", args.max_error)):
        if args.factor_bits is not None and value is not None:
            return f"{option} works with plain factors only (not --factor-bits)"
    return None


def usage_problem(args):
    """Why parsed options cannot mean anything, or None (checked before any work)."""
    if args.command == "compress":
        problem = codec_problem(args)
        if problem:
            return problem
    try:
        if args.command in ("compress", "resize", "convert"):
            rule_of(args)
        elif args.command == "demo":
            RankRule("energy", args.energy)
    except UsageError as e:
        return e.message
    return None


def _output(p, what):
    p.add_argument("-o", "--output", required=True, help=f"the {what} to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _compress(sub):
    c = sub.add_parser("compress", help="base + fine-tuned checkpoint -> delta file")
    c.add_argument("base", help="the model the fine-tune was made from (.safetensors)")
    c.add_argument("tuned", help="the fine-tuned model (.safetensors)")
    _output(c, "delta file")
    _add_rule_args(c, required=False, error=True)
    c.add_argument("--codec", default="svd", choices=["svd", "dct"],
                   help="svd: LoRA-format factors; dct: Delta-DCT (needs --bits)")
    c.add_argument("--bits", type=finite, metavar="B",
                   help="dct: bits per parameter, side data included (e.g. 0.5 .. 4)")
    c.add_argument("--factor-bits", type=int, metavar="F",
                   help="svd: quantize the factors, F bits (1..8) for the leading singular "
                        "vectors, fewer for the tail (not LoRA-loadable; see convert)")
    c.add_argument("--dtype", default="fp16", choices=DTYPES,
                   help="storage dtype of the factors")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    c.add_argument("--exact-ranks", action="store_true", help=EXACT_RANKS)
    c.add_argument("--allow-pickle", action="store_true",
                   help="read .ckpt/.pt files (tensors only, weights_only=True)")


def _apply(sub):
    a = sub.add_parser("apply", help="base + delta -> full checkpoint")
    a.add_argument("base", help="the base checkpoint the delta was made against")
    a.add_argument("delta", help="a deltasvd delta file")
    _output(a, "merged checkpoint")
    a.add_argument("--strength", type=finite, default=1.0,
                   help="multiplies the delta (1: the fine-tune)")
    a.add_argument("--force", action="store_true",
                   help="apply even if the base is not the one the delta was made against")
    a.add_argument("--allow-pickle", action="store_true",
                   help="read a .ckpt/.pt base (tensors only, weights_only=True)")
    a.add_argument("--no-verify", action="store_true", help=NO_VERIFY)


def _edits(sub):
    i = sub.add_parser("inspect", help="show a delta file's metadata and rank table")
    i.add_argument("delta", help="a deltasvd delta file")
    i.add_argument("--no-verify", action="store_true", help=NO_VERIFY)

    r = sub.add_parser("resize", help="cut a delta file to a smaller threshold or size")
    r.add_argument("delta", help="a LoRA-format (svd) deltasvd delta file")
    _output(r, "smaller delta file")
    _add_rule_args(r)
    r.add_argument("--no-verify", action="store_true", help=NO_VERIFY)

    v = sub.add_parser("convert", help="a qsvd / dct delta -> a LoRA-format delta file "
                       "(decode, then factor again)")
    v.add_argument("delta", help="a qsvd or dct deltasvd delta file")
    _output(v, "LoRA-format delta file")
    _add_rule_args(v, size=False)    # a size: convert, then `resize --size-mb`
    v.add_argument("--dtype", default="fp16", choices=DTYPES,
                   help="storage dtype of the factors")
    v.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    v.add_argument("--exact-ranks", action="store_true", help=EXACT_RANKS)
    v.add_argument("--no-verify", action="store_true", help=NO_VERIFY)


def _tools(sub):
    d = sub.add_parser("demo", help="the whole job on the built-in small text-to-image model "
                       "and its fine-tune, judged by pictures: writes deltasvd_demo.png")
    d.add_argument("--dir", default=None,
                   help="keep the files and the picture in this folder (default: a temporary "
                        "folder, removed at the end; the picture goes to the current folder)")
    d.add_argument("--energy", type=finite, default=0.5, help="the threshold to compress at")
    u = sub.add_parser("ui", help="the threshold explorer page in a browser (needs gradio)")
    u.add_argument("--port", type=int, default=7861, help="port to serve on")
    u.add_argument("--listen", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only)")
    u.add_argument("--models", default=".", help="folder whose checkpoints the page lists")
    u.add_argument("--loras", default=None,
                   help="where Save writes and Inspect looks (none: <models>/loras)")
    u.add_argument("--threshold", type=finite, default=0.5, help="the slider's first value")


def build_parser():
    """The parser; `parser.subcommands[name]` is each subcommand's, for its usage on errors."""
    p = _Parser(prog="deltasvd", description="Compress fine-tuned diffusion models (SD, SDXL, "
                "Flux, Qwen-Image, Wan, ...) against their base into LoRA-compatible delta files "
                "(Delta-SVD).")
    p.add_argument("--version", action="version", version=f"deltasvd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           metavar="command")
    for add in (_compress, _apply, _edits, _tools):
        add(sub)
    p.subcommands = dict(sub.choices)
    return p
