"""fastmae.kernels.mse_loss against the float64 reference (fastmae.reference.masked_mse_loss):
the loss and its gradient with respect to pred, awkward shapes and strides, poisoned buffers,
determinism; the backward's incoming-gradient scaling through fastmae.kernels.scale."""
import math
import warnings

import pytest
import torch

from fastmae import reference as ref
from fastmae import testing as T
from fastmae.kernels import mse_loss as ml
from fastmae.kernels.scale import scale

TOL = 1e-5


def _poison_allocations(monkeypatch):
    monkeypatch.setattr(ml, "_empty", T.poisoned_empty)


def _strided(case, layout, seed):
    """imgs and pred in a non-contiguous layout holding the same values."""
    imgs, pred = case["imgs"], case["pred"]
    if layout == "channels_last":
        imgs = imgs.contiguous(memory_format=torch.channels_last)
        pred = pred.transpose(1, 2).contiguous().transpose(1, 2)  # (N, K, L) storage
    elif layout == "slice":
        N, C, H, W = imgs.shape
        g = T._gen(seed + 7, "cpu")
        big = torch.randn(N, C + 2, H + 3, W + 5, generator=g).to(imgs.device, imgs.dtype)
        view = big[:, 1:1 + C, 2:2 + H, 3:3 + W]
        view.copy_(imgs)
        imgs = view
        bigp = torch.randn(N, pred.shape[1], 2 * pred.shape[2], generator=g).to(pred.device,
                                                                                pred.dtype)
        viewp = bigp[:, :, ::2]  # every other element
        viewp.copy_(pred)
        pred = viewp
        mask = case["mask"]
        bigm = torch.randn(N, 3 * mask.shape[1], generator=g).to(mask.device)
        viewm = bigm[:, 1::3]
        viewm.copy_(mask)
        case = dict(case, mask=viewm)
    elif layout != "contiguous":
        raise ValueError(layout)
    return dict(case, imgs=imgs, pred=pred)


def _reference(case, grad_loss=1.0):
    """float64 loss and d(grad_loss * loss) / d pred."""
    d = {k: (v.detach().double().requires_grad_() if torch.is_tensor(v) and v.is_floating_point()
             else v) for k, v in case.items()}
    loss = ref.masked_mse_loss(**d)
    (loss * grad_loss).backward()
    return loss.detach(), d["pred"].grad


# (N, C, H, W, p, imgs / pred layout)
CASES = [
    (1, 3, 12, 20, 4, "contiguous"),     # batch 1, 3x5 grid
    (3, 3, 12, 20, 4, "channels_last"),  # batch 3, pred with (N, K, L) storage
    (3, 1, 28, 20, 4, "slice"),          # C = 1, 7x5 grid, strided imgs / pred / mask
    (2, 4, 20, 28, 4, "contiguous"),     # C = 4, 5x7 grid
    (2, 3, 24, 40, 8, "slice"),          # p = 8, K = 192
    (3, 3, 28, 12, 4, "channels_last"),  # 7x3 grid (prime height)
    (1, 3, 28, 42, 14, "contiguous"),    # p = 14, K = 588
    (1, 3, 32, 16, 16, "contiguous"),    # p = 16, K = 768
]


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("N,C,H,W,p,layout", CASES)
def test_masked_mse(N, C, H, W, p, layout, norm_pix, device, monkeypatch):
    _poison_allocations(monkeypatch)
    case = T.loss_case(N, C, H, W, p, norm_pix=norm_pix, device=device, seed=N + C + p)
    case = _strided(case, layout, seed=p)
    r_loss, r_grad = _reference(case)

    loss, grad = ml.masked_mse_fwd(**case, need_grad=True)
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.shape == case["pred"].shape and grad.dtype == case["pred"].dtype
    assert grad.is_contiguous()
    T.assert_rel_close(loss, r_loss, TOL, "loss")
    T.assert_rel_close(grad, r_grad, TOL, "grad_pred")

    loss2, grad2 = ml.masked_mse_fwd(**case, need_grad=True)
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)
    loss3, none = ml.masked_mse_fwd(**case, need_grad=False)
    assert none is None and torch.equal(loss3, loss)


@pytest.mark.parametrize("pred_dtype,grad_dtype,tol", [
    (torch.float32, None, TOL),
    (torch.float16, torch.float32, 1e-3),  # as the op runs fp16: kept in fp32, rounded once
])
def test_masked_mse_backward_scaled(pred_dtype, grad_dtype, tol, device, monkeypatch):
    """The op's backward: grad_pred (for a unit gradient) scaled by the incoming 0-d gradient,
    stored in pred's dtype."""
    _poison_allocations(monkeypatch)
    case = T.loss_case(3, 3, 12, 20, 4, pred_dtype=pred_dtype, device=device, seed=4)
    grad_loss = torch.tensor(-2.75, device=device)
    _, r_grad = _reference(case, grad_loss.item())
    _, grad = ml.masked_mse_fwd(**case, need_grad=True, grad_dtype=grad_dtype)
    assert grad.dtype == (grad_dtype or pred_dtype)
    scaled = scale(grad, grad_loss, pred_dtype)
    assert scaled.dtype == pred_dtype
    T.assert_rel_close(scaled, r_grad, tol, "scaled grad_pred")


