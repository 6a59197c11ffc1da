"""kernels/bias_gelu.py against the float64 reference (fastmae.reference.bias_gelu), output and
both gradients."""
import pytest
import torch

from fastmae import reference as ref
from fastmae.kernels import bias_gelu as bg
from fastmae.testing import assert_rel_close, bias_gelu_case, grad_with_layout, poisoned_empty, rel_err

TOL = 1e-5
WIDTHS = [8, 40, 100, 1280]
ROWS = [1, 7, 33]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate (outputs and partial sums) starts as NaN."""
    monkeypatch.setattr(bg, "_empty", poisoned_empty)


_grad = grad_with_layout


def _reference(x, bias, dy):
    x64 = x.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    y = ref.bias_gelu(x64, b64)
    dx, db = torch.autograd.grad((y * dy.double()).sum(), (x64, b64))
    return y.detach(), dx, db


def _check(x, bias, dy):
    y = bg.bias_gelu_fwd(x, bias, torch.float32)
    dx, db = bg.bias_gelu_bwd(dy, x, bias, torch.float32)
    assert y.dtype == dx.dtype == db.dtype == torch.float32
    exp_y, exp_dx, exp_db = _reference(x, bias, dy)
    assert_rel_close(y, exp_y, TOL, "y")
    assert_rel_close(dx, exp_dx, TOL, "dx")
    assert_rel_close(db, exp_db, TOL, "dbias")
    return y, dx, db


@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("M", ROWS)
def test_bias_gelu_matches_float64(M, D, device):
    case = bias_gelu_case(M, D, device=device, seed=M * 1000 + D)
    _check(case["x"], case["bias"], _grad((M, D), "contiguous", device, seed=1))


def test_bias_gelu_backward_derivative_on_a_dense_grid(device):
    """The backward's GELU derivative Phi(z) + z phi(z) (Phi from its own erfc polynomial,
    kernels/bias_gelu.py _normal_cdf) on 20480 points of [-12, 12], through 0 and far past
    where exp(-z^2 / 2) underflows, against float64: absolute error at most 5e-7 (libdevice-
    grade erf gives ~1e-7; the derivative is at most 1.13)."""
    M, D = 160, 128
    z = torch.linspace(-12.0, 12.0, M * D, dtype=torch.float64)
    x = z.to(torch.float32).reshape(M, D).to(device)
    bias = torch.zeros(D, device=device)
    dx, db = bg.bias_gelu_bwd(torch.ones(M, D, device=device), x, bias, torch.float32)
    z64 = x.double().cpu()
    phi = torch.exp(-0.5 * z64 * z64) / (2 * torch.pi) ** 0.5
    expected = 0.5 * torch.erfc(-z64 / 2 ** 0.5) + z64 * phi
    err = (dx.double().cpu() - expected).abs()
    assert err.max().item() <= 5e-7, f"max abs error {err.max().item():.2e} at z={z64.flatten()[err.argmax()].item()}"
    assert torch.allclose(db.double().cpu(), expected.sum(0), rtol=1e-6, atol=1e-5)


def test_bias_gelu_forward_relative_accuracy_on_a_dense_grid(device):
    """The forward z * Phi(z) (Phi from _normal_cdf) on 20480 points of [-12, 12] against float64:
    within 1e-5 of each value from z = -6 up (output down to -6e-9; 0.5 z (1 + erf(z / sqrt 2))
    in fp32 loses its digits there as 1 + erf cancels, and fails this test), and within 1e-9
    absolutely below, where _normal_cdf's polynomial stops at x = 4.5 (z = -6.36)."""
    M, D = 160, 128
    z = torch.linspace(-12.0, 12.0, M * D, dtype=torch.float64)
    x = z.to(torch.float32).reshape(M, D).to(device)
    y = bg.bias_gelu_fwd(x, torch.zeros(D, device=device), torch.float32).double().cpu()
    z64 = x.double().cpu()
    expected = 0.5 * z64 * torch.erfc(-z64 / 2 ** 0.5)
    err = (y - expected).abs()
    assert err[z64 < -6].max().item() <= 1e-9
    near = z64 >= -6
    rel = err[near] / expected[near].abs().clamp_min(1e-300)
    rel[expected[near] == 0] = err[near][expected[near] == 0]  # z = 0: y must be 0
    worst = rel.argmax()
    assert rel.max().item() <= 1e-5, (f"max rel error {rel.max().item():.2e} at "
                                      f"z={z64[near][worst].item()}")


@pytest.mark.parametrize("layout", ["expanded", "transposed"])
@pytest.mark.parametrize("M,D", [(33, 100), (7, 1280)])
def test_bias_gelu_strided_gradient(M, D, layout, device):
    case = bias_gelu_case(M, D, device=device, seed=5)
    _check(case["x"], case["bias"], _grad((M, D), layout, device, seed=2))


def test_bias_gelu_row_strided_input(device):
    """x as a column slice of a wider tensor: row stride != D."""
    M, D = 33, 100
    case = bias_gelu_case(M, D, device=device, seed=6)
    wide = torch.randn(M, D + 7, device=device)
    wide[:, 2:2 + D] = case["x"]
    x = wide[:, 2:2 + D]
    assert x.stride(0) != D
    _check(x, case["bias"], _grad((M, D), "contiguous", device, seed=3))


def test_bias_gelu_wide_range(device):
    """Large |z| (saturated tails) and values near 0."""
    M, D = 7, 40
    x = torch.linspace(-12, 12, M * D, device=device).reshape(M, D)
    bias = torch.randn(D, generator=torch.Generator(device=device).manual_seed(0),
                       device=device) * 0.01
    _check(x, bias, _grad((M, D), "contiguous", device, seed=4))


