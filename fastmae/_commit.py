"""The git commit of a fastmae checkout. It imports nothing but the standard library (no torch,
no fastmae): setup.py also runs it, at build time, to record the commit in the built package."""
import os
import subprocess


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
