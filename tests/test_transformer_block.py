"""ops.transformer_block: a plain eager call with gradients runs the block as one autograd node
(``_Block``); it must give the op-by-op composition's outputs and every gradient (each op of
which is checked against the float64 reference in test_ops_triton.py), in fp32 and under
autocast, with and without an incoming branch and a qkv bias; everything else runs op by op."""
import pytest
import torch

import fastmae
from fastmae import ops
from fastmae.testing import assert_rel_close

pytestmark = pytest.mark.interpreter(
    covered_by="this file's cuda tests, the GPU training test (tests/test_model_triton.py) and "
               "fastmae check's model runs")

PARAM_NAMES = ("norm1.weight", "norm1.bias", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
               "norm2.weight", "norm2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


@pytest.fixture(autouse=True)
def triton_backend():
    with fastmae.use_backend("triton"):
        yield


def block_case(B, N, C, hidden, qkv_bias=True, branch=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (hidden, C), (hidden,),
              (C, hidden), (C,))
    params = [torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 0.5) for s in shapes]
    params[0] += 1.0
    params[6] += 1.0
    if not qkv_bias:
        params[3] = None
    x = torch.randn(B, N, C, generator=g)
    br = (torch.randn(B, N, C, generator=g), torch.randn(C, generator=g)) if branch else None
    out_grads = (torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g))
    return x, br, params, out_grads


def run_block(case, num_heads, node, autocast_dtype=None, scale=None, eps=(1e-6, 1e-5)):
    """Outputs and every gradient of one block call on fresh leaves; ``node`` picks the one-node
    path (asserted taken) or the op-by-op composition; ``scale`` defaults to the head dim's."""
    gs, gm = case[3]
    x, branch, params, leaves = _block_leaves(case, torch.Tensor.clone)
    if branch is not None and autocast_dtype:
        branch = (branch[0].to(autocast_dtype), branch[1])
    if scale is None:
        scale = (x.shape[-1] // num_heads) ** -0.5
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float16,
                        enabled=autocast_dtype is not None):
        if node:
            s, (m_out, m_bias) = ops.transformer_block(x, branch, tuple(params), num_heads, scale,
                                                       eps)
            assert type(s.grad_fn).__name__ == "_BlockBackward"
        else:
            s, (m_out, m_bias) = ops._block_by_op(x, branch, tuple(params), num_heads, scale, eps)
            assert type(s.grad_fn).__name__ != "_BlockBackward"
    assert m_bias is params[11]
    torch.autograd.backward((s, m_out), (gs, gm.to(m_out.dtype)))
    return [s.detach(), m_out.detach()], [t.grad for t in leaves]


@pytest.fixture(params=["fused", "fused_tma", "split"])
def mlp(request, monkeypatch):
    """The one-node block's fc1 forward and fc2 input gradient: fastmae's matmuls with the bias +
    GELU work in their epilogue (tiles moved by threads, or by TMA descriptors), or torch's
    matmuls and the bias + GELU kernels (on a GPU the fastest is timed and kept; FASTMAE_MLP
    forces one)."""
    monkeypatch.setenv("FASTMAE_MLP", request.param)
    return request.param


