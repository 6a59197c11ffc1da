"""kernels/layer_norm.py against the float64 reference (fastmae.reference.layer_norm /
add_layer_norm), output, statistics and every gradient."""
import pytest
import torch

from fastmae import reference as ref
from fastmae.kernels import layer_norm as ln
from fastmae.testing import (assert_guards_intact, assert_rel_close, grad_with_layout,
                             guarded_empty, layer_norm_case, poisoned_empty, rel_err)

TOL = 1e-5
WIDTHS = [8, 40, 100, 1280]
ROWS = [1, 7, 33]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate (outputs and partial sums) starts as NaN."""
    monkeypatch.setattr(ln, "_empty", poisoned_empty)


_grad = grad_with_layout


def _reference(case, dy, ds):
    """float64: y, s, mean, rstd, and the gradients (dx, dresidual, dweight, dbias)."""
    x = case["x"].double().requires_grad_()
    w = case["weight"].double().requires_grad_()
    b = case["bias"].double().requires_grad_()
    eps = case["eps"]
    bb = None
    if "residual" in case:
        r = case["residual"].double().requires_grad_()
        inputs = (x, r, w, b)
        if "branch_bias" in case:
            bb = case["branch_bias"].double().requires_grad_()
            inputs += (bb,)
        s, y = ref.add_layer_norm(x, r, w, b, eps, bb)
    else:
        r = None
        s = x
        y = ref.layer_norm(x, w, b, eps)
        inputs = (x, w, b)
    loss = (y * dy.double()).sum()
    if ds is not None:
        loss = loss + (s * ds.double()).sum()
    grads = torch.autograd.grad(loss, inputs)
    dbb = None
    if r is None:
        dx, dw, db = grads
        dr = None
    elif bb is None:
        dx, dr, dw, db = grads
    else:
        dx, dr, dw, db, dbb = grads
    sd = s.detach()
    mean = sd.mean(-1)
    rstd = (sd.var(-1, unbiased=False) + eps).rsqrt()
    return dict(y=y.detach(), s=sd if r is not None else None, mean=mean, rstd=rstd,
                dx=dx, dr=dr, dw=dw, db=db, dbb=dbb)


def _run(case, dy, ds):
    bb = case.get("branch_bias")
    y, s, mean, rstd = ln.layer_norm_fwd(case["x"], case["weight"], case["bias"], case["eps"],
                                         case["x"].dtype, residual=case.get("residual"),
                                         branch_bias=bb)
    saved = s if s is not None else case["x"]
    dx, dwb = ln.layer_norm_bwd(dy, saved, case["weight"], mean, rstd, ds=ds,
                                dx_dtype=case["x"].dtype, branch_bias_grad=bb is not None)
    assert dwb.shape == (2 if bb is None else 3, case["weight"].shape[0])
    return dict(y=y, s=s, mean=mean, rstd=rstd, dx=dx, dw=dwb[0], db=dwb[1],
                dbb=dwb[2] if bb is not None else None)


def _check(out, exp):
    for name in ("y", "mean", "rstd", "dx", "dw", "db"):
        assert out[name].dtype == torch.float32, name
        assert_rel_close(out[name], exp[name], TOL, name)
    if exp["s"] is None:
        assert out["s"] is None
    else:
        assert_rel_close(out["s"], exp["s"], TOL, "s")
        # the fused dx is the gradient of both x and residual
        assert_rel_close(out["dx"], exp["dr"], TOL, "dresidual")
    if exp["dbb"] is None:
        assert out["dbb"] is None
    else:
        assert_rel_close(out["dbb"], exp["dbb"], TOL, "dbranch_bias")


@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("residual", [False, True, "branch_bias"])
@pytest.mark.parametrize("with_ds", [False, True])
def test_layer_norm_matches_float64(M, D, residual, with_ds, device):
    """Plain, fused with the residual add, and fused with the add of the residual and of the
    branch's own bias (s = residual + x + branch_bias; its gradient the column sums of ds)."""
    case = layer_norm_case(M, D, residual=bool(residual), device=device, seed=M * 1000 + D)
    if residual == "branch_bias":
        case["branch_bias"] = torch.randn(D, device=device, generator=torch.Generator(device).manual_seed(D))
    dy = _grad((M, D), "contiguous", device, seed=1)
    ds = _grad((M, D), "contiguous", device, seed=2) if with_ds else None
    _check(_run(case, dy, ds), _reference(case, dy, ds))


