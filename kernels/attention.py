"""Non-causal multi-head attention, FlashAttention-2 style: o = softmax(q k^T * scale) v.

Shapes are (B, H, N, d) with any strides (notably views of the packed (B, N, 3, H, d) output of
the qkv projection), for MAE's short, odd sequences (encoder N = 50 / 65, decoder N = 197 / 257)
and longer ones. The head dimension is padded to BLOCK_D = next_pow2(d) and masked.

Grid: (batch * head) on axis 0 (up to 2**31 - 1 programs), sequence blocks on axis 1.

Forward (`attention_fwd`): one program per (batch*head, query block) keeps its query tile in
registers and sweeps the keys. When one key tile holds every key (BLOCK_N >= N: the short path,
chosen for N <= 256 when it is the fastest configuration) there is no online-softmax loop;
otherwise the keys are swept in blocks with the online softmax (running max and sum, fp32). The
softmax runs in base 2, log2(e) folded into the scale. The row log-sum-exp (natural log) is
saved for the backward.

Every sweep over a sequence (the forward's and dQ's over keys, dK-dV's over queries) ends with a
step of only N % BLOCK rows rounded up to a power of two (`_tail`): MAE's decoder N = 197 in
blocks of 64 computes 3 x 64 + 16 rows, not 256. The last block a program owns is cut the same way:
the forward's and dQ's last query block (a TAIL_M-row tile), dK-dV's last key block (TAIL_N keys).

Backward (`attention_bwd`), deterministic (no atomics), nothing of size N x N in global memory:
- short sequences (one key tile of next_pow2(N) x next_pow2(d) <= _FUSED_BWD_MAX_TILE elements,
  half that for fp32; e.g. N = 50 with d <= 128, N = 197 with d = 32, but not N = 65 with d = 80,
  nor N = 257), where timing the first call finds it faster than the two-kernel path (see
  `_bwd_strategy`): ONE fused kernel per batch*head keeps all keys
  and values in registers, sweeps the query blocks once, and computes dQ (complete, since every
  key is in the tile), dK and dV; delta = rowsum(dO * O) is computed inline.
- short sequences whose queries fit one tile likewise (`_attn_bwd_fused_q`, timed where N > 64):
  ONE kernel per batch*head keeps every query, dO and the dQ accumulator, sweeps the key
  blocks once, and stores each block's dK and dV when its step ends.
- otherwise two kernels: `_attn_bwd_dq` over query blocks (sweeps the keys; also writes each
  row's lse in log2 units and delta, side by side), then `_attn_bwd_dkdv` over key blocks (sweeps
  the queries, reading a row's two statistics as one pair).
Where one step of the query sweep holds every query (BLOCK_M >= N, e.g. the encoder's N = 50), the
sweep is straight-line code that stores each gradient as soon as it is complete
(`_attn_bwd_one_step`: far fewer registers than the loop, whose accumulators live to its end).
Optionally (``dsum``) each program also writes the fp32 column sums of the gradient rows it owns
to a small partial buffer: summed over its rows, the qkv projection's bias gradient, without a
reduction pass over the packed gradient (which costs a read of all of it).
"""
import os

import torch
import triton
import triton.language as tl

from ._common import (cdiv, dot_precision, empty, interpreting, keep_faster, launch_tuned,
                      next_pow2)

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): ln(x) = log2(x) * LN2

# The fused backward keeps K, V, dK, dV tiles of BLOCK_N x BLOCK_D in registers; above this many
# elements per tile it would spill, and the two-kernel backward is used instead.
_FUSED_BWD_MAX_TILE = 8192
# A (batch, head) slice's in-tile offsets are int32 (row * stride); larger strides are copied.
_MAX_TILE_ROWS = 256


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _head_and_start(N_CTX, BLOCK: tl.constexpr):
    """(batch x head index as int64, first row of this program's block) of a 1-D grid of
    B * H * cdiv(N, BLOCK) programs, a head's blocks adjacent in launch order. What they all read
    (the forward's and dQ's keys and values, dK-dV's queries and output gradients) is then read
    from memory by the first and from L2 by the rest: on a (B * H, blocks) grid a head's blocks ran
    B * H programs apart, the MAE decoder's other heads reading about 100 MB of keys and values in
    between at batch 256 (our arithmetic), more than the 50 MB of an H100's or H200's L2."""
    n_blocks = tl.cdiv(N_CTX, BLOCK)
    pid = tl.program_id(0)
    pid_bh = pid // n_blocks
    return pid_bh.to(tl.int64), (pid - pid_bh * n_blocks) * BLOCK


