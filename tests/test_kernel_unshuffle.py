"""fastmae.kernels.unshuffle against the reference in float64: the output and the gradients of
x and mask_token (pos_embed is a frozen table: its gradient is not computed)."""
import pytest
import torch

from fastmae import reference as ref
from fastmae.testing import (assert_guards_intact, assert_rel_close, guarded_empty, poisoned_empty,
                             rel_err, unshuffle_case)

TOL = 1e-5


@pytest.fixture
def kun(monkeypatch):
    """The kernel module with its allocator patched to hand out poisoned buffers (outputs and the
    backward's partial sums), so an element a kernel forgets to write fails the comparison."""
    from fastmae.kernels import unshuffle

    monkeypatch.setattr(unshuffle, "_empty", poisoned_empty)
    return unshuffle


def _reference_float64(case, grad_out):
    """Output and (grad_x, grad_mask_token) of the reference, run in float64 by autograd."""
    x = case["x"].detach().double().requires_grad_(True)
    mt = case["mask_token"].detach().double().requires_grad_(True)
    out = ref.unshuffle(x, mt, case["ids_restore"], case["pos_embed"].double())
    out.backward(grad_out.double())
    return out.detach(), x.grad, mt.grad


def _run(kun, case, grad_out):
    out = kun.unshuffle_fwd(case["x"], case["mask_token"], case["ids_restore"], case["pos_embed"])
    keep = case["x"].shape[1] - 1
    gx, gmt = kun.unshuffle_bwd(grad_out, case["ids_restore"], keep, case["x"].dtype,
                                case["mask_token"].dtype)
    return out, gx, gmt


def _check(kun, case, grad_out, tol=TOL):
    out, gx, gmt = _run(kun, case, grad_out)
    want_out, want_gx, want_gmt = _reference_float64(case, grad_out)
    N, keep1, D = case["x"].shape
    L = case["ids_restore"].shape[1]
    assert out.shape == (N, 1 + L, D) and out.is_contiguous()
    assert gx.shape == (N, keep1, D) and gx.is_contiguous() and gx.dtype == case["x"].dtype
    assert gmt.shape == (1, 1, D) and gmt.dtype == case["mask_token"].dtype
    assert_rel_close(out, want_out, tol, "out")
    assert_rel_close(gx, want_gx, tol, "grad_x")
    assert_rel_close(gmt, want_gmt, tol, "grad_mask_token")
    return out, gx, gmt


# (N, L, D, ratio): batch 1, L = 1, nothing kept, everything kept, primes, D not a power of 2
@pytest.mark.parametrize("N, L, D, ratio", [
    (1, 1, 8, 0.0),
    (2, 7, 40, 0.75),
    (3, 49, 100, 0.75),
    (1, 196, 8, 0.75),
    (2, 16, 8, 1.0),
    (1, 13, 40, 0.0),
    (1, 1024, 8, 0.75),
])
def test_unshuffle_matches_reference(kun, device, N, L, D, ratio):
    case = unshuffle_case(N, L, D, ratio, device=device, seed=L + D)
    grad_out = torch.randn(N, 1 + L, D, device=device) + 0.25
    out, gx, gmt = _check(kun, case, grad_out)
    again = _run(kun, case, grad_out)
    for a, b in zip((out, gx, gmt), again):
        assert torch.equal(a, b), "two runs differ"


def test_unshuffle_deterministic_multi_tile(kun, device, monkeypatch):
    """Fewer backward programs than tiles: each program loops over several tiles (3 tiles of 64
    rows on 2 programs: with 3 each took one, and a loop stepping to the wrong tile passed); the
    mask-token gradient is still right and bit-identical run after run."""
    monkeypatch.setattr(kun, "_BWD_PROGRAMS", 2)
    case = unshuffle_case(3, 49, 40, 0.75, device=device, seed=5)
    grad_out = torch.randn(3, 50, 40, device=device) * 3 + 1
    _, gx, gmt = _check(kun, case, grad_out)
    for _ in range(2):
        gx2, gmt2 = kun.unshuffle_bwd(grad_out, case["ids_restore"], 12, torch.float32,
                                      torch.float32)
        assert torch.equal(gx, gx2) and torch.equal(gmt, gmt2)


