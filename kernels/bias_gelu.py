"""Fused bias add + exact (erf) GELU, the activation of the MAE Mlp: y = gelu(x + bias), where x
is the fc1 matmul output without its bias. Computed in fp32 whatever the storage dtype.

The backward recomputes z = x + bias and produces dx and, in the same pass, dbias as
per-program partial column sums of dx plus a deterministic second reduction.

Both passes evaluate the normal CDF Phi(z) = (1 + erf(z / sqrt 2)) / 2 in erfc's scaled form
(`_normal_cdf`): one polynomial in a reciprocal, and an exp (which the backward's density needs
anyway). Compiled for sm_90 (Triton 3.6; tests/_kernel_capture.py bias_gelu --verbose):
libdevice's erff, which tl.erf calls, picks each of its polynomial's coefficients per value
between two sets (two register moves a term), and tl.exp and an fp32 division carry range
fix-ups; `_normal_cdf` takes its exp and reciprocal from exp2 and rsqrt, one MUFU instruction
each. The forward went from 648 instructions a program (erff, 16 values a thread) to 472, the
backward's loop from 831 an iteration (erff and a second exp) to 691 (the polynomial) to 546.
At ~40 instructions a value (erff) against 4 bytes moved, an H200 issues the forward's
instructions more slowly than it moves its bytes (our arithmetic from its issue rate and copy
bandwidth, not a measurement).
"""

import torch
import triton
import triton.language as tl

from ._common import cdiv, empty, interpreting, launch, next_pow2, sm_count


# Phi(z) for z <= 0 is erfc(x) / 2 with x = |z| / sqrt 2, and erfc(x) = exp(-x^2) R(x), where
# R = erfcx is smooth and slowly varying on [0, inf): R(0) = 1, R(x) ~ 1 / (x sqrt pi). R is a
# degree-8 polynomial in u = 2.889 t - 1.889, t = 1 / (1 + x / 2) in [1 / 3.25, 1] (x clamped to
# 4.5, past which erfc(x) < 3e-10), fitted in float64 by Chebyshev least squares to erfc(x)
# exp(x^2) (fit error 2e-8; evaluated in fp32, 3e-7); its coefficients here are halved (exactly),
# so that it gives erfc / 2 = Phi(-|z|) directly. Phi(z) for z > 0 is 1 - Phi(-z).
# tests/test_kernel_bias_gelu.py checks the kernels on dense grids of [-12, 12] (on the device the
# tests run on: exact exp2 and rsqrt under the interpreter, the MUFU approximations on a GPU): the
# GELU derivative within 5e-7, the forward within 1e-5 of each value down to z = -6, past which
# the clamp at x = 4.5 leaves only an absolute accuracy (1e-9). (1 + erf) / 2 in fp32 fails that
# test: 1 + erf cancels for negative z.
@triton.jit
def _normal_cdf(z):
    """(Phi(z), exp(-z^2 / 2)) in fp32 for fp32 z."""
    # exp2 and rsqrt compile to one MUFU instruction each (ex2 / rsqrt .approx.ftz); tl.exp and
    # a division add range fix-ups on sm_90 (predicated rescaling) that these arguments do not
    # need: a subnormal exp(-z^2 / 2), flushed to 0, only scales terms below 1e-37, and
    # d = 1 + x / 2 is in [1, 3.25], so 1 / d = rsqrt(d^2)
    e = tl.math.exp2(z * z * -0.7213475204444817)  # exp(-z^2 / 2)
    x = tl.minimum(tl.abs(z) * 0.7071067811865476, 4.5)
    d = 1.0 + 0.5 * x
    u = 2.8888888359069824 * tl.math.rsqrt(d * d) - 1.8888888359069824
    r = -5.077882633486297e-06
    r = r * u + 2.31639678531792e-05
    r = r * u + 5.54093458049465e-05
    r = r * u - 0.000532431120518595
    r = r * u - 0.000833387894090265
    r = r * u + 0.012734530493617058
    r = r * u + 0.07538887858390808
    r = r * u + 0.2071535438299179
    r = r * u + 0.20601537823677063
    half_erfc = e * r
    return tl.where(z > 0.0, 1.0 - half_erfc, half_erfc), e


