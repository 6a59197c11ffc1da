"""Turns Triton's interpreter on when no GPU is present, before any kernel module is imported.

``triton.jit`` decides at decoration time whether a kernel is interpreted, so the variable must
be set before ``fastmae.kernels.*`` is imported; fastmae imports its kernels lazily, and this
file is loaded before any test module.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernels run on this device in the tests: the GPU when there is one, else the CPU + interpreter.
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")
    config.addinivalue_line(
        "markers", "interpreter(covered_by): runs fastmae's kernels on CPU tensors through "
        "Triton's interpreter, which is off where a GPU is present: skipped there unless also "
        "marked cuda (covered_by names the GPU tests that check the same)")


# The sm_90 compile checks take about half the suite's CPU time, minutes a test (attention's the
# longest). Collected in file order they start late, and with pytest-xdist one worker ends the
# run alone with one of them; first in line, the workers share the rest of the suite around them.
FIRST_FILES = ("test_gpu_compile.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in FIRST_FILES)  # a stable sort
    if HAS_CUDA:
        for item in items:
            mark = item.get_closest_marker("interpreter")
            if mark is not None and "cuda" not in item.keywords:
                item.add_marker(pytest.mark.skip(
                    reason="CPU tensors through Triton's interpreter, which is off on a machine "
                           f"with a GPU; there: {mark.kwargs.get('covered_by', 'the cuda tests')}"))
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch made through fastmae.kernels._common, recorded as (kernel name,
    {meta-parameter: value}: its upper-case constexprs and num_warps)."""
    from fastmae.kernels import _common

    seen, real_work = [], _common.launch_work

    def launch_work(fn, args, kwargs):
        seen.append((_common.kernel_function(fn).__name__,
                     {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}))
        return real_work(fn, args, kwargs)

    monkeypatch.setattr(_common, "launch_work", launch_work)
    monkeypatch.setattr(_common, "OBSERVER", lambda *work: None)  # launch_work runs for it
    return seen


@pytest.fixture
def interpreter_bf16(monkeypatch):
    """bf16 through fastmae's kernels under Triton's interpreter: its bf16 dots and casts to
    bf16 mended, its other bf16 arithmetic an error (tests/_interpreter_bf16.py), and the ops
    no longer sending bf16 matmul operands to the reference there (ops._interpreted_bf16_dot).
    Nothing where the kernels are compiled (a GPU), nor for other dtypes."""
    from fastmae import ops
    from fastmae.kernels._common import interpreting

    if not interpreting():
        yield
        return
    from _interpreter_bf16 import bf16_mended

    monkeypatch.setattr(ops, "_interpreted_bf16_dot", lambda *tensors, compute_dtype=None: False)
    with bf16_mended():
        yield
