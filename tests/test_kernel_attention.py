"""kernels/attention.py against the float64 reference (interpreter, fp32) and, on a GPU, bf16/fp16
against SDPA's own low-precision error."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
import triton

from fastmae import reference
from fastmae.testing import (assert_guards_intact, attention_case, guarded_empty, poison_,
                             rel_err)

TOL = 1e-4  # attention, fp32 against float64


def _kernels():
    from fastmae.kernels import attention as attn  # imported after conftest set TRITON_INTERPRET

    return attn


def _reference64(q, k, v, do, scale):
    """o, lse and (dq, dk, dv) of the official op, in float64."""
    q64, k64, v64 = (t.detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    o64 = reference.attention(q64, k64, v64, scale=scale)
    o64.backward(do.detach().to(torch.float64))
    lse64 = torch.logsumexp((q64 @ k64.transpose(-1, -2)) * scale, dim=-1)
    return o64.detach(), lse64.detach(), (q64.grad, k64.grad, v64.grad)


def _nan_like_bhnd(t):
    """A NaN-filled (B, H, N, d) buffer with (B, N, H, d) storage, as the model hands them over."""
    B, H, N, d = t.shape
    return poison_(torch.empty((B, N, H, d), device=t.device, dtype=t.dtype)).transpose(1, 2)


def _nan_packed_grads(q):
    """NaN-filled dq, dk, dv: views of one packed (B, N, 3, H, d) buffer, as the lead passes them."""
    B, H, N, d = q.shape
    packed = poison_(torch.empty((B, N, 3, H, d), device=q.device, dtype=q.dtype))
    return packed.permute(2, 0, 3, 1, 4).unbind(0)


# The kernels each way of the backward launches (FASTMAE_ATTN_BWD forces one where it applies)
_WAY_KERNELS = {"fused": ("_attn_bwd_fused_tuned",), "fused_q": ("_attn_bwd_fused_q_tuned",),
                "split": ("_attn_bwd_dq_tuned", "_attn_bwd_dkdv_tuned")}


@contextlib.contextmanager
def _poisoned_allocations(launched):
    """Every buffer the launchers allocate themselves (o, lse, the split backward's statistics)
    comes back NaN-filled; the autotuned kernels launched are appended to ``launched``."""
    attn = _kernels()
    saved_empty, saved_launch = attn.empty, attn.launch_tuned

    def launch_tuned(tuned, *args, **kwargs):
        launched.append(tuned)
        return saved_launch(tuned, *args, **kwargs)

    attn.empty = lambda *args, **kwargs: poison_(saved_empty(*args, **kwargs))
    attn.launch_tuned = launch_tuned
    try:
        yield
    finally:
        attn.empty, attn.launch_tuned = saved_empty, saved_launch


def _run(q, k, v, do, scale, sums=True):
    """Forward then backward (with the gradients' column sums unless ``sums`` is False), every
    output buffer NaN-filled beforehand. Returns (o, lse, (dq, dk, dv), column sums (3, H, d)
    or None)."""
    attn = _kernels()
    out = _nan_like_bhnd(q)
    dq, dk, dv = _nan_packed_grads(q)
    dsum = poison_(torch.empty(attn.grad_sum_shape(*q.shape), device=q.device)) if sums else None
    launched = []
    with _poisoned_allocations(launched):
        o, lse = attn.attention_fwd(q, k, v, scale, out=out)
        grads = attn.attention_bwd(do, q, k, v, o, lse, scale, dq=dq, dk=dk, dv=dv, dsum=dsum)
    assert o is out
    assert grads[0] is dq and grads[1] is dk and grads[2] is dv
    forced = os.environ.get("FASTMAE_ATTN_BWD", "").strip()
    if forced in _WAY_KERNELS:  # where the way a test forces does not apply, it tests another
        ran = {name for name in vars(attn) if any(vars(attn)[name] is t for t in launched)}
        assert set(_WAY_KERNELS[forced]) <= ran, f"FASTMAE_ATTN_BWD={forced} ran {sorted(ran)}"
    return o, lse, grads, None if dsum is None else dsum.sum((0, 1))


def _column_sums(grads):
    """(3, H, d): each gradient (B, H, N, d) summed over the batch and the sequence."""
    return torch.stack([g.sum((0, 2)) for g in grads])


def _check(q, k, v, do, scale, tol=TOL):
    o, lse, grads, sums = _run(q, k, v, do, scale)
    o64, lse64, grads64 = _reference64(q, k, v, do, scale)
    assert o.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    errors = {"o": rel_err(o, o64), "lse": rel_err(lse, lse64)}
    # The scale of the gradients: with N = 1 the softmax is constant, dq = dk = 0 exactly and
    # only rounding remains, so their error is measured against the size of dv.
    floor = 1e-2 * max(g.abs().max().item() for g in grads64)
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        assert g.shape == g64.shape and g.dtype == q.dtype
        errors[name] = rel_err(g, g64, floor)
    errors["sums"] = rel_err(sums, _column_sums(grads64), floor)
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors over {tol:.0e}: {bad}"
    return o, lse, grads


def _do_like(q, seed=1):
    g = torch.Generator(device=q.device).manual_seed(seed)
    return torch.randn(q.shape, generator=g, device=q.device, dtype=torch.float32).to(q.dtype)


@contextlib.contextmanager
def _only_config(tuned, config):
    """Run an autotuned kernel on one given configuration (a single config is used as is)."""
    saved_configs, saved_cache = tuned.configs, dict(tuned.cache)
    tuned.configs = [config]
    tuned.cache.clear()
    try:
        yield
    finally:
        tuned.configs = saved_configs
        tuned.cache.clear()
        tuned.cache.update(saved_cache)


# ----------------------------------------------------------------------------- interpreter, fp32

@pytest.mark.parametrize("d", [32, 64, 80])
@pytest.mark.parametrize("N", [1, 7, 50, 64, 65, 197])
def test_matches_float64(N, d, device):
    B, H = (2, 3) if N < 197 else (1, 2)
    case = attention_case(B, H, N, d, "contiguous", device=device, seed=N * 100 + d)
    _check(case["q"], case["k"], case["v"], _do_like(case["q"]), d ** -0.5)


@pytest.mark.parametrize("layout,N,d", [
    ("qkv", 50, 64), ("qkv", 65, 80), ("qkv", 197, 32),
    ("transposed", 7, 32), ("transposed", 65, 64),
])
def test_strided_layouts(layout, N, d, device):
    B, H = (2, 3) if N < 197 else (1, 2)
    case = attention_case(B, H, N, d, layout, device=device, seed=7)
    _check(case["q"], case["k"], case["v"], _do_like(case["q"]), d ** -0.5)


@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
@pytest.mark.parametrize("N,d", [(7, 64), (50, 32), (197, 16)])
def test_backward_strategies_all_correct(strategy, N, d, device, monkeypatch):
    """Where the fused backwards apply, the two-kernel one is also timed and any of the three
    may be the one kept: each is checked on the shapes that allow all (FASTMAE_ATTN_BWD forces
    one; _run asserts its kernels ran). fused_q at N = 197 in steps of 64 keys: three full steps
    and a 16-key tail; d = 16, as in fp32 a (batch, head)'s 256 rows of d = 32 are past the
    fused ways' tile limit (the fp16 test below runs them at the decoder's d = 32)."""
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    B, H = (2, 3) if N < 197 else (1, 2)
    case = attention_case(B, H, N, d, "qkv", device=device, seed=N + d)
    _check(case["q"], case["k"], case["v"], _do_like(case["q"]), d ** -0.5)


@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
@pytest.mark.parametrize("N,d", [(50, 64), (197, 32)])
def test_half_precision_ways_within_rounding(strategy, N, d, device, monkeypatch):
    """fp16 inputs (bf16: test_low_precision_vs_sdpa_interpreted, against SDPA): each way's
    gradients and column sums within 1e-3 of float64's, relative to their size: fp16's rounding
    of P, dS and the outputs (3.5e-4 to 5.7e-4 here), not a cast in the wrong place (fused_q's
    scores rounded to fp16 before their exp gave 0.9e-3 to 1.3e-3 at N = 50)."""
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    case = attention_case(1, 2, N, d, "qkv", device=device, seed=N + d + 1)
    q, k, v = (case[n].to(torch.float16) for n in ("q", "k", "v"))
    do = _do_like(q)
    _, _, grads, sums = _run(q, k, v, do, d ** -0.5)
    _, _, grads64 = _reference64(q, k, v, do, d ** -0.5)
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        assert g.dtype == torch.float16 and rel_err(g, g64) <= 1e-3, name
    assert rel_err(sums, _column_sums(grads64)) <= 1e-3


def test_backward_strategy_env_is_checked(device, monkeypatch):
    monkeypatch.setenv("FASTMAE_ATTN_BWD", "fastest")
    case = attention_case(1, 1, 7, 32, "contiguous", device=device, seed=0)
    with pytest.raises(ValueError, match="FASTMAE_ATTN_BWD must be one of"):
        _run(case["q"], case["k"], case["v"], _do_like(case["q"]), 32 ** -0.5)


@pytest.mark.parametrize("N,timed", [(50, ["fused", "split"]), (64, ["fused", "split"]),
                                     (65, None), (197, None)])
def test_fused_q_timed_only_past_one_query_step(N, timed, monkeypatch):
    """Up to N = 64 the fused way's query sweep is one step (the same products, straight-line);
    fused_q is timed only past it, but any of the three may be forced anywhere."""
    attn = _kernels()
    calls = []
    monkeypatch.setattr(attn, "keep_faster", lambda *args: calls.append(args) or "split")
    ways = {"fused": None, "fused_q": None, "split": None}
    assert attn._bwd_strategy((6, N, 32, torch.float32, torch.device("cpu")), ways) == "split"
    (choices, key, env, runs, default, asked), = calls
    assert (env, runs, default, asked) == ("FASTMAE_ATTN_BWD", ways, "fused", timed)


@pytest.mark.parametrize("env,on", [({}, True), ({"FASTMAE_ATTN_HEAD_TILES": "0"}, False)])
def test_the_environment_leaves_out_the_head_tilings(env, on, monkeypatch):
    """FASTMAE_ATTN_HEAD_TILES=0, read at import (a fresh process here), leaves out the tilings
    whose one program holds a head's every query: fused_q is not timed, the forward's 256-row
    tiles are pruned (a forced fused_q still runs)."""
    import os
    import subprocess
    import sys
    code = "from fastmae.kernels import attention as at; print(at._HEAD_TILES)"
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TRITON_INTERPRET", "FASTMAE_ATTN_HEAD_TILES")}
    out = subprocess.run([sys.executable, "-c", code], env={**environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(on)]
    attn = _kernels()
    monkeypatch.setattr(attn, "_HEAD_TILES", on)
    assert attn._keep_fwd(256, 64, 16, 2, 197, 256, 32, False) == on
    calls = []
    monkeypatch.setattr(attn, "keep_faster", lambda *args: calls.append(args) or "fused_q")
    ways = {"fused": None, "fused_q": None, "split": None}
    assert attn._bwd_strategy((6, 197, 32, torch.float32, torch.device("cpu")), ways) == "fused_q"
    assert calls[0][-1] == (None if on else ["fused", "split"])


def test_long_sequence_multi_key_blocks(device):
    """N = 300 > 256: the forward loops over key blocks, the backward runs the two-kernel path."""
    case = attention_case(1, 2, 300, 32, "qkv", device=device, seed=3)
    _check(case["q"], case["k"], case["v"], _do_like(case["q"]), 32 ** -0.5)


@pytest.mark.parametrize("N,d", [(50, 64), (7, 32)])
def test_two_kernel_backward_on_short_sequences(N, d, device, monkeypatch):
    """The dQ / dK-dV kernel pair, forced where the fused backward would run."""
    monkeypatch.setattr(_kernels(), "_FUSED_BWD_MAX_TILE", 0)
    case = attention_case(2, 3, N, d, "qkv", device=device, seed=11)
    _check(case["q"], case["k"], case["v"], _do_like(case["q"]), d ** -0.5)


@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
@pytest.mark.parametrize("N,d", [(50, 32), (64, 32)])
def test_other_tilings(N, d, strategy, device, monkeypatch):
    """Smaller tiles than the default configuration: several key blocks in the forward, several
    query blocks in the fused sweep, several key steps in fused_q's (N = 50 in 16s ends with a
    16-key step of 2 keys; N = 64 has no partial step), uneven dQ / dK-dV blocks."""
    attn = _kernels()
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    case = attention_case(1, 2, N, d, "qkv", device=device, seed=31)
    with _only_config(attn._attn_fwd_tuned, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=2)), \
            _only_config(attn._attn_bwd_fused_tuned, triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=2)), \
            _only_config(attn._attn_bwd_fused_q_tuned, triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=2)), \
            _only_config(attn._attn_bwd_dq_tuned, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=2)), \
            _only_config(attn._attn_bwd_dkdv_tuned, triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2)):
        _check(case["q"], case["k"], case["v"], _do_like(case["q"]), d ** -0.5)


def test_forward_one_query_tile_a_head(device):
    """The forward's 256-row tiling at the decoder's N = 197: one program a head, its rows past
    N masked, the keys in three 64-key steps and a 16-key tail."""
    attn = _kernels()
    case = attention_case(1, 2, 197, 32, "qkv", device=device, seed=37)
    with _only_config(attn._attn_fwd_tuned, triton.Config({"BLOCK_M": 256, "BLOCK_N": 64}, num_warps=16, num_stages=2)):
        _check(case["q"], case["k"], case["v"], _do_like(case["q"]), 32 ** -0.5)


@pytest.mark.parametrize("N", [50, 197])  # one key tile; the online softmax over key blocks
@pytest.mark.parametrize("scale", [0.37, -0.37, 0.0])
def test_non_default_scale(N, scale, device):
    """Any scale, as SDPA takes: a positive one runs the softmax on unscaled scores (the max
    scaled once a row), a negative one flips which score is the max, zero gives a uniform
    softmax."""
    case = attention_case(2, 3, N, 64, "qkv", device=device, seed=5)
    q = case["q"] * 3.0  # peakier softmax as well
    _check(q, case["k"], case["v"], _do_like(q), scale)


@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
def test_expanded_grad_output(strategy, device, monkeypatch):
    """An incoming gradient with stride 0, as autograd hands over for o.sum()."""
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    case = attention_case(2, 3, 65, 32, "qkv", device=device, seed=9)
    do = _do_like(case["q"])[:1, :1, :1].expand_as(case["q"])
    assert do.stride()[:3] == (0, 0, 0)
    _check(case["q"], case["k"], case["v"], do, 32 ** -0.5)


@pytest.mark.parametrize("N,d,strategy", [(50, 64, "fused"), (197, 16, "fused_q"),
                                            (65, 80, "split")])  # (65, 80): only split applies
def test_bit_identical_runs(N, d, strategy, device, monkeypatch):
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    case = attention_case(2, 3, N, d, "qkv", device=device, seed=13)
    q, k, v = case["q"], case["k"], case["v"]
    do = _do_like(q)
    first = _run(q, k, v, do, 0.125)
    second = _run(q, k, v, do, 0.125)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv", "sums"),
                          (first[0], first[1], *first[2], first[3]),
                          (second[0], second[1], *second[2], second[3])):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
@pytest.mark.parametrize("N", [1, 50, 65])
def test_column_sums_on_finer_partial_rows(strategy, N, device, monkeypatch):
    """Partial rows of 16 sequence rows: each program of 64 rows writes its sums into the first
    of the 4 partial rows it owns and zeros into the others (only those below cdiv(N, 16));
    fused_q's program owns every partial row of its (batch, head). The NaN-filled buffer must
    come back fully written and sum to the float64 column sums."""
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    monkeypatch.setattr(_kernels(), "_sum_rows", lambda: 16)
    case = attention_case(2, 3, N, 32, "qkv", device=device, seed=N + 3)
    _check(case["q"], case["k"], case["v"], _do_like(case["q"]), 32 ** -0.5)


@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
def test_without_column_sums(strategy, device, monkeypatch):
    """No dsum: the same gradients, bit for bit, as with it."""
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    case = attention_case(2, 3, 65, 32, "qkv", device=device, seed=19)
    q, k, v = case["q"], case["k"], case["v"]
    do = _do_like(q)
    with_sums, without = _run(q, k, v, do, 0.2), _run(q, k, v, do, 0.2, sums=False)
    assert without[3] is None
    for a, b in zip(with_sums[2], without[2]):
        assert torch.equal(a, b)


def test_default_buffers(device):
    """o defaults to (B, N, H, d) storage; dq, dk, dv to views of one packed (B, N, 3, H, d)."""
    attn = _kernels()
    B, H, N, d = 2, 3, 7, 32
    case = attention_case(B, H, N, d, "contiguous", device=device, seed=17)
    q, k, v = case["q"], case["k"], case["v"]
    o, lse = attn.attention_fwd(q, k, v, d ** -0.5)
    assert o.shape == (B, H, N, d) and o.transpose(1, 2).is_contiguous()
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32 and lse.is_contiguous()
    dq, dk, dv = attn.attention_bwd(_do_like(q), q, k, v, o, lse, d ** -0.5)
    base = dq.untyped_storage().data_ptr()
    assert dk.untyped_storage().data_ptr() == base and dv.untyped_storage().data_ptr() == base
    packed = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4)  # (B, N, 3, H, d)
    assert dq.stride() == (N * 3 * H * d, d, 3 * H * d, 1) and packed.shape == (B, N, 3, H, d)
    ref = _check(q, k, v, _do_like(q), d ** -0.5)
    assert torch.equal(o, ref[0]) and torch.equal(dq, ref[2][0])


# ----------------------------------------------------------------------------- GPU

def _reference32(q, k, v, do, scale):
    """o, lse, grads in fp32 through explicit math (no TF32, no fused kernel)."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    s = (q32 @ k32.transpose(-1, -2)) * scale
    o32 = torch.softmax(s, dim=-1) @ v32
    o32.backward(do.float())
    return o32.detach(), torch.logsumexp(s.detach(), -1), (q32.grad, k32.grad, v32.grad)