@pytest.mark.parametrize("M,D", [(33, 8), (33, 100), (7, 1280)])
def test_bias_gelu_deterministic(M, D, device):
    case = bias_gelu_case(M, D, device=device, seed=9)
    dy = _grad((M, D), "contiguous", device, seed=5)
    first = _check(case["x"], case["bias"], dy)
    second = _check(case["x"], case["bias"], dy)
    for name, a, b in zip(("y", "dx", "dbias"), first, second):
        assert torch.equal(a, b), name


def test_bias_gelu_empty(device):
    x = torch.empty(0, 40, device=device)
    bias = torch.randn(40, device=device)
    assert bg.bias_gelu_fwd(x, bias, torch.float32).shape == (0, 40)
    dx, db = bg.bias_gelu_bwd(x, x, bias, torch.float32)
    assert dx.shape == (0, 40) and torch.equal(db, torch.zeros(40, device=device))


# ----------------------------------------------------------------------------- low precision

LOW = [(torch.bfloat16, 4e-3), (torch.float16, 5e-4)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol", LOW)
@pytest.mark.parametrize("M,D", [(256 * 50, 3072), (256 * 197, 2048), (1000, 100), (33, 8)])
def test_bias_gelu_low_precision(M, D, dtype, atol):
    _check_low_precision(M, D, dtype, atol, "cuda")


@pytest.mark.interpreter(covered_by="test_bias_gelu_low_precision")
@pytest.mark.parametrize("dtype,atol", LOW)
@pytest.mark.parametrize("M,D", [(97, 100), (33, 8)])
def test_bias_gelu_low_precision_interpreted(M, D, dtype, atol, interpreter_bf16):
    """The GPU test's rule at small shapes, bf16 with the interpreter's bf16 mended."""
    _check_low_precision(M, D, dtype, atol, "cpu")


def _check_low_precision(M, D, dtype, atol, device):
    """x (the fc1 output) in dtype, bias fp32. The kernel's error against an fp32 reference is at
    most 2x the eager op's error in that dtype (bias cast to it, as under autocast), + atol."""
    case = bias_gelu_case(M, D, dtype=dtype, device=device, seed=D)
    x, bias = case["x"], case["bias"]
    dy = torch.randn(M, D, generator=torch.Generator(device=device).manual_seed(0),
                     device=device).to(dtype)

    def ref_fwd_bwd(x, bias, dy):
        x, bias = x.detach().requires_grad_(), bias.detach().requires_grad_()
        y = ref.bias_gelu(x, bias)
        return (y,) + torch.autograd.grad((y.float() * dy.float()).sum(), (x, bias))

    exp = ref_fwd_bwd(x.float(), bias, dy.float())
    eager = ref_fwd_bwd(x, bias.to(dtype), dy)
    y = bg.bias_gelu_fwd(x, bias, dtype)
    dx, db = bg.bias_gelu_bwd(dy, x, bias, dtype)
    assert y.dtype == dx.dtype == dtype and db.dtype == torch.float32
    for name, got, e, eg in zip(("y", "dx", "dbias"), (y, dx, db), exp, eager):
        assert_rel_close(got, e, 2 * rel_err(eg, e) + atol, name)
    dx2, db2 = bg.bias_gelu_bwd(dy, x, bias, dtype)
    assert torch.equal(dx, dx2) and torch.equal(db, db2)


def test_half_input_with_an_fp32_bias_adds_in_fp32(device):
    """fp16 x and an fp32 bias (autocast's fc1 output and its master bias): the sum is taken in
    fp32 (adding the bias in fp16 first rounds 300 + x to 0.25 apart)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 40, generator=g).to(device, torch.float16)
    bias = (torch.randn(40, generator=g) * 1e-2 + 300.0).to(device)
    y = bg.bias_gelu_fwd(x, bias, torch.float32)
    assert_rel_close(y, ref.bias_gelu(x.double(), bias.double()), 1e-5, "y")


def test_half_input_with_an_fp32_bias_backward_adds_in_fp32(device):
    """The backward recomputes z = x + bias in fp32 as the forward does: fp16 x and an fp32 bias
    near 1 (where gelu' has slope ~0.3), whose fp16 rounding would move dx by ~1e-4."""
    g = torch.Generator().manual_seed(1)
    M, D = 7, 40
    x = torch.randn(M, D, generator=g).to(device, torch.float16)
    bias = (torch.randn(D, generator=g) * 1e-2 + 1.0).to(device)
    dy = _grad((M, D), "contiguous", device, seed=6)
    dx, db = bg.bias_gelu_bwd(dy, x, bias, torch.float32)
    _, exp_dx, exp_db = _reference(x, bias, dy)
    assert_rel_close(dx, exp_dx, TOL, "dx")
    assert_rel_close(db, exp_db, TOL, "dbias")


def test_bias_gelu_backward_dx_dtype_defaults_to_x(device):
    """Without dx_dtype, dx is in x's dtype (dbias fp32 always)."""
    case = bias_gelu_case(7, 40, device=device, seed=10)
    x16 = case["x"].half()
    dy = _grad((7, 40), "contiguous", device, seed=7)
    dx, db = bg.bias_gelu_bwd(dy, x16, case["bias"])
    assert dx.dtype == torch.float16 and db.dtype == torch.float32
    _, exp_dx, exp_db = _reference(x16, case["bias"], dy)
    assert_rel_close(dx, exp_dx, 1e-3, "dx")
    assert_rel_close(db, exp_db, TOL, "dbias")
