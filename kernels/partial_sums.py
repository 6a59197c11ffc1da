"""The second, deterministic reduction of the backward kernels' per-program partial sums, several
buffers in one launch.

The LayerNorm, bias + GELU, fused MLP and attention backwards write the column sums their
parameters' gradients need (weight, bias, branch bias, qkv bias) as per-program partials: an
(S, P, D) fp32 buffer, S sections of P program rows of D columns. Summing each over its P rows
took a torch reduction launch a buffer, four a transformer block's backward (~80 a ViT-B/16
step; in the H200 profile at 017ac2e, BENCHMARKS.md, the torch reductions but the qkv bias's took
0.83 ms for 68 launches, ~12 us each, by subtraction). Here
one launch sums up to four buffers, each column by one program in a fixed order (no atomics):
the same result run to run.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, empty, interpreting, launch

MAX_BUFFERS = 4  # a launch's buffers (a block's four partial sums); more take more launches


@triton.jit
def _sum_rows(
    SRC,  # (S, P, D) fp32, contiguous
    OUT,  # (S * D,) fp32 out: OUT[s * D + d] = sum over p of SRC[s, p, d]
    P, D, width,  # width = S * D
    block,  # this program's block of BLOCK_C of the width columns
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
    STAGES: tl.constexpr,
):
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < width
    section = cols // D
    # int64: S * P * D may pass 2**31 in principle (P a wave of programs, D the width)
    base = section.to(tl.int64) * P * D + (cols - section * D)
    acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for row0 in tl.range(0, P, ROWS, num_stages=STAGES):
        rows = row0 + tl.arange(0, ROWS)
        mask = (rows < P)[:, None] & col_ok[None, :]
        acc += tl.load(SRC + rows.to(tl.int64)[:, None] * D + base[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _sum_partials(
    SRC0,  # (S0, P0, D0) fp32, contiguous
    SRC1,  # (S1, P1, D1) fp32, contiguous (SRC0 again where a launch has fewer buffers)
    SRC2,  # (S2, P2, D2) likewise
    SRC3,  # (S3, P3, D3) likewise
    OUT,  # (W0 + W1 + W2 + W3,) fp32 out, W_i = S_i * D_i: buffer i's sums from OUT_i
    P0, P1, P2, P3, D0, D1, D2, D3, W0, W1, W2, W3,
    END0, END1, END2,  # programs [END_{i-1}, END_i) sum buffer i (END_i = grid size past the last)
    OUT1, OUT2, OUT3,  # where buffers 1-3's sums start in OUT (buffer 0's at 0)
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    # one compiled kernel for any number of buffers: a launch with fewer never reaches the
    # branches past its last (their END is the grid size)
    if pid < END0:
        _sum_rows(SRC0, OUT, P0, D0, W0, pid, BLOCK_C, ROWS, STAGES)
    elif pid < END1:
        _sum_rows(SRC1, OUT + OUT1, P1, D1, W1, pid - END0, BLOCK_C, ROWS, STAGES)
    elif pid < END2:
        _sum_rows(SRC2, OUT + OUT2, P2, D2, W2, pid - END1, BLOCK_C, ROWS, STAGES)
    else:
        _sum_rows(SRC3, OUT + OUT3, P3, D3, W3, pid - END2, BLOCK_C, ROWS, STAGES)


# ----------------------------------------------------------------------------- launcher

_empty = empty  # every output is allocated here (tests patch it to poison them)


def launch_config():
    """(columns a program, rows a tile, num_warps, stages): on a GPU 32 columns (a 128-byte line
    a row) by 64 rows, so that a ViT-B block's ~10^4 columns spread over ~300 programs (two or
    three an SM), each with its next tile's loads in flight, at 2 warps (one decoder block's
    partials on the H200, benches/results/h200-2026-12-04-c79d6d3/sweep_bwd.txt: 26.6 us against
    30.4 at 4 warps; in the step, 0.32 ms before and 0.33 after, at about a quarter of its
    memory floor either way); under the interpreter small tiles, so that the tests' small buffers take
    several column blocks and row tails."""
    if interpreting():
        return 16, 4, 1, 1
    return 32, 64, 2, 2


def sum_partials(buffers):
    """The sums over their rows of fp32 per-program partial-sum buffers, (P, D) or (S, P, D)
    (contiguous, on one device; P may be 0: sums of 0): a tuple of each buffer's sections' (D,)
    fp32 sums in order (one for a (P, D) buffer, S for an (S, P, D) one), views of one fresh
    buffer. Up to MAX_BUFFERS buffers a launch."""
    if not buffers:
        return ()
    device = buffers[0].device
    for i, b in enumerate(buffers):
        if b.dtype != torch.float32 or not b.is_contiguous() or b.device != device:
            raise ValueError(f"buffers[{i}] must be a contiguous fp32 tensor on {device}, "
                             f"got {b.dtype} {tuple(b.shape)} on {b.device}")
    shapes = tuple(b.shape for b in buffers)
    plan = _PLANS.get(shapes)
    if plan is None:
        plan = _plan(shapes, launch_config()[0])
        if len(_PLANS) < 256:
            _PLANS[shapes] = plan
    total, launches, sections = plan
    out = _empty((total,), torch.float32, device)
    block_c, rows, warps, stages = launch_config()
    for first, last, programs, start, width, ints in launches:
        pad = MAX_BUFFERS - (last - first)
        launch(_sum_partials, (programs,),
               *buffers[first:last], *(buffers[first],) * pad,
               out if width == total else out[start:start + width], *ints,
               BLOCK_C=block_c, ROWS=rows, STAGES=stages, num_warps=warps)
    return out.split_with_sizes(sections)


_PLANS = {}  # the buffers' shapes -> _plan(...): a training step repeats a few sets of shapes


def _plan(shapes, block_c):
    """(total columns, the launches as (first buffer, last + 1, programs, output start, output
    width, the kernel's int arguments), each section's D) for buffers of these shapes."""
    rows, cols, widths, sections = [], [], [], []  # per buffer P, D, S * D; each section's D
    for i, shape in enumerate(shapes):
        if len(shape) not in (2, 3):
            raise ValueError(f"buffers[{i}] must be (P, D) or (S, P, D), got {tuple(shape)}")
        S, P, D = shape if len(shape) == 3 else (1, *shape)
        rows.append(P)
        cols.append(D)
        widths.append(S * D)
        sections += [D] * S
    launches, start = [], 0
    for first in range(0, len(shapes), MAX_BUFFERS):
        last = min(first + MAX_BUFFERS, len(shapes))
        pad = MAX_BUFFERS - (last - first)
        ends, offsets, programs, width = [], [], 0, 0
        for w in widths[first:last]:
            offsets.append(width)
            programs += cdiv(w, block_c)
            width += w
            ends.append(programs)
        ints = (*rows[first:last], *[0] * pad,
                *cols[first:last], *[16] * pad,  # not 1, which Triton would specialize
                *widths[first:last], *[0] * pad,
                *(ends + [programs] * pad)[:3], *(offsets + [0] * pad)[1:])
        if programs:
            launches.append((first, last, programs, start, width, ints))
        start += width
    return start, tuple(launches), sections
