"""The backend switch and the interpreter harness."""
import os
import subprocess
import sys

import pytest
import torch

import fastmae
import fastmae.backend
from fastmae.backend import backend_for, requested_backend
from fastmae.testing import poison_


def test_default_backend_follows_the_device(monkeypatch):
    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    assert requested_backend() is None
    assert backend_for(torch.zeros(1)) == "torch"
    assert backend_for(torch.zeros(1, device="meta")) == "torch"


def test_use_backend_nests_and_restores(monkeypatch, device):
    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    x = torch.zeros(1, device=device)  # "triton" on CPU tensors needs the interpreter: not on GPUs
    with fastmae.use_backend("triton"):
        assert backend_for(x) == "triton"
        with fastmae.use_backend("torch"):
            assert backend_for(x) == "torch"
        assert backend_for(x) == "triton"
    assert backend_for(x) == ("triton" if x.is_cuda else "torch")  # the device's default


def test_environment_variable_sets_the_default(monkeypatch, device):
    x = torch.zeros(1, device=device)
    monkeypatch.setenv("FASTMAE_BACKEND", "triton")
    assert backend_for(x) == "triton"
    with fastmae.use_backend("torch"):
        assert backend_for(x) == "torch"
    monkeypatch.setenv("FASTMAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTMAE_BACKEND"):
        backend_for(x)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend"):
        with fastmae.use_backend("jax"):
            pass


@pytest.mark.parametrize("off", ["0", "false", "off", "No"])
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch, off):
    """Off in any of Triton's words: the error says to switch the interpreter on, not that it
    was switched on too late."""
    monkeypatch.setenv("TRITON_INTERPRET", off)
    with fastmae.use_backend("triton"):
        with pytest.raises(RuntimeError, match="runs through Triton's interpreter") as caught:
            backend_for(torch.zeros(1))
    assert "after triton was imported" not in str(caught.value)


@pytest.mark.parametrize("value", ["1", "0", "", "true", "True", "false", "FALSE", "on", "off",
                                   "yes", "no", "y", "Y", "2", "t", " 1", "1 ", "enabled"])
def test_interpret_requested_reads_the_variable_as_triton_does(monkeypatch, value):
    """fastmae's reading of TRITON_INTERPRET (without importing triton, which would fix the
    mode) is Triton's own (knobs.runtime.interpret): "false" and "off" are off."""
    from triton import knobs
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert fastmae.backend.interpret_requested() is bool(knobs.runtime.interpret), value


def test_interpreter_switched_on_after_triton_was_imported_is_a_clear_error():
    """TRITON_INTERPRET=1 set after `import triton` leaves Triton's own @jit functions made for
    the compiler, and an interpreted kernel fails calling them with an obscure error: fastmae
    says what happened instead."""
    code = ("import os, triton; os.environ['TRITON_INTERPRET'] = '1'; import torch, fastmae; "
            "x = torch.randn(3, 8)\n"
            "with fastmae.use_backend('triton'):\n"
            "    fastmae.ops.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-6)")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "RuntimeError: TRITON_INTERPRET=1 was set after triton was imported" in proc.stderr


def test_import_touches_no_gpu():
    """Importing fastmae (and constructing a model) must not initialize CUDA."""
    code = ("import torch, fastmae; m = fastmae.mae_vit_tiny_patch4(); "
            "import sys; sys.exit(1 if torch.cuda.is_initialized() else 0)")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("numel", [1, 7, 1024, 3001])
def test_a_triton_kernel_runs_through_the_harness(numel, device):
    """kernels/scale.py through the interpreter on a CPU machine (the compiler on a GPU)."""
    from fastmae.kernels.scale import scale
    import fastmae.kernels.scale as mod
    if not torch.cuda.is_available():
        # the harness really interprets: kernels are InterpretedFunction objects
        assert type(mod._scale_kernel).__name__ == "InterpretedFunction"
    x = torch.randn(numel, device=device)
    alpha = torch.tensor([1.7], device=device)
    y = scale(x, alpha)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, x * 1.7, rtol=1e-6, atol=0)


def test_poison_fills_with_unwritten_markers():
    t = poison_(torch.empty(3))
    assert torch.isnan(t).all()
    i = poison_(torch.empty(3, dtype=torch.int64))
    assert (i == torch.iinfo(torch.int64).max).all()


def test_use_backend_is_undone_when_its_block_raises(monkeypatch, device):
    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    x = torch.zeros(1, device=device)
    with fastmae.use_backend("triton"):
        with pytest.raises(KeyError):
            with fastmae.use_backend("torch"):
                raise KeyError("an op failed")
        assert backend_for(x) == "triton"
    assert requested_backend() is None
    assert backend_for(x) == ("triton" if x.is_cuda else "torch")


def test_use_backend_holds_in_its_own_thread_only(monkeypatch):
    """A block in one thread (a data-loading or serving thread) leaves the others' ops alone."""
    import threading
    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    inside, leave, seen = threading.Event(), threading.Event(), []

    def worker():
        with fastmae.use_backend("torch"):
            seen.append(requested_backend())
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert inside.wait(10)
        assert requested_backend() is None
        with fastmae.use_backend("triton"):
            assert requested_backend() == "triton"
    finally:
        leave.set()
        t.join(10)
    assert seen == ["torch"]


@pytest.mark.parametrize("value", [" torch", "Torch", "TORCH\n"])
def test_environment_variable_ignores_case_and_spaces(monkeypatch, value):
    monkeypatch.setenv("FASTMAE_BACKEND", value)
    assert requested_backend() == "torch"
    assert backend_for(torch.zeros(1)) == "torch"