def test_unshuffle_strided_inputs(kun, device):
    """x a slice of a bigger tensor and a transposed view, pos_embed and mask_token views,
    grad_out expanded (stride 0) and sliced; ids_restore contiguous, then a transposed copy
    (stride N along L)."""
    N, L, D, ratio = 2, 11, 40, 0.75
    case = unshuffle_case(N, L, D, ratio, device=device, seed=9)
    keep1 = case["x"].shape[1]
    big = torch.randn(N, keep1 + 2, D + 6, device=device)
    big[:, 1:1 + keep1, 3:3 + D] = case["x"]
    transposed = case["x"].transpose(1, 2).contiguous().transpose(1, 2)
    pos_big = torch.randn(1, 1 + L, 2 * D, device=device)
    pos_big[:, :, ::2] = case["pos_embed"]
    mt_big = torch.randn(1, 1, 3 * D, device=device)
    mt_big[:, :, ::3] = case["mask_token"]
    grads = (torch.randn(N, 1, D, device=device).expand(N, 1 + L, D),
             torch.randn(N, 2 + L, D + 5, device=device)[:, 1:, 2:2 + D],
             torch.randn(1, 1, 1, device=device).expand(N, 1 + L, D))
    ids_t = case["ids_restore"].t().contiguous().t()
    assert ids_t.stride() == (1, N)
    for x, ids in ((big[:, 1:1 + keep1, 3:3 + D], case["ids_restore"]), (transposed, ids_t)):
        strided = dict(case, x=x, pos_embed=pos_big[:, :, ::2], mask_token=mt_big[:, :, ::3],
                       ids_restore=ids)
        for grad_out in grads:
            _check(kun, strided, grad_out)


# ----------------------------------------------------------------------------- low precision

def _low_precision_errors(kun, case, grad_out):
    """Errors of the kernel and of the eager reference, both run on the low-precision inputs,
    against the float64 reference of those same inputs."""
    want = _reference_float64(case, grad_out)
    got = _run(kun, case, grad_out)
    x = case["x"].detach().clone().requires_grad_(True)
    mt = case["mask_token"].detach().clone().requires_grad_(True)
    eager_out = ref.unshuffle(x, mt, case["ids_restore"], case["pos_embed"])
    eager_out.backward(grad_out.to(eager_out.dtype))
    eager = (eager_out.detach(), x.grad, mt.grad)
    for a, e in zip(got, eager):
        assert a.dtype == e.dtype
    return ([rel_err(a, w) for a, w in zip(got, want)],
            [rel_err(e, w) for e, w in zip(eager, want)])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tables_low", [False, True], ids=["fp32-tables", "low-tables"])
@pytest.mark.parametrize("N, L, D", [(256, 196, 512), (3, 257, 1280), (4, 49, 100)])
def test_unshuffle_low_precision_cuda(kun, dtype, tables_low, N, L, D):
    _check_low_precision(kun, dtype, tables_low, N, L, D, "cuda")


@pytest.mark.interpreter(covered_by="test_unshuffle_low_precision_cuda")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tables_low", [False, True], ids=["fp32-tables", "low-tables"])
@pytest.mark.parametrize("N, L, D", [(4, 49, 100), (1, 13, 40)])
def test_unshuffle_low_precision_interpreted(kun, dtype, tables_low, N, L, D, interpreter_bf16):
    """The GPU test's rule at small shapes, bf16 with the interpreter's bf16 mended."""
    _check_low_precision(kun, dtype, tables_low, N, L, D, "cpu")


def _check_low_precision(kun, dtype, tables_low, N, L, D, device):
    """x in fp16/bf16 with fp32 tables (autocast: the result is fp32) or with tables in the same
    dtype: every output within 2x the eager op's error plus an atol."""
    case = unshuffle_case(N, L, D, 0.75, dtype=dtype, device=device, seed=N)
    if tables_low:
        case["mask_token"] = case["mask_token"].to(dtype)
        case["pos_embed"] = case["pos_embed"].to(dtype)
    out_dtype = torch.float32 if not tables_low else dtype
    grad_out = torch.randn(N, 1 + L, D, generator=torch.Generator().manual_seed(L)).to(device,
                                                                                     out_dtype)
    atol = 1e-5 if out_dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    got, eager = _low_precision_errors(kun, case, grad_out)
    for name, k, e in zip(("out", "grad_x", "grad_mask_token"), got, eager):
        assert k <= 2 * e + atol, f"{name}: kernel {k:.3e} > 2 x eager {e:.3e} + {atol:.1e}"


@pytest.mark.cuda
def test_unshuffle_bit_identical_cuda(kun):
    case = unshuffle_case(256, 196, 512, 0.75, dtype=torch.bfloat16, device="cuda", seed=1)
    grad_out = torch.randn(256, 197, 512, device="cuda")
    first = _run(kun, case, grad_out)
    _check(kun, dict(case, x=case["x"].float()), grad_out)
    for _ in range(3):
        for a, b in zip(first, _run(kun, case, grad_out)):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- invalid ids