@pytest.mark.parametrize("dy_layout", ["expanded", "transposed"])
@pytest.mark.parametrize("ds_layout", ["expanded", "transposed"])
@pytest.mark.parametrize("M,D", [(33, 100), (7, 1280)])
def test_layer_norm_strided_gradients(M, D, dy_layout, ds_layout, device):
    case = layer_norm_case(M, D, residual=True, device=device, seed=7)
    dy = _grad((M, D), dy_layout, device, seed=3)
    ds = _grad((M, D), ds_layout, device, seed=4)
    _check(_run(case, dy, ds), _reference(case, dy, ds))


@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_row_strided_input(residual, device):
    """x (and residual) as column slices of wider tensors: row stride != D."""
    M, D = 33, 40
    case = layer_norm_case(M, D, residual=residual, device=device, seed=11)
    wide = torch.randn(M, D + 9, device=device)
    wide[:, 3:3 + D] = case["x"]
    case["x"] = wide[:, 3:3 + D]
    if residual:
        wide_r = torch.randn(M, D + 5, device=device)
        wide_r[:, :D] = case["residual"]
        case["residual"] = wide_r[:, :D]
    assert case["x"].stride(0) != D
    dy = _grad((M, D), "contiguous", device, seed=5)
    out = _run(case, dy, None)
    _check(out, _reference(case, dy, None))


def test_layer_norm_fused_residual_dtype(device):
    """residual_dtype given explicitly is what s is stored in; default promotes."""
    case = layer_norm_case(7, 40, residual=True, device=device, seed=12)
    _, s, _, _ = ln.layer_norm_fwd(case["x"], case["weight"], case["bias"], case["eps"],
                                   torch.float32, residual=case["residual"],
                                   residual_dtype=torch.float64)
    assert s.dtype == torch.float64
    exp = case["residual"].double() + case["x"].double()
    assert_rel_close(s, exp, TOL, "s")


@pytest.mark.parametrize("M,D", [(33, 8), (33, 100), (7, 1280)])
def test_layer_norm_deterministic(M, D, device):
    case = layer_norm_case(M, D, residual=True, device=device, seed=13)
    dy = _grad((M, D), "contiguous", device, seed=6)
    ds = _grad((M, D), "contiguous", device, seed=7)
    first, second = _run(case, dy, ds), _run(case, dy, ds)
    for name in ("y", "s", "mean", "rstd", "dx", "dw", "db"):
        assert torch.equal(first[name], second[name]), name


def test_layer_norm_many_programs(monkeypatch, device):
    """One row per tile and more programs than the default: partial sums over many rows."""
    monkeypatch.setattr(ln, "_launch_config", lambda block_d: (1, 1))
    M, D = 33, 100
    case = layer_norm_case(M, D, residual=True, device=device, seed=17)
    dy = _grad((M, D), "contiguous", device, seed=8)
    _check(_run(case, dy, None), _reference(case, dy, None))


def test_layer_norm_empty(device):
    case = layer_norm_case(0, 40, residual=True, device=device)
    y, s, mean, rstd = ln.layer_norm_fwd(case["x"], case["weight"], case["bias"], case["eps"],
                                         torch.float32, residual=case["residual"])
    assert y.shape == (0, 40) and s.shape == (0, 40) and mean.shape == (0,)
    dx, (dw, db) = ln.layer_norm_bwd(torch.empty(0, 40, device=device), s, case["weight"], mean,
                                   rstd, dx_dtype=torch.float32)
    assert dx.shape == (0, 40) and torch.equal(dw, torch.zeros(40, device=device))
    assert torch.equal(db, torch.zeros(40, device=device))


