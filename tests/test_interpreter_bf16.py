"""tests/_interpreter_bf16.py, the mend that lets bf16 (the benchmark's dtype) through fastmae's
kernels under Triton's interpreter: its bf16 dot is fp32 math on the bf16 values, its casts to
bf16 round as torch's do, its other bf16 arithmetic is refused, and all of it ends with its
context. The tests that run the kernels and the model in bf16 with it (the ``interpreter_bf16``
fixture) sit beside their GPU twins: the ``*_interpreted`` low-precision tests of each kernel,
the block's and the model's autocast tests."""
import pytest
import torch
import triton
import triton.language as tl

from fastmae.testing import rel_err

pytestmark = pytest.mark.interpreter(
    covered_by="nothing: on a GPU the kernels compute bf16 themselves, with no mend")


# ----------------------------------------------------------------------------- the mend itself

@triton.jit
def _dot_kernel(a_ptr,  # (M, K) bf16 contiguous
                b_ptr,  # (K, N) bf16 contiguous
                c_ptr,  # (M, N) fp32 contiguous: c + a @ b on the way out
                M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    c = tl.load(c_ptr + rm[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, c))


@triton.jit
def _cast_kernel(x_ptr,  # (n,) fp32
                 y_ptr,  # (n,) bf16: x cast explicitly
                 z_ptr,  # (n,) bf16: x cast by the store
                 n: tl.constexpr):
    r = tl.arange(0, n)
    x = tl.load(x_ptr + r)
    tl.store(y_ptr + r, x.to(tl.bfloat16))
    tl.store(z_ptr + r, x)


@triton.jit
def _add_kernel(x_ptr,  # (n,) bf16
                y_ptr,  # (n,) bf16: x + x
                n: tl.constexpr):
    r = tl.arange(0, n)
    x = tl.load(x_ptr + r)
    tl.store(y_ptr + r, x + x)


@triton.jit
def _larger_kernel(x_ptr,  # (n,) bf16
                   y_ptr,  # (n,) bf16: in, then out: the larger of x and y
                   n: tl.constexpr):
    r = tl.arange(0, n)
    x = tl.load(x_ptr + r)
    y = tl.load(y_ptr + r)
    tl.store(y_ptr + r, tl.where(x > y, x, y))


def test_mended_dot_is_fp32_math_on_the_bf16_values(interpreter_bf16):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=g).bfloat16()
    b = torch.randn(32, 16, generator=g).bfloat16()
    c0 = torch.randn(16, 16, generator=g)
    c = c0.clone()
    _dot_kernel[(1,)](a, b, c, 16, 16, 32)
    want = c0.double() + a.double() @ b.double()
    assert rel_err(c, want) <= 1e-6


def test_mended_cast_rounds_to_nearest_even_as_torch_does(interpreter_bf16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, generator=g) * torch.logspace(-40, 38, 256).clamp(max=3e38)
    x[:11] = torch.tensor([1.00390625, 1.01171875, -1.00390625,  # ties: to even, both ways
                           3.3961e38, 3.3963e38, -3.3963e38,  # below and past the halfway point
                           # from bf16's largest finite value to infinity
                           float("inf"), -float("inf"), 0.0, -0.0, 1e-40])  # 1e-40: subnormal
    x[11] = float("nan")
    want = x.bfloat16()
    assert want[3].isfinite() and want[4:6].isinf().all()
    for cast_in_kernel in (True, False):
        y = torch.full((256,), 7.0, dtype=torch.bfloat16)
        z = torch.full((256,), 7.0, dtype=torch.bfloat16)
        _cast_kernel[(1,)](x, y, z, 256)
        got = y if cast_in_kernel else z
        assert torch.isnan(got[11]) and not torch.isnan(got[:11]).any()
        finite = ~torch.isnan(want)
        assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16))


@pytest.mark.parametrize("kernel", [_add_kernel, _larger_kernel])
def test_other_bf16_arithmetic_is_an_error(kernel, interpreter_bf16):
    """It would compute on the bits (x + x of 1.0 is not 2.0 there; -1.0 > -0.5 as uint16s):
    refused, naming why. (tl.max and tl.sum widen bf16 to fp32 themselves.)"""
    x = torch.randn(16).bfloat16()
    with pytest.raises(Exception, match="on bf16 values under the interpreter"):
        kernel[(1,)](x, torch.randn(16).bfloat16(), 16)


def test_the_mend_ends_with_its_context():
    from triton.runtime import interpreter

    import _interpreter_bf16 as mend
    before = {(o, n): getattr(o, n) for o, n in mend._REAL}
    with mend.bf16_mended():
        assert all(getattr(o, n) is not f for (o, n), f in before.items())
    assert all(getattr(o, n) is f for (o, n), f in before.items())
    assert interpreter.InterpreterBuilder.create_dot is before[interpreter.InterpreterBuilder,
                                                               "create_dot"]
