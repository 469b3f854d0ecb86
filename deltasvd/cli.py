"""`deltasvd` command line. Exit codes: 0 ok, 1 failure, 2 usage error."""

import argparse
import math
import os
import signal
import sys

from . import __version__
from .errors import DeltaError, UsageError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"deltasvd: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


NO_VERIFY = ("skip checking the delta's tensor data against the sha256 it records (one read "
             "of the file, for speed; its records and values are still checked)")


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


def _add_rule_args(p, required=True):
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--energy", type=finite, metavar="T",
                   help="smallest rank with sum(s[:t]) / sum(s) >= T (the paper's rule), 0<T<=1")
    g.add_argument("--fro", type=finite, metavar="F",
                   help="the same on s^2: retained Frobenius energy, 0<F<=1")
    g.add_argument("--rank", type=int, metavar="R", help="a fixed rank for every layer")
    g.add_argument("--size-mb", type=finite, metavar="M",
                   help="a total file size (MiB), ranks allocated to minimise total error")
    p.add_argument("--min-rank", type=int, default=1, help="lower clamp on every rank")
    p.add_argument("--max-rank", type=int, default=None, help="upper clamp on every rank")


def _rule(args):
    """The rule the options name (the option of each mode is named after it), or None."""
    from .ranks import MODES, RankRule
    for mode in MODES:
        value = getattr(args, mode)
        if value is not None:
            return RankRule(mode, value, args.min_rank, args.max_rank)
    return None


def codec_problem(args):
    """Why the options of `compress` do not name one codec setting, or None: svd needs a rank
    rule, dct a --bits budget and no rule."""
    from .dct_codec import MAX_BITS as DCT_MAX_BITS
    from .quant import MAX_BITS as FACTOR_MAX_BITS
    from .ranks import MODES
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
        return "--codec svd needs one of --energy, --fro, --rank, --size-mb"
    if args.bits is not None:
        return "--bits is for --codec dct; quantized factors: --factor-bits"
    if args.factor_bits is not None and not 1 <= args.factor_bits <= FACTOR_MAX_BITS:
        return f"--factor-bits must lie in 1..{FACTOR_MAX_BITS}"
    if args.factor_bits is not None and args.size_mb is not None:
        return "--size-mb works with plain factors only (not --factor-bits)"
    return None


def build_parser():
    p = _Parser(prog="deltasvd", description="Compress fine-tuned diffusion models (SD, SDXL, "
                "Flux, Qwen-Image, Wan, ...) against their base into LoRA-compatible delta files "
                "(Delta-SVD).")
    p.add_argument("--version", action="version", version=f"deltasvd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="base + tuned checkpoint -> delta file")
    c.add_argument("base")
    c.add_argument("tuned")
    c.add_argument("-o", "--output", required=True)
    _add_rule_args(c, required=False)
    c.add_argument("--codec", default="svd", choices=["svd", "dct"],
                   help="svd (default: LoRA-format factors) or dct (Delta-DCT, needs --bits)")
    c.add_argument("--bits", type=finite, metavar="B",
                   help="dct: bits per parameter, side data included (e.g. 0.5 .. 4)")
    c.add_argument("--factor-bits", type=int, metavar="F",
                   help="svd: quantize the factors, F bits (1..8) for the leading singular "
                        "vectors, fewer for the tail (not LoRA-loadable; see convert)")
    c.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="storage dtype of the factors (default fp16)")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    c.add_argument("--allow-pickle", action="store_true",
                   help="read .ckpt/.pt files (tensors only, weights_only=True)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")

    i = sub.add_parser("inspect", help="show a delta file's metadata and rank table")
    i.add_argument("delta")
    i.add_argument("--no-verify", action="store_true", help=NO_VERIFY)

    a = sub.add_parser("apply", help="base + delta -> full checkpoint")
    a.add_argument("base")
    a.add_argument("delta")
    a.add_argument("-o", "--output", required=True)
    a.add_argument("--strength", type=finite, default=1.0)
    a.add_argument("--force", action="store_true",
                   help="apply even if the base is not the one the delta was made against")
    a.add_argument("--allow-pickle", action="store_true")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--no-verify", action="store_true", help=NO_VERIFY)

    r = sub.add_parser("resize", help="cut a delta file to a smaller threshold or size")
    r.add_argument("delta")
    r.add_argument("-o", "--output", required=True)
    _add_rule_args(r)
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--no-verify", action="store_true", help=NO_VERIFY)

    v = sub.add_parser("convert", help="a qsvd / dct delta -> a LoRA-format delta file "
                       "(decode, then factor again)")
    v.add_argument("delta")
    v.add_argument("-o", "--output", required=True)
    _add_rule_args(v)
    v.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    v.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    v.add_argument("--overwrite", action="store_true")
    v.add_argument("--no-verify", action="store_true", help=NO_VERIFY)

    d = sub.add_parser("demo", help="the whole job on a built-in small pair")
    d.add_argument("--dir", default=None, help="where to put the files (default: a new temp dir)")
    d.add_argument("--energy", type=finite, default=0.5)
    u = sub.add_parser("ui", help="the threshold explorer page in a browser (needs gradio)")
    u.add_argument("--port", type=int, default=7861)
    u.add_argument("--listen", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--models", default=".", help="folder whose checkpoints the page lists")
    u.add_argument("--loras", default=None,
                   help="where Save writes and Inspect looks (default <models>/loras)")
    u.add_argument("--threshold", type=finite, default=0.5, help="the slider's first value")
    return p


def _progress_bar():
    """A tqdm bar per stage; returns (callback, close)."""
    from tqdm import tqdm
    bars = {}

    def update(stage, done, total, key):
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="tensor", leave=False,
                                     file=sys.stderr, disable=None)
        bar.n = done
        bar.set_postfix_str(key[-40:], refresh=False)
        bar.refresh()

    def close():
        for bar in bars.values():
            bar.close()

    return update, close


