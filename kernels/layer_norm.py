"""LayerNorm over the last dimension, optionally fused with the residual add of a pre-norm block.

Forward: y = (s - mean) * rstd * weight + bias with s = x, or s = residual + x (+ branch_bias,
the bias of the matmul that produced x, left out of it so that its gradient comes from this
kernel's backward) computed in fp32 and stored once in the residual dtype, when a residual is
given. Statistics in fp32 over D, biased
variance as nn.LayerNorm. One pass: a program reads its rows of x (and residual) once and
writes s and y once; mean and rstd (M,) fp32 are saved for the backward.

Backward: x_hat is recomputed from the saved input and statistics; dweight/dbias come from
per-program partial sums over a fixed block of rows and a deterministic second reduction.
"""

import torch
import triton
import triton.language as tl

from ._common import cdiv, empty, interpreting, launch, next_pow2, sm_count


@triton.jit
def _layer_norm_fwd(
    X,  # (M, D) x dtype, row stride stride_x, unit column stride
    R,  # (M, D) residual dtype, row stride stride_r (unused when not HAS_RESIDUAL)
    S,  # (M, D) residual_dtype out, s = residual + x, row stride stride_s (unused likewise)
    Y,  # (M, D) out_dtype out, row stride stride_y
    W,  # (D,) weight, any float dtype
    B,  # (D,) bias, any float dtype
    BB,  # (D,) branch bias, any float dtype, added to x (unused when not HAS_BRANCH_BIAS)
    Mean,  # (M,) fp32 out
    Rstd,  # (M,) fp32 out
    M, D,
    stride_x, stride_r, stride_s, stride_y,
    eps,
    BLOCK_D: tl.constexpr,  # next_pow2(D)
    ROWS: tl.constexpr,  # rows per program
    HAS_RESIDUAL: tl.constexpr,
    HAS_BRANCH_BIAS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH_BIAS:
        x = x + tl.load(BB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        # normalize what was stored (the backward recomputes x_hat from it)
        x = s.to(tl.float32)

    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Backward of y = x_hat * w + b, x_hat = (x - mean) * rstd, per row over D columns:
#   wdy = w * dy
#   dx  = rstd * (wdy - mean_D(wdy) - x_hat * mean_D(wdy * x_hat))  [+ ds, the residual path]
#   dw  = sum_rows(dy * x_hat),   db = sum_rows(dy),   dbranch_bias = sum_rows(dx)
# Program p owns the fixed block of rows [p * T * ROWS, (p + 1) * T * ROWS), T = tiles_per_program,
# and walks it in T tiles of ROWS rows; its column sums of dw, db (and dbranch_bias) go to row p
# of the (num_programs, D) partial buffers, summed by the host afterwards (deterministic, no
# atomics).
@triton.jit
def _add_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _layer_norm_bwd(
    DY,  # (M, D) any float dtype, strides (stride_dy_m, stride_dy_d); may be 0 (expanded)
    X,  # (M, D) the LayerNorm's input (x, or s when fused), row stride stride_x, unit col stride
    W,  # (D,) weight, any float dtype
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    DS,  # (M, D) any float dtype, strides (stride_ds_m, stride_ds_d) (unused when not HAS_DS)
    DX,  # (M, D) dx_dtype out, contiguous
    DX2,  # (M, D) out, contiguous: dx again in a second dtype (unused when not HAS_DX2)
    PART,  # (2 or 3, num_programs, D) fp32 out, contiguous: dweight, dbias (, dbranch_bias)
    M, D, tiles_per_program,  # row tiles of ROWS rows per program
    stride_dy_m, stride_dy_d, stride_x, stride_ds_m, stride_ds_d, stride_dx,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_DS: tl.constexpr,
    HAS_DX2: tl.constexpr,
    HAS_DBB: tl.constexpr,
    STAGES: tl.constexpr,  # tiles in flight: the loop's loads are prefetched (cp.async) if > 1
):
    pid = tl.program_id(0).to(tl.int64)
    row_begin = pid * tiles_per_program * ROWS
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbb_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    inv_d = 1.0 / D  # one fp32 division (a ~8-instruction sequence on sm_90), not two a row
    for t in tl.range(0, tiles_per_program, num_stages=STAGES):
        rows = row_begin + t * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy_m + cols[None, :] * stride_dy_d,
                     mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1, c2 = tl.reduce((x_hat * wdy, wdy), 1, _add_pair)
        c1 = c1 * inv_d
        c2 = c2 * inv_d
        dx = (wdy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            ds = tl.load(DS + rows[:, None] * stride_ds_m + cols[None, :] * stride_ds_d,
                         mask=mask, other=0.0)
            dx += ds.to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        if HAS_DX2:
            tl.store(DX2 + rows[:, None] * stride_dx + cols[None, :], dx.to(DX2.dtype.element_ty),
                     mask=mask)
        dw_acc += tl.sum(dy * x_hat, axis=0)
        db_acc += tl.sum(dy, axis=0)
        if HAS_DBB:  # rows past M are 0 (dy, ds and rstd loaded as 0); columns past D unstored
            dbb_acc += tl.sum(dx, axis=0)
    part = PART + pid * D + cols  # row pid of section 0; a section is num_programs * D apart
    section = tl.num_programs(0).to(tl.int64) * D
    tl.store(part, dw_acc, mask=col_ok)
    tl.store(part + section, db_acc, mask=col_ok)
    if HAS_DBB:
        tl.store(part + 2 * section, dbb_acc, mask=col_ok)


# ----------------------------------------------------------------------------- launchers

_empty = empty  # every output is allocated here (tests patch it to poison them)


# The backward spreads the rows over one wave of programs, each owning a fixed block of rows (its
# partial sums are a fixed function of the shape and device, hence deterministic): one wave only
# if the programs it counts on fit on an SM at once, their warps sharing its 65536 registers
# (sm_80, sm_90). tests/test_gpu_compile.py compiles every launch for sm_90 and checks its
# registers and shared memory against bwd_warps_per_sm.
#
# Its tiles put a program's warps side by side along the row (bwd_config): then the column sums
# (dweight, dbias, dbranch_bias) add up within each thread, and only the two row sums of a tile
# cross warps, in one exchange (a paired tl.reduce). With the forward's 4-warp tiles of 4 rows x
# 512 at D=512, Triton 3.6 split the warps 2 x 2 and each tile took 19 barriers (shared-memory
# exchanges of all five sums and of dx); with 2 rows x 512 at 2 warps it takes 7, as the 4-warp
# tiles of 2 x 1024 (D=768) do.
#
# BWD_STAGES tiles in flight: the loop is software-pipelined (tl.range num_stages), so each
# program's loads of the next tile (cp.async into shared memory) are issued before it computes
# the current one; a plain loop waits for every tile's loads (Triton pipelines only loops that
# ask).
BWD_STAGES = 2


def bwd_stages(block_d):
    """Tiles in flight in the backward's loop: 3 for 1024-column tiles (D = 768, 1024), else
    BWD_STAGES. On the H200 (benches/results/h200-2026-12-04/sweep_bwd.txt, bf16 autocast, the
    fused residual-add backward) 3 stages at 8 warps per SM took D=768 from 60.5 to 53.8 us
    (1.12x); at D=512, 3 stages at 12 warps per SM were 0.94x, so narrower tiles keep 2."""
    return 3 if block_d == 1024 else BWD_STAGES


def fwd_config(block_d):
    """(rows per program, num_warps) of the forward on a GPU: ~2048 elements a tile, 16 a thread
    at 4 warps."""
    warps = 4 if block_d <= 1024 else (8 if block_d <= 8192 else 16)
    return max(1, min(2048 // block_d, 128)), warps


def bwd_config(block_d):
    """(rows per tile, num_warps) of the backward on a GPU: block_d / 256 warps (up to 16), so
    that 32 threads a warp with 8-wide (16-byte bf16) vectors lay the warps side by side along
    a row; 16 elements a thread up to 1024 columns, 8 above (16 at 2048 took up to 166
    registers with Triton 3.9, over the 128 of 8-warp programs). At 512 columns one warp holds
    a whole row (its two row sums then cross no warp): on the H200, rows of 1 x 512 at 1 warp
    and 8 warps per SM took the decoder's fused backward (M=50432) from 131.3 / 132.3 to
    119.8 / 118.6 us in two runs (benches/results/h200-2026-12-04*/sweep_bwd.txt), 1.10x and
    1.12x against 2 x 512 at 2 warps; inside the training step (where each launch took ~105 us)
    the 17 decoder launches measured 1.79 ms before and 1.78 ms after (6c02ddb run)."""
    warps = 1 if block_d == 512 else min(max(block_d // 256, 1), 16)
    per_thread = 16 if block_d <= 1024 else 8
    return max(1, per_thread * 32 * warps // block_d), warps


def bwd_warps_per_sm(block_d):
    """Warps of the backward's one-wave grid per SM on a GPU: programs of up to 4 warps fill 12
    (168 registers a thread), larger ones 16 (128 registers a thread); 1024-column tiles 8, with
    their 3 stages (bwd_stages), and 512-column one-warp tiles 8 (bwd_config): measured so."""
    if block_d in (512, 1024):
        return 8
    return 12 if bwd_config(block_d)[1] <= 4 else 16


ONE_WAVE_WARPS_PER_SM = {"_layer_norm_bwd": lambda constexprs: bwd_warps_per_sm(
    constexprs["BLOCK_D"])}  # kernel -> its grid's warps per SM, for the check above


def _launch_config(block_d):
    """(rows per tile, num_warps) of the forward; under the interpreter (both kernels) ~256-element
    tiles at one warp, so that the small test shapes use several programs, several tiles per
    program and row tails."""
    if interpreting():
        return max(1, min(256 // block_d, 128)), 1
    return fwd_config(block_d)


def _bwd_launch_config(block_d):
    """(rows per tile, num_warps) of the backward."""
    if interpreting():
        return _launch_config(block_d)
    return bwd_config(block_d)


def _bwd_num_programs(M, rows, num_warps, block_d, device):
    """How many programs the backward spreads the rows over: one wave (bwd_warps_per_sm) on a
    GPU, which keeps the (programs, D) partials small (~2% of the bytes moved at M=12800, D=768);
    at most 4 under the interpreter."""
    tiles = cdiv(M, rows)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = sm_count(index) * max(1, bwd_warps_per_sm(block_d) // num_warps)
    else:
        target = 4
    return max(1, min(tiles, target))


def layer_norm_fwd(x, weight, bias, eps: float, out_dtype: torch.dtype, residual=None,
                   residual_dtype=None, branch_bias=None, out_shape=None):
    """LayerNorm of x (M, D), or of s = residual + x (+ branch_bias (D,)) when a residual (M, D)
    is given.

    Returns (y out_dtype contiguous, s residual_dtype contiguous or None, mean (M,) fp32,
    rstd (M,) fp32); y and s are shaped out_shape (default (M, D); its last dim D).
    residual_dtype defaults to promote_types(x, residual)."""
    assert branch_bias is None or residual is not None, "branch_bias goes with a residual"
    assert x.dim() == 2 and x.stride(1) == 1, "x must be (M, D) with unit column stride"
    M, D = x.shape
    device = x.device
    shape = (M, D) if out_shape is None else out_shape
    y_out = _empty(shape, out_dtype, device)
    mean = _empty((M,), torch.float32, device)
    rstd = _empty((M,), torch.float32, device)
    s_out = None
    if residual is not None:
        assert residual.shape == x.shape
        if residual.stride(1) != 1:
            residual = residual.contiguous()  # no copy in the common (contiguous) case
        if residual_dtype is None:
            residual_dtype = torch.promote_types(x.dtype, residual.dtype)
        s_out = _empty(shape, residual_dtype, device)
    if M == 0:
        return y_out, s_out, mean, rstd
    y = y_out.view(M, D)
    s = None if s_out is None else s_out.view(M, D)
    block_d = next_pow2(D)
    rows, warps = _launch_config(block_d)
    has_res = residual is not None
    r_arg, s_arg = (residual, s) if has_res else (x, y)  # placeholders, never touched
    has_bb = branch_bias is not None
    launch(_layer_norm_fwd, (cdiv(M, rows),),
           x, r_arg, s_arg, y, weight, bias, branch_bias if has_bb else bias, mean, rstd,
           M, D,
           x.stride(0), r_arg.stride(0), s_arg.stride(0), y.stride(0),
           float(eps),
           BLOCK_D=block_d, ROWS=rows, HAS_RESIDUAL=has_res, HAS_BRANCH_BIAS=has_bb,
           num_warps=warps)
    return y_out, s_out, mean, rstd


def layer_norm_bwd(dy, s_or_x, weight, mean, rstd, ds=None, dx_dtype=None, dx2_dtype=None,
                   branch_bias_grad=False, reduce=True):
    """Backward of layer_norm_fwd.

    dy (M, D) any strides (expanded is fine); s_or_x (M, D) the LayerNorm's input; ds (M, D) or
    None, the gradient reaching s from the residual path, added to dx. Returns (dx (M, D)
    dx_dtype (default: s_or_x's dtype) contiguous, dwb (2, D) fp32: the weight gradient in row 0
    and the bias gradient in row 1, one reduction for both; with branch_bias_grad, (3, D) with
    the column sums of dx, the branch bias's gradient, in row 2); in the fused case dx is the
    gradient of both x and residual. With dx2_dtype, dx is also written in that dtype in the
    same pass and returned third (the fused block's branch gradient in bf16 beside the fp32
    residual-stream gradient, without a cast pass). With reduce=False, dwb's per-program partial
    sums instead, (2 or 3, programs, D) fp32, for partial_sums.sum_partials to reduce with
    others in one launch."""
    M, D = s_or_x.shape
    if s_or_x.stride(1) != 1:
        s_or_x = s_or_x.contiguous()  # no copy in the common case (the saved s / x)
    device = s_or_x.device
    dx = _empty((M, D), dx_dtype if dx_dtype is not None else s_or_x.dtype, device)
    n_part = 3 if branch_bias_grad else 2
    if M == 0:
        zeros = (torch.zeros((n_part, D), dtype=torch.float32, device=device) if reduce
                 else _empty((n_part, 0, D), torch.float32, device))
        if dx2_dtype is not None:
            return dx, zeros, _empty((M, D), dx2_dtype, device)
        return dx, zeros
    block_d = next_pow2(D)
    rows, warps = _bwd_launch_config(block_d)
    programs = _bwd_num_programs(M, rows, warps, block_d, device)
    rows_per_program = cdiv(cdiv(M, programs), rows) * rows
    programs = cdiv(M, rows_per_program)
    # weight, bias (and branch bias) partials in one buffer: one reduction launch for all
    partials = _empty((n_part, programs, D), torch.float32, device)
    has_ds = ds is not None
    ds_arg = ds if has_ds else dy  # placeholder, never touched
    dx2 = _empty((M, D), dx2_dtype, device) if dx2_dtype is not None else None
    launch(_layer_norm_bwd, (programs,),
           dy, s_or_x, weight, mean, rstd, ds_arg, dx, dx if dx2 is None else dx2, partials,
           M, D, rows_per_program // rows,
           dy.stride(0), dy.stride(1), s_or_x.stride(0), ds_arg.stride(0), ds_arg.stride(1),
           dx.stride(0),
           BLOCK_D=block_d, ROWS=rows, HAS_DS=has_ds, HAS_DX2=dx2 is not None,
           HAS_DBB=branch_bias_grad, STAGES=bwd_stages(block_d), num_warps=warps)
    # second, deterministic reduction over the per-program partial sums
    dwb = partials.sum(1) if reduce else partials
    if dx2 is not None:
        return dx, dwb, dx2
    return dx, dwb