def _with_invalid_ids(case, bad):
    """A copy of the case's ids_restore with the id at each (n, l) of ``bad`` replaced."""
    ids = case["ids_restore"].clone()
    for (n, l), v in bad.items():
        ids[n, l] = v
    return ids


def test_unshuffle_ids_outside_range_give_nan_rows(kun, device):
    """An id outside [0, L) (-1, L, L + 7) is not followed: its output row is NaN (the old
    kernel copied the cls token for -1 and the mask token for >= L), every other row is the
    reference's, and nothing is read through it."""
    N, L, D = 2, 9, 8
    case = unshuffle_case(N, L, D, 0.5, device=device, seed=21)
    bad = {(0, 1): -1, (1, 4): L, (1, 0): L + 7}
    ids = _with_invalid_ids(case, bad)
    out = kun.unshuffle_fwd(case["x"], case["mask_token"], ids, case["pos_embed"])
    want = ref.unshuffle(case["x"].double(), case["mask_token"].double(), case["ids_restore"],
                         case["pos_embed"].double())
    nan_rows = torch.zeros(N, 1 + L, dtype=torch.bool)
    for n, l in bad:
        nan_rows[n, 1 + l] = True
    out, want = out.cpu(), want.cpu()
    assert out[nan_rows].isnan().all(), "an invalid id's row is not NaN"
    assert_rel_close(out[~nan_rows], want[~nan_rows], TOL, "the valid rows")


def test_unshuffle_bwd_ids_outside_range_write_nothing_and_give_nan(kun, device, monkeypatch):
    """In the backward an id outside [0, L) writes no gradient of x (the old kernel wrote the
    row at x[n, 1 + id], before the buffer for a large negative id, over the cls gradient for
    -1) and makes the mask token's gradient NaN; the other gradients are the reference's."""
    buffers = []
    monkeypatch.setattr(kun, "_empty", guarded_empty(buffers))
    N, L, D, ratio = 2, 9, 8, 0.5
    case = unshuffle_case(N, L, D, ratio, device=device, seed=22)
    keep = case["x"].shape[1] - 1
    ids = case["ids_restore"].clone()
    # replace ids of masked positions (>= keep): every row of x still has its one source
    masked = [(n, l) for n in range(N) for l in range(L) if ids[n, l] >= keep]
    bad = dict(zip(masked[:1] + masked[-2:], (-100, -1, L + 7)))
    assert {n for n, _ in bad} == {0, 1}
    ids = _with_invalid_ids(case, bad)
    grad_out = torch.randn(N, 1 + L, D, device=device) + 0.5
    gx, gmt = kun.unshuffle_bwd(grad_out, ids, keep, torch.float32, torch.float32)
    assert_guards_intact(buffers)
    _, want_gx, _ = _reference_float64(case, grad_out)
    assert_rel_close(gx, want_gx, TOL, "grad_x")  # cls rows included
    assert gmt.isnan().all(), "the mask token's gradient is not NaN"


def test_unshuffle_bwd_mask_token_grad_rounded_once(kun, device):
    """A 16-bit mask token's gradient is the fp32 sum of every program's partial, rounded to its
    dtype once: rounding each partial first lost the small total of partials that cancel (the
    rows of image 0 near +100, of image 1 near -100; four programs of 64 rows)."""
    N, L, D, ratio = 2, 127, 8, 0.75
    case = unshuffle_case(N, L, D, ratio, device=device, seed=23)
    keep = case["x"].shape[1] - 1
    g = torch.Generator(device=device)
    g.manual_seed(24)
    grad_out = torch.randn(N, 1 + L, D, generator=g, device=device)
    grad_out[0] += 100.0
    grad_out[1] -= 100.0
    _, want_gx, want_gmt = _reference_float64(case, grad_out)
    for mt_dtype in (torch.float16, torch.bfloat16):
        gx, gmt = kun.unshuffle_bwd(grad_out, case["ids_restore"], keep, torch.float32, mt_dtype)
        assert gmt.dtype == mt_dtype
        assert_rel_close(gx, want_gx, TOL, "grad_x")
        # one rounding of a value within fp32 error of the float64 sum: within one step
        assert_rel_close(gmt.double(), want_gmt, 2 * torch.finfo(mt_dtype).eps,
                         f"grad_mask_token ({mt_dtype})")