def _sdpa(q, k, v, do, scale):
    q_, k_, v_ = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = F.scaled_dot_product_attention(q_, k_, v_, scale=scale)
    o.backward(do)
    return o.detach(), (q_.grad, k_.grad, v_.grad)


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _assert_within_sdpa_error(dtype, q, k, v, do, scale):
    """The FlashAttention rule: error against fp32 at most 2x SDPA's own in the same dtype."""
    o, lse, grads, sums = _run(q, k, v, do, scale)
    o32, lse32, grads32 = _reference32(q, k, v, do, scale)
    o_sdpa, grads_sdpa = _sdpa(q, k, v, do, scale)
    atol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    assert (lse - lse32).abs().max().item() <= 1e-3 * max(1.0, lse32.abs().max().item())
    # atol is relative to each tensor's size, floored (N = 1: dq = dk = 0 up to rounding).
    floor = 1e-2 * max(r.abs().max().item() for r in (o32, *grads32))
    for name, a, s, r in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_sdpa, *grads_sdpa), (o32, *grads32)):
        assert torch.isfinite(a).all(), name
        err = (a.float() - r).abs().max().item()
        err_sdpa = (s.float() - r).abs().max().item()
        assert err <= 2 * err_sdpa + atol * max(r.abs().max().item(), floor), (name, err, err_sdpa)
    # the column sums of the fp32 gradients against those of the fp32 reference's, beside what
    # summing SDPA's low-precision gradients gives
    sums32, sums_sdpa = _column_sums(grads32), _column_sums([g.float() for g in grads_sdpa])
    err = (sums - sums32).abs().max().item()
    err_sdpa = (sums_sdpa - sums32).abs().max().item()
    assert torch.isfinite(sums).all() and err <= 2 * err_sdpa + atol * max(
        sums32.abs().max().item(), floor), ("sums", err, err_sdpa)


