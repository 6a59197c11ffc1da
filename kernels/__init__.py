"""Triton kernels and their host launchers (installed as ``fastmae.kernels``).

One file per op: ``@triton.jit`` kernels first, then the launcher that allocates outputs and
launches them. No autograd here (that lives in ``fastmae.ops``) and no CUDA query at import.
Under the Triton interpreter (``TRITON_INTERPRET=1`` set before these modules are imported)
the same kernels run on CPU tensors.
"""
import sys as _sys


def _hand_over_top_level_name():
    """Imported as top-level ``kernels``, this folder is only there because the repository root
    is on sys.path (``python -m pytest`` or ``python -c`` run from the checkout), where it shadows
    the PyPI package ``kernels`` (Hugging Face's, which transformers >= 5 imports). Load that
    package in its place; with none installed, stay this (empty) package as before."""
    import importlib.machinery
    import importlib.util
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def elsewhere(entry):
        return os.path.abspath(entry or os.curdir) != here

    spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in _sys.path if elsewhere(p)])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    # in sys.modules before it runs, so that its own `from kernels.x import ...` finds it; the
    # import statement that loaded this file returns whatever sys.modules holds afterwards
    _sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules["kernels"]
        raise


if __name__ == "kernels":
    _hand_over_top_level_name()
