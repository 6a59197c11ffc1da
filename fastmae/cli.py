"""The ``fastmae`` command: ``fastmae COMMAND [ARGS]``; each command lives in its own module and
is imported only when it runs."""
import argparse
import importlib
import os
import sys
from pathlib import Path

COMMANDS = {
    "bench": ("fastmae.bench", "time a training step of fastmae against the eager reference"),
    "check": ("fastmae.check", "check every op against the reference on this device"),
    "reconstruct": ("fastmae.reconstruct", "write the MAE reconstruction view of images as a PNG"),
    "pretrain": ("fastmae.pretrain", "pretrain an MAE with the official recipe"),
}


def int_at_least(minimum, name=None):
    """An argparse type: an integer >= ``minimum``, else a message saying what was expected
    (prefixed with ``name`` when given)."""
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    prefix = f"{name} " if name else ""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{prefix}must be {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{prefix}must be {expected}, got {value}")
        return value
    return parse


def output_file_error(flag, path):
    """Why ``path`` cannot be written as the file ``flag`` names (a directory, or below a file),
    as a message naming ``flag``; None when it can (missing parent folders are made when written).
    Meant to run before any work, so that a bad path does not waste a run."""
    text = os.fspath(path)
    p = Path(text)
    if p.is_dir():
        return f"{flag} {text}: is a directory; give a file path"
    if text.endswith(("/", os.sep)):
        return f"{flag} {text}: names a folder (ends with {os.sep}); give a file path"
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{flag} {text}: {parent} is not a directory"
            break
    return None


def _version():
    from fastmae import __version__
    return __version__


def _usage():
    lines = ["usage: fastmae COMMAND [ARGS]   (fastmae COMMAND --help for its options)",
             "       fastmae --version", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"fastmae {_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastmae: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