_GPU_CASES = [  # (N, d, layout): the MAE shapes in both layouts, then other head dims and lengths
    (50, 64, "qkv"), (50, 64, "contiguous"), (65, 80, "qkv"), (197, 32, "qkv"), (197, 32, "transposed"),
    (257, 32, "qkv"), (50, 96, "qkv"), (50, 128, "qkv"), (1, 64, "qkv"), (300, 64, "qkv"),
    (1024, 64, "qkv"), (4096, 64, "contiguous"), (4096, 128, "qkv"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,d,layout", _GPU_CASES)
def test_low_precision_vs_sdpa(dtype, N, d, layout, no_tf32, monkeypatch):
    monkeypatch.setattr(_kernels(), "_AUTOTUNE", False)  # one configuration per shape: quick
    B, H = (4, 6) if N <= 300 else (1, 2)
    case = attention_case(B, H, N, d, layout, dtype=dtype, device="cuda", seed=N + d)
    _assert_within_sdpa_error(dtype, case["q"], case["k"], case["v"], _do_like(case["q"]), d ** -0.5)


@pytest.mark.interpreter(covered_by="test_low_precision_vs_sdpa")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
@pytest.mark.parametrize("N,d,layout", [(1, 64, "qkv"), (50, 64, "qkv"), (197, 32, "transposed")])
def test_low_precision_vs_sdpa_interpreted(dtype, strategy, N, d, layout, interpreter_bf16,
                                           monkeypatch):
    """The GPU test's rule with each way of the backward, at the MAE encoder's and decoder's head
    shapes for one (batch, head) pair; bf16 with the interpreter's bf16 mended."""
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    case = attention_case(1, 2, N, d, layout, dtype=dtype, seed=N + d + 3)
    _assert_within_sdpa_error(dtype, case["q"], case["k"], case["v"], _do_like(case["q"]),
                              d ** -0.5)


def _kept_configs(attn, kind, N, d, dtype, gpu_pools=False):
    """(the kernel of ``kind``, its configurations its pruning keeps at N, d, dtype): from this
    process's pools, or with ``gpu_pools`` from a GPU's (attn._gpu_pools)."""
    q = torch.empty(0, dtype=dtype)
    named, bd = {"Q": q, "N_CTX": N}, max(16, triton.next_power_of_2(d))
    n_all = max(16, triton.next_power_of_2(N))
    gpu = attn._gpu_pools() if gpu_pools else None
    fwd, fused, fused_q, dq, dkdv = (
        (gpu[k] for k in ("fwd", "fused", "fused_q", "dq", "dkdv")) if gpu_pools else
        (attn._FWD_CONFIGS, attn._BWD_FUSED_CONFIGS, attn._BWD_FUSED_Q_CONFIGS,
         attn._BWD_DQ_CONFIGS, attn._BWD_DKDV_CONFIGS))
    pools = {
        "fwd": (attn._attn_fwd_tuned, fwd, attn._prune_fwd, {}),
        "fwd_head": (attn._attn_fwd_tuned, [c for c in fwd if c.kwargs["BLOCK_M"] == 256],
                     attn._prune_fwd, {}),
        "fused": (attn._attn_bwd_fused_tuned, fused, attn._prune_bwd_fused, {"BLOCK_N": n_all}),
        "fused_q": (attn._attn_bwd_fused_q_tuned, fused_q, attn._prune_bwd_fused_q,
                    {"BLOCK_M": n_all, "HAS_SUMS": True}),  # _run passes the column sums
        "dq": (attn._attn_bwd_dq_tuned, dq, attn._prune_bwd_dq, {}),
        "dkdv": (attn._attn_bwd_dkdv_tuned, dkdv, attn._prune_bwd_dkdv, {}),
    }
    tuned, pool, prune, extra = pools[kind]
    return tuned, prune(pool, named, BLOCK_D=bd, **extra)


@pytest.mark.parametrize("kind", ["fwd", "fwd_head", "fused", "fused_q", "dq", "dkdv"])
def test_kept_configs_prunes_each_kind(kind):
    """The CUDA test below prunes each kind's pool as its autotuner would (here the pools of
    this process: the interpreter's single configurations)."""
    attn = _kernels()
    for N, d in ((50, 64), (197, 32)):
        tuned, kept = _kept_configs(attn, kind, N, d, torch.bfloat16)
        assert isinstance(kept, list) and all(isinstance(c, triton.Config) for c in kept)


@pytest.mark.cuda
@pytest.mark.parametrize("N,d,kinds", [(50, 64, ("fwd", "fused")), (197, 32, ("fwd", "fused")),
                                       (197, 32, ("dkdv",)), (65, 80, ("fwd", "dq", "dkdv")),
                                       (50, 64, ("fused_q",)), (197, 32, ("fwd_head", "fused_q")),
                                       (257, 32, ("fwd_head",))],
                         ids=lambda v: "+".join(v) if isinstance(v, tuple) else str(v))
def test_every_autotune_config_mae_shapes(N, d, kinds, no_tf32, monkeypatch):
    """Each configuration the autotuner may pick at MAE's shapes (bf16), run one at a time (the
    other kernels on one configuration). The head tilings (fused_q, the forward's 256-row tiles;
    at N = 257 followed by a 16-row tail tile) are what benches/gpu_suite.sh's stage 0c runs
    first; where it turned them off (FASTMAE_ATTN_HEAD_TILES=0) they are not run again."""
    attn = _kernels()
    if not attn._HEAD_TILES and {"fused_q", "fwd_head"} & set(kinds):
        pytest.skip("attention's head tilings are off in this process (FASTMAE_ATTN_HEAD_TILES=0)")
    case = attention_case(4, 6, N, d, "qkv", dtype=torch.bfloat16, device="cuda", seed=N)
    q, k, v = case["q"], case["k"], case["v"]
    do = _do_like(q)
    plans = [(kind, *_kept_configs(attn, kind, N, d, torch.bfloat16)) for kind in kinds]
    monkeypatch.setattr(attn, "_AUTOTUNE", False)
    # the backward whose configurations are tried, not the one timing would keep
    monkeypatch.setenv("FASTMAE_ATTN_BWD", next((k for k in kinds if k.startswith("fused")), "split"))
    for kind, tuned, kept in plans:
        for config in kept:
            with _only_config(tuned, config):
                try:
                    _assert_within_sdpa_error(torch.bfloat16, q, k, v, do, d ** -0.5)
                except AssertionError as e:
                    raise AssertionError(f"{kind} {config}: {e}") from e


# the backward way that runs each kind's kernel
_WAY_OF_KIND = {"fwd": "split", "fwd_head": "split", "fused": "fused", "fused_q": "fused_q",
                "dq": "split", "dkdv": "split"}


@pytest.mark.interpreter(covered_by="test_every_autotune_config_mae_shapes")
@pytest.mark.parametrize("N,d", [(50, 64), (197, 32)])
@pytest.mark.parametrize("kind", ["fwd", "fused", "fused_q", "dq", "dkdv"])
def test_every_gpu_tiling_through_the_interpreter(N, d, kind, monkeypatch):
    """Each configuration a GPU's autotuner may pick at MAE's encoder and decoder shapes (the
    pools of attn._gpu_pools, pruned as on a GPU for 16-bit inputs: 256-row tiles, 128-key
    steps, their tails at N = 197), run one at a time in fp16, the other kernels on the
    interpreter's configuration: o, lse, each gradient and the column sums within fp16's
    rounding of float64 (1e-3, as test_half_precision_ways_within_rounding). Their indexing is
    checked here, where a GPU is not needed; only the CUDA test ran these tilings before."""
    attn = _kernels()
    tuned, kept = _kept_configs(attn, kind, N, d, torch.float16, gpu_pools=True)
    assert kept
    monkeypatch.setenv("FASTMAE_ATTN_BWD", _WAY_OF_KIND[kind])
    case = attention_case(1, 2, N, d, "qkv", device="cpu", seed=N + d + 5)
    q, k, v = (case[n].to(torch.float16) for n in ("q", "k", "v"))
    do = _do_like(q)
    o64, lse64, grads64 = _reference64(q, k, v, do, d ** -0.5)
    tilings = {tuple(sorted(c.kwargs.items())): c for c in kept}  # warps, stages: one run
    for config in tilings.values():
        with _only_config(tuned, config):
            o, lse, grads, sums = _run(q, k, v, do, d ** -0.5)
        errors = {"o": rel_err(o, o64), "lse": rel_err(lse, lse64),
                  "sums": rel_err(sums, _column_sums(grads64))}
        errors.update({name: rel_err(g, g64) for name, g, g64 in zip(("dq", "dk", "dv"), grads,
                                                                      grads64)})
        bad = {name: err for name, err in errors.items() if not err <= 1e-3}
        assert not bad, f"{kind} {config}: {bad}"


@pytest.mark.cuda
@pytest.mark.parametrize("N,d", [(50, 64), (197, 32)])
def test_autotuned_mae_shapes(N, d, no_tf32):
    """The full autotuning search at MAE's encoder and decoder shapes (bf16, batch 8)."""
    attn = _kernels()
    for tuned in (attn._attn_fwd_tuned, attn._attn_bwd_fused_tuned, attn._attn_bwd_fused_q_tuned,
                  attn._attn_bwd_dq_tuned, attn._attn_bwd_dkdv_tuned):
        tuned.cache.clear()  # forget choices made with autotuning off by earlier tests
    case = attention_case(8, 12, N, d, "qkv", dtype=torch.bfloat16, device="cuda", seed=29)
    _assert_within_sdpa_error(torch.bfloat16, case["q"], case["k"], case["v"], _do_like(case["q"]), d ** -0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("N,d", [(50, 64), (197, 32), (300, 80)])
def test_fp32_gpu_matches_float64(N, d):
    """fp32 on the GPU: the dots must run in IEEE fp32, not TF32."""
    case = attention_case(2, 3, N, d, "qkv", device="cuda", seed=21)
    _check(case["q"], case["k"], case["v"], _do_like(case["q"]), d ** -0.5)


@pytest.mark.cuda
def test_large_batch_head_grid(no_tf32, monkeypatch):
    """B * H = 1024 * 16 programs on grid axis 0 (over axis 1's 65535 limit), N = 50, d = 64."""
    monkeypatch.setattr(_kernels(), "_AUTOTUNE", False)
    B, H, N, d = 1024, 16, 50, 64
    case = attention_case(B, H, N, d, "qkv", dtype=torch.bfloat16, device="cuda", seed=23)
    _assert_within_sdpa_error(torch.bfloat16, case["q"], case["k"], case["v"], _do_like(case["q"]), d ** -0.5)


def test_launch_reuses_the_autotuners_choice(monkeypatch, device):
    """_common.launch_tuned, after the autotuner has cached a configuration for a key, passes the
    kernel what the autotuner passed it (the configuration's meta-parameters, warps and stages),
    without running the autotuner; with the autotuner's cache cleared it goes through it again."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    attn = _kernels()
    tuned = attn._attn_fwd_tuned
    inner = tuned.fn
    while isinstance(inner, (Autotuner, Heuristics)):
        inner = inner.fn  # below the autotuner and the ONE_TILE heuristic: the kernel itself
    through_autotuner, seen = [], []
    real_tuner_run, real_run = Autotuner.run, type(inner).run

    def tuner_run(self, *args, **kwargs):
        through_autotuner.append(self is tuned)
        return real_tuner_run(self, *args, **kwargs)

    def run(self, *args, **kwargs):
        if self is inner:
            seen.append({k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", tuner_run)
    monkeypatch.setattr(type(inner), "run", run)
    # two configurations, so that the autotuner keys its cache (one is used without a key)
    two = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1),
           triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    monkeypatch.setattr(tuned, "configs", two)
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(tuned, "early_config_prune", None)
    monkeypatch.setattr(tuned, "_bench", lambda *args, config, **kw: [float(config.kwargs["BLOCK_M"])] * 3)
    case = attention_case(1, 2, 13, 16, "qkv", device=device, seed=3)
    q, k, v = case["q"], case["k"], case["v"]
    from fastmae.kernels import _common
    monkeypatch.setattr(_common, "TUNE_TIMINGS", {})
    first, _ = attn.attention_fwd(q, k, v, 0.25)
    assert through_autotuner == [True] and len(tuned.cache) == 1
    # the search's timings are kept by key (the autotuner keeps its latest search's only)
    assert _common.TUNE_TIMINGS == {id(tuned): {next(iter(tuned.cache)): {two[0]: 16.0,
                                                                           two[1]: 32.0}}}
    second, _ = attn.attention_fwd(q, k, v, 0.25)
    assert through_autotuner == [True], "the cached configuration is launched directly"
    assert seen[-1] == seen[-2] and seen[-1]["BLOCK_M"] == 16
    assert torch.equal(first, second)
    tuned.cache.clear()
    attn.attention_fwd(q, k, v, 0.25)
    assert through_autotuner == [True, True]
    # a grid of another size class (B * H = 2 -> 8) is tuned again, under its own key
    wide = attention_case(4, 2, 13, 16, "qkv", device=device, seed=4)
    attn.attention_fwd(wide["q"], wide["k"], wide["v"], 0.25)
    assert through_autotuner == [True, True, True]
    assert sorted(key[2] for key in tuned.cache) == [(1 * 2).bit_length(), (4 * 2).bit_length()]


def test_capped_dkdv_configurations_only_where_the_caps_were_checked():
    """The register-capped dK-dV tilings (see _CAPPED_DKDV) join the pool at the head dimension
    they were compiled for without spilling, in half precision, next to their uncapped twins."""
    attn = _kernels()
    assert attn._CAPPED_DKDV
    for bm, bn, s, cap in attn._CAPPED_DKDV:
        assert attn._keep_bwd_dkdv(bm, bn, 4, s, 256, 32, False, cap)
        assert attn._keep_bwd_dkdv(bm, bn, 4, s, 256, 32, False)  # the twin
        assert not attn._keep_bwd_dkdv(bm, bn, 4, s, 256, 64, False, cap)  # another head dim
        assert not attn._keep_bwd_dkdv(bm, bn, 4, s, 256, 32, True, cap)  # fp32


def test_fused_q_pool_at_mae_shapes():
    """fused_q's pruning over its GPU pool's candidates (the sm_90 compiles its comments cite):
    half precision, at the decoder's N = 197, d = 32 (256 queries a program) pipelined steps of
    64 keys at 8 or 16 warps (16 only with the column sums: without, they spilled); at the
    encoder's N = 50, d = 64 one step of 64 keys at 8 warps (4 spilled; 16 take 256 rows); fp32
    steps of 16 keys at 8 warps, 2 stages."""
    attn = _kernels()
    grid = [(bn, w, s) for bn in (16, 32, 64, 128) for w in (4, 8, 16) for s in (1, 2, 3)]

    def kept(N, bd, fp32=False, sums=True):
        bm = max(16, triton.next_power_of_2(N))
        return {(bn, w, s) for bn, w, s in grid
                if attn._keep_bwd_fused_q(bm, bn, w, s, N, bd, fp32, sums)}

    assert kept(197, 32) == {(64, w, s) for w in (8, 16) for s in (2, 3)}
    assert kept(197, 32, sums=False) == {(64, 8, 2), (64, 8, 3)}
    assert kept(50, 64) == {(64, 8, 1)}
    assert kept(50, 64, fp32=True) == {(16, 8, 2)}
    assert kept(13, 64) == {(16, 8, 1)}  # the smallest tile, one step
    assert {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in attn._BWD_FUSED_Q_CONFIGS} \
        <= set(grid)


def test_forward_pool_takes_256_row_tiles_at_16_warps_only_where_compiled():
    """The forward's 256-row tiling (one program a head at N = 197) is kept at 16 warps, in
    64-key steps at d = 32, pipelined; not at other head dimensions, nor in fp32."""
    attn = _kernels()
    grid = [(bm, bn, w, s) for bm in (16, 32, 64, 128, 256) for bn in (16, 32, 64, 128, 256)
            for w in (4, 8, 16) for s in (1, 2, 3)]

    def wide(N, bd, fp32=False):
        n_pow2 = max(16, triton.next_power_of_2(N))
        return {c for c in grid if (c[0] == 256 or c[2] == 16)
                and attn._keep_fwd(*c, N, n_pow2, bd, fp32)}

    assert wide(197, 32) == wide(4096, 32) == {(256, 64, 16, 2), (256, 64, 16, 3)}
    assert wide(197, 64) == wide(197, 32, fp32=True) == wide(50, 32) == set()


@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
@pytest.mark.parametrize("N", [50, 97])  # one key tile; key loops with a partial last step
def test_backward_with_very_negative_scores(strategy, N, device, monkeypatch):
    """Scores ~ -140 (log-sum-exp below fp32's exp range), each way of the backward: wherever
    a padding key's exp2(s - lse) is formed (the dQ sweep's last, partial key step, the fused
    ways' padded key tiles) it is inf there and must be masked, and a padding query row must
    read lse = 0, not the next head's (masking nothing passed every other test: with ordinary
    scores the padding's zero keys and values hide it); the forward's online softmax (N = 97)
    must keep the max of the scaled scores, not of the unscaled ones."""
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    c = attention_case(1, 2, N, 32, device=device, seed=4)
    q, k = -5.0 + 0.1 * c["q"], 5.0 + 0.1 * c["k"]
    _check(q, k, c["v"], _do_like(q), 32 ** -0.5)


# ----------------------------------------------------------------------------- stores, copies, ways

@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
def test_stores_stay_inside_their_buffers(strategy, device, monkeypatch):
    """Every buffer the kernels write -- o, the packed gradients, the column sums (partial rows
    of 16: a program stores zeros in those it owns, up to the last), the launchers' own lse and
    the split way's statistics -- is followed by more memory, as a view of a larger tensor is:
    nothing past it may change. (Within a buffer a row mask off by one writes into the next
    head's or batch's rows, which their own programs then rewrite: only the end shows it, and
    without the guard the stray write lands outside the allocation.)"""
    attn = _kernels()
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    monkeypatch.setattr(attn, "_sum_rows", lambda: 16)
    B, H, N, d = 2, 2, 97, 32
    case = attention_case(B, H, N, d, "qkv", device=device, seed=43)
    q, k, v = case["q"], case["k"], case["v"]
    do, scale = _do_like(q), d ** -0.5
    guards = []
    alloc = guarded_empty(guards)
    monkeypatch.setattr(attn, "empty", alloc)
    out = alloc((B, N, H, d), q.dtype, device).transpose(1, 2)
    packed = alloc((B, N, 3, H, d), q.dtype, device)
    dq, dk, dv = packed.permute(2, 0, 3, 1, 4).unbind(0)
    dsum = alloc(attn.grad_sum_shape(B, H, N, d), torch.float32, device)
    o, lse = attn.attention_fwd(q, k, v, scale, out=out)
    attn.attention_bwd(do, q, k, v, o, lse, scale, dq=dq, dk=dk, dv=dv, dsum=dsum)
    assert len(guards) == (5 if strategy == "split" else 4)  # o, grads, dsum, lse (, stats)
    assert_guards_intact(guards)
    o64, _, grads64 = _reference64(q, k, v, do, scale)
    floor = 1e-2 * max(g.abs().max().item() for g in grads64)
    assert rel_err(o, o64) <= TOL
    assert all(rel_err(g, g64, floor) <= TOL for g, g64 in zip((dq, dk, dv), grads64))
    assert rel_err(dsum.sum((0, 1)), _column_sums(grads64), floor) <= TOL


def test_operands_copied_for_int32_tile_offsets(device, monkeypatch):
    """A tensor whose in-tile offsets could overflow int32 is run on a contiguous copy (_fit;
    never MAE's layouts, whose strides are small): with the limit lowered so that every
    operand and output is copied, o and the gradients must still land in the caller's buffers."""
    monkeypatch.setattr(_kernels(), "_MAX_TILE_ROWS", 2 ** 31)
    case = attention_case(2, 3, 50, 32, "qkv", device=device, seed=47)
    _check(case["q"], case["k"], case["v"], _do_like(case["q"]), 32 ** -0.5)


def test_split_sums_with_unequal_dq_and_dkdv_blocks(device, monkeypatch):
    """The column sums' partial rows are as short as the smallest block of the two split
    kernels' tilings (here dQ's 16 query rows, not dK-dV's 32 keys), so that each program of
    either owns whole partial rows."""
    attn = _kernels()
    monkeypatch.setenv("FASTMAE_ATTN_BWD", "split")
    case = attention_case(1, 2, 50, 32, "qkv", device=device, seed=53)
    with _only_config(attn._attn_bwd_dq_tuned, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16},
                                                             num_warps=4, num_stages=2)), \
            _only_config(attn._attn_bwd_dkdv_tuned, triton.Config({"BLOCK_M": 16, "BLOCK_N": 32},
                                                                  num_warps=4, num_stages=2)):
        _check(case["q"], case["k"], case["v"], _do_like(case["q"]), 32 ** -0.5)


@pytest.mark.parametrize("dtype,N,d,fits", [
    (torch.float32, 50, 64, True), (torch.float32, 97, 32, True), (torch.float32, 197, 32, False),
    (torch.float32, 65, 80, False), (torch.float16, 197, 32, True), (torch.float16, 65, 80, False),
    (torch.float16, 257, 16, False)])
def test_fused_ways_only_within_the_tile_limit(dtype, N, d, fits, device, monkeypatch):
    """A fused way runs only where a head's next_pow2(N) x next_pow2(d) tile holds at most
    _FUSED_BWD_MAX_TILE elements (half that in fp32, whose dots run on CUDA cores) and N <= 256
    (the examples of the module's docstring; bigger tiles spill on the GPU): elsewhere a forced
    fused way runs the two-kernel one. The launches are recorded, not run."""
    attn = _kernels()
    launched = []
    monkeypatch.setattr(attn, "launch_tuned", lambda tuned, *args, **kwargs: launched.append(tuned))
    q = torch.randn(1, 1, N, d, device=device).to(dtype)
    lse = torch.randn(1, 1, N, device=device)
    for way in ("fused", "fused_q"):
        monkeypatch.setenv("FASTMAE_ATTN_BWD", way)
        launched.clear()
        attn.attention_bwd(q, q, q, q, q, lse, d ** -0.5)
        assert launched == [getattr(attn, name) for name in _WAY_KERNELS[way if fits else "split"]]


def test_grad_output_of_another_dtype(device):
    """An fp32 incoming gradient for fp16 q, k, v (as an fp32 loss hands it over) is cast to
    their dtype: the gradients as with an fp16 one, in fp16."""
    case = attention_case(1, 2, 50, 32, "qkv", device=device, seed=59)
    q, k, v = (case[n].to(torch.float16) for n in ("q", "k", "v"))
    do = _do_like(q, seed=3).float()
    _, _, grads, _ = _run(q, k, v, do, 32 ** -0.5)
    _, _, same, _ = _run(q, k, v, do.half(), 32 ** -0.5)
    for g, s in zip(grads, same):
        assert g.dtype == torch.float16 and torch.equal(g, s)


def _grads64_given_o(q, k, v, do, o, scale):
    """dq, dk and dP - delta in float64, with delta = rowsum(dO * o) of the ``o`` the backward
    was handed (its 16-bit rounding of the true output included), so that only the kernel's own
    arithmetic is left between them."""
    q, k, v, do, o = (t.to(torch.float64) for t in (q, k, v, do, o))
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    dp_less_delta = do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True)
    ds = p * dp_less_delta
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, dp_less_delta


@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
def test_delta_summed_in_fp32_from_half_precision(strategy, device, monkeypatch):
    """fp16 dO and O of size ~8, every row of V near one row v0: delta = rowsum(dO * O) (~300)
    cancels in dP - delta down to ~3.5, so dQ and dK carry delta's error magnified. Its products
    and sum taken in fp32, dQ and dK were within 5.7e-4 of float64's; taken in fp16 (products
    rounded to ~0.03, partial sums to ~0.1), 4.0e-2 and 2.8e-2 off, each way."""
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    N, d = 50, 32
    g = torch.Generator(device=device).manual_seed(61)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(torch.float16)

    q, k, do = randn(1, 2, N, d), randn(1, 2, N, d), randn(1, 2, N, d, scale=8.0)
    v = (randn(1, 2, 1, d, scale=8.0).float() + randn(1, 2, N, d, scale=0.1).float()).half()
    attn = _kernels()
    o, lse = attn.attention_fwd(q, k, v, d ** -0.5)
    dq, dk, dv = _nan_packed_grads(q)
    attn.attention_bwd(do, q, k, v, o, lse, d ** -0.5, dq=dq, dk=dk, dv=dv)
    dq64, dk64, dp_less_delta = _grads64_given_o(q, k, v, do, o, d ** -0.5)
    delta = (do.double() * o.double()).sum(-1)
    assert delta.abs().mean() > 50 * dp_less_delta.abs().mean()  # the cancellation
    assert rel_err(dq, dq64) <= 2e-3 and rel_err(dk, dk64) <= 2e-3
