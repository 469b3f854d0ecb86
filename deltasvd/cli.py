"""`deltasvd` command line: the commands and their exit codes (0 ok, 1 failure, 2 usage error).
The options are in cli_parser.py."""

import os
import signal
import sys

from .errors import DeltaError, UsageError

# cli_parser.py's codes, repeated here: this module must import without numpy or torch, so that
# a missing package is one line, not a traceback.
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# Packages a command may miss, and what to install: one line, never a traceback.
PACKAGES = {"torch": "torch (see README, Quick start: the CPU or CUDA build)",
            "numpy": "numpy", "safetensors": "safetensors", "tqdm": "tqdm",
            "gradio": "'gradio>=3.41'"}


def _rule(args):
    from .cli_parser import rule_of
    return rule_of(args)


def _progress_bar():
    """A tqdm bar per stage; returns (callback, close). Without tqdm: one line, no bars."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("deltasvd: no progress bars (pip install tqdm for them)", file=sys.stderr)
        return None, lambda: None
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
    """torch's CPU allocator puts buffers of 2 MiB and more on transparent huge pages when this
    is set before its first allocation: reading two 4 GB checkpoints allocates some 10 GB in
    passing, and 4 KiB page faults on it cost 2-3 s of system time for SD1.5. Only for our own
    process (a host's torch is already running, and is its own business)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv=None):
    try:
        return _main(argv)
    except ModuleNotFoundError as e:
        name = (e.name or "").split(".")[0]
        if name not in PACKAGES:
            raise
        print(f"deltasvd: this needs the package {name}: pip install {PACKAGES[name]}",
              file=sys.stderr)
        return EXIT_FAIL


def _main(argv):
    from .cli_parser import build_parser, usage_problem
    _large_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = usage_problem(args)
    if problem:
        parser.subcommands[args.command].error(problem)   # exit 2, with its usage
    previous = _terminate_as_interrupt()
    try:
        COMMANDS[args.command](args)
        sys.stdout.flush()
    except UsageError as e:
        print(f"deltasvd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DeltaError as e:
        print(f"deltasvd: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("deltasvd: interrupted; no output written", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:
        # `deltasvd inspect x | head`: the reader left; that is no error of ours. Point
        # stdout at nothing so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
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
