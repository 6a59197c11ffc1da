"""bf16 under Triton's interpreter, for the tests.

The interpreter keeps a bf16 tensor as its uint16 bits, and bf16 is "not supported yet" there
(triton-lang/triton#11584). Two of its defects touch what fastmae's kernels do with bf16:
- ``tl.dot`` multiplies the operands' bits as integers (values around 1e10);
- a cast of fp32 values to bf16 (``.to(tl.bfloat16)``, or a store through a bf16 pointer)
  truncates the mantissa, where a GPU rounds to nearest even: a bias toward zero.
So the ops run the reference for bf16 matmul operands on CPU tensors
(``ops._interpreted_bf16_dot``), and without a mend the benchmark's dtype reaches fastmae's
kernels on GPUs only. ``bf16_mended()`` mends both: a dot with a bf16 operand takes the
operand's values, widened to fp32 exactly, and accumulates in fp32 as a GPU's bf16 MMA does;
fp32 -> bf16 rounds to nearest even. Every other operation that computes on bf16 values there
(arithmetic, comparisons, reductions, scans, fma, erf, rsqrt) would compute on the bits too, so
under ``bf16_mended()`` it raises instead: a kernel that does one fails its test rather than pass
on garbage; so does a cast to bf16 from anything but fp32 (the interpreter would take an int's
bits). Loads, stores, selects, reshapes and the widening casts move or convert the bits right
already.
"""
import contextlib

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

_BUILDER = interpreter.InterpreterBuilder


def _is_bf16(handle):
    return isinstance(handle, interpreter.TensorHandle) and handle.dtype.scalar == tl.bfloat16


def _as_fp32(handle):
    """A bf16 handle's values as an fp32 array (exact: bf16 is fp32's upper half)."""
    return (handle.data.astype(np.uint32) << 16).view(np.float32)


def _dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if _is_bf16(a) or _is_bf16(b):
        a_data = _as_fp32(a) if _is_bf16(a) else a.data.astype(np.float32)
        b_data = _as_fp32(b) if _is_bf16(b) else b.data.astype(np.float32)
        out = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)
    return _REAL[_BUILDER, "create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)


def _cast(self, src, dst_type):
    if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
        if src.dtype.scalar != tl.float32:  # fp16 reaches here widened to fp32 first
            raise Bf16ArithmeticError(f"a cast of {src.dtype.scalar} to bf16 under the "
                                      "interpreter, which would take its bits: cast to fp32 first")
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # to nearest even
        nan = np.isnan(src.data)
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # a quiet NaN stays NaN
        return interpreter.TensorHandle(rounded, tl.bfloat16)
    return _REAL[_BUILDER, "cast_impl"](self, src, dst_type)


class Bf16ArithmeticError(AssertionError):
    """A kernel computed on bf16 values other than through tl.dot under the interpreter."""


def _refusing(owner, name):
    real = getattr(owner, name)

    def refuse_bf16(*args, **kwargs):
        if name == "ternary_op" and args[-1] is np.where:  # a select moves bits: right as it is
            return real(*args, **kwargs)
        for arg in args[1:]:
            inputs = arg if isinstance(arg, (tuple, list)) else (arg,)
            for t in inputs:
                handle = getattr(t, "handle", t)  # reductions get tl tensors, the builder handles
                if _is_bf16(handle):
                    raise Bf16ArithmeticError(
                        f"{owner.__name__}.{name} on bf16 values under the interpreter, which "
                        "would compute on their bits: widen them to fp32 first (tests/"
                        "_interpreter_bf16.py)")
        return real(*args, **kwargs)

    return refuse_bf16


# what computes on values: the builder's elementwise ops (clamps through ternary_op, erf and
# rsqrt on their own) and the reductions' and scans' entry
_REFUSED = ((_BUILDER, "binary_op"), (_BUILDER, "unary_op"), (_BUILDER, "create_fma"),
            (_BUILDER, "ternary_op"), (_BUILDER, "create_erf"), (_BUILDER, "create_rsqrt"),
            (interpreter.ReduceOps, "apply_impl"), (interpreter.ScanOps, "apply_impl"))
_MENDED = ((_BUILDER, "create_dot", _dot), (_BUILDER, "cast_impl", _cast))
_REAL = {(owner, name): getattr(owner, name)
         for owner, name in _REFUSED + tuple(m[:2] for m in _MENDED)}


@contextlib.contextmanager
def bf16_mended():
    """Within: the interpreter's bf16 dots and casts to bf16 are right, and its other bf16
    arithmetic raises."""
    patched = list(_MENDED)
    patched += [(owner, name, _refusing(owner, name)) for owner, name in _REFUSED]
    try:
        for owner, name, fn in patched:
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, _ in patched:
            setattr(owner, name, _REAL[owner, name])