def _device(name):
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeltaError("--device cuda asked for, but no CUDA device is available")
    return name


def cmd_compress(args):
    from .api import compress_files
    from .compress import Codec
    rule, codec = _rule(args), Codec(args.codec, args.bits, args.factor_bits)
    progress, close = _progress_bar()
    try:
        _, summary = compress_files(args.base, args.tuned, args.output, rule, args.dtype,
                                    _device(args.device), args.overwrite, args.allow_pickle,
                                    progress, codec)
    finally:
        close()
    print(summary)
    print(f"\nwrote {args.output}")


def cmd_inspect(args):
    from .delta_file import read_delta
    from .summary import inspect_text
    delta = read_delta(args.delta, verify=not args.no_verify)
    print(inspect_text(delta, os.path.getsize(args.delta)))


def _warn(text):
    print(f"deltasvd: warning: {text}", file=sys.stderr)


def cmd_apply(args):
    from .apply import apply_file
    progress, close = _progress_bar()
    try:
        n = apply_file(args.base, args.delta, args.output, args.strength, args.force,
                       args.overwrite, args.allow_pickle, progress, warn=_warn,
                       verify=not args.no_verify)
    finally:
        close()
    print(f"patched {n} tensors at strength {args.strength}; wrote {args.output}")


def cmd_resize(args):
    from .api import resize_file
    from .summary import inspect_text
    delta, size = resize_file(args.delta, args.output, _rule(args), args.overwrite,
                              verify=not args.no_verify)
    print(inspect_text(delta, size))
    print(f"\nwrote {args.output}")


def cmd_convert(args):
    from .api import convert_file
    from .summary import inspect_text
    progress, close = _progress_bar()
    try:
        delta, size = convert_file(args.delta, args.output, _rule(args), args.dtype,
                                   _device(args.device), args.overwrite, progress,
                                   verify=not args.no_verify)
    finally:
        close()
    print(inspect_text(delta, size))
    print(f"\nwrote {args.output}")


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args.dir, args.energy)


def cmd_ui(args):
    try:
        from . import ui
    except ImportError as e:
        raise DeltaError(f"the page needs gradio ({e}): pip install 'gradio>=3.41'") from None
    from .ui_actions import standalone
    if not os.path.isdir(args.models):
        raise DeltaError("models folder does not exist", args.models)
    loras = args.loras or os.path.join(args.models, "loras")
    os.makedirs(loras, exist_ok=True)
    print(f"deltasvd ui: http://{args.listen}:{args.port}  (models {args.models}, "
          f"deltas into {loras})", flush=True)
    ui.launch(standalone(args.models, loras, args.threshold), args.port, args.listen)


COMMANDS = {"compress": cmd_compress, "inspect": cmd_inspect, "apply": cmd_apply,
            "resize": cmd_resize, "convert": cmd_convert, "demo": cmd_demo, "ui": cmd_ui}


def _large_pages():
    """torch's CPU allocator puts buffers of 2 MB and more on transparent huge pages when this
    is set before its first allocation: reading two 4 GB checkpoints allocates some 10 GB in
    passing, and 4 KB page faults on it cost 2-3 s of system time for SD1.5. Only for our own
    process (a host's torch is already running, and is its own business)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv=None):
    _large_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = codec_problem(args) if args.command == "compress" else None
    if problem:
        parser.error(problem)                  # exit 2, like argparse's own checks
    previous = _terminate_as_interrupt()
    try:
        COMMANDS[args.command](args)
    except UsageError as e:
        print(f"deltasvd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DeltaError as e:
        print(f"deltasvd: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("deltasvd: interrupted; no output written", file=sys.stderr)
        return EXIT_FAIL
    finally:
        _restore(previous)
    return EXIT_OK


def _terminate_as_interrupt():
    """SIGTERM (timeout, systemd, docker stop) unwinds like Ctrl-C, so the half-written output
    is removed. Only from the main thread (signal handlers can be set nowhere else)."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt
    try:
        return signal.signal(signal.SIGTERM, interrupted)
    except ValueError:      # not the main thread (main() called from a worker)
        return None


def _restore(previous):
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
