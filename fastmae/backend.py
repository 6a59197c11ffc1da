"""Which implementation runs an op: "triton" (fastmae's kernels) or "torch" (the eager reference).

Order of precedence: the innermost ``use_backend(...)`` block, then the ``FASTMAE_BACKEND``
environment variable, then the default: "triton" for CUDA tensors, "torch" for CPU tensors.
"triton" on CPU tensors runs the kernels through Triton's interpreter, which must be switched
on with ``TRITON_INTERPRET=1`` before fastmae's kernels are first imported.
"""
import contextlib
import os
import threading

import torch

BACKENDS = ("triton", "torch")
_state = threading.local()


def _check(name, what):
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside this block with backend ``name`` ("triton" or "torch")."""
    _check(name, "backend")
    stack = _state.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested_backend():
    """The backend set by ``use_backend`` or ``FASTMAE_BACKEND``, or None for the default."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("FASTMAE_BACKEND", "").strip().lower()
    if env:
        return _check(env, "FASTMAE_BACKEND")
    return None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(tensor: torch.Tensor) -> str:
    """The backend that runs an op whose main input is ``tensor``."""
    name = requested_backend()
    if name is None:
        return "triton" if tensor.is_cuda else "torch"
    if name == "triton" and not tensor.is_cuda and not interpreter_on():
        raise RuntimeError(
            "the 'triton' backend on CPU tensors runs through Triton's interpreter: set "
            "TRITON_INTERPRET=1 before fastmae's kernels are first imported, or use "
            "use_backend('torch') / FASTMAE_BACKEND=torch"
        )
    return name