def test_masked_mse_all_masked_rows(device, monkeypatch):
    """Rows with no removed patch and a single removed patch overall."""
    _poison_allocations(monkeypatch)
    case = T.loss_case(3, 3, 12, 20, 4, device=device, seed=8)
    mask = torch.zeros_like(case["mask"])
    mask[1, 7] = 1.0
    case["mask"] = mask
    r_loss, r_grad = _reference(case)
    loss, grad = ml.masked_mse_fwd(**case, need_grad=True)
    T.assert_rel_close(loss, r_loss, TOL, "loss")
    T.assert_rel_close(grad, r_grad, TOL, "grad_pred")


def test_masked_mse_weighted_mask(device, monkeypatch):
    """A mask of weights in (0, 2), not 0 / 1: the loss is sum(mask * patch MSE) / sum(mask) as
    the reference has it (a count of the nonzero entries in place of sum(mask) passed the
    binary masks)."""
    _poison_allocations(monkeypatch)
    case = T.loss_case(2, 3, 12, 20, 4, device=device, seed=10)
    g = T._gen(11, "cpu")
    case["mask"] = (case["mask"].cpu() * (0.1 + 1.8 * torch.rand(2, 15, generator=g))).to(device)
    for norm_pix in (True, False):
        case["norm_pix"] = norm_pix
        r_loss, r_grad = _reference(case)
        loss, grad = ml.masked_mse_fwd(**case, need_grad=True)
        T.assert_rel_close(loss, r_loss, TOL, "loss")
        T.assert_rel_close(grad, r_grad, TOL, "grad_pred")


def test_masked_mse_single_value_patches(device):
    """K = 1 (p = 1, C = 1): without norm_pix the loss is exact; with it the unbiased variance is
    0 / 0 = nan, as in torch, and nothing crashes."""
    case = T.loss_case(2, 1, 3, 5, 1, norm_pix=False, device=device, seed=2)
    r_loss, r_grad = _reference(case)
    loss, grad = ml.masked_mse_fwd(**case, need_grad=True)
    T.assert_rel_close(loss, r_loss, TOL, "loss")
    T.assert_rel_close(grad, r_grad, TOL, "grad_pred")

    case["norm_pix"] = True
    with warnings.catch_warnings():  # torch and the interpreter's numpy warn about 0 / 0
        warnings.simplefilter("ignore")
        r_loss, _ = _reference(case)
        loss, _ = ml.masked_mse_fwd(**case, need_grad=True)
    assert math.isnan(r_loss.item())
    assert math.isnan(loss.item())


# ----------------------------------------------------------------------------- low precision

LOW = [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol", LOW)
@pytest.mark.parametrize("N,C,H,W,p", [(16, 3, 224, 224, 16), (4, 3, 224, 224, 14),
                                       (5, 1, 96, 80, 8), (3, 4, 64, 48, 16)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_mse_low_precision_cuda(N, C, H, W, p, norm_pix, dtype, atol):
    _check_low_precision(N, C, H, W, p, norm_pix, dtype, atol, "cuda")


@pytest.mark.interpreter(covered_by="test_masked_mse_low_precision_cuda")
@pytest.mark.parametrize("dtype,atol", LOW)
@pytest.mark.parametrize("N,C,H,W,p", [(3, 4, 64, 48, 16), (2, 3, 20, 12, 4)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_mse_low_precision_interpreted(N, C, H, W, p, norm_pix, dtype, atol,
                                              interpreter_bf16):
    """The GPU test's rule at small shapes, bf16 with the interpreter's bf16 mended."""
    _check_low_precision(N, C, H, W, p, norm_pix, dtype, atol, "cpu")


def _check_low_precision(N, C, H, W, p, norm_pix, dtype, atol, device):
    """pred in dtype, imgs fp32 (as under autocast): the kernel's loss and gradient vs the
    float64 reference, at most 2x the error of the eager reference run in dtype, plus atol."""
    case = T.loss_case(N, C, H, W, p, norm_pix=norm_pix, pred_dtype=dtype, device=device, seed=1)
    r_loss, r_grad = _reference(case)
    low = dict(case, imgs=case["imgs"].to(dtype),
               pred=case["pred"].detach().clone().requires_grad_(), mask=case["mask"].to(dtype))
    e_loss = ref.masked_mse_loss(**low)
    e_loss.backward()
    loss, grad = ml.masked_mse_fwd(**case, need_grad=True)
    assert grad.dtype == dtype
    assert T.rel_err(loss, r_loss) <= 2 * T.rel_err(e_loss, r_loss) + atol
    assert T.rel_err(grad, r_grad) <= 2 * T.rel_err(low["pred"].grad, r_grad) + atol


@pytest.mark.cuda
def test_masked_mse_fp32_cuda_exact():
    """fp32 on the GPU at the model's shape: the compiled kernel within 1e-5 of float64."""
    case = T.loss_case(8, 3, 224, 224, 16, device="cuda", seed=3)
    r_loss, r_grad = _reference(case)
    loss, grad = ml.masked_mse_fwd(**case, need_grad=True)
    T.assert_rel_close(loss, r_loss, TOL, "loss")
    T.assert_rel_close(grad, r_grad, TOL, "grad_pred")


def test_norm_pix_low_contrast_patches(device):
    """Patches of variance ~1e-6 (the norm_pix eps): (var + eps) ** .5, as official (eps outside
    the root passed every other test, whose patches have variance ~1)."""
    case = T.loss_case(2, 3, 12, 20, 4, norm_pix=True, device=device, seed=9)
    case["imgs"] = 0.5 + 1e-3 * case["imgs"]
    r_loss, r_grad = _reference(case)
    loss, grad = ml.masked_mse_fwd(**case, need_grad=True)
    T.assert_rel_close(loss, r_loss, TOL, "loss")
    T.assert_rel_close(grad, r_grad, TOL, "grad_pred")
