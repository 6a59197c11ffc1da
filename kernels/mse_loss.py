"""MAE's loss, the per-patch (optionally normalized) pixel MSE averaged over removed patches, and
its gradient with respect to pred, in one pass that reads imgs and pred once.

    target[n, l, k] = imgs[n, c, gh*p + i, gw*p + j],  k = (i*p + j)*C + c  (patchify's (p, q, c)),
                      gh, gw = l // (W//p), l % (W//p)
    norm_pix:         target = (target - mean_k) / sqrt(var_k (unbiased) + 1e-6), per patch
    loss              = sum_{n,l} mask[n,l] * mean_k (pred - target)^2 / S,   S = sum(mask)
    d loss / d pred   = 2 * mask[n,l] * (pred - target) / (K * S)

(no gradient flows to imgs: the official loss treats the image as a constant target).
The backward of the op is grad_pred * grad_loss: ``fastmae.kernels.scale.scale`` does it.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, empty, interpreting, launch, next_pow2

NORM_PIX_EPS = 1e-6


_empty = empty  # every output is allocated here (tests patch it to poison them)


@triton.jit
def _masked_mse_fwd(
    imgs_ptr,  # (N, C, H, W) any float dtype, strides (s_in, s_ic, s_ih, s_iw)
    pred_ptr,  # (N, L, K) any float dtype, strides (s_pn, s_pl, s_pk)
    mask_ptr,  # (N, L) any float dtype, strides (s_mn, s_ml)
    mask_sum_ptr,  # (1,) fp32: sum(mask), computed beforehand on the device (no host sync)
    grad_ptr,  # (N, L, K) contiguous, any float dtype: d loss / d pred; unused unless NEED_GRAD
    part_ptr,  # (num_programs,) fp32: each program's share of the loss, already divided by S
    NL, L, grid_w,
    s_in, s_ic, s_ih, s_iw, s_pn, s_pl, s_pk, s_mn, s_ml,
    C: tl.constexpr, P: tl.constexpr,
    C_BLOCK: tl.constexpr,  # next_pow2(C)
    PP_BLOCK: tl.constexpr,  # next_pow2(P * P)
    NORM_PIX: tl.constexpr, NEED_GRAD: tl.constexpr, EPS: tl.constexpr,
    BLOCK_P: tl.constexpr,  # patches per program
):
    # Registers hold BLOCK_P patches as (patch, i*P + j, c), c padded to C_BLOCK: the image is
    # contiguous along the middle axis (vector loads along each patch row). pred's element
    # k = (i*P + j)*C + c is loaded and stored through the flat (patch, (i*P + j)*C_BLOCK + c)
    # view of that tile, so that a warp covers runs of whole pixels of one patch.
    K = C * P * P
    pid = tl.program_id(0).to(tl.int64)
    patch = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = patch < NL
    n = patch // L
    l = patch - n * L
    gh = l // grid_w
    gw = l - gh * grid_w
    c = tl.arange(0, C_BLOCK)
    ij = tl.arange(0, PP_BLOCK)
    i = ij // P
    j = ij % P  # with s_iw == 1, runs of P contiguous pixels: vector loads

    ok = p_ok[:, None, None] & (ij < P * P)[None, :, None] & (c < C)[None, None, :]
    img_base = n * s_in + (gh * P) * s_ih + (gw * P) * s_iw
    img_off = (img_base[:, None, None] + (i * s_ih + j * s_iw)[None, :, None]
               + (c * s_ic)[None, None, :])
    x = tl.load(imgs_ptr + img_off, mask=ok, other=0.0).to(tl.float32)
    q = tl.arange(0, PP_BLOCK * C_BLOCK)
    q_pix = q // C_BLOCK
    q_c = q % C_BLOCK
    k = q_pix * C + q_c
    ok2 = p_ok[:, None] & ((q_pix < P * P) & (q_c < C))[None, :]
    pred_off = (n * s_pn + l * s_pl)[:, None] + k[None, :] * s_pk
    y = tl.load(pred_ptr + pred_off, mask=ok2, other=0.0).to(tl.float32)
    y = tl.reshape(y, (BLOCK_P, PP_BLOCK, C_BLOCK))

    if NORM_PIX:
        mean = tl.sum(tl.sum(x, axis=2), axis=1) / K
        xc = tl.where(ok, x - mean[:, None, None], 0.0)
        var = tl.sum(tl.sum(xc * xc, axis=2), axis=1) / (K - 1)  # unbiased; K = 1: nan, as torch
        rstd = 1.0 / tl.sqrt(var + EPS)
        target = xc * rstd[:, None, None]
    else:
        target = x
    diff = y - target  # 0 on masked-off lanes (both loads gave 0; xc is 0 there)
    per_patch = tl.sum(tl.sum(diff * diff, axis=2), axis=1) / K

    m = tl.load(mask_ptr + n * s_mn + l * s_ml, mask=p_ok, other=0.0).to(tl.float32)
    mask_sum = tl.load(mask_sum_ptr)
    contrib = tl.where(p_ok, per_patch * m, 0.0)
    tl.store(part_ptr + pid, tl.sum(contrib, axis=0) / mask_sum)

    if NEED_GRAD:
        g_scale = m * (2.0 / (K * mask_sum))
        grad = tl.reshape(diff * g_scale[:, None, None], (BLOCK_P, PP_BLOCK * C_BLOCK))
        tl.store(grad_ptr + patch[:, None] * K + k[None, :], grad.to(grad_ptr.dtype.element_ty),
                 mask=ok2)


def masked_mse_fwd(imgs, pred, mask, patch_size, norm_pix, need_grad, grad_dtype=None):
    """imgs (N, C, H, W), pred (N, L, K = p*p*C), mask (N, L) float ->
    (loss: 0-d fp32 tensor, grad_pred: (N, L, K) contiguous in grad_dtype (pred's unless given),
    or None unless need_grad). grad_pred is d loss / d pred for a unit incoming gradient."""
    N, C, H, W = imgs.shape
    p = int(patch_size)
    grid_w = W // p
    L = pred.shape[1]
    K = p * p * C
    assert pred.shape[2] == K and L == (H // p) * grid_w and mask.shape == (N, L)
    device = pred.device
    NL = N * L
    c_block, pp_block = next_pow2(C), next_pow2(p * p)
    if interpreting():
        block_p, num_warps = 2, 4
    else:  # about 4096 elements of each operand per program: 4 patches at p = 16, C = 3
        block_p, num_warps = max(1, 4096 // (c_block * pp_block)), 8
    mask_sum = mask.sum(dtype=torch.float32).reshape(1)
    grad = _empty((N, L, K), grad_dtype or pred.dtype, device) if need_grad else None
    if NL == 0:
        return (torch.zeros((), dtype=torch.float32, device=device) / mask_sum[0]), grad
    programs = cdiv(NL, block_p)
    partials = _empty((programs,), torch.float32, device)
    launch(_masked_mse_fwd, (programs,),
           imgs, pred, mask, mask_sum, grad if need_grad else partials, partials,
           NL, L, grid_w,
           *imgs.stride(), *pred.stride(), *mask.stride(),
           C=C, P=p, C_BLOCK=c_block, PP_BLOCK=pp_block,
           NORM_PIX=bool(norm_pix), NEED_GRAD=bool(need_grad), EPS=NORM_PIX_EPS,
           BLOCK_P=block_p, num_warps=num_warps)
    return partials.sum(), grad


# The backward of the loss op: grad_pred * grad_loss, by fastmae.kernels.scale.scale(grad_pred,
# grad_loss) (a 0-d fp32 tensor, no host sync); no separate launcher here.
