"""Which fastmae and Triton a result came from: the commit and the version that `fastmae bench`
and `fastmae check` report. Its imports are the standard library's only (no torch, no fastmae):
setup.py also runs it, at build time, to record the commit in the built package."""
import os
import re
import subprocess
from pathlib import Path


def source_commit(root):
    """Short commit of the git checkout whose top folder is ``root``, "+dirty" when tracked files
    differ from it; None where ``root`` is not the top of a checkout (an installed copy, or an
    unpacked sdist inside some other repository) or git is missing."""
    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or os.path.realpath(top) != os.path.realpath(root):
        return None
    sha = git("rev-parse", "--short=12", "HEAD")
    if not sha:
        return None
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def git_commit():
    """The commit this fastmae came from: FASTMAE_COMMIT, when set, as is (for a copy of a working
    tree whose .git is not the one it was copied from: a remote GPU machine); else the short
    commit of the checkout fastmae runs from, "+dirty" when tracked files differ from it; else
    the one setup.py recorded when this installed copy was built (``pip install .``); else
    "unknown". A FASTMAE_COMMIT that is not a commit (7-40 hex digits, "+dirty" allowed: not,
    say, the "ref: refs/heads/main" of a .git/HEAD) raises ValueError: a result would carry it."""
    override = os.environ.get("FASTMAE_COMMIT")
    if override:
        if not re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?", override):
            raise ValueError(f"FASTMAE_COMMIT must be a commit (7 to 40 hex digits, optionally "
                             f"+dirty), got {override!r}")
        return override
    commit = source_commit(Path(__file__).resolve().parent.parent)
    if commit is None:
        try:
            from fastmae._build_info import COMMIT as commit
        except ImportError:
            commit = None
    return commit or "unknown"


def triton_version():
    """Triton's version, or "not installed" where it does not import."""
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return "not installed"
