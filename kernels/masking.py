"""Random masking: the per-row argsort of the noise in one launch, the gather of the visible
tokens, and that gather's backward.

Official semantics (``fastmae.reference.masking_indices`` / ``gather_tokens``):
ids_shuffle = argsort(noise), ids_restore = argsort(ids_shuffle), ids_keep = ids_shuffle[:keep],
mask[ids_shuffle[j]] = (j >= keep) with 0 = kept, 1 = removed.

The sort runs inside one program per row: each noise value becomes an order-preserving int32
key, packed with its column index as ``key << 32 | index`` into int64 and sorted with
``tl.sort``; the low 32 bits of the sorted keys are ids_shuffle. Equal noise values (-0.0 and
+0.0 among them) sort by index (a stable argsort); for distinct noise this equals
``torch.argsort`` exactly.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, empty, launch, next_pow2


@triton.jit
def _masking_indices(
    noise_ptr,  # (N, L) fp32, strides (s_nn, s_nl)
    ids_keep_ptr,  # (N, keep) int64, contiguous
    mask_ptr,  # (N, L) fp32, contiguous: 0 = kept, 1 = removed
    ids_restore_ptr,  # (N, L) int64, contiguous
    L,
    keep,
    s_nn,
    s_nl,
    BLOCK_L: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_L)
    in_row = j < L
    noise = tl.load(noise_ptr + n * s_nn + j * s_nl, mask=in_row, other=0.0)
    # -0.0 as +0.0: torch's sort holds them equal (a tie, broken by index), their bits do not
    noise = tl.where(noise == 0.0, 0.0, noise)
    # order-preserving int32 key of an fp32: positives keep their bits, negatives flip all bits
    # but the sign; padding gets the largest key (and an index >= L) so it sorts last
    bits = noise.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    # every NaN (either sign: x86's 0/0 has the sign bit) after +inf, NaNs tied, as torch sorts
    key = tl.where(noise != noise, 0x7FFFFFFF, key)
    key = tl.where(in_row, key, 0x7FFFFFFF)
    packed = (key.to(tl.int64) << 32) | j.to(tl.int64)
    packed = tl.sort(packed, dim=0)
    ids_shuffle = packed - ((packed >> 32) << 32)  # the low 32 bits: the column index
    # here j is the rank: position ids_shuffle[j] of the row is the j-th smallest noise
    tl.store(ids_keep_ptr + n * keep + j, ids_shuffle, mask=j < keep)
    tl.store(ids_restore_ptr + n * L + ids_shuffle, j.to(tl.int64), mask=in_row)
    tl.store(mask_ptr + n * L + ids_shuffle, (j >= keep).to(tl.float32), mask=in_row)


@triton.jit
def _gather_tokens(
    x_ptr,  # (N, L, D) any float dtype, strides (s_xn, s_xl, s_xd)
    ids_ptr,  # (N, keep) int64, strides (s_in, s_ik)
    out_ptr,  # (N, keep, D) same dtype as x, contiguous
    n_rows,  # N * keep
    keep,
    D,
    s_xn,
    s_xl,
    s_xd,
    s_in,
    s_ik,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    n = rows // keep
    k = rows - n * keep
    src = tl.load(ids_ptr + n * s_in + k * s_ik, mask=row_ok, other=0)
    io_mask = row_ok[:, None] & (d < D)[None, :]
    src_row = n * s_xn + src * s_xl
    v = tl.load(x_ptr + src_row[:, None] + (d.to(tl.int64) * s_xd)[None, :], mask=io_mask)
    tl.store(out_ptr + (rows * D)[:, None] + d[None, :], v, mask=io_mask)


# The work each launch must do (_common.launch_work): the gather reads only the kept rows of x.
LAUNCH_WORK = {"_gather_tokens": lambda a: {
    "bytes": {"x_ptr": a["n_rows"] * a["D"] * a["x_ptr"].element_size()}}}


# Backward of the gather: out[n, l] = grad[n, ids_restore[n, l]] if ids_restore[n, l] < keep
# else 0. Every output element is written once (kept rows copied, removed rows zeroed), so the
# result needs no zero-filled buffer, no atomics, and is deterministic.
@triton.jit
def _scatter_tokens(
    grad_ptr,  # (N, keep, D) any float dtype, strides (s_gn, s_gk, s_gd)
    ids_restore_ptr,  # (N, L) int64, strides (s_rn, s_rl)
    out_ptr,  # (N, L, D) same dtype as grad, contiguous
    n_rows,  # N * L
    L,
    keep,
    D,
    s_gn,
    s_gk,
    s_gd,
    s_rn,
    s_rl,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    n = rows // L
    l = rows - n * L
    r = tl.load(ids_restore_ptr + n * s_rn + l * s_rl, mask=row_ok, other=0)
    d_ok = (d < D)[None, :]
    kept = (row_ok & (r < keep))[:, None] & d_ok
    src_row = n * s_gn + r * s_gk
    v = tl.load(grad_ptr + src_row[:, None] + (d.to(tl.int64) * s_gd)[None, :], mask=kept,
                other=0.0)
    tl.store(out_ptr + (rows * D)[:, None] + d[None, :], v, mask=row_ok[:, None] & d_ok)


# ----------------------------------------------------------------------------- launchers

_empty = empty  # every output is allocated here (tests patch it to poison them)


def _row_tiling(D: int, elem_size: int):
    """(ROWS, BLOCK_D, num_warps) for the row-copy kernels: a program moves a [ROWS, BLOCK_D]
    tile of about 16 KB. BLOCK_D is the power of two (<= 1024) that wastes the fewest masked
    lanes over D (768 and 1280 -> 256, 512 -> 512, 100 -> 16: 112 lanes), ROWS fills the tile."""
    best = None
    for b in (16, 32, 64, 128, 256, 512, 1024):
        b = min(b, next_pow2(D))
        waste = cdiv(D, b) * b - D
        if best is None or waste < best[0] or (waste == best[0] and b > best[1]):
            best = (waste, b)
    block_d = best[1]
    tile = max(16384 // max(elem_size, 1), block_d)
    rows = max(1, min(tile // block_d, 64))
    num_warps = 4 if rows * block_d <= 2048 else 8
    return rows, block_d, num_warps


def masking_indices(noise: torch.Tensor, len_keep: int):
    """noise (N, L) fp32 -> ids_keep (N, len_keep) int64, mask (N, L) fp32 (0 = kept,
    1 = removed), ids_restore (N, L) int64; all contiguous, on noise's device. One launch,
    one program per row. Identical to the reference for distinct noise values (ties sort by
    index). Noise of another float dtype is converted to fp32 first."""
    assert noise.dim() == 2, "noise must be (N, L)"
    N, L = noise.shape
    len_keep = int(len_keep)
    assert 0 <= len_keep <= L, f"len_keep {len_keep} outside [0, {L}]"
    if noise.dtype != torch.float32:
        noise = noise.to(torch.float32)
    dev = noise.device
    ids_keep = _empty((N, len_keep), torch.int64, dev)
    mask = _empty((N, L), torch.float32, dev)
    ids_restore = _empty((N, L), torch.int64, dev)
    if N and L:
        block_l = max(next_pow2(L), 2)  # tl.sort needs at least two elements
        num_warps = 4 if block_l <= 512 else 8
        launch(_masking_indices, (N,), noise, ids_keep, mask, ids_restore, L, len_keep,
               noise.stride(0), noise.stride(1), BLOCK_L=block_l,
               num_warps=num_warps)
    return ids_keep, mask, ids_restore


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x (N, L, D) any strides, any float dtype; ids_keep (N, keep) int64 ->
    (N, keep, D) contiguous, x's dtype: out[n, k] = x[n, ids_keep[n, k]], a bit-exact copy."""
    N, L, D = x.shape
    keep = ids_keep.shape[1]
    assert ids_keep.shape[0] == N
    out = _empty((N, keep, D), x.dtype, x.device)
    n_rows = N * keep
    if n_rows and D:
        rows, block_d, num_warps = _row_tiling(D, x.element_size())
        grid = (cdiv(n_rows, rows), cdiv(D, block_d))
        launch(_gather_tokens, grid, x, ids_keep, out, n_rows, keep, D,
               x.stride(0), x.stride(1), x.stride(2),
               ids_keep.stride(0), ids_keep.stride(1),
               ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
    return out


def scatter_tokens(grad: torch.Tensor, ids_restore: torch.Tensor, len_keep: int) -> torch.Tensor:
    """Backward of ``gather_tokens``: grad (N, keep, D) any strides, ids_restore (N, L) int64 ->
    (N, L, D) contiguous, grad's dtype: out[n, l] = grad[n, ids_restore[n, l]] where
    ids_restore[n, l] < len_keep, else 0. One pass, every element written once."""
    N, keep, D = grad.shape
    len_keep = int(len_keep)
    assert keep == len_keep, f"grad has {keep} rows per image, len_keep is {len_keep}"
    assert ids_restore.shape[0] == N
    L = ids_restore.shape[1]
    out = _empty((N, L, D), grad.dtype, grad.device)
    n_rows = N * L
    if n_rows and D:
        rows, block_d, num_warps = _row_tiling(D, grad.element_size())
        grid = (cdiv(n_rows, rows), cdiv(D, block_d))
        launch(_scatter_tokens, grid, grad, ids_restore, out, n_rows, L, len_keep, D,
               grad.stride(0), grad.stride(1), grad.stride(2),
               ids_restore.stride(0), ids_restore.stride(1),
               ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
    return out
