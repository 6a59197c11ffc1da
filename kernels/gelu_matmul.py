"""The MLP's two matmuls that touch its GELU, with the bias + GELU work in their epilogue.

Forward, fc1 (`matmul_bias_gelu`): f = a @ w.T (M x N, K deep) rounded to the output dtype, and
g = gelu_erf(f + bias) from that rounded f, both written from the accumulator tile: the same
values as cuBLAS's f followed by kernels/bias_gelu.py's forward (the same normal CDF,
`_normal_cdf`), without a second kernel reading f back (f is still written: the backward needs it).

Backward, fc2's input gradient (`matmul_gelu_bwd`): dg = dm @ w2 stays in the fp32 accumulator,
and the epilogue reads the saved f and writes df = dg * gelu'(f + bias) in the output dtype, and
the fp32 column sums of df over its tile's rows (the bias gradient, as per-tile partials and a
deterministic second reduction): dg is never written or read back, and it is not rounded to the
half dtype first (the unfused path rounds it).

Whether these beat cuBLAS plus the separate bias + GELU kernels depends on the card: fastmae.ops
times each way on the first call of each shape and keeps the fastest (``fastmae.ops._mlp_way``;
the TMA kernels below are a way of their own).

Tiles: (BLOCK_M, BLOCK_N) output tiles, grouped GROUP_M tile rows at a time so that consecutive
tiles share A's rows and B's columns in L2. Rows and columns past M and N are read wrapped around
(in bounds, no masks in the K loop) and never stored or summed. A configuration either launches
one program a tile (PROGRAMS_PER_SM = 0) or is persistent: PROGRAMS_PER_SM programs an SM, each
taking every so-many-th tile in one loop that Triton flattens with the K loop
(``tl.range(..., flatten=True)``), so that the next tile's first K steps are loaded while the
current tile's epilogue runs. MAE's K is short (512, 768: 8 to 12 steps of 64), so a tile's
load latency and epilogue are a large part of it where each program has one tile; the autotuner
times both kinds.
"""
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import cdiv, dot_precision, empty, interpreting, launch_tuned, next_pow2, sm_count
from .bias_gelu import _normal_cdf


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile number pid, GROUP_M tile rows walked column by column."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _matmul_tile(
    A,  # (M, K) any strides
    B,  # (K, N) any strides
    pid_m, pid_n,  # the output tile
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask in the loop
    DOT_PRECISION: tl.constexpr,
):
    """The fp32 (BLOCK_M, BLOCK_N) tile (pid_m, pid_n) of A @ B; rows >= M and columns >= N
    hold wrapped-around rows and columns: never to be stored or summed."""
    # wrapped, not masked: every load in bounds (64-bit row offsets: M * K can pass 2**31)
    a_rows = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    b_cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = B + ks[:, None] * stride_bk + b_cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = ks < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _tile_outputs(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (pid_m, pid_n)'s output rows (int64), columns, column mask and element mask."""
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    return rows, cols, col_ok, (rows < M)[:, None] & col_ok[None, :]


@triton.jit
def _bias_gelu_epilogue(
    acc, pid_m, pid_n, BIAS, F, G, M, N, stride_f, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """f = acc rounded to F's dtype and g = gelu(f + bias), stored for tile (pid_m, pid_n)."""
    rows, cols, col_ok, mask = _tile_outputs(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    f = acc.to(F.dtype.element_ty)
    tl.store(F + rows[:, None] * stride_f + cols[None, :], f, mask=mask)
    # the GELU of the rounded f: what the backward recomputes from the saved f
    z = f.to(tl.float32) + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cdf, _ = _normal_cdf(z)  # Phi(z), as kernels/bias_gelu.py's forward
    g = z * cdf
    tl.store(G + rows[:, None] * stride_g + cols[None, :], g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_bias_gelu(
    A,  # (M, K) any strides: fc1's input
    B,  # (K, N) any strides: fc1's weight transposed (a view of the (N, K) weight)
    BIAS,  # (N,) any float dtype
    F,  # (M, N) out, row stride stride_f, unit column stride: the matmul output, rounded
    G,  # (M, N) out, row stride stride_g, unit column stride: gelu(F + BIAS)
    M, N, K, M_KEY,  # M_KEY: next_pow2(M), only the autotuner's key
    stride_am, stride_ak, stride_bk, stride_bn, stride_f, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # 0: one program a tile; else persistent (see the top)
    FLATTEN: tl.constexpr,  # persistent: the tile loop flattened with the K loop
):
    if PROGRAMS_PER_SM == 0:
        pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _matmul_tile(A, B, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk,
                           stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
        _bias_gelu_epilogue(acc, pid_m, pid_n, BIAS, F, G, M, N, stride_f, stride_g,
                            BLOCK_M, BLOCK_N)
    else:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
            pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _matmul_tile(A, B, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk,
                               stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
            _bias_gelu_epilogue(acc, pid_m, pid_n, BIAS, F, G, M, N, stride_f, stride_g,
                                BLOCK_M, BLOCK_N)


@triton.jit
def _store_part_sums(DB_PART, sums, pid_m, col0, M, N,
                     BLOCK_M: tl.constexpr, SUM_ROWS: tl.constexpr):
    """A tile's column sums (from column col0) in its first partial row, zeros in the others it
    covers: every partial row is written once whatever BLOCK_M the autotuner picked (no
    clearing, no atomics)."""
    cols = col0 + tl.arange(0, sums.shape[0])
    col_ok = cols < N
    part_row = pid_m * (BLOCK_M // SUM_ROWS)
    tl.store(DB_PART + part_row * N + cols, sums, mask=col_ok)
    part_rows = tl.cdiv(M, SUM_ROWS)
    for r in tl.static_range(1, BLOCK_M // SUM_ROWS):
        row_ok = tl.full(sums.shape, part_row + r, tl.int32) < part_rows
        tl.store(DB_PART + (part_row + r) * N + cols, tl.zeros_like(sums), mask=col_ok & row_ok)


@triton.jit
def _gelu_bwd_epilogue(
    dg, pid_m, pid_n, F, BIAS, DF, DB_PART, M, N, stride_f, stride_df,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUM_ROWS: tl.constexpr,
):
    """df = dg * gelu'(f + bias) stored for tile (pid_m, pid_n), and its column sums."""
    rows, cols, col_ok, mask = _tile_outputs(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    f = tl.load(F + rows[:, None] * stride_f + cols[None, :], mask=mask, other=0.0)
    z = f.to(tl.float32) + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cdf, e = _normal_cdf(z)
    # wrapped rows and columns hold another tile's dg: zeroed before the sums
    df = tl.where(mask, dg * (cdf + z * (e * 0.3989422804014327)), 0.0)  # pdf: e / sqrt(2 pi)
    tl.store(DF + rows[:, None] * stride_df + cols[None, :], df.to(DF.dtype.element_ty), mask=mask)
    _store_part_sums(DB_PART, tl.sum(df, axis=0), pid_m, pid_n * BLOCK_N, M, N, BLOCK_M, SUM_ROWS)


@triton.jit
def _matmul_gelu_bwd(
    A,  # (M, K) any strides: the gradient of fc2's output
    B,  # (K, N) any strides: fc2's (K, N) weight
    F,  # (M, N) row stride stride_f, unit column stride: fc1's saved output, without bias
    BIAS,  # (N,) any float dtype: fc1's bias
    DF,  # (M, N) out, row stride stride_df, unit column stride: the gradient of F
    DB_PART,  # (cdiv(M, SUM_ROWS), N) fp32 out, contiguous: column sums of DF, see below
    M, N, K, M_KEY,
    stride_am, stride_ak, stride_bk, stride_bn, stride_f, stride_df,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SUM_ROWS: tl.constexpr,  # rows a partial sum row covers: the smallest BLOCK_M of any config
    PROGRAMS_PER_SM: tl.constexpr,  # 0: one program a tile; else persistent (see the top)
    FLATTEN: tl.constexpr,  # persistent: the tile loop flattened with the K loop
):
    if PROGRAMS_PER_SM == 0:
        pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        dg = _matmul_tile(A, B, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk,
                          stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
        _gelu_bwd_epilogue(dg, pid_m, pid_n, F, BIAS, DF, DB_PART, M, N, stride_f, stride_df,
                           BLOCK_M, BLOCK_N, SUM_ROWS)
    else:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
            pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            dg = _matmul_tile(A, B, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk,
                              stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
            _gelu_bwd_epilogue(dg, pid_m, pid_n, F, BIAS, DF, DB_PART, M, N, stride_f,
                               stride_df, BLOCK_M, BLOCK_N, SUM_ROWS)


# ----------------------------------------------------------------------------- TMA kernels
#
# The same two products with every tile moved by the Hopper tensor memory accelerator (TMA):
# A, B and F loaded and F, G, DF stored through host-built tensor descriptors, one copy
# instruction a tile instead of a thread's address arithmetic and cp.async copies (the way
# Triton's persistent-matmul tutorial approaches cuBLAS on sm_90; not yet measured here).
# Always persistent (PROGRAMS_PER_SM programs an SM, the tile loop flattened into the K loop;
# or, the WARP_SPECIALIZE configurations, warp-specialized: see _tma_configs).
# Out-of-bounds rows and columns load as zeros and are not stored: the epilogue needs no masks,
# and zero rows and columns add exactly zero to the bias gradient's column sums (dg is 0
# there). The epilogue may run on the tile in SUBTILE column pieces (fewer live registers). The
# launchers take this path only on request (tma=True) and where tma_ok: 16-bit operands on
# sm_90 or newer (or the interpreter), a contiguous last dimension and 16-byte aligned rows.

@triton.jit
def _tile_origin(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, first row, first column) of tile number ``tile`` (see _tile_of)."""
    pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m, pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _tma_product(a_desc, b_desc, row0, col0, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 B_KN: tl.constexpr,  # b_desc describes (K, N); else (N, K), used transposed
                 DOT_PRECISION: tl.constexpr):
    """The fp32 (BLOCK_M, BLOCK_N) tile at (row0, col0) of A @ B (zeros past M and N)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([row0, k * BLOCK_K])
        if B_KN:
            b = b_desc.load([k * BLOCK_K, col0])
        else:
            b = tl.trans(b_desc.load([col0, k * BLOCK_K]))
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _tma_pieces(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBTILE: tl.constexpr):
    """acc's column halves (SUBTILE = 2), or acc and itself (SUBTILE = 1)."""
    if SUBTILE == 2:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        return left, right
    else:
        return acc, acc


@triton.jit
def _tma_bias_gelu_piece(acc, row0, col0, BIAS, f_desc, g_desc, N):
    """f = acc rounded and g = gelu(f + bias) stored at (row0, col0)."""
    f = acc.to(f_desc.dtype)
    f_desc.store([row0, col0], f)
    cols = col0 + tl.arange(0, acc.shape[1])
    z = f.to(tl.float32) + tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    cdf, _ = _normal_cdf(z)
    g_desc.store([row0, col0], (z * cdf).to(g_desc.dtype))


@triton.jit
def _matmul_bias_gelu_tma(
    a_desc,  # (M, K): fc1's input
    w_desc,  # (N, K): fc1's weight
    BIAS,  # (N,) any float dtype
    f_desc,  # (M, N) out: the matmul output, rounded
    g_desc,  # (M, N) out: gelu(F + BIAS)
    F,  # (M, N) out, row stride stride_f: f_desc's tensor again (pointer stores: WARP_SPECIALIZE)
    G,  # (M, N) out, row stride stride_g: g_desc's tensor again, likewise
    M, N, K, M_KEY, ELEM_BYTES,  # next_pow2(M), A's element size: keys only
    stride_f, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SUBTILE: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # the grid's programs an SM (the launcher's; unused here)
    WARP_SPECIALIZE: tl.constexpr,  # the tile loop warp-specialized (see _tma_configs)
):
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if WARP_SPECIALIZE:
        # Triton splits this loop into a TMA producer and consumers that share each tile's
        # rows; its sm_90 partitioning handles the epilogue's pointer stores, not descriptor
        # stores
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), warp_specialize=True):
            pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _tma_product(a_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, BLOCK_M,
                               BLOCK_N, BLOCK_K, False, DOT_PRECISION)
            _bias_gelu_epilogue(acc, pid_m, pid_n, BIAS, F, G, M, N, stride_f, stride_g,
                                BLOCK_M, BLOCK_N)
    else:
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
            pid_m, row0, col0 = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _tma_product(a_desc, w_desc, row0, col0, K, BLOCK_M, BLOCK_N, BLOCK_K, False,
                               DOT_PRECISION)
            left, right = _tma_pieces(acc, BLOCK_M, BLOCK_N, SUBTILE)
            _tma_bias_gelu_piece(left, row0, col0, BIAS, f_desc, g_desc, N)
            if SUBTILE == 2:
                _tma_bias_gelu_piece(right, row0, col0 + BLOCK_N // 2, BIAS, f_desc, g_desc, N)


@triton.jit
def _tma_gelu_bwd_piece(dg, row0, col0, f_desc, BIAS, df_desc, N):
    """df = dg * gelu'(f + bias) stored at (row0, col0); its column sums returned."""
    cols = col0 + tl.arange(0, dg.shape[1])
    f = f_desc.load([row0, col0])
    z = f.to(tl.float32) + tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    cdf, e = _normal_cdf(z)
    df = dg * (cdf + z * (e * 0.3989422804014327))  # pdf: e / sqrt(2 pi)
    df_desc.store([row0, col0], df.to(df_desc.dtype))
    return tl.sum(df, axis=0)


@triton.jit
def _tma_product_t(a_desc, w_desc, row0, col0, K,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """The fp32 (BLOCK_N, BLOCK_M) tile of (A @ W)^T = W^T A^T at (col0, row0) for a_desc (M, K)
    and w_desc (K, N), both used transposed (zeros past M and N)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        w = w_desc.load([k * BLOCK_K, col0])
        a = a_desc.load([row0, k * BLOCK_K])
        acc = tl.dot(tl.trans(w), tl.trans(a), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _gelu_bwd_epilogue_t(dg_t, pid_m, row0, col0, F, BIAS, DF, DB_PART, M, N, stride_f,
                         stride_df, BLOCK_M: tl.constexpr, SUM_ROWS: tl.constexpr):
    """df = dg * gelu'(f + bias) for the tile whose transpose dg_t (columns col0.., rows
    row0..) holds dg, stored through pointers, and its column sums (dg_t's row sums). Rows
    and columns past M and N hold zeros (TMA's): they add nothing to the sums."""
    cols = col0 + tl.arange(0, dg_t.shape[0])
    rows = (row0 + tl.arange(0, dg_t.shape[1])).to(tl.int64)
    col_ok = cols < N
    mask = col_ok[:, None] & (rows < M)[None, :]
    f = tl.load(F + rows[None, :] * stride_f + cols[:, None], mask=mask, other=0.0)
    z = f.to(tl.float32) + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    cdf, e = _normal_cdf(z)
    df = dg_t * (cdf + z * (e * 0.3989422804014327))  # pdf: e / sqrt(2 pi)
    tl.store(DF + rows[None, :] * stride_df + cols[:, None], df.to(DF.dtype.element_ty), mask=mask)
    _store_part_sums(DB_PART, tl.sum(df, axis=1), pid_m, col0, M, N, BLOCK_M, SUM_ROWS)


@triton.jit
def _matmul_gelu_bwd_tma(
    a_desc,  # (M, K): the gradient of fc2's output
    w_desc,  # (K, N): fc2's weight
    f_desc,  # (M, N): fc1's saved output, without bias
    BIAS,  # (N,) any float dtype: fc1's bias
    df_desc,  # (M, N) out: the gradient of F
    DB_PART,  # (cdiv(M, SUM_ROWS), N) fp32 out, contiguous: column sums of DF
    F,  # (M, N), row stride stride_f: f_desc's tensor again (pointer loads: WARP_SPECIALIZE)
    DF,  # (M, N) out, row stride stride_df: df_desc's tensor again, likewise
    M, N, K, M_KEY, ELEM_BYTES,
    stride_f, stride_df,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SUBTILE: tl.constexpr,
    SUM_ROWS: tl.constexpr,  # rows a partial sum row covers: the smallest BLOCK_M of any config
    PROGRAMS_PER_SM: tl.constexpr,  # the grid's programs an SM (the launcher's; unused here)
    WARP_SPECIALIZE: tl.constexpr,  # the tile loop warp-specialized on transposed tiles
):
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if WARP_SPECIALIZE:
        # Triton's sm_90 partitioning gives each consumer warpgroup part of the tile's rows and
        # refuses a reduction across them, which the bias gradient's column sums are; on the
        # transposed tile (N x M) they are row sums, within each consumer's rows
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), warp_specialize=True):
            pid_m, row0, col0 = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            dg_t = _tma_product_t(a_desc, w_desc, row0, col0, K, BLOCK_M, BLOCK_N, BLOCK_K,
                                  DOT_PRECISION)
            _gelu_bwd_epilogue_t(dg_t, pid_m, row0, col0, F, BIAS, DF, DB_PART, M, N, stride_f,
                                 stride_df, BLOCK_M, SUM_ROWS)
    else:
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
            pid_m, row0, col0 = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            dg = _tma_product(a_desc, w_desc, row0, col0, K, BLOCK_M, BLOCK_N, BLOCK_K, True,
                              DOT_PRECISION)
            left, right = _tma_pieces(dg, BLOCK_M, BLOCK_N, SUBTILE)
            sums = _tma_gelu_bwd_piece(left, row0, col0, f_desc, BIAS, df_desc, N)
            _store_part_sums(DB_PART, sums, pid_m, col0, M, N, BLOCK_M, SUM_ROWS)
            if SUBTILE == 2:
                sums = _tma_gelu_bwd_piece(right, row0, col0 + BLOCK_N // 2, f_desc, BIAS,
                                           df_desc, N)
                _store_part_sums(DB_PART, sums, pid_m, col0 + BLOCK_N // 2, M, N, BLOCK_M,
                                 SUM_ROWS)


# ----------------------------------------------------------------------------- configurations

GROUP_M = 8
_SMEM_BUDGET = 200 * 1024  # bytes of pipelined A and B tiles a program may take on sm_90


def _gpu_configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs an SM: 0 one a tile, else persistent).
    # Compiled for sm_90 (Triton 3.6), each runs its K loop on wgmma (HGMMA) fed by cp.async,
    # with no spill in the loop. The epilogue's GELU work (most of the kernel's 2,216 / 2,720 SASS
    # instructions, forward / backward, at 128 x 128 over 8 warps) overlaps another program's
    # loop only where two programs fit an SM: the 4-warp tiles (under 200 registers a thread, 96
    # KiB of shared memory). 128 x 256 is cuBLAS's tile for these shapes; its backward spills in
    # the epilogue (592 bytes a thread; the forward none: tests/_kernel_capture.py gelu_matmul
    # --verbose). The persistent ones (see the top) at 128 x 128 over 8 warps, one program an SM,
    # and at 128 x 64 over 4 warps, two, each with the tile loop flattened into the K loop and
    # not: flattened, the K loop also holds the epilogue (~2,250 instructions, 4 HGMMAs and 8 or
    # 12 copies), 150 and 178 registers (forward), and the 4-warp backward spills 48 bytes; not
    # flattened, the K loop is the one-a-tile kernel's (~100 instructions) and the next tile's
    # first copies are issued after the epilogue, 141 and 139 registers (forward), the 8-warp
    # backward spilling 32 bytes. Which hides a short K loop's latency best is the autotuner's
    # measurement, not ours.
    shapes = [(128, 256, 64, 8, 3, 0, False), (128, 128, 64, 8, 4, 0, False),
              (128, 64, 64, 4, 4, 0, False), (64, 128, 64, 4, 4, 0, False)]
    shapes += [(128, 128, 64, 8, 4, 1, flatten) for flatten in (True, False)]
    shapes += [(128, 64, 64, 4, 4, 2, flatten) for flatten in (True, False)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PROGRAMS_PER_SM": p,
                           "FLATTEN": flatten}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s, p, flatten in shapes]


if interpreting():
    # small tiles, so that the tests' small shapes take several tiles, K steps and tails (the
    # tests run the persistent kind too, with a stand-in SM count: _CPU_SMS)
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "PROGRAMS_PER_SM": 0,
                               "FLATTEN": False}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = _gpu_configs()
_CPU_SMS = 3  # the "SMs" a persistent configuration's grid is sized for off a GPU


def _prune(configs, named_args, **kwargs):
    """Configurations whose pipelined tiles fit shared memory (fp32 operands take twice the
    bytes; all of a persistent one's programs an SM) and that do not overhang small M or N by
    more than a tile."""
    a, M, N = named_args["A"], named_args["M"], named_args["N"]
    size = a.element_size()
    kept = [c for c in configs
            if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]
            * size * max(1, c.kwargs["PROGRAMS_PER_SM"]) <= _SMEM_BUDGET
            and c.kwargs["BLOCK_M"] <= max(64, next_pow2(M))
            and c.kwargs["BLOCK_N"] <= max(64, next_pow2(N))]
    return kept or [min(configs, key=lambda c: c.num_stages * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _tma_blocks(a_block, w_block):
    """The autotuner's pre-hook for a TMA kernel: each descriptor's block shape from the
    configuration (a descriptor's block shape is part of the kernel's signature)."""
    def hook(nargs, **kwargs):
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        dims = {"m": bm, "n": bn, "k": bk}
        nargs["a_desc"].block_shape = [dims[d] for d in a_block]
        nargs["w_desc"].block_shape = [dims[d] for d in w_block]
        for name in ("f_desc", "g_desc", "df_desc"):
            if name in nargs:
                nargs[name].block_shape = [bm, bn // nargs["SUBTILE"]]
    hook.arguments_only = True  # it sets only descriptors' block shapes: _common.launch_tuned
    # applies it itself and keeps them for its direct launches
    return hook


# Triton versions whose sm_90 warp specialization compiles the TMA kernels' WARP_SPECIALIZE
# loops (tests/_kernel_capture.py gelu_matmul): 3.6, the GPU machines' Triton. The
# NVGPUWarpSpecialization pass of Triton 3.8 (what `pip install .` resolved to on 2026-12-04)
# and 3.9 fails on these loops (a descriptor's block against the consumer's half of the tile),
# so elsewhere those configurations are not offered (the interpreter's tests force them).
_WARP_SPECIALIZE_TRITONS = ("3.6",)


# FASTMAE_TMA=0: the TMA kernels are not offered on a GPU (tma_applies says no there);
# FASTMAE_WARP_SPECIALIZE=0: not their warp-specialized configurations. Read at import;
# benches/gpu_suite.sh sets them for its run when its first check of those kernels on the GPU
# fails, so that a fault there does not take the measurements with it.
_TMA_ON = os.environ.get("FASTMAE_TMA", "1").strip() != "0"
_WARP_SPECIALIZE_ON = os.environ.get("FASTMAE_WARP_SPECIALIZE", "1").strip() != "0"


def _warp_specialize_offered():
    return (_WARP_SPECIALIZE_ON
            and ".".join(triton.__version__.split(".")[:2]) in _WARP_SPECIALIZE_TRITONS)


def _tma_configs(hook, backward):
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs an SM, epilogue pieces,
    # warp-specialized), all persistent; those not warp-specialized with the tile loop flattened
    # (see the TMA kernels). Compiled for sm_90 (Triton 3.6, tests/_kernel_capture.py
    # gelu_matmul --verbose) none of those spills, 128 x 256 included (178 / 241 registers,
    # forward / backward, in two epilogue pieces); the backward also
    # stages F's tile in shared memory, so its two-an-SM tilings take one stage fewer than the
    # forward's to fit twice (112 KiB a program forward, 96 and 104 KiB backward).
    # Both are also warp-specialized (WARP_SPECIALIZE, not flattened): Triton 3.6 makes
    # the 4 warps' loop a producer warpgroup issuing the TMA loads and two consumer warpgroups
    # of half the tile's rows each (wgmma and the epilogue), their registers moved to 40 and
    # 232 (setmaxnreg; --verbose lists the PTX's), 12 warps, one program an SM: cuBLAS's
    # cooperative structure (the "coopA" kernels of its H200 profile, BENCHMARKS.md), with the
    # next tile's loads issued while the consumers run the GELU epilogue. The forward's
    # 256 x 128 (128 rows a consumer, as cuBLAS's 256 x 128 tiles) compiles too but spills 72
    # bytes a thread: left out. The partitioning refuses a reduction across the consumers'
    # rows, which the backward's bias-gradient column sums are, so its warp-specialized loop
    # computes transposed tiles (N x M: the sums are row sums, within each consumer; F is read
    # and DF written through pointers); of its tilings 128 x 128 and 64 x 256 (M x N) spill 8
    # and 16-24 bytes a thread, 256 x 128 and 128 x 256 over 1 KB (left out).
    # (The interpreter has one configuration a kernel, with small tiles; the tests force the
    # others' kinds, WARP_SPECIALIZE included.)
    shapes = [(16, 32, 16, 4, 1, 1, 2, False)] if interpreting() else _tma_gpu_shapes(backward)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PROGRAMS_PER_SM": p,
                           "SUBTILE": sub, "WARP_SPECIALIZE": ws},
                          num_warps=w, num_stages=s, pre_hook=hook)
            for bm, bn, bk, w, s, p, sub, ws in shapes]


def _tma_gpu_shapes(backward):
    """_tma_configs's tuples on a GPU."""
    if backward:
        shapes = [(128, 256, 64, 8, 3, 1, 2, False), (128, 128, 64, 8, 4, 1, 1, False),
                  (128, 128, 64, 4, 2, 2, 2, False), (128, 64, 64, 4, 3, 2, 1, False)]
        # transposed tiles (N x M): BLOCK_N's rows split between the consumers
        ws_shapes = [(128, 128, 64, 4, 4, 1, 1, True), (64, 256, 64, 4, 4, 1, 1, True)]
    else:
        shapes = [(128, 256, 64, 8, 3, 1, 2, False), (128, 128, 64, 8, 4, 1, 1, False),
                  (128, 128, 64, 4, 3, 2, 2, False), (128, 64, 64, 4, 4, 2, 1, False)]
        ws_shapes = [(128, 256, 64, 4, 4, 1, 1, True), (128, 128, 64, 4, 4, 1, 1, True)]
    return shapes + ws_shapes if _warp_specialize_offered() else shapes


def _tma_prune(configs, named_args, **kwargs):
    """_prune, for the TMA kernels' arguments."""
    return _prune(configs, {"A": named_args["a_desc"].base, "M": named_args["M"],
                            "N": named_args["N"]})


_TMA_FWD_CONFIGS = _tma_configs(_tma_blocks("mk", "nk"), backward=False)
_TMA_BWD_CONFIGS = _tma_configs(_tma_blocks("mk", "kn"), backward=True)
_SUM_ROWS = min(c.kwargs["BLOCK_M"] for c in _CONFIGS + _TMA_BWD_CONFIGS)
_KEY = ["M_KEY", "N", "K"]
_matmul_bias_gelu_tuned = triton.autotune(
    configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_matmul_bias_gelu)
_matmul_gelu_bwd_tuned = triton.autotune(
    configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_matmul_gelu_bwd)
_TMA_KEY = ["M_KEY", "N", "K", "ELEM_BYTES"]  # descriptors carry no dtype the key would see
_matmul_bias_gelu_tma_tuned = triton.autotune(
    configs=_TMA_FWD_CONFIGS, key=_TMA_KEY,
    prune_configs_by={"early_config_prune": _tma_prune})(_matmul_bias_gelu_tma)
_matmul_gelu_bwd_tma_tuned = triton.autotune(
    configs=_TMA_BWD_CONFIGS, key=_TMA_KEY,
    prune_configs_by={"early_config_prune": _tma_prune})(_matmul_gelu_bwd_tma)


# ----------------------------------------------------------------------------- launchers

_empty = empty  # every output is allocated here (tests patch it to poison them)


# The work each launch must do (_common.launch_work): an (M x K) @ (K x N) product, 2 M N K
# FLOPs; every tensor argument is read or written whole.
LAUNCH_WORK = {name: lambda a: {"flops": 2 * a["M"] * a["N"] * a["K"]}
               for name in ("_matmul_bias_gelu", "_matmul_gelu_bwd", "_matmul_bias_gelu_tma",
                            "_matmul_gelu_bwd_tma")}


def _check(a, b, name_b):
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0] > 0, \
        f"a (M, K) and {name_b} (K, N), K > 0, expected, got {tuple(a.shape)} and {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"a and {name_b} must share a dtype, got {a.dtype} and {b.dtype}"


def _meta(a, K):
    return dict(GROUP_M=GROUP_M, EVEN_K=all(K % c.kwargs["BLOCK_K"] == 0 for c in _CONFIGS),
                DOT_PRECISION=dot_precision(a.dtype))


def _grid(M, N, device):
    """One program a tile, or a persistent configuration's programs an SM (at most a tile
    each)."""
    sms = sm_count(device.index) if device.type == "cuda" else _CPU_SMS

    def grid(meta):
        tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
        per_sm = meta["PROGRAMS_PER_SM"]
        return (min(tiles, per_sm * sms) if per_sm else tiles,)
    return grid


def _describable(t):
    """Whether a TMA descriptor can describe 2-D t: unit last stride, 16-byte aligned start and
    rows. An expanded t (row stride 0, e.g. the gradient of a sum) is left to the pointer
    kernels: no GPU run has checked a descriptor of rows at one address."""
    return (t.dim() == 2 and t.stride(1) == 1 and t.stride(0) > 0 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


@functools.lru_cache(maxsize=None)
def _tma_device(index):
    """Whether CUDA device ``index`` has a TMA (sm_90 and newer); asked once a device."""
    return torch.cuda.get_device_capability(index)[0] >= 9


def tma_applies(device, dtype):
    """Whether the TMA path is for operands of ``dtype`` on ``device``: an sm_90 or newer GPU
    with 16-bit operands (the TMA matmuls' usual case; fp32 operands, whose 64-wide tiles are
    rows wider than TMA's 128-byte swizzle, stay on the pointer kernels there), or the
    interpreter (any float dtype: the tests check the indexing in fp32). Not on a GPU where
    FASTMAE_TMA=0."""
    if device.type == "cuda":
        return _TMA_ON and _tma_device(device.index) and dtype.itemsize == 2
    return interpreting()


def tma_ok(device, out_dtype, N, **operands):
    """Whether the launchers can take their TMA path (``tma=True``) on ``device`` with these
    operands (keyword: tensor) and (M, N) outputs of out_dtype: tma_applies to each operand,
    and describable operands and output rows."""
    return (N * out_dtype.itemsize) % 16 == 0 and all(
        tma_applies(device, t.dtype) and _describable(t) for t in operands.values())


_FIELDS = dataclasses.fields(TensorDescriptor)
# the fields after base, shape, strides and block_shape (padding, and in Triton 3.9
# round_f32_to_tf32), all with defaults, or None where one has none (this Triton's own way then)
_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in _FIELDS[4:]}
if ([f.name for f in _FIELDS[:4]] != ["base", "shape", "strides", "block_shape"]
        or dataclasses.MISSING in _DESCRIPTOR_DEFAULTS.values()):
    _DESCRIPTOR_DEFAULTS = None


def _descriptor(t):
    """A TMA descriptor of 2-D t, which _check_tma has found describable. Built without the
    dataclass's __init__, whose checks repeat _check_tma's (and check the placeholder block
    shape) four times a launch, on the host's critical path in an eager step. The block shape
    is a placeholder: the configuration's pre-hook sets it."""
    if _DESCRIPTOR_DEFAULTS is None:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])
    d = TensorDescriptor.__new__(TensorDescriptor)
    d.__dict__.update(_DESCRIPTOR_DEFAULTS)
    d.base, d.shape, d.strides, d.block_shape = t, list(t.shape), list(t.stride()), [16, 16]
    return d


def _check_tma(device, out_dtype, N, **operands):
    """Raise, naming why, unless tma_ok (the launchers' outputs are fresh, aligned, and their
    rows N elements of out_dtype)."""
    if tma_ok(device, out_dtype, N, **operands):
        return
    for name, t in operands.items():
        if not _describable(t):
            raise ValueError(f"tma=True: {name} must be 2-D with a unit last stride and 16-byte "
                             f"aligned start and rows, got strides {tuple(t.stride())} of "
                             f"{t.dtype}")
    dtypes = sorted({str(t.dtype) for t in operands.values()})
    raise ValueError(f"tma=True needs an sm_90 or newer GPU with 16-bit operands, or the "
                     f"interpreter, and 16-byte output rows; got {device}, {dtypes} and "
                     f"N = {N} of {out_dtype}")


def matmul_bias_gelu(a, w, bias, out_dtype: torch.dtype, tma=False):
    """(f, g) for a (M, K) and w (N, K) of one dtype (any strides), bias (N,): f = a @ w.T rounded
    to out_dtype, g = gelu_erf(f + bias) in out_dtype (computed in fp32), both (M, N)
    contiguous. fp32 operands multiply in full fp32 ("ieee"), never TF32. tma=True: the TMA
    kernel (see there; where tma_ok)."""
    b = w.t()
    _check(a, b, "w.T")
    M, K = a.shape
    N = b.shape[1]
    f = _empty((M, N), out_dtype, a.device)
    g = _empty((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return f, g
    m_key = next_pow2(M)
    if tma:
        _check_tma(a.device, out_dtype, N, a=a, w=w)
        size = a.element_size()
        launch_tuned(_matmul_bias_gelu_tma_tuned, _grid(M, N, a.device), (m_key, N, K, size),
                     _descriptor(a), _descriptor(w), bias, _descriptor(f), _descriptor(g), f, g,
                     M, N, K, m_key, size, f.stride(0), g.stride(0), GROUP_M=GROUP_M,
                     DOT_PRECISION=dot_precision(a.dtype))
        return f, g
    launch_tuned(_matmul_bias_gelu_tuned, _grid(M, N, a.device), (m_key, N, K),
                 a, b, bias, f, g, M, N, K, m_key,
                 a.stride(0), a.stride(1), b.stride(0), b.stride(1), f.stride(0), g.stride(0),
                 **_meta(a, K))
    return f, g


def matmul_gelu_bwd(dm, w, f, bias, dx_dtype: torch.dtype, reduce=True, tma=False):
    """(df, dbias) for dm (M, K) and w (K, N) of one dtype (any strides), f (M, N) fc1's saved
    output and bias (N,) its bias: df = (dm @ w) * gelu'(f + bias) (the product kept in fp32),
    (M, N) contiguous in dx_dtype; dbias (N,) fp32, the column sums of the fp32 df. With
    reduce=False, dbias's partial sums instead, (row blocks, N) fp32, for
    partial_sums.sum_partials. tma=True: the TMA kernel (see there; where tma_ok)."""
    _check(dm, w, "w")
    M, K = dm.shape
    N = w.shape[1]
    assert f.shape == (M, N), f"f must be ({M}, {N}), got {tuple(f.shape)}"
    if f.stride(1) != 1:
        f = f.contiguous()
    df = _empty((M, N), dx_dtype, dm.device)
    if M == 0 or N == 0:
        if not reduce:
            return df, _empty((0, N), torch.float32, dm.device)
        return df, torch.zeros(N, dtype=torch.float32, device=dm.device)
    m_key = next_pow2(M)
    db_part = _empty((cdiv(M, _SUM_ROWS), N), torch.float32, dm.device)
    if tma:
        _check_tma(dm.device, dx_dtype, N, dm=dm, w=w, f=f)
        size = dm.element_size()
        launch_tuned(_matmul_gelu_bwd_tma_tuned, _grid(M, N, dm.device), (m_key, N, K, size),
                     _descriptor(dm), _descriptor(w), _descriptor(f), bias, _descriptor(df),
                     db_part, f, df, M, N, K, m_key, size, f.stride(0), df.stride(0),
                     GROUP_M=GROUP_M, DOT_PRECISION=dot_precision(dm.dtype), SUM_ROWS=_SUM_ROWS)
        return df, db_part.sum(0) if reduce else db_part
    launch_tuned(_matmul_gelu_bwd_tuned, _grid(M, N, dm.device), (m_key, N, K),
                 dm, w, f, bias, df, db_part, M, N, K, m_key,
                 dm.stride(0), dm.stride(1), w.stride(0), w.stride(1), f.stride(0), df.stride(0),
                 **_meta(dm, K), SUM_ROWS=_SUM_ROWS)
    return df, db_part.sum(0) if reduce else db_part