@pytest.mark.parametrize("B, N, C, H, hidden", [(2, 7, 64, 2, 128), (1, 13, 96, 1, 40)])
@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_block_node_matches_the_op_by_op_block_fp32(B, N, C, H, hidden, branch, qkv_bias, mlp):
    case = block_case(B, N, C, hidden, qkv_bias=qkv_bias, branch=branch)
    (outs, grads), (ref_outs, ref_grads) = run_block(case, H, True), run_block(case, H, False)
    for name, a, b in zip(("x", "branch"), outs, ref_outs):
        assert_rel_close(a, b, 1e-6, name)
    names = ["x"] + [n for n, p in zip(PARAM_NAMES, case[2]) if p is not None] + (
        ["branch", "branch bias"] if branch else [])
    assert len(grads) == len(names)
    for name, a, b in zip(names, grads, ref_grads):
        if name == "fc2.bias":  # added (and differentiated) by the next block's LayerNorm
            assert a is None and b is None
            continue
        assert a is not None and b is not None, f"no gradient reached {name}"
        assert a.dtype == b.dtype, name
        assert_rel_close(a, b, 1e-5, f"grad of {name}")


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("branch", [True, False])
def test_block_node_matches_the_op_by_op_block_under_autocast(branch, dtype, tol, mlp,
                                                              interpreter_bf16):
    """The autocast path: half-precision matmul inputs (the weights cast once), fp32 residual
    stream and parameter gradients, the bf16/fp16 branch gradient from the one-pass LayerNorm
    backward. bf16 with the interpreter's bf16 mended (the interpreter_bf16 fixture); its
    tolerance is fp16's times 8, the ratio of their units in the last place."""
    case = block_case(2, 5, 64, 96, branch=branch, seed=3)
    (outs, grads), (ref_outs, ref_grads) = (run_block(case, 2, node, dtype)
                                            for node in (True, False))
    assert outs[0].dtype == torch.float32 and outs[1].dtype == dtype
    for a, b in zip(outs, ref_outs):
        assert a.dtype == b.dtype
        assert_rel_close(a.float(), b.float(), tol, "output")
    for a, b in zip(grads, ref_grads):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype
        assert_rel_close(a.float(), b.float(), tol, "gradient")


def test_block_without_gradients_runs_op_by_op():
    x, br, params, _ = block_case(1, 5, 64, 64)
    with torch.no_grad():
        s, (m, _) = ops.transformer_block(x, br, tuple(params), 2, 32 ** -0.5, (1e-6, 1e-6))
    ref_s, (ref_m, _) = ops._block_by_op(x, br, tuple(params), 2, 32 ** -0.5, (1e-6, 1e-6))
    assert s.grad_fn is None
    assert_rel_close(s, ref_s.detach(), 1e-6, "x")
    assert_rel_close(m, ref_m.detach(), 1e-6, "branch")


def test_block_with_a_head_dim_the_kernel_does_not_serve_runs_op_by_op():
    """d = 16: no fused attention kernel; the op-by-op block takes the reference attention."""
    case = block_case(1, 5, 32, 32, branch=True)
    x, br, params, _ = case
    x = x.clone().requires_grad_(True)
    s, _ = ops.transformer_block(x, br, tuple(params), 2, 16 ** -0.5, (1e-6, 1e-6))
    assert type(s.grad_fn).__name__ != "_BlockBackward"


def test_block_rejects_a_wrong_parameter_tuple():
    x, br, params, _ = block_case(1, 5, 64, 64)
    with pytest.raises(ValueError, match="params"):
        ops.transformer_block(x, br, tuple(params[:11]), 2, 32 ** -0.5, (1e-6, 1e-6))


def test_mlp_path_forced_by_an_unknown_name_raises(monkeypatch):
    monkeypatch.setenv("FASTMAE_MLP", "fastest")
    case = block_case(1, 5, 64, 64, branch=False)
    with pytest.raises(ValueError, match="FASTMAE_MLP must be one of"):
        run_block(case, 2, True)


def _record_mlp_kernels(monkeypatch):
    """[(fused MLP launcher, whether it was asked for TMA), ...] as the block calls them."""
    from fastmae.kernels import gelu_matmul
    calls = []
    for name in ("matmul_bias_gelu", "matmul_gelu_bwd"):
        real = getattr(gelu_matmul, name)
        monkeypatch.setattr(gelu_matmul, name,
                            lambda *a, _real=real, _name=name, **k: calls.append((_name, k["tma"]))
                            or _real(*a, **k))
    return calls