@triton.jit
def _load_tile(
    base,  # pointer to row 0 of the tile, (rows, d) any strides
    offs_r,  # (ROWS,) int32 row indices relative to base
    offs_d,  # (BLOCK_D,) int32 column indices
    stride_r,
    stride_d,
    n_rows,  # rows with index < n_rows are in bounds
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    """A (ROWS, BLOCK_D) tile, zero outside the rows and the head dimension."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(
    base,  # pointer to row 0 of the tile, (rows, d) any strides
    value,  # (ROWS, BLOCK_D) fp32, cast to the pointer's dtype
    offs_r,
    offs_d,
    stride_r,
    stride_d,
    n_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if BLOCK_D == HEAD_DIM:
        mask = offs_r[:, None] < n_rows
    else:
        mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _store_col_sums(
    base,  # pointer to [b, row0, section, h, 0] of the (B, R, 3, H, d) fp32 column sums
    sums,  # (BLOCK_D,) fp32: this program's column sums over its rows of the sequence
    row0,  # the first of the OWN partial rows this program owns (its first sequence row / SUM_ROWS)
    n_rows,  # R = cdiv(N, SUM_ROWS): rows at or past it are not stored
    stride_sr,
    offs_d,
    OWN: tl.constexpr,  # partial rows a program owns: its sequence rows / SUM_ROWS, rounded up
    HEAD_DIM: tl.constexpr,
):
    """The sums in the program's first partial row, zeros in the others it owns: every row of
    the buffer is written by exactly one program, whatever the tile sizes the autotuner chose,
    so it needs no clearing and its reduction over rows is deterministic."""
    d_ok = offs_d < HEAD_DIM
    tl.store(base + offs_d, sums, mask=d_ok)
    for i in tl.static_range(1, OWN):
        if row0 + i < n_rows:
            tl.store(base + i * stride_sr + offs_d, tl.zeros_like(sums), mask=d_ok)


# ----------------------------------------------------------------------------- forward

# The forward's softmax runs on unscaled scores where the scale is positive (POS_SCALE, every
# real use): max(s) * scale = max(s * scale) exactly then (rounding is monotonic), so the scale
# is applied once a row to the max and folded into the exp's FFMA for each element, instead of
# a multiply an element first. At the decoder's head dimension of 32 the loop is bound by its
# exps and by instruction issue, not by its MMAs (our arithmetic): with 128 x 64 tiles at 4
# warps (sm_90 SASS from Triton 3.6, tests/_kernel_capture.py attention --verbose) a warp
# issued 532 instructions an iteration, ~530 cycles of a scheduler, and 66 exps, ~530 cycles of
# its share of the SM's exp unit (16 results a clock), against ~280 tensor-core cycles for the
# iteration's two 128 x 64 x 32 products. With this it issues 470, under the exp unit's bound,
# in 135 registers instead of 158 (more programs fit an SM); fewer scores (the query tail
# below) are what shortens the exp-bound part.
@triton.jit
def _scores(q, k, qk_scale, POS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(scores, scale): q k^T and the scale still to apply to them (qk_scale or 1)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if POS_SCALE:
        scale = qk_scale
    else:  # a negative scale turns the max into a min: scale the scores first
        s = s * qk_scale
        scale = 1.0
    return s, scale


@triton.jit
def _attn_fwd_block(
    acc, m_i, l_i,  # (BLOCK_M, BLOCK_D) fp32, (BLOCK_M,) fp32 running max (log2 units), sum
    q,  # (BLOCK_M, BLOCK_D) input dtype
    k_base, v_base,  # pointers to key / value row 0 of this (batch, head)
    start_n, N_CTX, qk_scale,
    offs_n, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, POS_SCALE: tl.constexpr,
):
    """One step of the online softmax over the keys [start_n, start_n + BLOCK_N)."""
    row0 = tl.cast(start_n, tl.int64)
    k = _load_tile(k_base + row0 * stride_kn, offs_n, offs_d, stride_kn, stride_kd, N_CTX - start_n,
                   HEAD_DIM, BLOCK_D, MASK_N)
    v = _load_tile(v_base + row0 * stride_vn, offs_n, offs_d, stride_vn, stride_vd, N_CTX - start_n,
                   HEAD_DIM, BLOCK_D, MASK_N)
    qk, scale = _scores(q, k, qk_scale, POS_SCALE, DOT_PRECISION)
    if MASK_N:
        qk = tl.where(offs_n[None, :] < N_CTX - start_n, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)  # finite: every block holds at least one key
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_rows(
    q_base, k_base, v_base, o_base,  # pointers to row start_m of this (batch, head)'s Q and O,
    lse_row,  # and row 0 of its K and V; lse_row: to its lse at row start_m
    rows_left,  # N_CTX - start_m: rows at or past it are not stored
    N_CTX, qk_scale,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od,
    ROWS: tl.constexpr,  # query rows of this tile
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_N: tl.constexpr,
    ONE_TILE: tl.constexpr, DOT_PRECISION: tl.constexpr, POS_SCALE: tl.constexpr,
):
    """Attention of ROWS query rows against every key: o and lse stored."""
    offs_m = tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # Rows past N load as zeros: their scores are finite, and they are never stored.
    q = _load_tile(q_base, offs_m, offs_d, stride_qn, stride_qd, rows_left, HEAD_DIM, BLOCK_D, True)

    if ONE_TILE:
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, N_CTX, HEAD_DIM, BLOCK_D, True)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, N_CTX, HEAD_DIM, BLOCK_D, True)
        qk, scale = _scores(q, k, qk_scale, POS_SCALE, DOT_PRECISION)
        qk = tl.where(offs_n[None, :] < N_CTX, qk, float("-inf"))
        m_i = tl.max(qk, 1) * scale
        p = tl.math.exp2(qk * scale - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    else:
        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        n_full = (N_CTX // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):  # full key blocks: no masks on keys
            acc, m_i, l_i = _attn_fwd_block(
                acc, m_i, l_i, q, k_base, v_base, start_n, N_CTX, qk_scale, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, HEAD_DIM, BLOCK_D, False, DOT_PRECISION,
                POS_SCALE)
        for start_n in range(n_full, N_CTX, TAIL_N):  # the rest, in one block of TAIL_N keys
            acc, m_i, l_i = _attn_fwd_block(
                acc, m_i, l_i, q, k_base, v_base, start_n, N_CTX, qk_scale, tl.arange(0, TAIL_N),
                offs_d, stride_kn, stride_kd, stride_vn, stride_vd, HEAD_DIM, BLOCK_D, True,
                DOT_PRECISION, POS_SCALE)

    # one division a row, not one an element (an fp32 division is ~8 instructions on sm_90)
    o = acc * (1.0 / l_i)[:, None]
    _store_tile(o_base, o, offs_m, offs_d, stride_on, stride_od, rows_left, HEAD_DIM, BLOCK_D)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log
    tl.store(lse_row + offs_m, lse, mask=offs_m < rows_left)


@triton.jit
def _attn_fwd(
    Q,  # (B, H, N, d) fp32 | fp16 | bf16, any strides
    K,  # (B, H, N, d) q's dtype, any strides
    V,  # (B, H, N, d) q's dtype, any strides
    O,  # (B, H, N, d) q's dtype, any strides (default storage (B, N, H, d))
    LSE,  # (B, H, N) fp32 contiguous: natural-log log-sum-exp of each row of scaled scores
    qk_scale,  # fp32: scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N_CTX,
    BH_CLASS,  # _bh_class(B, H): a key of the autotuner only, unused here
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TAIL_M: tl.constexpr,  # query rows of the last block when N % BLOCK_M (see _tail)
    TAIL_N: tl.constexpr,  # keys of the loop's last step when N % BLOCK_N (see _tail)
    ONE_TILE: tl.constexpr,  # BLOCK_N >= N_CTX: every key in one tile, no online softmax
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    POS_SCALE: tl.constexpr,  # qk_scale > 0: the softmax takes unscaled scores (see _scores)
):
    pid_bh, start_m = _head_and_start(N_CTX, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    q_base = Q + b * stride_qb + h * stride_qh + tl.cast(start_m, tl.int64) * stride_qn
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh + tl.cast(start_m, tl.int64) * stride_on
    lse_row = LSE + pid_bh * N_CTX + start_m
    rows_left = N_CTX - start_m
    # The last query block computes only TAIL_M rows (MAE's decoder, N = 197 in blocks of 64: 3 x
    # 64 + 16 = 208 rows instead of 256); both tile sizes are compiled where they differ.
    if TAIL_M == BLOCK_M or rows_left >= BLOCK_M:
        _attn_fwd_rows(q_base, k_base, v_base, o_base, lse_row, rows_left, N_CTX, qk_scale,
                       stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                       stride_on, stride_od, BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_D, TAIL_N,
                       ONE_TILE, DOT_PRECISION, POS_SCALE)
    else:
        _attn_fwd_rows(q_base, k_base, v_base, o_base, lse_row, rows_left, N_CTX, qk_scale,
                       stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                       stride_on, stride_od, TAIL_M, HEAD_DIM, BLOCK_N, BLOCK_D, TAIL_N,
                       ONE_TILE, DOT_PRECISION, POS_SCALE)


# ----------------------------------------------------------------------------- backward
#
# Forward, per (batch, head), row i of the queries, column j of the keys:
#   S = scale * Q K^T,  P = softmax_rows(S) = exp(S - lse[:, None]),  O = P V.
# Backward, given dO:
#   dV = P^T dO
#   dP = dO V^T
#   dS = P * (dP - delta[:, None]),  delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
#   dQ = scale * dS K
#   dK = scale * dS^T Q
# P is recomputed tile by tile from Q, K and the saved lse (exp2 with log2(e) folded into the
# scale); nothing of size N x N is written to global memory. Each output row is owned by one
# program (dK, dV by the program of its key block, dQ by that of its query block, or all three
# by one program when one tile holds every key), so the result is deterministic.
#
# Rows past N: queries, dO and O load as zeros and lse / delta as 0, so those columns of P^T
# come out finite (exp2(0)) and contribute exactly 0 to dV, dS and dK. Keys past N are zeros too,
# but exp2(0 - lse) may overflow, so P is zeroed there wherever those keys feed dQ.

@triton.jit
def _attn_bwd_step_inputs(
    q_bh, do_bh, o_bh,  # pointers to row 0 of this (batch, head)'s Q, dO, O
    lse_bh,  # pointer to this (batch, head)'s (N,) lse (read when FUSE_DQ)
    stats_bh,  # pointer to this (batch, head)'s (N, 2) [lse * log2(e), delta] (when not FUSE_DQ)
    start_m, N_CTX,
    offs_m,  # (ROWS,) query rows of this step, relative to start_m
    offs_d,
    stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_M: tl.constexpr,  # rows past N possible in this step
    FUSE_DQ: tl.constexpr,
):
    """What a step of the query sweep reads of its ROWS queries: q, dO (ROWS, BLOCK_D), their
    lse in log2 units and delta (ROWS,) fp32 (0 past N), and which rows are < N."""
    row0_m = tl.cast(start_m, tl.int64)
    rows_left = N_CTX - start_m
    row_valid = offs_m < rows_left
    q = _load_tile(q_bh + row0_m * stride_qn, offs_m, offs_d, stride_qn, stride_qd, rows_left,
                   HEAD_DIM, BLOCK_D, MASK_M)
    do = _load_tile(do_bh + row0_m * stride_don, offs_m, offs_d, stride_don, stride_dod, rows_left,
                    HEAD_DIM, BLOCK_D, MASK_M)
    if FUSE_DQ:
        if MASK_M:
            lse = tl.load(lse_bh + start_m + offs_m, mask=row_valid, other=0.0)
        else:
            lse = tl.load(lse_bh + start_m + offs_m)
        lse2 = lse * 1.4426950408889634
        o = _load_tile(o_bh + row0_m * stride_on, offs_m, offs_d, stride_on, stride_od, rows_left,
                       HEAD_DIM, BLOCK_D, MASK_M)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    else:
        # a row's two statistics as one pair: the (keys x queries) tiles below need them in
        # every thread for each of its query columns, which loaded from two arrays took 32
        # 4-byte cp.async copies a thread an iteration (64 queries a step, 4 warps); the
        # (ROWS, 2) tile compiles to one copy and a spread through shared memory (5 copies an
        # iteration in all: sm_90, Triton 3.6)
        stats = stats_bh + 2 * (start_m + offs_m)[:, None] + tl.arange(0, 2)[None, :]
        if MASK_M:
            lse2, delta = tl.split(tl.load(stats, mask=row_valid[:, None], other=0.0))
        else:
            lse2, delta = tl.split(tl.load(stats))
    return q, do, lse2, delta, row_valid


@triton.jit
def _attn_bwd_p_t(k, q, lse2, key_valid, qk_scale,
                  FUSE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """P^T (keys x queries) of this program's keys and a step's queries, fp32; transposed so
    that dK and dV accumulate without transposes. Zero at keys past N where they feed dQ."""
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    p_t = tl.math.exp2(qk_t - lse2[None, :])
    if FUSE_DQ:
        p_t = tl.where(key_valid[:, None], p_t, 0.0)
    return p_t


@triton.jit
def _attn_bwd_dkdv_block(
    dk, dv,  # (BLOCK_N, BLOCK_D) fp32 accumulators
    dq_sum,  # (BLOCK_D,) fp32: column sums of dQ so far (FUSE_DQ and HAS_SUMS)
    k, v,  # (BLOCK_N, BLOCK_D) this program's keys and values
    key_valid,  # (BLOCK_N,) keys < N
    start_m, N_CTX, sm_scale, qk_scale,
    q_bh, do_bh, o_bh, dq_bh,  # pointers to row 0 of this (batch, head)'s Q, dO, O, dQ
    lse_bh, stats_bh,  # as _attn_bwd_step_inputs's
    offs_m,  # (ROWS,) query rows of this step, relative to start_m
    offs_d,
    stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od, stride_dqn, stride_dqd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_M: tl.constexpr,  # rows past N possible in this block
    FUSE_DQ: tl.constexpr, HAS_SUMS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One step of the query sweep: the queries [start_m, start_m + ROWS) against this
    program's keys."""
    q, do, lse2, delta, row_valid = _attn_bwd_step_inputs(
        q_bh, do_bh, o_bh, lse_bh, stats_bh, start_m, N_CTX, offs_m, offs_d,
        stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od,
        HEAD_DIM, BLOCK_D, MASK_M, FUSE_DQ)
    p_t = _attn_bwd_p_t(k, q, lse2, key_valid, qk_scale, FUSE_DQ, DOT_PRECISION)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    if FUSE_DQ:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale
        row0_m = tl.cast(start_m, tl.int64)
        _store_tile(dq_bh + row0_m * stride_dqn, dq, offs_m, offs_d, stride_dqn, stride_dqd,
                    N_CTX - start_m, HEAD_DIM, BLOCK_D)
        if HAS_SUMS:
            if MASK_M:
                dq = tl.where(row_valid[:, None], dq, 0.0)
            dq_sum += tl.sum(dq, 0)
    return dk, dv, dq_sum


@triton.jit
def _attn_bwd_one_step(
    k, v,  # (KEYS, BLOCK_D) this program's keys and values
    key_valid,  # (KEYS,) keys < N
    keys_left, N_CTX, sm_scale, qk_scale,
    q_bh, do_bh, o_bh, dq_bh, lse_bh, stats_bh,  # as _attn_bwd_dkdv_block's
    dk_row, dv_row,  # pointers to this program's first key row of dK and dV
    s_base,  # pointer to this program's first partial row of DSUM, section 0 (HAS_SUMS)
    row_s, n_rows,  # that partial row, and DSUM's rows
    offs_m, offs_n, offs_d,
    stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od, stride_dqn, stride_dqd,
    stride_dkn, stride_dkd, stride_dvn, stride_dvd, stride_sr, stride_ss,
    OWN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    FUSE_DQ: tl.constexpr, HAS_SUMS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Every query against this program's keys in one step (BLOCK_M >= N: the encoder's N = 50
    in 64 rows): the sweep's one iteration as straight-line code, dV, dK and dQ each stored, with
    its column sums, as soon as it is complete, so that its registers are free for the next. In
    the loop every accumulator lives to the end: at N = 50, d = 64 (bf16, column sums on, sm_90,
    Triton 3.6: tests/_kernel_capture.py attention --mode full --verbose) the fused kernel's
    64-row step took 255 registers a thread and spilled at 4 warps (2 programs an SM), 222 at 8
    (1); straight-line, 138 (3) and 126 (2)."""
    q, do, lse2, delta, row_valid = _attn_bwd_step_inputs(
        q_bh, do_bh, o_bh, lse_bh, stats_bh, 0, N_CTX, offs_m, offs_d,
        stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od,
        HEAD_DIM, BLOCK_D, True, FUSE_DQ)
    p_t = _attn_bwd_p_t(k, q, lse2, key_valid, qk_scale, FUSE_DQ, DOT_PRECISION)
    dv = tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    _store_tile(dv_row, dv, offs_n, offs_d, stride_dvn, stride_dvd, keys_left, HEAD_DIM, BLOCK_D)
    if HAS_SUMS:
        _store_col_sums(s_base + 2 * stride_ss, tl.sum(tl.where(key_valid[:, None], dv, 0.0), 0),
                        row_s, n_rows, stride_sr, offs_d, OWN, HEAD_DIM)
    ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION) * sm_scale
    _store_tile(dk_row, dk, offs_n, offs_d, stride_dkn, stride_dkd, keys_left, HEAD_DIM, BLOCK_D)
    if HAS_SUMS:
        _store_col_sums(s_base + stride_ss, tl.sum(tl.where(key_valid[:, None], dk, 0.0), 0),
                        row_s, n_rows, stride_sr, offs_d, OWN, HEAD_DIM)
    if FUSE_DQ:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale
        _store_tile(dq_bh, dq, offs_m, offs_d, stride_dqn, stride_dqd, N_CTX, HEAD_DIM, BLOCK_D)
        if HAS_SUMS:
            _store_col_sums(s_base, tl.sum(tl.where(row_valid[:, None], dq, 0.0), 0),
                            row_s, n_rows, stride_sr, offs_d, OWN, HEAD_DIM)


@triton.jit
def _attn_bwd_dkdv_keys(
    Q, K, V, O, DO, DQ, DK, DV, LSE, STATS, DSUM,  # as _attn_bwd_dkdv's
    pid_bh, b, h, start_n, N_CTX, sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_sb, stride_sr, stride_ss, stride_sh,
    KEYS: tl.constexpr,  # keys of this program's tile
    OWN: tl.constexpr,  # partial rows of DSUM the program owns (BLOCK_N / SUM_ROWS, rounded up)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_M: tl.constexpr,
    FUSE_DQ: tl.constexpr, HAS_SUMS: tl.constexpr, SUM_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_STEP: tl.constexpr,
):
    """dK and dV of the KEYS keys from start_n, swept over every query (FUSE_DQ: dQ and delta
    too)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, KEYS)
    offs_d = tl.arange(0, BLOCK_D)
    keys_left = N_CTX - start_n
    row0_n = tl.cast(start_n, tl.int64)

    k = _load_tile(K + b * stride_kb + h * stride_kh + row0_n * stride_kn, offs_n, offs_d,
                   stride_kn, stride_kd, keys_left, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + b * stride_vb + h * stride_vh + row0_n * stride_vn, offs_n, offs_d,
                   stride_vn, stride_vd, keys_left, HEAD_DIM, BLOCK_D, True)
    q_bh = Q + b * stride_qb + h * stride_qh
    do_bh = DO + b * stride_dob + h * stride_doh
    o_bh = O + b * stride_ob + h * stride_oh
    dq_bh = DQ + b * stride_dqb + h * stride_dqh
    lse_bh = LSE + pid_bh * N_CTX
    stats_bh = STATS + pid_bh * N_CTX * 2
    key_valid = offs_n < keys_left
    # the fp32 gradients' column sums over this program's keys (rows past N can hold garbage
    # where P was not zeroed: masked), with FUSE_DQ dQ's over every query (HAS_SUMS); these
    # pointers are formed where they are used, not held through the sweep
    row_s = start_n // SUM_ROWS
    n_rows = (N_CTX + SUM_ROWS - 1) // SUM_ROWS

    if ONE_STEP:
        dk_row = DK + b * stride_dkb + h * stride_dkh + row0_n * stride_dkn
        dv_row = DV + b * stride_dvb + h * stride_dvh + row0_n * stride_dvn
        s_base = DSUM + b * stride_sb + row_s * stride_sr + h * stride_sh
        _attn_bwd_one_step(
            k, v, key_valid, keys_left, N_CTX, sm_scale, qk_scale,
            q_bh, do_bh, o_bh, dq_bh, lse_bh, stats_bh, dk_row, dv_row, s_base, row_s, n_rows,
            offs_m, offs_n, offs_d,
            stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od,
            stride_dqn, stride_dqd, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
            stride_sr, stride_ss, OWN, HEAD_DIM, BLOCK_D, FUSE_DQ, HAS_SUMS, DOT_PRECISION)
    else:
        dk = tl.zeros([KEYS, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([KEYS, BLOCK_D], dtype=tl.float32)
        dq_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        if TAIL_M < BLOCK_M:
            m_full = (N_CTX // BLOCK_M) * BLOCK_M
            for start_m in range(0, m_full, BLOCK_M):  # full query blocks: no masks on the rows
                dk, dv, dq_sum = _attn_bwd_dkdv_block(
                    dk, dv, dq_sum, k, v, key_valid, start_m, N_CTX, sm_scale, qk_scale,
                    q_bh, do_bh, o_bh, dq_bh, lse_bh, stats_bh, offs_m, offs_d,
                    stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od,
                    stride_dqn, stride_dqd, HEAD_DIM, BLOCK_D, False, FUSE_DQ, HAS_SUMS,
                    DOT_PRECISION)
            for start_m in range(m_full, N_CTX, TAIL_M):  # the rest, in one block of TAIL_M rows
                dk, dv, dq_sum = _attn_bwd_dkdv_block(
                    dk, dv, dq_sum, k, v, key_valid, start_m, N_CTX, sm_scale, qk_scale,
                    q_bh, do_bh, o_bh, dq_bh, lse_bh, stats_bh, tl.arange(0, TAIL_M), offs_d,
                    stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od,
                    stride_dqn, stride_dqd, HEAD_DIM, BLOCK_D, True, FUSE_DQ, HAS_SUMS,
                    DOT_PRECISION)
        else:  # no smaller last step to gain: one loop, one copy of its body (fewer registers)
            for start_m in range(0, N_CTX, BLOCK_M):
                dk, dv, dq_sum = _attn_bwd_dkdv_block(
                    dk, dv, dq_sum, k, v, key_valid, start_m, N_CTX, sm_scale, qk_scale,
                    q_bh, do_bh, o_bh, dq_bh, lse_bh, stats_bh, offs_m, offs_d,
                    stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od,
                    stride_dqn, stride_dqd, HEAD_DIM, BLOCK_D, True, FUSE_DQ, HAS_SUMS,
                    DOT_PRECISION)
        dk = dk * sm_scale
        _store_tile(DK + b * stride_dkb + h * stride_dkh + row0_n * stride_dkn, dk, offs_n,
                    offs_d, stride_dkn, stride_dkd, keys_left, HEAD_DIM, BLOCK_D)
        _store_tile(DV + b * stride_dvb + h * stride_dvh + row0_n * stride_dvn, dv, offs_n,
                    offs_d, stride_dvn, stride_dvd, keys_left, HEAD_DIM, BLOCK_D)
        if HAS_SUMS:
            s_base = DSUM + b * stride_sb + row_s * stride_sr + h * stride_sh
            if FUSE_DQ:
                _store_col_sums(s_base, dq_sum, row_s, n_rows, stride_sr, offs_d, OWN, HEAD_DIM)
            _store_col_sums(s_base + stride_ss, tl.sum(tl.where(key_valid[:, None], dk, 0.0), 0),
                            row_s, n_rows, stride_sr, offs_d, OWN, HEAD_DIM)
            _store_col_sums(s_base + 2 * stride_ss,
                            tl.sum(tl.where(key_valid[:, None], dv, 0.0), 0),
                            row_s, n_rows, stride_sr, offs_d, OWN, HEAD_DIM)


@triton.jit
def _attn_bwd_dkdv(
    Q,  # (B, H, N, d) fp32 | fp16 | bf16, any strides
    K,  # (B, H, N, d) any strides
    V,  # (B, H, N, d) any strides
    O,  # (B, H, N, d) any strides: read only when FUSE_DQ (delta computed inline)
    DO,  # (B, H, N, d) q's dtype, any strides (stride 0 allowed)
    DQ,  # (B, H, N, d) any strides: written only when FUSE_DQ
    DK,  # (B, H, N, d) any strides
    DV,  # (B, H, N, d) any strides
    LSE,  # (B, H, N) fp32 contiguous, natural log (from the forward)
    STATS,  # (B, H, N, 2) fp32 contiguous [lse * log2(e), rowsum(dO * O)] (not FUSE_DQ)
    DSUM,  # (B, R, 3, H, d) fp32, unit last stride: column sums of dQ, dK, dV (when HAS_SUMS)
    sm_scale,  # fp32: the softmax scale
    qk_scale,  # fp32: scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_sb, stride_sr, stride_ss, stride_sh,
    H, N_CTX,
    BH_CLASS,  # _bh_class(B, H): a key of the autotuner only, unused here
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step of the sweep
    BLOCK_N: tl.constexpr,  # keys owned by this program (all of them when FUSE_DQ)
    BLOCK_D: tl.constexpr,
    TAIL_M: tl.constexpr,  # rows of the sweep's last step when N % BLOCK_M (see _tail)
    TAIL_N: tl.constexpr,  # keys of the last key block when N % BLOCK_N (see _tail)
    FUSE_DQ: tl.constexpr,  # one key tile holds every key: also compute dQ and delta here
    HAS_SUMS: tl.constexpr,  # also write the column sums (the qkv bias gradient's partials)
    SUM_ROWS: tl.constexpr,  # sequence rows per partial row of DSUM
    DOT_PRECISION: tl.constexpr,
    ONE_STEP: tl.constexpr,  # BLOCK_M >= N: the query sweep is one step (_attn_bwd_one_step)
):
    pid_bh, start_n = _head_and_start(N_CTX, BLOCK_N)
    b = pid_bh // H
    h = pid_bh % H
    OWN: tl.constexpr = (BLOCK_N + SUM_ROWS - 1) // SUM_ROWS
    # The last key block's program runs a TAIL_N-key tile (MAE's decoder, N = 197 in blocks of
    # 64: its 5 keys in a tile of 16, not 64), as the query tails of the forward and dQ; it owns
    # the same partial rows of DSUM either way. (FUSE_DQ: BLOCK_N >= N, so TAIL_N == BLOCK_N.)
    if TAIL_N == BLOCK_N or N_CTX - start_n >= BLOCK_N:
        _attn_bwd_dkdv_keys(
            Q, K, V, O, DO, DQ, DK, DV, LSE, STATS, DSUM, pid_bh, b, h, start_n, N_CTX, sm_scale,
            qk_scale,
            stride_qb, stride_qh, stride_qn, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd,
            stride_ob, stride_oh, stride_on, stride_od,
            stride_dob, stride_doh, stride_don, stride_dod,
            stride_dqb, stride_dqh, stride_dqn, stride_dqd,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd,
            stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            stride_sb, stride_sr, stride_ss, stride_sh,
            BLOCK_N, OWN, HEAD_DIM, BLOCK_M, BLOCK_D, TAIL_M, FUSE_DQ, HAS_SUMS, SUM_ROWS,
            DOT_PRECISION, ONE_STEP)
    else:
        _attn_bwd_dkdv_keys(
            Q, K, V, O, DO, DQ, DK, DV, LSE, STATS, DSUM, pid_bh, b, h, start_n, N_CTX, sm_scale,
            qk_scale,
            stride_qb, stride_qh, stride_qn, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd,
            stride_ob, stride_oh, stride_on, stride_od,
            stride_dob, stride_doh, stride_don, stride_dod,
            stride_dqb, stride_dqh, stride_dqn, stride_dqd,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd,
            stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            stride_sb, stride_sr, stride_ss, stride_sh,
            TAIL_N, OWN, HEAD_DIM, BLOCK_M, BLOCK_D, TAIL_M, FUSE_DQ, HAS_SUMS, SUM_ROWS,
            DOT_PRECISION, ONE_STEP)


@triton.jit
def _attn_bwd_dq_block(
    dq,  # (BLOCK_M, BLOCK_D) fp32 accumulator
    q, do,  # (BLOCK_M, BLOCK_D) input dtype
    lse2, delta,  # (BLOCK_M,) fp32: lse in log2 units, rowsum(dO * O)
    k_base, v_base, start_n, N_CTX, qk_scale, offs_n, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row0 = tl.cast(start_n, tl.int64)
    k = _load_tile(k_base + row0 * stride_kn, offs_n, offs_d, stride_kn, stride_kd, N_CTX - start_n,
                   HEAD_DIM, BLOCK_D, MASK_N)
    v = _load_tile(v_base + row0 * stride_vn, offs_n, offs_d, stride_vn, stride_vd, N_CTX - start_n,
                   HEAD_DIM, BLOCK_D, MASK_N)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    if MASK_N:
        p = tl.where(offs_n[None, :] < N_CTX - start_n, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _attn_bwd_dq_rows(
    Q, DO, O, DQ,  # pointers to row start_m of this (batch, head)'s Q, dO, O, dQ
    k_base, v_base,  # pointers to key / value row 0 of this (batch, head)
    stats_row, lse_row,  # pointers to this (batch, head)'s STATS and lse at row start_m
    dsum_row,  # pointer to [b, start_m // SUM_ROWS, 0, h, 0] of DSUM (HAS_SUMS)
    row_s, rows_left, N_CTX, sm_scale, qk_scale,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od,
    stride_don, stride_dod, stride_dqn, stride_dqd, stride_sr,
    ROWS: tl.constexpr,  # query rows of this tile
    OWN: tl.constexpr,  # partial rows of DSUM the program owns (BLOCK_M / SUM_ROWS, rounded up)
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_N: tl.constexpr,
    HAS_SUMS: tl.constexpr, SUM_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of ROWS query rows (and their STATS, and dQ's column sums)."""
    offs_m = tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < rows_left
    q = _load_tile(Q, offs_m, offs_d, stride_qn, stride_qd, rows_left, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO, offs_m, offs_d, stride_don, stride_dod, rows_left, HEAD_DIM, BLOCK_D, True)
    o = _load_tile(O, offs_m, offs_d, stride_on, stride_od, rows_left, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse2 = tl.load(lse_row + offs_m, mask=row_valid, other=0.0) * 1.4426950408889634
    tl.store(stats_row + 2 * offs_m[:, None] + tl.arange(0, 2)[None, :], tl.join(lse2, delta),
             mask=row_valid[:, None])

    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    n_full = (N_CTX // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _attn_bwd_dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n, N_CTX, qk_scale,
                                offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
    for start_n in range(n_full, N_CTX, TAIL_N):  # the rest, in one block of TAIL_N keys
        dq = _attn_bwd_dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n, N_CTX, qk_scale,
                                tl.arange(0, TAIL_N), offs_d, stride_kn, stride_kd, stride_vn,
                                stride_vd, HEAD_DIM, BLOCK_D, True, DOT_PRECISION)
    dq = dq * sm_scale
    _store_tile(DQ, dq, offs_m, offs_d, stride_dqn, stride_dqd, rows_left, HEAD_DIM, BLOCK_D)
    if HAS_SUMS:
        _store_col_sums(dsum_row, tl.sum(tl.where(row_valid[:, None], dq, 0.0), 0), row_s,
                        (N_CTX + SUM_ROWS - 1) // SUM_ROWS, stride_sr, offs_d, OWN, HEAD_DIM)


@triton.jit
def _attn_bwd_dq(
    Q,  # (B, H, N, d) fp32 | fp16 | bf16, any strides
    K,  # (B, H, N, d) any strides
    V,  # (B, H, N, d) any strides
    O,  # (B, H, N, d) any strides
    DO,  # (B, H, N, d) q's dtype, any strides (stride 0 allowed)
    DQ,  # (B, H, N, d) any strides
    LSE,  # (B, H, N) fp32 contiguous, natural log (from the forward)
    STATS,  # (B, H, N, 2) fp32 contiguous: [lse * log2(e), rowsum(dO * O)], written here for
    # _attn_bwd_dkdv
    DSUM,  # (B, R, 3, H, d) fp32, unit last stride: column sums of dQ in section 0 (HAS_SUMS)
    sm_scale,  # fp32: the softmax scale
    qk_scale,  # fp32: scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_sb, stride_sr, stride_sh,
    H, N_CTX,
    BH_CLASS,  # _bh_class(B, H): a key of the autotuner only, unused here
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # keys per step of the sweep
    BLOCK_D: tl.constexpr,
    TAIL_M: tl.constexpr,  # query rows of the last block when N % BLOCK_M (see _tail)
    TAIL_N: tl.constexpr,  # keys of the sweep's last step when N % BLOCK_N (see _tail)
    HAS_SUMS: tl.constexpr,  # also write dQ's column sums
    SUM_ROWS: tl.constexpr,  # sequence rows per partial row of DSUM
    DOT_PRECISION: tl.constexpr,
):
    # The math is written above _attn_bwd_dkdv: here dQ = scale * sum over key blocks of dS K.
    pid_bh, start_m = _head_and_start(N_CTX, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    rows_left = N_CTX - start_m
    row0 = tl.cast(start_m, tl.int64)
    row_s = start_m // SUM_ROWS
    q_row = Q + b * stride_qb + h * stride_qh + row0 * stride_qn
    do_row = DO + b * stride_dob + h * stride_doh + row0 * stride_don
    o_row = O + b * stride_ob + h * stride_oh + row0 * stride_on
    dq_row = DQ + b * stride_dqb + h * stride_dqh + row0 * stride_dqn
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    stats_row = STATS + (pid_bh * N_CTX + start_m) * 2
    lse_row = LSE + pid_bh * N_CTX + start_m
    dsum_row = DSUM + b * stride_sb + row_s * stride_sr + h * stride_sh
    OWN: tl.constexpr = (BLOCK_M + SUM_ROWS - 1) // SUM_ROWS
    # the last query block runs a TAIL_M-row tile, as the forward's (compiled twice only where
    # TAIL_M differs); the program owns the same partial rows of DSUM either way
    if TAIL_M == BLOCK_M or rows_left >= BLOCK_M:
        _attn_bwd_dq_rows(q_row, do_row, o_row, dq_row, k_base, v_base, stats_row, lse_row,
                          dsum_row, row_s, rows_left, N_CTX, sm_scale, qk_scale,
                          stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                          stride_on, stride_od, stride_don, stride_dod, stride_dqn, stride_dqd,
                          stride_sr, BLOCK_M, OWN, HEAD_DIM, BLOCK_N, BLOCK_D, TAIL_N, HAS_SUMS,
                          SUM_ROWS, DOT_PRECISION)
    else:
        _attn_bwd_dq_rows(q_row, do_row, o_row, dq_row, k_base, v_base, stats_row, lse_row,
                          dsum_row, row_s, rows_left, N_CTX, sm_scale, qk_scale,
                          stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                          stride_on, stride_od, stride_don, stride_dod, stride_dqn, stride_dqd,
                          stride_sr, TAIL_M, OWN, HEAD_DIM, BLOCK_N, BLOCK_D, TAIL_N, HAS_SUMS,
                          SUM_ROWS, DOT_PRECISION)


# The fused_q backward: one program per (batch, head) holds every query (BLOCK_M >= N) and
# sweeps the keys in blocks, each step computing that block's dK and dV whole (stored at once)
# and adding its share of dQ to an fp32 accumulator in registers. Against the two-kernel
# backward it computes the scores and dP once instead of twice (5 products and one exp a score,
# not 7 and two) and needs no STATS pass; against the fused one (every key held, queries swept)
# it keeps one fp32 accumulator through the loop instead of two. The scores are laid out
# (queries x keys), as in dQ's sweep, so a row's lse and delta are per-row values held once.
# Rows past N load as zeros with lse = delta = 0: their P is 1 times a zero dO and their dS
# 1 * (0 - 0), so they add nothing to dV or dK; keys past N (the last step only) are zeroed in P,
# so they add nothing to dQ and their dK, dV rows come out zero (and are not stored).

@triton.jit
def _attn_bwd_fused_q_step(
    dq,  # (BLOCK_M, BLOCK_D) fp32 accumulator
    q, do,  # (BLOCK_M, BLOCK_D) input dtype: every query of this (batch, head)
    lse2, delta,  # (BLOCK_M,) fp32: lse in log2 units, rowsum(dO * O); 0 past N
    k_row, v_row, dk_row, dv_row,  # pointers to row start_n of this (batch, head)'s K, V, dK, dV
    keys_left,  # N_CTX - start_n: keys at or past it are padding
    sm_scale, qk_scale,
    offs_n,  # (KEYS,) key rows of this step, relative to start_n
    offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # keys past N possible in this step
    DOT_PRECISION: tl.constexpr,
):
    """One step of the key sweep: dK and dV of its KEYS keys stored, dQ's share added.
    Returns (dq, dK's column sums, dV's column sums over these keys)."""
    k = _load_tile(k_row, offs_n, offs_d, stride_kn, stride_kd, keys_left, HEAD_DIM, BLOCK_D,
                   MASK_N)
    v = _load_tile(v_row, offs_n, offs_d, stride_vn, stride_vd, keys_left, HEAD_DIM, BLOCK_D,
                   MASK_N)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    if MASK_N:  # a padding key's exp2(0 - lse) may be anything: zero, as it feeds dQ and dV
        p = tl.where(offs_n[None, :] < keys_left, p, 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    _store_tile(dv_row, dv, offs_n, offs_d, stride_dvn, stride_dvd, keys_left, HEAD_DIM, BLOCK_D)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION) * sm_scale
    _store_tile(dk_row, dk, offs_n, offs_d, stride_dkn, stride_dkd, keys_left, HEAD_DIM, BLOCK_D)
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq, tl.sum(dk, 0), tl.sum(dv, 0)


@triton.jit
def _attn_bwd_fused_q(
    Q,  # (B, H, N, d) fp32 | fp16 | bf16, any strides
    K,  # (B, H, N, d) any strides
    V,  # (B, H, N, d) any strides
    O,  # (B, H, N, d) any strides (delta = rowsum(dO * O) computed here)
    DO,  # (B, H, N, d) q's dtype, any strides (stride 0 allowed)
    DQ,  # (B, H, N, d) any strides
    DK,  # (B, H, N, d) any strides
    DV,  # (B, H, N, d) any strides
    LSE,  # (B, H, N) fp32 contiguous, natural log (from the forward)
    DSUM,  # (B, R, 3, H, d) fp32, unit last stride: column sums of dQ, dK, dV (when HAS_SUMS)
    sm_scale,  # fp32: the softmax scale
    qk_scale,  # fp32: scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_sb, stride_sr, stride_ss, stride_sh,
    H, N_CTX,
    N_SUM_ROWS,  # R, DSUM's partial rows (HAS_SUMS)
    BH_CLASS,  # _bh_class(B, H): a key of the autotuner only, unused here
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= N: every query in one tile
    BLOCK_N: tl.constexpr,  # keys per step of the sweep
    BLOCK_D: tl.constexpr,
    TAIL_N: tl.constexpr,  # keys of the sweep's last step when N % BLOCK_N (see _tail)
    HAS_SUMS: tl.constexpr,  # also write the column sums (the qkv bias gradient's partials)
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < N_CTX
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, N_CTX,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, stride_dod,
                    N_CTX, HEAD_DIM, BLOCK_D, True)
    o = _load_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_on, stride_od, N_CTX,
                   HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse2 = tl.load(LSE + pid_bh * N_CTX + offs_m, mask=row_valid, other=0.0) * 1.4426950408889634
    k_bh = K + b * stride_kb + h * stride_kh
    v_bh = V + b * stride_vb + h * stride_vh
    dk_bh = DK + b * stride_dkb + h * stride_dkh
    dv_bh = DV + b * stride_dvb + h * stride_dvh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dk_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    dv_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    n_full = (N_CTX // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full key blocks: no masks on the keys
        row0 = tl.cast(start_n, tl.int64)
        dq, dk_step, dv_step = _attn_bwd_fused_q_step(
            dq, q, do, lse2, delta, k_bh + row0 * stride_kn, v_bh + row0 * stride_vn,
            dk_bh + row0 * stride_dkn, dv_bh + row0 * stride_dvn, N_CTX - start_n,
            sm_scale, qk_scale, offs_n, offs_d,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_dkn, stride_dkd, stride_dvn,
            stride_dvd, HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
        dk_sum += dk_step
        dv_sum += dv_step
    for start_n in range(n_full, N_CTX, TAIL_N):  # the rest, in one block of TAIL_N keys
        row0 = tl.cast(start_n, tl.int64)
        dq, dk_step, dv_step = _attn_bwd_fused_q_step(
            dq, q, do, lse2, delta, k_bh + row0 * stride_kn, v_bh + row0 * stride_vn,
            dk_bh + row0 * stride_dkn, dv_bh + row0 * stride_dvn, N_CTX - start_n,
            sm_scale, qk_scale, tl.arange(0, TAIL_N), offs_d,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_dkn, stride_dkd, stride_dvn,
            stride_dvd, HEAD_DIM, BLOCK_D, True, DOT_PRECISION)
        dk_sum += dk_step
        dv_sum += dv_step
    dq = dq * sm_scale
    _store_tile(DQ + b * stride_dqb + h * stride_dqh, dq, offs_m, offs_d, stride_dqn, stride_dqd,
                N_CTX, HEAD_DIM, BLOCK_D)
    if HAS_SUMS:
        # the program owns every partial row of its (batch, head): the sums go in row 0, zeros
        # in the others
        s_bh = DSUM + b * stride_sb + h * stride_sh
        d_ok = offs_d < HEAD_DIM
        tl.store(s_bh + offs_d, tl.sum(tl.where(row_valid[:, None], dq, 0.0), 0), mask=d_ok)
        tl.store(s_bh + stride_ss + offs_d, dk_sum, mask=d_ok)
        tl.store(s_bh + 2 * stride_ss + offs_d, dv_sum, mask=d_ok)
        zeros = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(1, N_SUM_ROWS):
            for s in tl.static_range(3):
                tl.store(s_bh + r * stride_sr + s * stride_ss + offs_d, zeros, mask=d_ok)


# ----------------------------------------------------------------------------- autotuning
# Keyed on (N, d, _bh_class) (and, by the autotuner itself, the dtypes). Each pool is pruned per
# shape and dtype by register / shared-memory budgets calibrated on sm_90 compiles (triton 3.6,
# ptxas): the kept configurations compile without spills, or nearly so. fp32 inputs take IEEE
# dots on CUDA cores (no tensor cores), so they get small tiles only.
#
# Under the interpreter a single small configuration: BLOCK_N = 64 gives the one-tile forward for
# N <= 64 and the key loop beyond; BLOCK_M = 64 gives several query blocks from N = 65 on.

_SMEM_BUDGET = 200 * 1024  # bytes, under the 227 KiB an H100 block may use

# FASTMAE_ATTN_HEAD_TILES=0 (read at import): leave out the tilings whose one program holds every
# query of a head (the fused_q backward and the forward's 256-row tiles) -- what benches/
# gpu_suite.sh sets for the rest of its run when their first GPU check (stage 0c) fails.
_HEAD_TILES = os.environ.get("FASTMAE_ATTN_HEAD_TILES", "1").strip() != "0"

# FASTMAE_ATTN_AUTOTUNE=0: skip the search and take one configuration per shape (the largest
# tile kept by the pruning, more warps first): quick compiles for tests and short runs.
_AUTOTUNE = os.environ.get("FASTMAE_ATTN_AUTOTUNE", "1") not in ("0", "")


def _finish(kept, configs):
    if not kept:
        return configs[:1]
    if not _AUTOTUNE:
        def tile(c):
            return c.kwargs.get("BLOCK_M", 1) * c.kwargs.get("BLOCK_N", 1)
        kept = sorted(kept, key=lambda c: (-tile(c), -c.num_warps, c.num_stages))[:1]
    return kept


def _shape_args(named_args, kwargs):
    args = {**named_args, **kwargs}
    n_ctx = args["N_CTX"]
    return n_ctx, max(16, next_pow2(n_ctx)), args["BLOCK_D"], args["Q"].dtype == torch.float32


def _keep_fwd(bm, bn, w, s, n_ctx, n_pow2, bd, fp32):
    if bm > n_pow2 or bn > n_pow2:
        return False
    one_tile = bn >= n_ctx
    if one_tile != (s == 1):  # one tile: no loop to pipeline; a loop: pipeline its loads
        return False
    if fp32:  # CUDA-core dots: the three tiles q, k, v and the scores stay small
        budget = 131072 if one_tile and bd <= 64 else 65536
        return w == 4 and bm * bn * bd <= budget and (one_tile or (s == 2 and bn >= min(32, n_pow2)))
    # a tile of 256 query rows (MAE's decoder, N = 197: one program a head, which loads the
    # head's keys and values once instead of once per 128 rows) at 16 warps, 4 warpgroups of 64
    # rows, at the head dimension where it was compiled (sm_90, Triton 3.6; tests/
    # _kernel_capture.py attention --verbose): at d = 32 steps of 64 keys took 98-104
    # registers, 252-262 instructions a warp an iteration, no spill; steps of 128 keys spilled
    # 8-40 bytes at N = 257 (where the 256 rows are followed by a 16-row tail tile)
    if (bm == 256 or w == 16) and not (
            bm == 256 and w == 16 and bd <= 32 and bn == 64 and _HEAD_TILES):
        return False
    # short key loops (N <= 256) in blocks of at least 64; up to 3 stages: on the H200 the dQ
    # kernel at the decoder's N = 197 ran 10-19% faster at 3 than at 2 for 5 of its 6 tilings
    # (benches/results/h200-2026-12-04-6c02ddb, autotune_timings)
    if not one_tile and (bn > 128 or (n_ctx <= 256 and bn < 64)):
        return False
    if bm < min(32, n_pow2) or bn < min(32, n_pow2) or (w == 8 and bm < 64):
        return False
    if not one_tile and (bm < 64 or (w == 8 and bm < 128)):  # long rows: big query tiles
        return False
    if (bm * bn + 1.5 * bm * bd) / (32 * w) > 128:  # score + accumulator + q, fp32 regs/thread
        return False
    if bm == 32 and bn * bd > 8192:  # mma.sync tiles (no wgmma below 64 rows) spill earlier
        return False
    return (bm * bd + 2 * bn * bd * s) * 2 <= _SMEM_BUDGET


def _keep_bwd_fused(bm, bn, w, s, n_ctx, bd, fp32):
    if bm > max(16, next_pow2(n_ctx)) or (s > 1 and bm >= n_ctx):
        return False
    if fp32:
        return bm == 16 and w == 8
    return bm * bn <= 32 * 32 * w and bn * bd <= 64 * 32 * w and bm * bd <= 4096


def _keep_bwd_dq(bm, bn, w, s, n_pow2, bd, fp32):
    if bm > n_pow2 or bn > n_pow2:
        return False
    if fp32:
        return bm == 32 and bn * bd <= 2048 and w == 4
    if bm < 64 or bn < 32 or (w == 8 and bm < 128):
        return False
    return bm * bd <= 64 * 32 * w and bm * bn <= 64 * 32 * w


def _keep_bwd_fused_q(bm, bn, w, s, n_ctx, bd, fp32, sums=True):
    """bm: every query (the launcher's next_pow2(N)); bn: keys a step; sums: HAS_SUMS."""
    if bn > bm or (s == 1) != (bn >= n_ctx):  # one step: nothing to pipeline; a loop: pipelined
        return False
    if fp32:  # CUDA-core dots: small steps (at 3 stages Triton 3.8 spilled 8 bytes, N = 50, d = 64)
        return bn == 16 and w == 8 and s == 2
    # Steps of 64 keys or all of them: dV = P^T dO and dK = dS^T Q have a step's keys as their
    # rows, and below 64 they compile to mma.sync, not wgmma. At the decoder's N = 197, d = 32
    # (bf16, sm_90, Triton 3.6; tests/_kernel_capture.py attention --verbose), 8 warps: steps of
    # 16 and 32 keys issue 0.70 and 0.74 warp instructions a score (360 and 756 a warp an
    # iteration), more than dK-dV's and dQ's loops together (0.28 + 0.31 at their 64 x 64 and
    # 64 x 32 tilings, 4 warps); steps of 64 keys 0.38 (778), in 219 registers, no spill.
    # 4 warps spill: at the encoder's N = 50, d = 64 the one step took 255 registers and spilled
    # 112 bytes a thread (8 warps: 242, none). 16 warps (4 warpgroups of 64 query rows: 256 rows
    # at least) fit ptxas's 128 registers at N = 197 with steps of 64 keys and the column sums
    # on (the transformer block's way), no spill, 16 warps an SM instead of 8, for 0.52 warp
    # instructions a score (536 a warp an iteration); without the sums the same tiling spilled
    # 112-120 bytes (44 local accesses an iteration at 3 stages), steps of 128 keys 424.
    if bn < min(64, bm) or w not in (8, 16) or (w == 16 and (bm < 256 or not sums)):
        return False
    # fp32 registers a thread: the scores and dP (bm x bn each), the dQ accumulator, and q and
    # dO as 16-bit operands (bm x bd each, half a register an element); at 16 warps the
    # register file holds 128 a thread
    return (2 * bm * bn + 2 * bm * bd) / (32 * w) <= (192 if w == 8 else 96)


# dK-dV tilings also tried with their registers capped (ptxas's maxnreg), at the head dimension
# where the caps were checked: at the decoder's d = 32 (bf16, sm_90, Triton 3.6) ptxas takes
# 156-164 registers a thread for the 64 x 64 tiling at 4 warps and 118-122 for 32 x 64 without
# needing them (3 and 4 programs an SM), and fits 128 (4 programs, 16 warps an SM) and 96 (5
# programs, 20 warps) without spilling (tests/_kernel_capture.py attention --verbose); the
# autotuner times both ways. (BLOCK_M, BLOCK_N, stages, cap); the 64 x 64 tiling at 2 stages
# spilled under 128 when tried.
_CAPPED_DKDV = ((64, 64, 3, 128), (32, 64, 2, 96), (32, 64, 3, 96))
_CAPPED_HEAD_DIM = 32


def _keep_bwd_dkdv(bm, bn, w, s, n_pow2, bd, fp32, maxnreg=None):
    if bm > n_pow2 or bn > n_pow2:
        return False
    if maxnreg is not None and (fp32 or bd != _CAPPED_HEAD_DIM):
        return False
    if fp32:
        return bm == 16 and bn == 32 and w == 4
    if bm < 32 or bn < 64 or (w == 8 and bn * bd < 128 * 64):
        return False
    return 2 * bn * bd <= 64 * 32 * w and bm * bn <= 32 * 32 * w


def _prune_fwd(configs, named_args, **kwargs):
    n_ctx, n_pow2, bd, fp32 = _shape_args(named_args, kwargs)
    kept = [c for c in configs if _keep_fwd(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                            c.num_stages, n_ctx, n_pow2, bd, fp32)]
    return _finish(kept, configs)


def _prune_bwd_fused(configs, named_args, **kwargs):
    n_ctx, _, bd, fp32 = _shape_args(named_args, kwargs)
    bn = kwargs["BLOCK_N"]
    kept = [c for c in configs
            if _keep_bwd_fused(c.kwargs["BLOCK_M"], bn, c.num_warps, c.num_stages, n_ctx, bd, fp32)]
    return _finish(kept, configs)


def _prune_bwd_fused_q(configs, named_args, **kwargs):
    n_ctx, _, bd, fp32 = _shape_args(named_args, kwargs)
    bm, sums = kwargs["BLOCK_M"], kwargs["HAS_SUMS"]
    kept = [c for c in configs if _keep_bwd_fused_q(bm, c.kwargs["BLOCK_N"], c.num_warps,
                                                    c.num_stages, n_ctx, bd, fp32, sums)]
    return _finish(kept, configs)


def _prune_bwd_dq(configs, named_args, **kwargs):
    _, n_pow2, bd, fp32 = _shape_args(named_args, kwargs)
    kept = [c for c in configs if _keep_bwd_dq(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                               c.num_stages, n_pow2, bd, fp32)]
    return _finish(kept, configs)


def _prune_bwd_dkdv(configs, named_args, **kwargs):
    _, n_pow2, bd, fp32 = _shape_args(named_args, kwargs)
    kept = [c for c in configs if _keep_bwd_dkdv(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                 c.num_stages, n_pow2, bd, fp32, c.maxnreg)]
    return _finish(kept, configs)


def _pool(blocks_m, blocks_n, warps, stages):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm in blocks_m for bn in blocks_n for w in warps for s in stages]


def _gpu_pools():
    """Each kernel's configurations on a GPU, before the pruning per shape (the tests run them
    through the interpreter too): fwd, fused, fused_q, dq, dkdv."""
    return {
        "fwd": (_pool((16, 32, 64, 128), (16, 32, 64, 128, 256), (4, 8), (1, 2, 3))
                + _pool((256,), (64,), (16,), (2, 3))),
        "fused": [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
                  for bm in (16, 32, 64) for w in (4, 8) for s in (1, 2)],
        "fused_q": [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
                    for bn in (16, 32, 64) for w in (4, 8, 16) for s in (1, 2, 3)],
        "dq": _pool((32, 64, 128), (16, 32, 64), (4, 8), (2, 3)),
        "dkdv": _pool((16, 32, 64), (32, 64, 128), (4, 8), (2, 3)) + [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=s, maxnreg=cap)
            for bm, bn, s, cap in _CAPPED_DKDV],
    }


if interpreting():
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    _BWD_FUSED_CONFIGS = [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)]
    _BWD_FUSED_Q_CONFIGS = [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)]
    _BWD_DQ_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    _BWD_DKDV_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
else:
    _GPU_POOLS = _gpu_pools()
    (_FWD_CONFIGS, _BWD_FUSED_CONFIGS, _BWD_FUSED_Q_CONFIGS, _BWD_DQ_CONFIGS,
     _BWD_DKDV_CONFIGS) = (_GPU_POOLS[kind] for kind in ("fwd", "fused", "fused_q", "dq", "dkdv"))


def _tail(n_ctx, block):
    """Rows of a sweep's last, partial step: N % block rounded up to a power of two (at least
    16, a tl.dot's smallest side), so that e.g. N = 197 in blocks of 64 ends with 16 rows, not 64
    (3 x 64 + 16 = 208 computed instead of 256)."""
    rest = n_ctx % block
    return min(block, max(16, next_pow2(rest))) if rest else block


def _tail_of(block):
    """A triton.heuristics value: _tail of N_CTX and the meta-parameter ``block``."""
    return lambda args: _tail(args["N_CTX"], args[block])


_attn_fwd_tuned = triton.autotune(
    configs=_FWD_CONFIGS, key=["N_CTX", "HEAD_DIM", "BH_CLASS"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(triton.heuristics({"ONE_TILE": lambda args: args["BLOCK_N"] >= args["N_CTX"],
                     "TAIL_M": _tail_of("BLOCK_M"), "TAIL_N": _tail_of("BLOCK_N")})(_attn_fwd))

_attn_bwd_dkdv_heuristics = triton.heuristics(
    {"TAIL_M": _tail_of("BLOCK_M"), "TAIL_N": _tail_of("BLOCK_N"),
     "ONE_STEP": lambda args: args["BLOCK_M"] >= args["N_CTX"]})(_attn_bwd_dkdv)

_attn_bwd_fused_tuned = triton.autotune(
    configs=_BWD_FUSED_CONFIGS, key=["N_CTX", "HEAD_DIM", "BH_CLASS"],
    prune_configs_by={"early_config_prune": _prune_bwd_fused},
)(_attn_bwd_dkdv_heuristics)

# HAS_SUMS keys the search too: its pruning keeps 16 warps only with the column sums on (without
# them that tiling spilled), so a choice made with them must not serve a call without
_attn_bwd_fused_q_tuned = triton.autotune(
    configs=_BWD_FUSED_Q_CONFIGS, key=["N_CTX", "HEAD_DIM", "BH_CLASS", "HAS_SUMS"],
    prune_configs_by={"early_config_prune": _prune_bwd_fused_q},
)(triton.heuristics({"TAIL_N": _tail_of("BLOCK_N")})(_attn_bwd_fused_q))

_attn_bwd_dkdv_tuned = triton.autotune(
    configs=_BWD_DKDV_CONFIGS, key=["N_CTX", "HEAD_DIM", "BH_CLASS"],
    prune_configs_by={"early_config_prune": _prune_bwd_dkdv},
)(_attn_bwd_dkdv_heuristics)

_attn_bwd_dq_tuned = triton.autotune(
    configs=_BWD_DQ_CONFIGS, key=["N_CTX", "HEAD_DIM", "BH_CLASS"],
    prune_configs_by={"early_config_prune": _prune_bwd_dq},
)(triton.heuristics({"TAIL_M": _tail_of("BLOCK_M"), "TAIL_N": _tail_of("BLOCK_N")})(_attn_bwd_dq))


# ----------------------------------------------------------------------------- launchers

def _score_flops(named):
    """2 * N^2 * d per (batch, head): one (N x d) @ (d x N) or (N x N) @ (N x d) product."""
    q = named["Q"]
    return 2 * q.shape[0] * q.shape[1] * named["N_CTX"] ** 2 * named["HEAD_DIM"]


# The work each launch must do (_common.launch_work): the forward's two products (scores, P V);
# dQ's three (scores again, dP = dO V^T, dQ = dS K); dK-dV's four (scores, dV = P^T dO, dP,
# dK = dS^T Q), five with dQ fused, when it also reads O (delta inline), LSE, and writes dQ --
# the split dK-dV gets those three pointers without touching them (it reads STATS instead),
# and without column sums a placeholder DSUM (lse again) it does not touch either; fused_q's
# five, every tensor it is passed read or written once.
LAUNCH_WORK = {
    "_attn_fwd": lambda a: {"flops": 2 * _score_flops(a)},
    "_attn_bwd_dq": lambda a: {"flops": 3 * _score_flops(a)},
    "_attn_bwd_fused_q": lambda a: {"flops": 5 * _score_flops(a)},
    "_attn_bwd_dkdv": lambda a: ({"flops": 5 * _score_flops(a)} if a["FUSE_DQ"] else
                                 {"flops": 4 * _score_flops(a),
                                  "bytes": {"O": 0, "DQ": 0, "LSE": 0,
                                            **({} if a["HAS_SUMS"] else {"DSUM": 0})}}),
}


def _fit(t):
    """In-tile offsets are int32 (row * stride within one tile); a tensor whose row or column
    stride would overflow that is copied (never the case for MAE's layouts)."""
    if max(abs(t.stride(2)), abs(t.stride(3))) * _MAX_TILE_ROWS * 2 >= 2 ** 31:
        return t.contiguous()
    return t


def _block_d(d):
    return max(16, next_pow2(d))


def _bh_class(B, H):
    """(B * H).bit_length(), the third key of the attention autotuners: their choice is kept per
    doubling of the grid, not per (N, d) alone. Before this the bench's parity step (batch 32)
    chose the tiles that its batch-256 steps then ran with, and a trainer's first batch size
    chose them for every other (a grid of 512 programs and one of 16384 favour different tiles)."""
    return (B * H).bit_length()


def attention_fwd(q, k, v, scale: float, out=None):
    """o = softmax(q k^T * scale) v for q, k, v (B, H, N, d) of one float dtype, any strides.

    Returns (o, lse): o (B, H, N, d) in q's dtype, by default allocated as (B, N, H, d) storage
    and returned as its transpose(1, 2) view (so o.transpose(1, 2).reshape(B, N, H * d) is free),
    or written into ``out`` (any strides) when given; lse (B, H, N) fp32 contiguous, the
    natural-log log-sum-exp of each row of the scaled scores."""
    B, H, N, d = q.shape
    if out is None:
        out = empty((B, N, H, d), q.dtype, q.device).transpose(1, 2)
    lse = empty((B, H, N), torch.float32, q.device)
    if B * H * N == 0:
        return out, lse
    q, k, v = _fit(q), _fit(k), _fit(v)
    o_view = _fit(out)  # a copy only for absurd strides; then written back below

    def grid(meta):
        return (B * H * cdiv(N, meta["BLOCK_M"]),)

    bh_class = _bh_class(B, H)
    launch_tuned(
        _attn_fwd_tuned, grid, (N, d, bh_class),
        q, k, v, o_view, lse, float(scale) * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o_view.stride(),
        H, N, bh_class,
        HEAD_DIM=d, BLOCK_D=_block_d(d), DOT_PRECISION=dot_precision(q.dtype),
        POS_SCALE=float(scale) > 0,
    )
    if o_view is not out:
        out.copy_(o_view)
    return out, lse


def _grad_buffers(q, k, v, dq, dk, dv):
    """Default gradient buffers: views of one packed (B, N, 3, H, d) tensor when q, k, v share a
    dtype (what the qkv projection's backward wants), else (B, N, H, d) storage each."""
    B, H, N, d = q.shape
    if dq is None and dk is None and dv is None and q.dtype == k.dtype == v.dtype:
        packed = empty((B, N, 3, H, d), q.dtype, q.device)
        return packed.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(
        g if g is not None else empty((B, N, H, d), t.dtype, t.device).transpose(1, 2)
        for g, t in ((dq, q), (dk, k), (dv, v)))


# Where the fused backwards are possible (one tile holds every key, or every query), they and
# the two-kernel one are timed on the first call of each (B*H, N, d, dtype, device) and the
# fastest is kept (each is deterministic on its own). fused_q is timed only where N > 64 (and
# FASTMAE_ATTN_HEAD_TILES is not 0): up to 64 the fused way's query sweep is one step, the same
# products in straight-line code (see _attn_bwd_one_step), where fused_q compiles a loop and a
# tail. FASTMAE_ATTN_BWD=fused|fused_q|split forces one; the interpreter and a call during
# CUDA-graph capture take "fused" untimed.
_BWD_CHOICE = {}


def _bwd_strategy(key, ways):
    n_ctx = key[1]
    timed = None if n_ctx > 64 and _HEAD_TILES else [w for w in ways if w != "fused_q"]
    return keep_faster(_BWD_CHOICE, key, "FASTMAE_ATTN_BWD", ways, "fused", timed)


# The optional column sums of dQ, dK, dV (the qkv projection's bias gradient, without a pass
# over the packed gradient) are per-program partials over SUM_ROWS sequence rows each: the
# smallest sequence block of the configurations the backward kernels' autotuners hold, so that
# any configuration's program owns whole partial rows.
_sum_rows_of = [None, None, 0]  # the dQ and dK-dV configuration lists, and their smallest block


def _sum_rows():
    dq, dkdv = _attn_bwd_dq_tuned.configs, _attn_bwd_dkdv_tuned.configs
    if _sum_rows_of[0] is not dq or _sum_rows_of[1] is not dkdv:
        _sum_rows_of[:] = dq, dkdv, min([c.kwargs["BLOCK_M"] for c in dq]
                                        + [c.kwargs["BLOCK_N"] for c in dkdv])
    return _sum_rows_of[2]


def grad_sum_shape(B, H, N, d):
    """Shape of attention_bwd's ``dsum``: (B, R, 3, H, d), R = cdiv(N, SUM_ROWS) partial rows;
    summed over its first two dims it gives the column sums of dq, dk, dv, laid out (3, H, d)
    as the packed qkv projection's bias."""
    return (B, cdiv(N, _sum_rows()), 3, H, d)


def attention_bwd(do, q, k, v, o, lse, scale: float, dq=None, dk=None, dv=None, dsum=None):
    """Gradients of o = softmax(q k^T * scale) v given do = dL/do, o and lse from attention_fwd.

    All of do, q, k, v, o are (B, H, N, d) with any strides (do may be expanded, stride 0).
    Returns (dq, dk, dv), each (B, H, N, d) in the dtype of q, k, v respectively: written into the
    given buffers (any strides), or by default views of one packed (B, N, 3, H, d) tensor.
    With ``dsum`` (fp32, grad_sum_shape, contiguous) the kernels also write into it, every
    element, the fp32 column sums of the three gradients over blocks of the sequence."""
    B, H, N, d = q.shape
    dq, dk, dv = _grad_buffers(q, k, v, dq, dk, dv)
    if dsum is not None:
        assert dsum.shape == grad_sum_shape(B, H, N, d) and dsum.dtype == torch.float32 \
            and dsum.is_contiguous(), "dsum must be a contiguous fp32 grad_sum_shape tensor"
    if B * H * N == 0:
        if dsum is not None:
            dsum.zero_()
        return dq, dk, dv
    if do.dtype != q.dtype:  # the dot operands must share a dtype
        do = do.to(dtype=q.dtype)
    lse = lse.contiguous()  # (B, H, N) fp32 from attention_fwd: already contiguous
    q, k, v, o, do = (_fit(t) for t in (q, k, v, o, do))
    dq_w, dk_w, dv_w = (_fit(t) for t in (dq, dk, dv))
    sm_scale = float(scale)
    qk_scale = sm_scale * LOG2E
    block_d = _block_d(d)
    block_n_all = max(16, next_pow2(N))
    precision = dot_precision(q.dtype)
    bh_class = _bh_class(B, H)
    common_strides = (*q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq_w.stride())
    has_sums = dsum is not None
    sum_rows = _sum_rows()
    if has_sums:  # (B, R, 3, H, d): batch, partial row, section (q, k, v), head
        s_arg, (s_b, s_r, s_s, s_h) = dsum, dsum.stride()[:4]
    else:
        s_arg, (s_b, s_r, s_s, s_h) = lse, (0, 0, 0, 0)  # placeholder, never touched

    def fused():
        # One program per (batch, head) holds every key: dQ, dK, dV and delta in one pass.
        launch_tuned(
            _attn_bwd_fused_tuned, (B * H,), (N, d, bh_class),
            q, k, v, o, do, dq_w, dk_w, dv_w, lse, lse, s_arg, sm_scale, qk_scale,  # STATS unused
            *common_strides, *dk_w.stride(), *dv_w.stride(), s_b, s_r, s_s, s_h,
            H, N, bh_class,
            HEAD_DIM=d, BLOCK_N=block_n_all, BLOCK_D=block_d, FUSE_DQ=True, HAS_SUMS=has_sums,
            SUM_ROWS=sum_rows, DOT_PRECISION=precision,
        )

    def fused_q():
        # One program per (batch, head) holds every query and sweeps the keys: dQ, dK, dV.
        launch_tuned(
            _attn_bwd_fused_q_tuned, (B * H, 1), (N, d, bh_class, has_sums),
            q, k, v, o, do, dq_w, dk_w, dv_w, lse, s_arg, sm_scale, qk_scale,
            *common_strides, *dk_w.stride(), *dv_w.stride(), s_b, s_r, s_s, s_h,
            H, N, cdiv(N, sum_rows), bh_class,
            HEAD_DIM=d, BLOCK_M=block_n_all, BLOCK_D=block_d, HAS_SUMS=has_sums,
            DOT_PRECISION=precision,
        )

    def split():
        stats = empty((B, H, N, 2), torch.float32, q.device)
        launch_tuned(
            _attn_bwd_dq_tuned, lambda meta: (B * H * cdiv(N, meta["BLOCK_M"]),),
            (N, d, bh_class),
            q, k, v, o, do, dq_w, lse, stats, s_arg, sm_scale, qk_scale,
            *common_strides, s_b, s_r, s_h,
            H, N, bh_class,
            HEAD_DIM=d, BLOCK_D=block_d, HAS_SUMS=has_sums, SUM_ROWS=sum_rows,
            DOT_PRECISION=precision,
        )
        launch_tuned(
            _attn_bwd_dkdv_tuned, lambda meta: (B * H * cdiv(N, meta["BLOCK_N"]),),
            (N, d, bh_class),
            q, k, v, o, do, dq_w, dk_w, dv_w, lse, stats, s_arg, sm_scale, qk_scale,
            *common_strides, *dk_w.stride(), *dv_w.stride(), s_b, s_r, s_s, s_h,
            H, N, bh_class,
            HEAD_DIM=d, BLOCK_D=block_d, FUSE_DQ=False, HAS_SUMS=has_sums, SUM_ROWS=sum_rows,
            DOT_PRECISION=precision,
        )

    fused_limit = _FUSED_BWD_MAX_TILE // (2 if q.dtype == torch.float32 else 1)  # fp32: CUDA-core dots
    can_fuse = block_n_all <= _MAX_TILE_ROWS and block_n_all * block_d <= fused_limit
    if can_fuse:
        ways = {"fused": fused, "fused_q": fused_q, "split": split}
        ways[_bwd_strategy((B * H, N, d, q.dtype, q.device), ways)]()
    else:
        split()
    for w, g in ((dq_w, dq), (dk_w, dk), (dv_w, dv)):
        if w is not g:
            g.copy_(w)
    return dq, dk, dv