@triton.jit
def _bias_gelu_fwd(
    X,  # (M, D) any float dtype, row stride stride_x, unit column stride
    BIAS,  # (D,) any float dtype
    Y,  # (M, D) out_dtype out, contiguous
    M, D,
    stride_x, stride_y,
    ROWS: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    mask = (rows < M)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0)
    z = x.to(tl.float32) + b.to(tl.float32)[None, :]
    cdf, _ = _normal_cdf(z)
    y = z * cdf
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Backward of y = z * Phi(z), z = x + bias (Phi the normal CDF, phi its density):
#   dx    = dy * (Phi(z) + z * phi(z)),  Phi(z) = (1 + erf(z / sqrt 2)) / 2 (_normal_cdf),
#                                        phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
#   dbias = sum_rows(dx)
# Program (p, n) owns rows [p * T * ROWS, (p + 1) * T * ROWS), T = tiles_per_program, of
# column block n, walks them in T tiles of ROWS rows, and writes its fp32 column sums of dx
# (before the cast to dx_dtype) to row p of the (num_row_programs, D) partial buffer.
@triton.jit
def _bias_gelu_bwd(
    DY,  # (M, D) any float dtype, strides (stride_dy_m, stride_dy_d); may be 0 (expanded)
    X,  # (M, D) any float dtype, row stride stride_x, unit column stride
    BIAS,  # (D,) any float dtype
    DX,  # (M, D) dx_dtype out, contiguous
    DB_PART,  # (num_row_programs, D) fp32 out, contiguous
    M, D, tiles_per_program,  # row tiles of ROWS rows per program
    stride_dy_m, stride_dy_d, stride_x, stride_dx,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,  # tiles in flight: the loop's loads are prefetched (cp.async) if > 1
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    row_begin = pid_m * tiles_per_program * ROWS
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in tl.range(0, tiles_per_program, num_stages=STAGES):
        rows = row_begin + t * ROWS + tl.arange(0, ROWS)
        mask = (rows < M)[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy_m + cols[None, :] * stride_dy_d,
                     mask=mask, other=0.0)
        z = x.to(tl.float32) + b[None, :]
        cdf, e = _normal_cdf(z)
        dx = dy.to(tl.float32) * (cdf + z * (e * 0.3989422804014327))  # pdf: e / sqrt(2 pi)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        db_acc += tl.sum(dx, axis=0)  # masked elements are 0: dy was loaded as 0 there
    tl.store(DB_PART + pid_m * D + cols, db_acc, mask=col_ok)


# ----------------------------------------------------------------------------- launchers

_empty = empty  # every output is allocated here (tests patch it to poison them)


# The backward's grid is one wave of BWD_WARPS_PER_SM warps per SM (see kernels/layer_norm.py):
# 255 registers a thread at most at 8, checked for sm_90 by tests/test_gpu_compile.py; its loop
# prefetches BWD_STAGES - 1 tiles ahead (_bwd_tile: 4 x 1024 tiles, 32 KiB of shared memory a
# program at 3 in bf16). On the H200 (benches/results/h200-2026-12-04/sweep_bwd.txt, bf16) that
# configuration took the decoder's D=2048 from 199.4 to 165.3 us (1.21x) and the encoder's
# D=3072 from 83.1 to 78.0 us (1.06x) against the earlier 2 x 1024 tiles, 2 stages and 16 warps
# per SM.
BWD_WARPS_PER_SM = 8
BWD_STAGES = 3
ONE_WAVE_WARPS_PER_SM = {"_bias_gelu_bwd": lambda constexprs: BWD_WARPS_PER_SM}


def _tile(D):
    """(ROWS, BLOCK_N, num_warps). GPU: column blocks of up to 1024 (3072 = 3 x 1024, 2048 =
    2 x 1024) and ~2048 elements per tile at 4 warps, 16 per thread (the backward stays near
    72 registers for bf16 on sm_90); interpreter: blocks of up to 64 columns and ~256 elements,
    so that the small test shapes exercise several column blocks, row tiles and tails."""
    if interpreting():
        block_n = min(next_pow2(D), 64)
        return max(1, 256 // block_n), block_n, 1
    block_n = min(next_pow2(D), 1024)
    return max(1, min(2048 // block_n, 64)), block_n, 4


def _bwd_tile(D):
    """(ROWS, BLOCK_N, num_warps) of the backward: the forward's columns and warps with ~4096
    elements a tile on a GPU (32 a thread at 4 warps; measured, see BWD_STAGES); the
    forward's tile under the interpreter."""
    rows, block_n, warps = _tile(D)
    if interpreting():
        return rows, block_n, warps
    return max(1, min(4096 // block_n, 64)), block_n, warps


def bias_gelu_fwd(x, bias, out_dtype: torch.dtype, out_shape=None):
    """y = gelu_erf(x + bias) for x (M, D) with unit column stride, bias (D,); computed in fp32,
    returned contiguous in out_dtype, shaped out_shape (default (M, D); its last dim D)."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be (M, D) with unit column stride"
    M, D = x.shape
    y_out = _empty((M, D) if out_shape is None else out_shape, out_dtype, x.device)
    if M == 0 or D == 0:
        return y_out
    y = y_out.view(M, D)
    rows, block_n, warps = _tile(D)
    grid = (cdiv(M, rows), cdiv(D, block_n))
    launch(_bias_gelu_fwd, grid, x, bias, y, M, D, x.stride(0), y.stride(0),
           ROWS=rows, BLOCK_N=block_n, num_warps=warps)
    return y_out


def bias_gelu_bwd(dy, x, bias, dx_dtype=None, reduce=True):
    """Backward of bias_gelu_fwd: dy (M, D) any strides (expanded is fine), x the saved fc1
    output without bias. Returns (dx (M, D) contiguous in dx_dtype (default: x's dtype),
    dbias (D,) fp32 = column sums of the fp32 dx). With reduce=False, dbias's per-program partial
    sums instead, (programs, D) fp32, for partial_sums.sum_partials."""
    M, D = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()  # no copy in the common case (the saved matmul output)
    device = x.device
    dx = _empty((M, D), dx_dtype if dx_dtype is not None else x.dtype, device)
    if M == 0 or D == 0:
        if not reduce:
            return dx, _empty((0, D), torch.float32, device)
        return dx, torch.zeros(D, dtype=torch.float32, device=device)
    rows, block_n, warps = _bwd_tile(D)
    col_blocks = cdiv(D, block_n)
    tiles = cdiv(M, rows)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # one wave over all column blocks: small (programs, D) partials
        target = max(1, sm_count(index) * max(1, BWD_WARPS_PER_SM // warps) // col_blocks)
    else:
        target = 4
    programs = max(1, min(tiles, target))
    rows_per_program = cdiv(cdiv(M, programs), rows) * rows
    programs = cdiv(M, rows_per_program)
    db_part = _empty((programs, D), torch.float32, device)
    launch(_bias_gelu_bwd, (programs, col_blocks),
           dy, x, bias, dx, db_part,
           M, D, rows_per_program // rows,
           dy.stride(0), dy.stride(1), x.stride(0), dx.stride(0),
           ROWS=rows, BLOCK_N=block_n, STAGES=BWD_STAGES, num_warps=warps)
    # second, deterministic reduction over the per-program partial sums
    return dx, db_part.sum(0) if reduce else db_part