def test_mlp_path_fused_runs_the_kernels_without_tma(monkeypatch):
    """FASTMAE_MLP=fused takes the fused kernels whose tiles threads move, also where the TMA
    ones could run (a mutation audit found nothing checked which)."""
    monkeypatch.setenv("FASTMAE_MLP", "fused")
    calls = _record_mlp_kernels(monkeypatch)
    run_block(block_case(1, 5, 64, 64, branch=False), 2, True)
    assert calls == [("matmul_bias_gelu", False), ("matmul_gelu_bwd", False)]


def test_mlp_path_fused_tma_runs_the_tma_kernels_or_says_why_not(monkeypatch):
    """FASTMAE_MLP=fused_tma takes the TMA kernels; where the hidden width's rows are not whole
    16-byte units (66 fp32) it raises naming the variable instead of running another way."""
    monkeypatch.setenv("FASTMAE_MLP", "fused_tma")
    calls = _record_mlp_kernels(monkeypatch)
    run_block(block_case(1, 5, 64, 64, branch=False), 2, True)
    assert calls == [("matmul_bias_gelu", True), ("matmul_gelu_bwd", True)]
    with pytest.raises(ValueError, match="FASTMAE_MLP=fused_tma: the TMA kernels need"):
        run_block(block_case(1, 5, 64, 66, branch=False), 2, True)


@pytest.mark.cuda
def test_weight_gradient_comes_out_in_fp32_from_half_operands():
    """On a GPU the block's weight gradients come from torch.mm(out_dtype=torch.float32): fp32
    straight from the matmul, closer to the exact product than the half result cast after it
    (autocast's way, which the CPU path keeps)."""
    from fastmae.testing import rel_err
    g = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(1000, 96, device="cuda", generator=g).to(torch.bfloat16)
    x = torch.randn(1000, 64, device="cuda", generator=g).to(torch.bfloat16)
    dw = ops._weight_grad(dy, x, torch.float32)
    assert dw.dtype == torch.float32 and ops._MM_FP32_OUT["available"]
    exact = dy.double().t() @ x.double()
    assert rel_err(dw, exact) < rel_err((dy.t() @ x).float(), exact)


def test_the_interpreter_takes_the_fused_mlp_path_by_default(monkeypatch):
    """Without FASTMAE_MLP, the interpreter runs the block's MLP through kernels/gelu_matmul.py
    (so the model-level CPU tests cover it); nothing is timed or kept."""
    from fastmae.kernels import gelu_matmul
    monkeypatch.delenv("FASTMAE_MLP", raising=False)
    calls = []
    for name in ("matmul_bias_gelu", "matmul_gelu_bwd"):
        real = getattr(gelu_matmul, name)
        monkeypatch.setattr(gelu_matmul, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name)
                            or _real(*a, **k))
    run_block(block_case(1, 5, 64, 64, branch=False), 2, True)
    assert calls == ["matmul_bias_gelu", "matmul_gelu_bwd"]
    assert ops._MLP_CHOICE == {}


def test_a_way_kept_with_tma_is_not_given_operands_no_descriptor_describes(monkeypatch):
    """The MLP's choices are kept per key with tma_ok in it: after the TMA way was kept for a
    shape (a stand-in for keep_faster keeps it, as a GPU whose timing it won would), a call of
    that shape whose gradient rows no TMA descriptor describes (a column slice: 68-byte rows)
    gets a way of its own instead of the kept one, which would raise; the same results."""
    from fastmae.kernels import _common
    from fastmae.kernels import gelu_matmul as gm
    M, N, K = 7, 32, 16
    g = torch.Generator().manual_seed(21)
    f = torch.randn(M, N, generator=g)
    fc1_b = torch.randn(N, generator=g)
    gelu_out = torch.nn.functional.gelu(f + fc1_b)
    w2 = torch.randn(K, N, generator=g) / N ** 0.5
    d_m = torch.randn(M, K + 1, generator=g)[:, :K]
    cpu = torch.device("cpu")
    assert gm.tma_ok(cpu, torch.float32, N, dm=d_m.contiguous(), w=w2, f=f)
    assert not gm.tma_ok(cpu, torch.float32, N, dm=d_m, w=w2, f=f)

    def keep_tma_where_offered(choices, key, forced_env, runs, default):
        if key not in choices:
            choices[key] = "fused_tma" if "fused_tma" in runs else "fused"
        return choices[key]

    monkeypatch.setattr(_common, "keep_faster", keep_tma_where_offered)
    monkeypatch.setattr(ops, "_MLP_CHOICE", {})
    monkeypatch.delenv("FASTMAE_MLP", raising=False)
    kept_tma = ops._fc2_gelu_grads(d_m.contiguous(), gelu_out, f, w2, fc1_b, torch.float32)
    sliced = ops._fc2_gelu_grads(d_m, gelu_out, f, w2, fc1_b, torch.float32)
    assert sorted(ops._MLP_CHOICE.values()) == ["fused", "fused_tma"]
    for name, x, y in zip(("df", "fc1 bias partial sums", "fc2 weight grad"), sliced, kept_tma):
        assert torch.equal(x, y), name