# ----------------------------------------------------------------------------- low precision

LOW = [(torch.bfloat16, 4e-3), (torch.float16, 5e-4)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol", LOW)
@pytest.mark.parametrize("M,D", [(256 * 50, 768), (1000, 1280), (77, 100), (33, 8)])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_low_precision(M, D, residual, dtype, atol):
    _check_low_precision(M, D, residual, dtype, atol, "cuda")


@pytest.mark.interpreter(covered_by="test_layer_norm_low_precision")
@pytest.mark.parametrize("dtype,atol", LOW)
@pytest.mark.parametrize("M,D", [(77, 100), (33, 8)])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_low_precision_interpreted(M, D, residual, dtype, atol, interpreter_bf16):
    """The GPU test's rule at its small shapes, bf16 with the interpreter's bf16 mended."""
    _check_low_precision(M, D, residual, dtype, atol, "cpu")


def _check_low_precision(M, D, residual, dtype, atol, device):
    """Autocast setting: x (the branch) in dtype, residual fp32, y in dtype. The kernel's error
    against an fp32 reference is at most 2x the eager op's error in that dtype, + atol."""
    case = layer_norm_case(M, D, residual=residual, dtype=dtype, device=device, seed=D)
    x, w, b, eps = case["x"], case["weight"], case["bias"], case["eps"]
    g = torch.Generator(device=device).manual_seed(0)
    dy = torch.randn(M, D, generator=g, device=device).to(dtype)
    ds = torch.randn(M, D, generator=g, device=device) if residual else None

    def ref_fwd_bwd(x, r, w, b, dy, ds):
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        inputs = [x, w, b]
        if r is not None:
            r = r.detach().requires_grad_()
            inputs.append(r)
            s, y = ref.add_layer_norm(x, r, w, b, eps)
        else:
            s, y = x, ref.layer_norm(x, w, b, eps)
        loss = (y.float() * dy.float()).sum()
        if ds is not None:
            loss = loss + (s.float() * ds).sum()
        return (y,) + torch.autograd.grad(loss, inputs)

    r = case.get("residual")
    # fp32 reference on the same (rounded) inputs
    exp = ref_fwd_bwd(x.float(), r, w, b, dy.float(), ds)
    # eager in the low dtype: as under autocast the residual stream stays fp32; without a
    # residual the eager op runs wholly in the low dtype
    if r is None:
        eager = ref_fwd_bwd(x, None, w.to(dtype), b.to(dtype), dy, None)
    else:
        x_e = x.detach().requires_grad_()
        r_e = r.detach().requires_grad_()
        w_e, b_e = w.detach().requires_grad_(), b.detach().requires_grad_()
        s_e, y_e = ref.add_layer_norm(x_e, r_e, w_e, b_e, eps)
        y_e = y_e.to(dtype)
        loss = (y_e.float() * dy.float()).sum() + (s_e * ds).sum()
        eager = (y_e,) + torch.autograd.grad(loss, [x_e, w_e, b_e, r_e])
        eager = (eager[0], eager[1].to(dtype)) + eager[2:]

    y, s, mean, rstd = ln.layer_norm_fwd(x, w, b, eps, dtype, residual=r)
    assert y.dtype == dtype and (s is None or s.dtype == torch.float32)
    dx, (dw, db) = ln.layer_norm_bwd(dy, s if s is not None else x, w, mean, rstd, ds=ds,
                                   dx_dtype=dtype)
    assert dx.dtype == dtype and dw.dtype == torch.float32
    for name, got, e, eg in zip(("y", "dx", "dweight", "dbias"), (y, dx, dw, db), exp, eager):
        limit = 2 * rel_err(eg, e) + atol
        assert_rel_close(got, e, limit, name)
    again_dx, (again_dw, again_db) = ln.layer_norm_bwd(dy, s if s is not None else x, w, mean,
                                                       rstd, ds=ds, dx_dtype=dtype)
    for first, second in zip((dx, dw, db), (again_dx, again_dw, again_db)):
        assert torch.equal(first, second)


@pytest.mark.cuda
@pytest.mark.parametrize("M,D", [(256 * 197, 512), (256 * 50, 768)])
def test_fused_block_backward_at_mae_shapes(M, D):
    """At ViT-B/16's decoder and encoder shapes (many row tiles a program: the backward's
    prefetching loop runs)."""
    _check_fused_block_backward(M, D, "cuda")


@pytest.mark.interpreter(covered_by="test_fused_block_backward_at_mae_shapes")
def test_fused_block_backward_bf16_interpreted(interpreter_bf16):
    _check_fused_block_backward(131, 40, "cpu")


def _check_fused_block_backward(M, D, device):
    """The transformer block's hand-off under bf16 autocast: s = residual + x + branch bias in
    fp32, y in bf16; the backward's fp32 residual gradient, its bf16 copy (the branch gradient)
    and the weight, bias and branch-bias column sums, against float64."""
    g = torch.Generator(device=device).manual_seed(D)
    x = torch.randn(M, D, generator=g, device=device).to(torch.bfloat16)
    r = torch.randn(M, D, generator=g, device=device)
    w = 1 + 0.1 * torch.randn(D, generator=g, device=device)
    b, bb = (0.1 * torch.randn(D, generator=g, device=device) for _ in range(2))
    dy = torch.randn(M, D, generator=g, device=device).to(torch.bfloat16)
    ds = torch.randn(M, D, generator=g, device=device)
    y, s, mean, rstd = ln.layer_norm_fwd(x, w, b, 1e-6, torch.bfloat16, residual=r,
                                         residual_dtype=torch.float32, branch_bias=bb)
    dsum, dwb, dbranch = ln.layer_norm_bwd(dy, s, w, mean, rstd, ds=ds, dx_dtype=torch.float32,
                                           dx2_dtype=torch.bfloat16, branch_bias_grad=True)

    s64 = (r.double() + x.double() + bb.double()).requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    y64 = torch.nn.functional.layer_norm(s64, (D,), w64, b64, 1e-6)
    loss = (y64 * dy.double()).sum() + (s64 * ds.double()).sum()
    ds64, dw64, db64 = torch.autograd.grad(loss, (s64, w64, b64))
    assert_rel_close(s, s64, 1e-6, "s")
    assert_rel_close(y.float(), y64, 8e-3, "y")
    assert_rel_close(dsum, ds64, 1e-5, "dresidual")
    # rounded to nearest even, as torch casts (the interpreter too, mended)
    assert torch.equal(dbranch, dsum.to(torch.bfloat16)), "the branch gradient is dx in bf16"
    assert_rel_close(dwb[0], dw64, 1e-4, "dweight")  # fp32 sums over M rows
    assert_rel_close(dwb[1], db64, 1e-4, "dbias")
    assert_rel_close(dwb[2], ds64.sum(0), 1e-4, "dbranch_bias")


def test_rows_whose_variance_is_near_eps(device):
    """Rows of variance ~eps (1e-6) and a constant row (variance 0: y = bias, dx = 0), where
    eps's place decides the result: rstd = 1 / sqrt(var + eps) (eps outside the root gave inf
    on the constant row and passed every other test, whose rows have variance ~4)."""
    M, D = 7, 40
    case = layer_norm_case(M, D, device=device, seed=3)
    case["x"] = (case["x"] - 0.5) * 5e-4
    case["x"][3] = 0.25
    dy = grad_with_layout((M, D), "contiguous", device, seed=1)
    _check(_run(case, dy, None), _reference(case, dy, None))


def test_layer_norm_writes_nothing_outside_its_buffers(monkeypatch, device):
    """Every launcher buffer (y, s, mean, rstd, dx, its second dtype, the partial sums) inside
    sentinels: the row tail of the last tile (33 rows in tiles of 4) stores nothing past M."""
    buffers = []
    monkeypatch.setattr(ln, "_empty", guarded_empty(buffers))
    M, D = 33, 40
    case = layer_norm_case(M, D, residual=True, device=device, seed=19)
    g = torch.Generator(device).manual_seed(5)
    case["branch_bias"] = torch.randn(D, device=device, generator=g)
    dy = _grad((M, D), "contiguous", device, seed=9)
    ds = _grad((M, D), "contiguous", device, seed=10)
    out = _run(case, dy, ds)
    assert len(buffers) == 6
    ln.layer_norm_bwd(dy, out["s"], case["weight"], out["mean"], out["rstd"], ds=ds,
                      dx_dtype=torch.float32, dx2_dtype=torch.float16, branch_bias_grad=True)
    assert len(buffers) == 9
    assert_guards_intact(buffers)
    _check(out, _reference(case, dy, ds))


def test_layer_norm_second_dx_dtype_is_the_same_gradient(device):
    """dx2_dtype: the fused backward also writes dx (residual path included) in a second dtype,
    from the same fp32 values (the branch gradient beside the residual stream's)."""
    M, D = 7, 40
    case = layer_norm_case(M, D, residual=True, device=device, seed=21)
    y, s, mean, rstd = ln.layer_norm_fwd(case["x"], case["weight"], case["bias"], case["eps"],
                                         torch.float32, residual=case["residual"])
    dy = _grad((M, D), "contiguous", device, seed=11)
    ds = _grad((M, D), "contiguous", device, seed=12)
    dx, dwb, dx2 = ln.layer_norm_bwd(dy, s, case["weight"], mean, rstd, ds=ds,
                                     dx_dtype=torch.float32, dx2_dtype=torch.float16)
    assert dx.dtype == torch.float32 and dx2.dtype == torch.float16
    assert_rel_close(dx, _reference(case, dy, ds)["dx"], TOL, "dx")
    assert_rel_close(dx2, dx, 1e-3, "dx2")  # dx rounded to fp16


def test_layer_norm_output_dtypes(device):
    """The launchers' dtypes: y in out_dtype (not x's), s in the promoted dtype of x and residual
    when residual_dtype is not given, and dx by default in the saved input's dtype."""
    M, D = 7, 40
    case = layer_norm_case(M, D, residual=True, device=device, seed=23)
    x16 = case["x"].half()
    y, s, mean, rstd = ln.layer_norm_fwd(x16, case["weight"], case["bias"], case["eps"],
                                         torch.float32, residual=case["residual"])
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    s64 = x16.double() + case["residual"].double()
    assert_rel_close(s, s64, TOL, "s")
    exp_y = ref.layer_norm(s64, case["weight"].double(), case["bias"].double(), case["eps"])
    assert_rel_close(y, exp_y, TOL, "y")
    dy = _grad((M, D), "contiguous", device, seed=13)
    dx, _ = ln.layer_norm_bwd(dy, x16, case["weight"], mean, rstd)
    assert dx.dtype == torch.float16


def test_layer_norm_normalizes_the_stored_half_precision_sum(device):
    """s stored in fp16 (x and residual fp16): y, mean and rstd are those of the stored s, which
    the backward recomputes x_hat from, not of the unrounded fp32 sum."""
    M, D = 7, 40
    case = layer_norm_case(M, D, residual=True, device=device, seed=25)
    x16, r16 = case["x"].half(), case["residual"].half()
    y, s, mean, rstd = ln.layer_norm_fwd(x16, case["weight"], case["bias"], case["eps"],
                                         torch.float32, residual=r16)
    assert s.dtype == torch.float16
    s64 = s.double()
    assert_rel_close(s64, x16.double() + r16.double(), 1e-3, "s")
    exp_y = ref.layer_norm(s64, case["weight"].double(), case["bias"].double(), case["eps"])
    assert_rel_close(y, exp_y, TOL, "y")
    assert_rel_close(mean, s64.mean(-1), TOL, "mean")
    assert_rel_close(rstd, (s64.var(-1, unbiased=False) + case["eps"]).rsqrt(), TOL, "rstd")
