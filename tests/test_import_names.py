"""The top-level folder kernels/ is fastmae.kernels; with the repository root on sys.path (python
-m pytest or python -c from a checkout) it must not shadow the PyPI package ``kernels`` (Hugging
Face's), which transformers >= 5 imports: that shadowing once failed every HF checkpoint test."""
import importlib.machinery
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run_from_root(code, *flags):
    """Runs ``code`` with ``python -c`` in the repository root ('' first on sys.path)."""
    done = subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


def _pypi_kernels_installed():
    outside = [p for p in sys.path if pathlib.Path(p or ".").resolve() != REPO]
    return importlib.machinery.PathFinder.find_spec("kernels", outside) is not None


def test_top_level_kernels_is_the_pypi_package_where_one_is_installed():
    if not _pypi_kernels_installed():
        pytest.skip("no PyPI package 'kernels' installed (transformers >= 5 installs it)")
    top, ours = _run_from_root(
        "import kernels, fastmae.kernels as fk; "
        "print(kernels.__file__); print(fk.__file__)")
    assert pathlib.Path(top).resolve().parent != REPO / "kernels"
    assert pathlib.Path(ours).resolve() == REPO / "kernels" / "__init__.py"


def test_transformers_hub_kernels_imports_from_the_root():
    pytest.importorskip("transformers")
    assert _run_from_root("import transformers.integrations.hub_kernels; print('ok')") == ["ok"]


def test_top_level_kernels_stays_this_folder_with_no_other_installed():
    # -S: no site-packages, so no other 'kernels' anywhere on the path
    (top,) = _run_from_root("import kernels; print(kernels.__file__)", "-S")
    assert pathlib.Path(top).resolve() == REPO / "kernels" / "__init__.py"