def _cast_inputs(device):
    g = torch.Generator().manual_seed(5)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 65520.0,
                            1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.4e38])  # NaN, inf, ties...
    ws = [torch.cat([special, torch.randn(37 * 5 - special.numel(), generator=g)]).view(37, 5),
          torch.randn(5, 37, generator=g) * 1e4, torch.randn(3, generator=g),
          torch.randn(2, 3, 4, generator=g)[:, 1]]  # the last one strided
    return [w.to(device) for w in ws]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_together_gives_tensor_to_bits(dtype):
    """The block's one-launch weight cast: bit for bit Tensor.to, None kept, a tensor already in
    the dtype returned as is, and sources of two dtypes each cast as their own group."""
    ws = _cast_inputs("cpu")
    half_src = torch.randn(4, 6, dtype=torch.float16)
    tensors = [ws[0], None, ws[1], dtype_already := torch.randn(3, 3).to(dtype), ws[2], ws[3],
               half_src.double()]
    out = ops._cast_together(tensors, dtype)
    assert out[1] is None and out[3] is dtype_already
    for t, o in zip(tensors, out):
        if t is None:
            continue
        expected = t.to(dtype=dtype)
        assert o.dtype == dtype and o.shape == t.shape
        assert torch.equal(o.contiguous().view(torch.int16), expected.contiguous().view(torch.int16))
    assert ops._cast_together([ws[2]], dtype)[0].dtype == dtype  # a group of one


@pytest.fixture
def foreach_copies(monkeypatch):
    """The torch._foreach_copy_ calls made while a test runs: how many tensors each copied."""
    calls = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_",
                        lambda dst, src, *a: calls.append(len(src)) or real(dst, src, *a))
    return calls


def test_block_node_casts_its_weights_in_one_foreach_copy(foreach_copies):
    """Under autocast the block's four weights and qkv bias reach the matmul dtype through one
    torch._foreach_copy_ (one kernel on CUDA) instead of five casts."""
    run_block(block_case(1, 5, 64, 64, branch=True), 2, True, torch.float16)
    assert foreach_copies == [5]


def test_cast_block_weights_applies_only_where_a_block_node_casts():
    """ops.cast_block_weights: under autocast with gradients, every block's (qkv, proj, fc1, fc2
    weights, qkv bias) in the autocast dtype, bit for bit Tensor.to, None kept for a missing
    bias; None for every block without autocast, without gradients or without a tensor that
    needs one."""
    cases = [block_case(1, 3, 64, 32, qkv_bias=b, seed=i) for i, b in enumerate((True, False))]
    x = cases[0][0].clone().requires_grad_(True)
    params = [tuple(None if p is None else p.clone().requires_grad_(True) for p in c[2])
              for c in cases]
    with torch.autocast("cpu", dtype=torch.float16):
        casts = ops.cast_block_weights(x, params)
        with torch.no_grad():
            assert ops.cast_block_weights(x, params) == [None, None]
        frozen = [tuple(None if p is None else p.detach() for p in ps) for ps in params]
        assert ops.cast_block_weights(x.detach(), frozen) == [None, None]
    assert ops.cast_block_weights(x, params) == [None, None]  # no autocast: nothing to cast
    for ps, cast in zip(params, casts):
        assert len(cast) == 5
        for src, out in zip((ps[2], ps[4], ps[8], ps[10], ps[3]), cast):
            if src is None:
                assert out is None
                continue
            assert out.dtype == torch.float16 and not out.requires_grad
            assert torch.equal(out, src.detach().to(torch.float16))


