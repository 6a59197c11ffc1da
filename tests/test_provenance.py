"""The commit `fastmae bench` and `fastmae check` name in their results: live from a checkout,
recorded at build time for an installed copy (README's `pip install . && fastmae bench`),
FASTMAE_COMMIT over both."""
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fastmae import _provenance
from fastmae._provenance import git_commit, source_commit

REPO = Path(__file__).resolve().parent.parent
GIT_ID = ["-c", "user.email=test@fastmae", "-c", "user.name=fastmae test"]


def _git(repo, *args):
    return subprocess.run(["git", *GIT_ID, "-C", str(repo), *args], check=True,
                          capture_output=True, text=True).stdout.strip()


def _commit_all(repo):
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "test")
    return _git(repo, "rev-parse", "--short=12", "HEAD")


def _repo_with_a_file(path):
    path.mkdir()
    _git(path, "init", "-q")
    (path / "a.txt").write_text("one\n")
    return _commit_all(path)


def _source_copy(dest, with_git):
    """What a build of fastmae reads (setup.py, README.md, fastmae/, kernels/), copied to dest,
    as a fresh one-commit repository when with_git; returns that commit or None."""
    dest.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("fastmae", "kernels"):
        shutil.copytree(REPO / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "_build_info.py"))
    if not with_git:
        return None
    _git(dest, "init", "-q")
    return _commit_all(dest)


def _installed_commit(src, tmp_path):
    """Install src (pip, as README's `pip install .`, dependencies left out) into a folder of
    its own and ask that copy's git_commit() from outside any checkout."""
    target = tmp_path / f"site-{src.name}"
    env = {k: v for k, v in os.environ.items() if k != "FASTMAE_COMMIT"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(src)], check=True, capture_output=True, text=True, env=env)
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", "import fastmae, fastmae.bench as b; "
                          "print(fastmae.__file__); print(b.env_info()['commit'])"],
                         check=True, capture_output=True, text=True, env=env, cwd=tmp_path)
    module_file, commit = out.stdout.split()
    assert Path(module_file).is_relative_to(target), module_file  # the installed copy ran
    return commit


@pytest.mark.parametrize("with_git", [True, False], ids=["from-a-checkout", "from-plain-files"])
def test_installed_copy_names_the_commit_it_was_built_from(with_git, tmp_path):
    sha = _source_copy(tmp_path / "src", with_git)
    assert _installed_commit(tmp_path / "src", tmp_path) == (sha if with_git else "unknown")


def test_source_commit_is_the_checkouts_short_commit_and_marks_changes(tmp_path):
    repo = tmp_path / "repo"
    sha = _repo_with_a_file(repo)
    assert len(sha) == 12 and source_commit(repo) == sha
    (repo / "new.txt").write_text("untracked files do not count\n")
    assert source_commit(repo) == sha
    (repo / "a.txt").write_text("two\n")
    assert source_commit(repo) == sha + "+dirty"


def test_source_commit_is_none_below_a_checkouts_top_and_outside_one(tmp_path):
    repo = tmp_path / "repo"
    _repo_with_a_file(repo)
    (repo / "site-packages").mkdir()  # e.g. a virtual environment inside some repository
    assert source_commit(repo / "site-packages") is None
    (tmp_path / "plain").mkdir()
    assert source_commit(tmp_path / "plain") is None


def test_git_commit_takes_the_environment_then_the_checkout_then_the_build_record(monkeypatch):
    monkeypatch.setenv("FASTMAE_COMMIT", "0123456789ab")
    monkeypatch.setattr(_provenance, "source_commit", lambda root: "checkout0000")
    assert git_commit() == "0123456789ab"
    monkeypatch.delenv("FASTMAE_COMMIT")
    assert git_commit() == "checkout0000"
    monkeypatch.setattr(_provenance, "source_commit", lambda root: None)
    monkeypatch.setitem(sys.modules, "fastmae._build_info",
                        types.SimpleNamespace(COMMIT="recorded0000"))
    assert git_commit() == "recorded0000"
    monkeypatch.setitem(sys.modules, "fastmae._build_info", types.SimpleNamespace(COMMIT=None))
    assert git_commit() == "unknown"
    monkeypatch.setitem(sys.modules, "fastmae._build_info", None)  # no record: ImportError
    assert git_commit() == "unknown"


@pytest.mark.parametrize("value", ["ref: refs/heads/main", "main", "c79d6d3 ", "C79D6D3", "abc12"])
def test_git_commit_refuses_an_environment_value_that_is_not_a_commit(monkeypatch, value):
    """What a GPU run's `FASTMAE_COMMIT=$(cat .git/HEAD)` once recorded as its commit."""
    monkeypatch.setenv("FASTMAE_COMMIT", value)
    with pytest.raises(ValueError, match="FASTMAE_COMMIT"):
        git_commit()
    monkeypatch.setenv("FASTMAE_COMMIT", "c79d6d3c0beeb677d3898812206417905895ba1d+dirty")
    assert git_commit().startswith("c79d6d3c")


def test_git_commit_run_from_a_checkout_names_that_checkout(monkeypatch):
    """Without FASTMAE_COMMIT, a fastmae imported from this checkout names this checkout's
    commit: the folder above the fastmae package is the checkout's top."""
    if Path(_provenance.__file__).resolve().parent.parent != REPO:
        pytest.skip("fastmae is not imported from this checkout (an installed copy)")
    expected = source_commit(REPO)
    if expected is None:
        pytest.skip("this working tree is not a git checkout (a copy without .git)")
    monkeypatch.delenv("FASTMAE_COMMIT", raising=False)
    assert git_commit() == expected
