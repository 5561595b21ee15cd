"""The ``leanvit`` command line: ``leanvit [--plugin MODULE] train | eval | bench | viz | flops | demo | export |
sweep``.

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``. User mistakes (:class:`leanvit.errors.LeanvitError`, missing files) are printed
as one line on stderr with exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from leanvit.errors import DISK_ERRNOS, LeanvitError

# command -> (module, one-line help)
COMMANDS = {
    "train": ("leanvit.tools.train", "train or fine-tune a model with a recipe"),
    "eval": ("leanvit.tools.eval", "evaluate top-1/top-5, loss and throughput"),
    "bench": ("leanvit.tools.bench", "throughput, latency, peak memory and GMACs table"),
    "viz": ("leanvit.tools.viz", "draw which tokens EViT kept"),
    "flops": ("leanvit.tools.flops", "GMACs of a model in the papers' convention"),
    "demo": ("leanvit.tools.demo", "the main job on the embedded digits data"),
    "export": ("leanvit.tools.export", "export to ONNX or torch.export (.pt2) and verify against PyTorch"),
    "sweep": ("leanvit.tools.sweep", "accuracy vs throughput/latency over a grid of reductions; Pareto front"),
}


def build_parser(command=None) -> argparse.ArgumentParser:
    """All commands are listed; only ``command``'s module is imported (keeps every call fast)."""
    parser = argparse.ArgumentParser(prog="leanvit", description="Lean vision transformers.",
                                     epilog="--plugin MODULE (before the command, repeatable): import MODULE "
                                            "first, e.g. one that registers a task (leanvit.tasks.register_task)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class _StdoutHandler(logging.Handler):
    """Writes to whatever ``sys.stdout`` is at the time (so captured or redirected output gets it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def setup_logging() -> None:
    """Library modules log through ``logging``; the command line prints their messages as plain lines on
    stdout (what the library used to print), from the main process only."""
    root = logging.getLogger("leanvit")
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if _is_main_process() else logging.WARNING)
    root.propagate = False


def error_line(e: BaseException) -> str:
    """The one line the command line prints for a user error. An error raised in a DataLoader worker comes
    back wrapped with the worker's traceback ("Caught LeanvitError in DataLoader worker process 0 ..."):
    its own message is the traceback's last line."""
    msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
    if "Original Traceback" in msg:
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        name = f"{type(e).__module__}.{type(e).__name__}: "
        msg = lines[-1][len(name):] if lines[-1].startswith(name) else lines[-1]
    return msg


def flag_names(message: str, args) -> str:
    """``message`` with each setting the library names in backticks (```num_classes```) shown as this
    command's flag (``--num-classes``) where the command has one (``train`` takes every recipe key as a flag),
    else as the plain name."""
    def flag(m: re.Match) -> str:
        name = m.group(1)
        has = hasattr(args, name) or getattr(args, "_accepts_extra", False)
        return "--" + name.replace("_", "-") if has else name

    return re.sub(r"`([a-z][a-z0-9_]*)`", flag, message)


def plugin_options(argv):
    """``--plugin MODULE`` options before the command: (modules, the other arguments)."""
    modules, i = [], 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        if a.startswith("--plugin="):
            modules.append(a.split("=", 1)[1])
        elif a == "--plugin" and i + 1 < len(argv):
            modules.append(argv[i + 1])
            i += 1
        else:
            break
        i += 1
    return modules, argv[i:]


def load_plugins(modules) -> None:
    """Import ``modules`` (each may register tasks, reduction methods or dataset kinds)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise LeanvitError(f"--plugin {name}: cannot import it ({e})") from None


def main(argv=None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    plugins, argv = plugin_options(argv)
    try:
        load_plugins(plugins)
    except LeanvitError as e:
        print(f"leanvit: error: {e}", file=sys.stderr)
        return 2
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        import torch

        from leanvit.checkpoints import reading_once  # a command reads each checkpoint file once

        threads = torch.get_num_threads()  # --threads is the command's: main() called in-process gives it back
        try:
            with reading_once():
                if getattr(args, "_accepts_extra", False):  # `train` takes any recipe key as --key value
                    return int(args._run(args, extra) or 0)
                return int(args._run(args) or 0)
        finally:
            torch.set_num_threads(threads)
    except (LeanvitError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        msg = flag_names(error_line(e), args)
        code = int(getattr(e, "exit_code", 2))  # 75: stopped by a signal after a recovery checkpoint
        if _is_main_process():
            print(f"leanvit {args.command}: {'error: ' if code == 2 else ''}{msg}", file=sys.stderr)
        return code
    except OSError as e:  # a full, read-only or unwritable disk: one line naming the file or folder
        if e.errno not in DISK_ERRNOS:
            raise
        where = e.filename or getattr(args, "output", None) or "the output"
        if _is_main_process():
            print(f"leanvit {args.command}: error: cannot write {where}: {e.strerror or os.strerror(e.errno)}",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