def test_block_node_takes_cast_weights_of_its_dtype_only(foreach_copies):
    """transformer_block(cast_weights=...) runs on the copies it is handed (no cast of its own)
    and gives the same bits as casting itself; copies in another dtype than the block's matmul
    dtype are not used: the block casts its own."""
    case = block_case(2, 5, 64, 64, branch=True, seed=3)
    x, br, params, (gs, gm) = case

    def run_with(cast_dtype):
        foreach_copies.clear()
        xl = x.clone().requires_grad_(True)
        ps = tuple(p.clone().requires_grad_(True) for p in params)
        cast = None
        if cast_dtype is not None:
            cast = tuple(t.detach().to(cast_dtype) for t in (ps[2], ps[4], ps[8], ps[10], ps[3]))
        with torch.autocast("cpu", dtype=torch.float16):
            s, (m_out, _) = ops.transformer_block(xl, (br[0].half(), br[1]), ps, 2, 0.25,
                                                  (1e-6, 1e-6), cast_weights=cast)
        assert type(s.grad_fn).__name__ == "_BlockBackward"
        torch.autograd.backward((s, m_out), (gs, gm))
        grads = [s.detach(), m_out.detach(), xl.grad] + [p.grad for p in ps]
        return grads, list(foreach_copies)

    own, own_calls = run_with(None)
    handed, handed_calls = run_with(torch.float16)
    other, other_calls = run_with(torch.bfloat16)
    assert own_calls == [5] and handed_calls == [] and other_calls == [5]
    for a, b, c in zip(own, handed, other):
        if a is None:  # fc2.bias: the caller adds it, and differentiates it
            assert b is None and c is None
            continue
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("branch, qkv_bias", [(True, True), (False, False)])
def test_block_node_sums_its_partials_in_one_launch(monkeypatch, branch, qkv_bias, mlp):
    """The block's backward hands its kernels' partial-sum buffers (fc1 bias, norm2 with the
    proj bias, norm1 with the branch bias, the qkv bias) to one partial_sums launch, and runs no
    torch reduction."""
    from fastmae.kernels import partial_sums
    calls, sums = [], []
    real = partial_sums.sum_partials
    monkeypatch.setattr(partial_sums, "sum_partials",
                        lambda buffers: calls.append([tuple(b.shape) for b in buffers])
                        or real(buffers))
    real_sum = torch.Tensor.sum
    case = block_case(2, 7, 64, 128, qkv_bias=qkv_bias, branch=branch)
    x, br, params, (gs, gm) = case
    x = x.clone().requires_grad_(True)
    params = [None if p is None else p.clone().requires_grad_(True) for p in params]
    branch_in = None if br is None else (br[0].clone().requires_grad_(True), br[1])
    s, (m_out, _) = ops.transformer_block(x, branch_in, tuple(params), 2, 0.125, (1e-6, 1e-5))
    monkeypatch.setattr(torch.Tensor, "sum",
                        lambda t, *a, **k: sums.append(tuple(t.shape)) or real_sum(t, *a, **k))
    torch.autograd.backward((s, m_out), (gs, gm))
    monkeypatch.setattr(torch.Tensor, "sum", real_sum)
    assert sums == []
    assert len(calls) == 1
    shapes = calls[0]
    assert len(shapes) == (4 if qkv_bias else 3)
    assert shapes[0][-1] == 128 and len(shapes[0]) == 2  # fc1's bias: (rows, hidden)
    assert shapes[1][0] == 3 and shapes[1][-1] == 64  # norm2: weight, bias, proj bias
    assert shapes[2][0] == (3 if branch else 2) and shapes[2][-1] == 64  # norm1 (+ branch bias)
    if qkv_bias:
        assert shapes[3][-1] == 3 * 64


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_together_gives_tensor_to_bits_on_cuda(dtype):
    """torch's CUDA fast path of _foreach_copy_ (one multi-tensor kernel, fp32 in, half out)
    rounds as Tensor.to does."""
    ws = [w.contiguous() for w in _cast_inputs("cuda")]
    out = ops._cast_together(ws, dtype)
    for w, o in zip(ws, out):
        assert torch.equal(o.view(torch.int16), w.to(dtype=dtype).view(torch.int16))


