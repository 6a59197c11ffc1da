"""The decoder's token work in one pass: append mask tokens, unshuffle, re-attach cls, add the
position table (official ``forward_decoder``; spec: ``fastmae.reference.unshuffle``).

    out[n, 0]     = x[n, 0] + pos[0]
    out[n, 1 + l] = (x[n, 1 + r] if r < keep else mask_token) + pos[1 + l],  r = ids_restore[n, l]

Rows of the output are flattened to N * (1 + L) and tiled [ROWS, BLOCK_D]; each output element
is written exactly once, sums are done in fp32.

An id r outside [0, L) (ids_restore is a permutation of 0..L-1; torch's gather would raise) is
not followed: its output row is NaN, nothing is read through it, and in the backward it writes
no gradient of x and makes the mask token's gradient NaN (no host check: no sync, no launch).

The backward returns the gradients of x and mask_token only: the position tables of MAE are
fixed sin-cos buffers held as parameters with requires_grad=False, so no gradient of pos_embed
is computed (d pos_embed would be grad_out summed over n).
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, empty, launch
from .masking import _row_tiling

# The backward's mask-token reduction runs on about this many programs (a constant, not the
# device's SM count, so the summation order -- and the gradient's bits -- depend only on shape).
_BWD_PROGRAMS = 1024


@triton.jit
def _unshuffle_fwd(
    x_ptr,  # (N, 1 + keep, D) any float dtype, strides (s_xn, s_xt, s_xd)
    mt_ptr,  # (1, 1, D) any float dtype, stride s_md along D
    ids_ptr,  # (N, L) int64 ids_restore, strides (s_in, s_il)
    pos_ptr,  # (1, 1 + L, D) any float dtype, strides (s_pt, s_pd)
    out_ptr,  # (N, 1 + L, D) promoted dtype, contiguous
    n_rows,  # N * (1 + L)
    L,
    keep,
    D,
    s_xn,
    s_xt,
    s_xd,
    s_md,
    s_in,
    s_il,
    s_pt,
    s_pd,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    row_ok = rows < n_rows
    n = rows // (L + 1)
    t = rows - n * (L + 1)  # 0 = cls, 1 + l = patch l
    r = tl.load(ids_ptr + n * s_in + (t - 1) * s_il, mask=row_ok & (t > 0), other=0)
    bad = (t > 0) & ((r < 0) | (r >= L))  # an id outside [0, L): its row is NaN, nothing read
    from_x = row_ok & ((t == 0) | ((r >= 0) & (r < keep)))
    src = tl.where(t == 0, 0, r + 1)
    io_ok = row_ok[:, None] & d_ok[None, :]
    xv = tl.load(x_ptr + (n * s_xn + src * s_xt)[:, None] + (d.to(tl.int64) * s_xd)[None, :],
                 mask=from_x[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    mt = tl.load(mt_ptr + d.to(tl.int64) * s_md, mask=d_ok, other=0.0).to(tl.float32)
    pv = tl.load(pos_ptr + (t * s_pt)[:, None] + (d.to(tl.int64) * s_pd)[None, :], mask=io_ok,
                 other=0.0).to(tl.float32)
    v = tl.where(from_x[:, None], xv, mt[None, :]) + pv
    v = tl.where(bad[:, None], float("nan"), v)
    tl.store(out_ptr + (rows * D)[:, None] + d[None, :], v.to(out_ptr.dtype.element_ty), mask=io_ok)


# Backward, with g = grad_out (N, 1 + L, D) and r = ids_restore[n, l]:
#   d x[n, 0]       = g[n, 0]
#   d x[n, 1 + r]   = g[n, 1 + l]                       for r < keep (each kept row hit once)
#   d mask_token    = sum_{n, l : r >= keep} g[n, 1 + l]  (fp32)
# Each program walks TILES consecutive row tiles, scatters the kept rows into grad_x and sums the
# masked rows into a [ROWS, BLOCK_D] fp32 accumulator, reduced once and written to its own row of
# the partials buffer; the host sums the partials. Fixed order: bit-identical run after run.
@triton.jit
def _unshuffle_bwd(
    g_ptr,  # (N, 1 + L, D) any float dtype, strides (s_gn, s_gt, s_gd) (stride 0 allowed)
    ids_ptr,  # (N, L) int64 ids_restore, strides (s_in, s_il)
    gx_ptr,  # (N, 1 + keep, D) x's dtype, contiguous
    part_ptr,  # (num_programs, D) fp32, contiguous: per-program mask-token sums
    n_rows,  # N * (1 + L)
    L,
    keep,
    D,
    tiles,  # row tiles per program
    s_gn,
    s_gt,
    s_gd,
    s_in,
    s_il,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for i in range(0, tiles):
        rows = (pid * tiles + i) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        n = rows // (L + 1)
        t = rows - n * (L + 1)
        is_tok = row_ok & (t > 0)
        r = tl.load(ids_ptr + n * s_in + (t - 1) * s_il, mask=is_tok, other=0)
        bad = is_tok & ((r < 0) | (r >= L))  # an id outside [0, L): no store, a NaN gradient
        to_x = row_ok & ((t == 0) | ((r >= 0) & (r < keep)))
        to_mt = is_tok & (r >= keep) & (r < L)
        g = tl.load(g_ptr + (n * s_gn + t * s_gt)[:, None] + (d.to(tl.int64) * s_gd)[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        dst = n * (keep + 1) + tl.where(t == 0, 0, r + 1)
        tl.store(gx_ptr + (dst * D)[:, None] + d[None, :], g.to(gx_ptr.dtype.element_ty),
                 mask=to_x[:, None] & d_ok[None, :])
        acc += tl.where(to_mt[:, None], g, 0.0)
        acc += tl.where(bad[:, None], float("nan"), 0.0)
    tl.store(part_ptr + pid * D + d, tl.sum(acc, axis=0), mask=d_ok)


# ----------------------------------------------------------------------------- launchers

_empty = empty  # every output is allocated here (tests patch it to poison them)


def unshuffle_fwd(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                  pos_embed: torch.Tensor) -> torch.Tensor:
    """x (N, 1 + keep, D) any strides, mask_token (1, 1, D), ids_restore (N, L) int64,
    pos_embed (1, 1 + L, D) -> out (N, 1 + L, D) contiguous, dtype
    promote(promote(x, mask_token), pos_embed); the sum is done in fp32. An id outside [0, L)
    gives a NaN row (torch's gather raises)."""
    N, keep1, D = x.shape
    L = ids_restore.shape[1]
    assert keep1 >= 1 and ids_restore.shape[0] == N
    assert mask_token.shape[-1] == D and pos_embed.shape[-2:] == (1 + L, D)
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    out = _empty((N, 1 + L, D), out_dtype, x.device)
    n_rows = N * (1 + L)
    if n_rows and D:
        elem = max(x.element_size(), out.element_size())
        rows, block_d, num_warps = _row_tiling(D, elem)
        grid = (cdiv(n_rows, rows), cdiv(D, block_d))
        launch(_unshuffle_fwd, grid,
               x, mask_token, ids_restore, pos_embed, out, n_rows, L, keep1 - 1, D,
               x.stride(0), x.stride(1), x.stride(2), mask_token.stride(-1),
               ids_restore.stride(0), ids_restore.stride(1),
               pos_embed.stride(-2), pos_embed.stride(-1),
               ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
    return out


def unshuffle_bwd(grad_out: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                  x_dtype: torch.dtype, mask_token_dtype: torch.dtype):
    """grad_out (N, 1 + L, D) any strides (expanded / stride 0 is fine), ids_restore (N, L)
    int64 -> grad_x (N, 1 + len_keep, D) contiguous in x_dtype, grad_mask_token (1, 1, D) in
    mask_token_dtype (fp32 sum over the masked positions, deterministic). No pos_embed grad.
    An id outside [0, L) writes nothing and makes grad_mask_token NaN."""
    N, L1, D = grad_out.shape
    L = ids_restore.shape[1]
    len_keep = int(len_keep)
    assert L1 == L + 1 and ids_restore.shape[0] == N and 0 <= len_keep <= L
    dev = grad_out.device
    grad_x = _empty((N, 1 + len_keep, D), x_dtype, dev)
    n_rows = N * (1 + L)
    if n_rows == 0 or D == 0:
        return grad_x, torch.zeros((1, 1, D), dtype=mask_token_dtype, device=dev)
    rows, block_d, num_warps = _row_tiling(D, grad_out.element_size())
    n_tiles = cdiv(n_rows, rows)
    tiles = cdiv(n_tiles, _BWD_PROGRAMS)
    programs = cdiv(n_tiles, tiles)
    partials = _empty((programs, D), torch.float32, dev)
    launch(_unshuffle_bwd, (programs, cdiv(D, block_d)),
           grad_out, ids_restore, grad_x, partials, n_rows, L, len_keep, D, tiles,
           grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
           ids_restore.stride(0), ids_restore.stride(1),
           ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
    grad_mask_token = partials.sum(0).to(mask_token_dtype).reshape(1, 1, D)
    return grad_x, grad_mask_token
