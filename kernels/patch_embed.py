"""Visible-patch embedding: the stride-p convolution of MAE's PatchEmbed, done only for the kept
patches, plus the positional embedding, in one matmul whose A operand is gathered straight from
the image.

    out[n, k, :] = conv2d(imgs, weight, bias, stride=p)[n, :, l // gw, l % gw] + pos_embed[0, 1 + l]
                 = patches[n, l, :] @ weight.view(D, K)^T + bias + pos_embed[0, 1 + l]
      with l = ids_keep[n, k], gw = W // p, K = C * p * p and
      patches[n, l, kk] = imgs[n, c, (l // gw) * p + i, (l % gw) * p + j], kk = (c * p + i) * p + j

(the (c, i, j) order of the weight's flattening; not the (p, q, c) order of ``patchify``).
The full-sequence embedding is never built: the forward does keep / L of the convolution's FLOPs.

Rows of every matmul here are the M = N * keep visible patches, m = n * keep + k.

An id of ids_keep outside [0, L) (torch's gather would raise) is not followed -- no load or
store goes through it, and no host check syncs: its output row is NaN. The backward leaves its
row out (no image gradient written, nothing added to the weight gradient; a loss that reads the
NaN row hands it a NaN gradient, which makes the weight gradient NaN). Flagging it in the
weight-gradient kernel itself cost sm_90 registers and occupancy (Triton 3.6, our compiles).
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, empty, interpreting, launch, launch_tuned, next_pow2


_empty = empty  # every output is allocated here (tests patch it to poison them)


@triton.jit
def _dot_in(a, b, acc, COMPUTE: tl.constexpr):
    """acc + a @ b with the operands in the compute dtype: 0 fp32 ("ieee" dots), 1 fp16, 2 bf16."""
    if COMPUTE == 2:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif COMPUTE == 1:
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


# ----------------------------------------------------------------------------- forward

def _fwd_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]


@triton.jit
def _patch_rows(ids_ptr, m, row_ok, keep, grid_w, L, s_idn, s_idk, s_in, s_ih, s_iw,
                P: tl.constexpr):
    """For rows m = n * keep + k: the patch index l = ids_keep[n, k], the image offset of the
    patch's top-left pixel (int64), and ok = row_ok with l in [0, L). The offset of an l
    outside [0, L) points outside the image: the callers mask every load and store through it
    (and through l) with ok."""
    n = m // keep
    k = m - n * keep
    l = tl.load(ids_ptr + n * s_idn + k * s_idk, mask=row_ok, other=0).to(tl.int64)
    # one unsigned compare: a negative id is a huge unsigned one
    ok = row_ok & (l.to(tl.uint64, bitcast=True) < L)
    gh = l // grid_w
    gw = l - gh * grid_w
    base = n * s_in + (gh * P) * s_ih + (gw * P) * s_iw
    return l, base, ok


@triton.jit
def _patch_cols(kk, s_ic, s_ih, s_iw, P: tl.constexpr):
    """Offset inside a patch of the K index kk = (c * p + i) * p + j (the weight's order)."""
    c = kk // (P * P)
    i = (kk // P) % P
    j = kk % P  # % and // by a constexpr: Triton sees the runs of P contiguous pixels
    return c * s_ic + i * s_ih + j * s_iw


@triton.autotune(configs=_fwd_configs(), key=["K", "D"])
@triton.jit
def _patch_embed_fwd(
    imgs_ptr,  # (N, C, H, W) any float dtype, strides (s_in, s_ic, s_ih, s_iw)
    w_ptr,  # (D, K) the conv weight viewed (D, C*p*p), any float dtype, strides (s_wd, s_wk)
    bias_ptr,  # (D,) any float dtype, stride s_b
    pos_ptr,  # (1, 1 + L, D) any float dtype, strides (s_pl, s_pd) over its last two dims
    ids_ptr,  # (N, keep) int64, strides (s_idn, s_idk)
    out_ptr,  # (M = N * keep, D) contiguous, out_dtype
    M, keep, grid_w, L, D,
    s_in, s_ic, s_ih, s_iw,
    s_wd, s_wk, s_b, s_pl, s_pd, s_idn, s_idk,
    K: tl.constexpr,  # C * P * P
    P: tl.constexpr,
    COMPUTE: tl.constexpr,  # matmul operands: 0 fp32 ("ieee"), 1 fp16, 2 bf16 (autocast)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # A 1-D grid, the output column tiles of a row tile adjacent in launch order: they all
    # gather that tile's patches from the image, the first from memory and the rest from L2 (a
    # (row tiles, column tiles) grid ran them a whole column of row tiles apart, about 38 MB of
    # other patches at ViT-B/16 batch 256 in fp32 -- our arithmetic -- against a 50 MB L2).
    n_col_tiles = tl.cdiv(D, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = (pid // n_col_tiles).to(tl.int64)
    pid_n = (pid % n_col_tiles).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = m < M
    col_ok = d < D
    l, base, ok = _patch_rows(ids_ptr, m, row_ok, keep, grid_w, L, s_idn, s_idk, s_in, s_ih,
                              s_iw, P)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(imgs_ptr + base[:, None] + _patch_cols(kk, s_ic, s_ih, s_iw, P)[None, :],
                    mask=ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + kk[:, None] * s_wk + d[None, :] * s_wd,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot_in(a, b, acc, COMPUTE)

    bias = tl.load(bias_ptr + d * s_b, mask=col_ok, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + (1 + l)[:, None] * s_pl + d[None, :] * s_pd,
                  mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    acc = acc + bias[None, :] + pos
    acc = tl.where(ok[:, None], acc, float("nan"))  # an id outside [0, L): a NaN row
    tl.store(out_ptr + m[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


_COMPUTE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _patch_bytes(a, ptr):
    """Bytes of the M visible patches (K pixels each) a launch reads or writes of an image."""
    return a["M"] * a["K"] * a[ptr].element_size()


# The work each launch must do (_common.launch_work): an (M x K) by (K x D) product, 2 M D K
# FLOPs, on the M = N * keep visible patches -- the images are read (or their gradient written)
# at those patches only. A ZERO launch of the images' gradient writes the removed patches' zeros
# and reads nothing.
LAUNCH_WORK = {
    "_patch_embed_fwd": lambda a: {"flops": 2 * a["M"] * a["D"] * a["K"],
                                   "bytes": {"imgs_ptr": _patch_bytes(a, "imgs_ptr")}},
    "_patch_embed_bwd_weight": lambda a: {"flops": 2 * a["M"] * a["D"] * a["K"],
                                          "bytes": {"imgs_ptr": _patch_bytes(a, "imgs_ptr")}},
    "_patch_embed_bwd_imgs": lambda a: (
        {"bytes": {"dx_ptr": _patch_bytes(a, "dx_ptr"), "g_ptr": 0, "w_ptr": 0}} if a["ZERO"] else
        {"flops": 2 * a["M"] * a["D"] * a["K"], "bytes": {"dx_ptr": _patch_bytes(a, "dx_ptr")}}),
}


def patch_embed_visible_fwd(imgs, weight, bias, pos_embed, ids_keep, out_dtype, compute_dtype=None):
    """(N, C, H, W), (D, C, p, p), (D,), (1, 1 + L, D), (N, keep) int64 -> (N, keep, D) contiguous
    in out_dtype. The matmul's operands are cast to compute_dtype (default: out_dtype) when it is
    fp16 / bf16, else fp32. Under autocast the model asks for bf16 operands and an fp32 result,
    as the official fp32 position add promotes the bf16 convolution output. An id outside
    [0, L) gives a NaN row."""
    if compute_dtype is None:
        compute_dtype = out_dtype
    N, C, H, W = imgs.shape
    D, _, p, _ = weight.shape
    keep = ids_keep.shape[1]
    K = C * p * p
    grid_w = W // p
    M = N * keep
    out = _empty((N, keep, D), out_dtype, imgs.device)
    if M == 0 or D == 0:
        return out
    w2 = weight.reshape(D, K)  # a view for the (contiguous) conv weight
    pos = pos_embed.reshape(pos_embed.shape[-2], D)
    grid = lambda META: (cdiv(M, META["BLOCK_M"]) * cdiv(D, META["BLOCK_N"]),)
    launch_tuned(_patch_embed_fwd, grid, (K, D),
                 imgs, w2, bias, pos, ids_keep, out,
                 M, keep, grid_w, (H // p) * grid_w, D,
                 *imgs.stride(), *w2.stride(), bias.stride(0), *pos.stride(), *ids_keep.stride(),
                 K=K, P=p, COMPUTE=_COMPUTE_CODES.get(compute_dtype, 0))
    return out


# ----------------------------------------------------------------------------- backward
#
# With G = grad_out viewed (M, D), A = the visible patches (M, K) gathered from the image
# (row m = n * keep + k is patch l = ids_keep[n, k], columns in the weight's (c, i, j) order) and
# Wm = weight viewed (D, K), the forward is out = A @ Wm^T + bias + pos_embed[0, 1 + l], so
#
#   grad_bias   = sum_m G[m, :]                                  (torch sum: deterministic)
#   grad_weight = G^T @ A                      (D, K), viewed back as (D, C, p, p)
#   grad_A      = G @ Wm                       (M, K), scattered back into the image:
#   grad_imgs[n, c, gh*p + i, gw*p + j] = grad_A[n * keep + k, (c*p + i)*p + j]  for l = ids_keep[n, k]
#
# and 0 for the pixels of removed patches and for any pixel outside the (H//p) x (W//p) grid
# (the conv never reads them). pos_embed's gradient (a scatter of G into rows 1 + l) is not
# asked of this launcher. grad_weight reduces over M: split-M programs each write an fp32
# partial (SPLIT, D, K), summed by torch (deterministic, no atomics).

def _bwd_w_configs():
    if interpreting():
        return [triton.Config({"BLOCK_D": 16, "BLOCK_K": 32, "BLOCK_M": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 128, "BLOCK_M": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 128, "BLOCK_M": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 64, "BLOCK_M": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_D": 64, "BLOCK_K": 128, "BLOCK_M": 64}, num_warps=4, num_stages=4),
    ]


@triton.autotune(configs=_bwd_w_configs(), key=["K", "D"])
@triton.jit
def _patch_embed_bwd_weight(
    g_ptr,  # (M, D) grad_out viewed (N*keep, D), any float dtype, strides (s_gm, s_gd)
    imgs_ptr,  # (N, C, H, W) any float dtype, strides (s_in, s_ic, s_ih, s_iw)
    ids_ptr,  # (N, keep) int64, strides (s_idn, s_idk)
    part_ptr,  # (SPLIT, D, K) fp32 contiguous: per-split partials of grad_weight
    M, keep, grid_w, L, D, rows_per_split,
    s_gm, s_gd, s_in, s_ic, s_ih, s_iw, s_idn, s_idk,
    K: tl.constexpr, P: tl.constexpr,
    COMPUTE: tl.constexpr,  # matmul operands: 0 fp32 ("ieee"), 1 fp16, 2 bf16
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_d = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_ok = d < D
    k_ok = kk < K
    cols = _patch_cols(kk, s_ic, s_ih, s_iw, P)
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)

    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, rows_per_split, BLOCK_M):
        m = m_start + m0 + tl.arange(0, BLOCK_M)
        row_ok = m < m_end
        _, base, ok = _patch_rows(ids_ptr, m, row_ok, keep, grid_w, L, s_idn, s_idk, s_in, s_ih,
                                  s_iw, P)
        gt = tl.load(g_ptr + m[None, :] * s_gm + d[:, None] * s_gd,
                     mask=d_ok[:, None] & row_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_M) = G^T
        a = tl.load(imgs_ptr + base[:, None] + cols[None, :],
                    mask=ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        acc = _dot_in(gt, a, acc, COMPUTE)

    tl.store(part_ptr + split * D * K + d[:, None] * K + kk[None, :], acc,
             mask=d_ok[:, None] & k_ok[None, :])


def _bwd_x_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_D": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64, "BLOCK_D": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_bwd_x_configs(), key=["K", "D", "ZERO"])
@triton.jit
def _patch_embed_bwd_imgs(
    g_ptr,  # (N*keep, D) grad_out, any float dtype, strides (s_gm, s_gd); unread when ZERO
    w_ptr,  # (D, K) the conv weight viewed (D, C*p*p), strides (s_wd, s_wk); unread when ZERO
    ids_ptr,  # (N, R) int64, strides (s_idn, s_idk): the patches this launch writes
    dx_ptr,  # (N, C, H, W) grad_imgs, imgs' dtype, strides (s_in, s_ic, s_ih, s_iw)
    M, R, grid_w, L, D,
    s_gm, s_gd, s_wd, s_wk, s_idn, s_idk, s_in, s_ic, s_ih, s_iw,
    K: tl.constexpr, P: tl.constexpr,
    ZERO: tl.constexpr,  # True: the ids are the removed patches, write zeros
    COMPUTE: tl.constexpr,  # matmul operands: 0 fp32 ("ieee"), 1 fp16, 2 bf16
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # m = n * R + r; with R = keep, grad_out's row
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = m < M
    k_ok = kk < K
    # an id outside [0, L) writes nothing (its gradient has no pixel to go to)
    _, base, ok = _patch_rows(ids_ptr, m, row_ok, R, grid_w, L, s_idn, s_idk, s_in, s_ih, s_iw,
                              P)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if not ZERO:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            g = tl.load(g_ptr + m[:, None] * s_gm + d[None, :] * s_gd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_ptr + d[:, None] * s_wd + kk[None, :] * s_wk,
                        mask=d_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot_in(g, w, acc, COMPUTE)

    tl.store(dx_ptr + base[:, None] + _patch_cols(kk, s_ic, s_ih, s_iw, P)[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=ok[:, None] & k_ok[None, :])


# The other way to grad_weight (fastmae.ops picks the faster on a GPU): the visible patches
# gathered into a contiguous (M, K) matrix in the compute dtype, for cuBLAS's G^T @ A. One read
# of the kept pixels and one write of A, against _patch_embed_bwd_weight's tiles that each
# gather their own operands.

@triton.jit
def _gather_patches(
    imgs_ptr,  # (N, C, H, W) any float dtype, strides (s_in, s_ic, s_ih, s_iw)
    ids_ptr,  # (N, keep) int64, strides (s_idn, s_idk)
    out_ptr,  # (M = N * keep, K) contiguous, any float dtype: row m = n * keep + k
    M, keep, grid_w, L,
    s_in, s_ic, s_ih, s_iw, s_idn, s_idk,
    K: tl.constexpr, P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = m < M
    k_ok = kk < K
    _, base, ok = _patch_rows(ids_ptr, m, row_ok, keep, grid_w, L, s_idn, s_idk, s_in, s_ih,
                              s_iw, P)
    # an id outside [0, L): a row of zeros, left out of G^T @ A as the fused kernel leaves it
    a = tl.load(imgs_ptr + base[:, None] + _patch_cols(kk, s_ic, s_ih, s_iw, P)[None, :],
                mask=ok[:, None] & k_ok[None, :], other=0.0)
    tl.store(out_ptr + m[:, None] * K + kk[None, :], a.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


LAUNCH_WORK["_gather_patches"] = lambda a: {
    "bytes": {"imgs_ptr": _patch_bytes(a, "imgs_ptr"), "out_ptr": _patch_bytes(a, "out_ptr")}}


def gather_visible_patches(imgs, ids_keep, p, dtype):
    """(N, C, H, W), (N, keep) int64 -> the kept patches (N * keep, C * p * p) contiguous in
    dtype, row n * keep + k patch ids_keep[n, k], columns in the conv weight's (c, i, j) order
    (zeros for an id outside [0, L))."""
    N, C, H, W = imgs.shape
    keep = ids_keep.shape[1]
    K = C * p * p
    M = N * keep
    out = _empty((M, K), dtype, imgs.device)
    if M == 0 or K == 0:
        return out
    block_m, block_k = (16, 32) if interpreting() else (32, min(256, next_pow2(K)))
    launch(_gather_patches, (cdiv(M, block_m), cdiv(K, block_k)),
           imgs, ids_keep, out, M, keep, W // p, (H // p) * (W // p),
           *imgs.stride(), *ids_keep.stride(),
           K=K, P=p, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return out


def _split_count(M, D, K):
    """Split the M reduction of grad_weight so that about 256 programs run (nominal 128x128
    tiles), each over at least 256 rows; small under the interpreter (but > 1, to be tested)."""
    if interpreting():
        return max(1, min(3, cdiv(M, 16)))
    tiles = cdiv(D, 128) * cdiv(K, 128)
    return max(1, min(cdiv(256, tiles), cdiv(M, 256)))


def patch_embed_visible_bwd(grad_out, imgs, weight, ids_keep, need_imgs_grad,
                            need_weight_grad=True, compute_dtype=None):
    """-> grad_weight (D, C, p, p) fp32 (None when not need_weight_grad), grad_bias (D,) fp32,
    grad_imgs (N, C, H, W) contiguous in imgs.dtype (None when not need_imgs_grad). The matmuls'
    operands are cast to compute_dtype (default: grad_out's dtype) when it is fp16 / bf16 (as
    autocast's convolution backward reads them), else fp32 "ieee"; accumulation in fp32; the
    bias gradient sums grad_out as it comes."""
    N, C, H, W = imgs.shape
    D, _, p, _ = weight.shape
    keep = ids_keep.shape[1]
    K = C * p * p
    L_h, grid_w = H // p, W // p
    L = L_h * grid_w
    M = N * keep
    device = imgs.device
    compute = _COMPUTE_CODES.get(grad_out.dtype if compute_dtype is None else compute_dtype, 0)
    g = grad_out.reshape(M, D)  # a view whenever grad_out's rows are uniformly strided
    w2 = weight.reshape(D, K)

    grad_bias = g.sum(dim=0, dtype=torch.float32)

    if not need_weight_grad:
        grad_weight = None
    elif M == 0:
        grad_weight = torch.zeros((D, C, p, p), dtype=torch.float32, device=device)
    else:
        split = _split_count(M, D, K)
        rows_per_split = cdiv(M, split)
        split = cdiv(M, rows_per_split)  # no empty split
        partials = _empty((split, D, K), torch.float32, device)
        grid = lambda META: (cdiv(D, META["BLOCK_D"]), cdiv(K, META["BLOCK_K"]), split)
        launch_tuned(_patch_embed_bwd_weight, grid, (K, D),
                     g, imgs, ids_keep, partials,
                     M, keep, grid_w, L, D, rows_per_split,
                     *g.stride(), *imgs.stride(), *ids_keep.stride(),
                     K=K, P=p, COMPUTE=compute)
        grad_weight = (partials[0] if split == 1 else partials.sum(dim=0)).reshape(D, C, p, p)

    grad_imgs = None
    if need_imgs_grad:
        grad_imgs = _empty((N, C, H, W), imgs.dtype, device)
        # pixels outside the patch grid (H % p, W % p): zero, each written once
        if H > L_h * p:
            grad_imgs[:, :, L_h * p:, :].zero_()
        if W > grid_w * p:
            grad_imgs[:, :, : L_h * p, grid_w * p:].zero_()
        launches = [(ids_keep, False)]
        if keep < L:
            # the removed patches, in increasing order: no host sync. An id outside [0, L) is
            # scattered into a spare column (on a GPU scatter_ would stop the process with a
            # device-side assert): its output row is NaN already
            removed = torch.ones((N, L + 1), dtype=torch.int32, device=device)
            valid = (ids_keep >= 0) & (ids_keep < L)
            removed.scatter_(1, torch.where(valid, ids_keep, L), 0)
            ids_removed = torch.argsort(removed[:, :L], dim=1, stable=True)[:, keep:]
            launches.append((ids_removed, True))
        for ids, zero in launches:
            R = ids.shape[1]
            rows = N * R
            if rows == 0:
                continue
            grid = lambda META: (cdiv(rows, META["BLOCK_M"]), cdiv(K, META["BLOCK_K"]))
            launch_tuned(_patch_embed_bwd_imgs, grid, (K, D, zero),
                         g, w2, ids, grad_imgs,
                         rows, R, grid_w, L, D,
                         *g.stride(), *w2.stride(), *ids.stride(), *grad_imgs.stride(),
                         K=K, P=p, ZERO=zero, COMPUTE=compute)
    return grad_weight, grad_bias, grad_imgs