@pytest.mark.cuda
def test_cast_block_weights_on_cuda_gives_tensor_to_bits():
    """A ViT-B encoder's twelve blocks' weights through one multi-tensor cast on the GPU (many
    chunks, several launches): each copy bit for bit Tensor.to, as each block's own cast."""
    params = []
    for i in range(12):
        ps = block_case(1, 3, 768, 3072, seed=i)[2]
        params.append(tuple(p.cuda().requires_grad_(True) for p in ps))
    x = torch.randn(2, 50, 768, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        casts = ops.cast_block_weights(x, params)
    assert len(casts) == 12
    for ps, cast in zip(params, casts):
        for src, out in zip((ps[2], ps[4], ps[8], ps[10], ps[3]), cast):
            expected = src.detach().to(dtype=torch.bfloat16)
            assert out.dtype == torch.bfloat16 and out.shape == src.shape
            assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


# --------------------------------------------------- found by a mutation audit of ops.py (2)

def _official_block_fp64(x, branch, params, num_heads, scale, eps):
    """timm's Block written out in float64 with torch's functions alone (no fastmae op): the
    hand-off form's (s, m) of transformer_block, m without fc2's bias."""
    import torch.nn.functional as F
    n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, _ = params
    B, N, C = x.shape
    d = C // num_heads
    s1 = x if branch is None else x + branch[0] + branch[1]
    h = F.layer_norm(s1, (C,), n1w, n1b, eps[0])
    q, k, v = F.linear(h, qkv_w, qkv_b).view(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
    s2 = s1 + F.linear(a.transpose(1, 2).reshape(B, N, C), proj_w, proj_b)
    h2 = F.layer_norm(s2, (C,), n2w, n2b, eps[1])
    return s2, F.linear(F.gelu(F.linear(h2, fc1_w, fc1_b)), fc2_w)


@pytest.mark.parametrize("node", [True, False])
@pytest.mark.parametrize("branch, qkv_bias", [(True, True), (False, False)])
def test_block_with_its_own_scale_matches_an_independent_float64_block(node, branch, qkv_bias):
    """The one-node block and the op-by-op one against timm's Block in float64 (torch's own
    functions, not fastmae's reference path, which the op-by-op block shares), with a softmax
    scale that is not the head dim's default: both outputs and every gradient. A block that
    dropped its ``scale`` for d ** -0.5, in the forward or only in the backward, matched the
    composition it was compared with, which used the default scale too."""
    B, N, C, H, hidden = 2, 7, 64, 2, 40
    case = block_case(B, N, C, hidden, qkv_bias=qkv_bias, branch=branch, seed=17)
    _, _, params, (gs, gm) = case
    scale, eps = 0.31, (1e-6, 1e-5)
    outs, grads = run_block(case, H, node, scale=scale, eps=eps)
    xd, bd, pd, leaves = _block_leaves(case, torch.Tensor.double)
    s, m = _official_block_fp64(xd, bd, pd, H, scale, eps)
    torch.autograd.backward((s, m), (gs.double(), gm.double()))
    assert_rel_close(outs[0], s, 1e-5, "x")
    assert_rel_close(outs[1], m, 1e-5, "branch")
    names = ["x"] + [n for n, p in zip(PARAM_NAMES, params) if p is not None] + (
        ["branch", "branch bias"] if branch else [])
    for name, a, r in zip(names, grads, [t.grad for t in leaves]):
        if name == "fc2.bias":
            assert a is None
            continue
        assert_rel_close(a, r, 1e-4, f"grad of {name}")


def _block_leaves(case, convert):
    """A block case's x, branch and parameters as leaves (``convert`` of each, requiring grad),
    and the list of them in the order the gradients are compared."""
    x, br, params, _ = case
    x = convert(x).requires_grad_(True)
    params = [None if p is None else convert(p).requires_grad_(True) for p in params]
    leaves = [x] + [p for p in params if p is not None]
    branch = None
    if br is not None:
        branch = tuple(convert(t).requires_grad_(True) for t in br)
        leaves += list(branch)
    return x, branch, params, leaves


def test_block_node_double_backward_raises():
    """The one-node block's backward is not itself differentiable: create_graph=True through it
    raises instead of handing back gradients without a graph (which a gradient penalty would
    silently take as constants)."""
    x, br, params, _ = block_case(1, 5, 64, 48, branch=False, seed=2)
    x = x.clone().requires_grad_(True)
    params = [p.clone().requires_grad_(True) for p in params]
    s, (m, _) = ops.transformer_block(x, None, tuple(params), 2, 32 ** -0.5, (1e-6, 1e-6))
    assert type(s.grad_fn).__name__ == "_BlockBackward"
    (gx,) = torch.autograd.grad((s.square().sum() + m.square().sum()), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|marked with @once_differentiable"):
        gx.sum().backward()


def test_block_with_half_weights_beside_fp32_x_raises_as_torch_does():
    """Without autocast the matmuls take the weights as they are: fp16 weights beside an fp32
    residual stream are the dtype mismatch torch's linear refuses ("torch" backend), and the
    one-node block does not cast them to fp32 silently instead (a mutation audit found it
    unchecked)."""
    x, br, params, _ = block_case(1, 5, 64, 48, branch=False, seed=4)
    params = [p.half() if p.dim() == 2 else p for p in params]
    params = tuple(p.requires_grad_(True) for p in params)
    x = x.requires_grad_(True)
    for backend in ("torch", "triton"):
        with fastmae.use_backend(backend), pytest.raises(RuntimeError, match="dtype"):
            ops.transformer_block(x, None, params, 2, 32 ** -0.5, (1e-6, 1e-6))
    # fp16 x and weights, an fp32 incoming branch: the residual sum promotes to fp32 (as the
    # reference's add), which fp16 weights refuse; not an fp16 sum in the one-node block
    params = tuple(p.detach().half().requires_grad_(True) for p in params)
    x16 = x.detach().half().requires_grad_(True)
    branch = (torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(5)), params[11])
    for backend in ("torch", "triton"):
        with fastmae.use_backend(backend), pytest.raises(RuntimeError, match="dtype"):
            ops.transformer_block(x16, branch, params, 2, 32 ** -0.5, (1e-6, 1e-6))


def test_cast_block_weights_casts_frozen_weights_on_a_stream_that_needs_gradients():
    """Frozen blocks on a residual stream that needs gradients (a trainable layer before them)
    still run as one-node blocks that cast their weights: cast_block_weights casts them all at
    once for them, rather than leaving each block its own cast."""
    case = block_case(1, 3, 64, 32, seed=6)
    x = case[0].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        (cast,) = ops.cast_block_weights(x, [tuple(case[2])])
    assert cast is not None and len(cast) == 5
    for src, out in zip((case[2][2], case[2][4], case[2][8], case[2][10], case[2][3]), cast):
        assert out.dtype == torch.float16 and torch.equal(out, src.to(torch.float16))
