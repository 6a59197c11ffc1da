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


# the values Triton reads TRITON_INTERPRET as on (its knobs.runtime.interpret, any case, unstripped)
_TRUE_VALUES = ("1", "true", "on", "yes", "y")


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter, read as Triton reads it ("false"
    or "off" is off), without importing triton: importing it fixes the mode."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE_VALUES


def interpreter_on() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter; a RuntimeError where it was set
    after triton was imported (half the kernels' machinery would then be the compiler's)."""
    on = interpret_requested()
    if on and not _triton_imported_for_the_interpreter():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported: Triton's own @triton.jit "
            "functions (tl.sum's, tl.sigmoid's, ...) were then made for the compiler, and a "
            "kernel run through the interpreter fails calling them (\"Cannot call @triton.jit'd "
            "outside of the scope of a kernel\"). Set TRITON_INTERPRET=1 before anything "
            "imports triton (in the environment, or first thing in the script)")
    return on


_STDLIB_INTERPRETED = []  # its one answer, once found (a plain global: torch.compile traces it)


def _triton_imported_for_the_interpreter():
    """Whether triton's standard library was decorated for the interpreter (Triton decides at
    its import, by TRITON_INTERPRET then). Found once: it cannot change afterwards."""
    if not _STDLIB_INTERPRETED:
        import triton.language.standard as standard
        kinds = [type(v).__name__ for v in vars(standard).values()]
        jitted = [k for k in kinds if k in ("InterpretedFunction", "JITFunction")]
        # no @jit function found: nothing to tell by
        _STDLIB_INTERPRETED.append(not jitted or jitted[0] == "InterpretedFunction")
    return _STDLIB_INTERPRETED[0]


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
