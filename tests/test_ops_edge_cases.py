"""The public ops' edge cases under the "triton" backend: parameters in strided layouts, float64
(the reference runs: float64-exact, gradcheck passes), bf16 matmul operands under Triton's
interpreter (whose bf16 tl.dot is wrong: the reference runs), head dims the attention kernel
does not serve, functorch transforms (the reference runs) and indices outside [0, L) (a
ValueError on CPU tensors; the kernels' NaN rows are tested in the kernel tests)."""
import pytest
import torch

import fastmae
from fastmae import ops, reference
from fastmae.testing import (assert_rel_close, attention_case, bias_gelu_case, layer_norm_case,
                             loss_case, patch_embed_case, rel_err, unshuffle_case)

pytestmark = pytest.mark.interpreter(
    covered_by="the kernel tests' cuda cases and fastmae check on the GPU")


@pytest.fixture(autouse=True)
def triton_backend():
    with fastmae.use_backend("triton"):
        yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _strided(t, seed):
    """A leaf twice t's size along its last dim and t as its view [..., ::2] (values of t)."""
    big = torch.randn(*t.shape[:-1], 2 * t.shape[-1], generator=_gen(seed), dtype=t.dtype)
    big[..., ::2] = t
    return big.requires_grad_(True)


def _backward(outs, seed=0):
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = _gen(seed)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs])


# ----------------------------------------------------------------------------- strided params

def _vector_op_cases():
    ln = layer_norm_case(5, 24, residual=True, seed=1)
    bb = torch.randn(24, generator=_gen(2))
    bg = bias_gelu_case(7, 40, seed=3)
    return {
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b, 1e-6),
                       lambda x, w, b: reference.layer_norm(x, w, b, 1e-6),
                       (ln["x"], ln["weight"], ln["bias"]), (1, 2)),
        "add_layer_norm": (
            lambda x, r, w, b, bb: ops.add_layer_norm(x, r, w, b, 1e-6, bb),
            lambda x, r, w, b, bb: reference.add_layer_norm(x, r, w, b, 1e-6, bb),
            (ln["x"], ln["residual"], ln["weight"], ln["bias"], bb), (2, 3, 4)),
        "bias_gelu": (ops.bias_gelu, reference.bias_gelu, (bg["x"], bg["bias"]), (1,)),
    }


@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm", "bias_gelu"])
def test_strided_vector_parameters(name):
    """(D,) weights and biases that are views with stride 2 (legal parameters) give the
    reference's outputs, and their gradients reach the tensors they view."""
    op, ref_op, inputs, strided = _vector_op_cases()[name]

    def run(fn, dtype):
        leaves, args = [], []
        for i, t in enumerate(inputs):
            if i in strided:
                big = _strided(t.to(dtype), seed=10 + i)
                leaves.append(big)
                args.append(big[..., ::2])
            else:
                leaves.append(t.to(dtype).clone().requires_grad_(True))
                args.append(leaves[-1])
        outs = fn(*args)
        _backward(outs)
        return outs if isinstance(outs, tuple) else (outs,), [t.grad for t in leaves]

    outs, grads = run(op, torch.float32)
    ref_outs, ref_grads = run(ref_op, torch.float64)
    for o, r in zip(outs, ref_outs):
        assert_rel_close(o, r, 1e-5, f"{name} output")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(g, r, 1e-5, f"{name} gradient of input {i}")


def _block_params(C, hidden, seed):
    g = _gen(seed)
    shapes = ((C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (hidden, C),
              (hidden,), (C, hidden), (C,))
    params = [torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 0.5) for s in shapes]
    params[0] += 1.0
    params[6] += 1.0
    return params


def _run_block(x, branch, params, num_heads, dtype, backend, strided, autocast=None):
    """Outputs, the gradients of every leaf, and the name of s's grad_fn, of one
    transformer_block call in ``dtype``; with ``strided`` the (D,) parameters (and the branch
    bias) are [::2] views of their leaves and qkv.weight a transposed view."""
    leaves, args = [], []
    for i, p in enumerate(params):
        if strided and p.dim() == 1:
            big = _strided(p.to(dtype), seed=20 + i)
            leaves.append(big)
            args.append(big[::2])
        elif strided and i == 2:
            t = p.to(dtype).t().contiguous().requires_grad_(True)
            leaves.append(t)
            args.append(t.t())
        else:
            leaves.append(p.to(dtype).clone().requires_grad_(True))
            args.append(leaves[-1])
    xl = x.to(dtype).clone().requires_grad_(True)
    m = branch[0].to(dtype).clone().requires_grad_(True)
    if strided:
        bias = _strided(branch[1].to(dtype), seed=40)
        br = (m, bias[::2])
    else:
        bias = branch[1].to(dtype).clone().requires_grad_(True)
        br = (m, bias)
    C = x.shape[-1]
    with fastmae.use_backend(backend), torch.autocast("cpu", dtype=autocast or torch.float16,
                                                      enabled=autocast is not None):
        s, (m_out, m_bias) = ops.transformer_block(xl, br, tuple(args), num_heads,
                                                   (C // num_heads) ** -0.5, (1e-6, 1e-5))
    out = (s, m_out + m_bias)
    _backward(out, seed=5)
    return out, [t.grad for t in [xl, m, bias] + leaves], type(s.grad_fn).__name__


def test_strided_block_parameters():
    """transformer_block (the one-node path) with every (D,) parameter and the branch bias a
    stride-2 view, qkv.weight a transposed view: the reference's outputs and gradients."""
    B, N, C, H, hidden = 2, 5, 64, 2, 48
    g = _gen(7)
    x = torch.randn(B, N, C, generator=g)
    branch = (torch.randn(B, N, C, generator=g), torch.randn(C, generator=g))
    params = _block_params(C, hidden, seed=8)
    outs, grads, node = _run_block(x, branch, params, H, torch.float32, "triton", strided=True)
    assert node == "_BlockBackward"  # the one-node block is what ran
    ref_outs, ref_grads, _ = _run_block(x, branch, params, H, torch.float64, "torch",
                                        strided=True)
    for o, r in zip(outs, ref_outs):
        assert_rel_close(o, r, 1e-4, "block output")
    for i, (a, r) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(a, r, 1e-4, f"block gradient {i}")


def test_strided_patch_embed_parameters():
    """A channels-last conv weight and a stride-2 bias give the reference's embedding and
    gradients."""
    case = patch_embed_case(2, 3, 12, 8, 4, 16, seed=5)

    def run(dtype, backend):
        w = case["weight"].to(dtype).contiguous(memory_format=torch.channels_last)
        w = w.detach().requires_grad_(True)
        assert not w.is_contiguous()
        big = _strided(case["bias"].to(dtype), seed=6)
        imgs = case["imgs"].to(dtype).detach().clone().requires_grad_(True)
        with fastmae.use_backend(backend):
            out = ops.patch_embed_visible(imgs, w, big[::2], case["pos_embed"].to(dtype),
                                          case["ids_keep"])
        _backward(out)
        return out, [imgs.grad, w.grad, big.grad]

    out, grads = run(torch.float32, "triton")
    ref_out, ref_grads = run(torch.float64, "torch")
    assert_rel_close(out, ref_out, 1e-5, "embedding")
    for name, a, r in zip(("imgs", "weight", "bias"), grads, ref_grads):
        assert_rel_close(a, r, 1e-5, f"gradient of {name}")


# ----------------------------------------------------------------------------- float64

def _fp64_cases():
    d = torch.float64
    ln = {k: (v.to(d) if isinstance(v, torch.Tensor) else v)
          for k, v in layer_norm_case(3, 8, residual=True, seed=1).items()}
    un = unshuffle_case(2, 5, 6, 0.6, seed=2)
    lo = loss_case(2, 3, 8, 8, 4, seed=3)
    pe = patch_embed_case(2, 2, 8, 8, 4, 6, seed=4)
    at = attention_case(1, 2, 3, 32, seed=5)
    bb = torch.randn(8, generator=_gen(6), dtype=d)
    qkv = torch.randn(1, 3, 3 * 2 * 32, generator=_gen(7), dtype=d)
    mx = torch.randn(2, 5, 6, generator=_gen(8), dtype=d)
    noise = torch.rand(2, 5, generator=_gen(9))
    # (op, positional args, indices of the args to differentiate)
    return {
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b, 1e-6),
                       (ln["x"], ln["weight"], ln["bias"]), (0, 1, 2)),
        "add_layer_norm": (lambda x, r, w, b, bb: ops.add_layer_norm(x, r, w, b, 1e-6, bb),
                           (ln["x"], ln["residual"], ln["weight"], ln["bias"], bb),
                           (0, 1, 2, 3, 4)),
        "bias_gelu": (ops.bias_gelu, (ln["x"], bb), (0, 1)),
        "unshuffle": (ops.unshuffle, (un["x"].to(d), un["mask_token"].to(d), un["ids_restore"],
                                      un["pos_embed"].to(d)), (0, 1)),
        "masked_mse_loss": (lambda i, p, m: ops.masked_mse_loss(i, p, m, 4),
                            (lo["imgs"].to(d), lo["pred"].to(d), lo["mask"].to(d)), (1,)),
        "masked_mse_loss_fp32_mask": (lambda i, p, m: ops.masked_mse_loss(i, p, m, 4),
                                      (lo["imgs"].to(d), lo["pred"].to(d), lo["mask"]), (1,)),
        "patch_embed_visible": (ops.patch_embed_visible,
                                (pe["imgs"].to(d), pe["weight"].to(d), pe["bias"].to(d),
                                 pe["pos_embed"].to(d), pe["ids_keep"]), (0, 1, 2)),
        "attention": (ops.attention, (at["q"].to(d), at["k"].to(d), at["v"].to(d)), (0, 1, 2)),
        "packed_attention": (lambda t: ops.packed_attention(t, 2), (qkv,), (0,)),
        "random_masking": (lambda x: ops.random_masking(x, 0.4, noise)[0], (mx,), (0,)),
    }


@pytest.mark.parametrize("name", list(_fp64_cases()))
def test_float64_runs_the_reference_exactly(name):
    """float64 inputs give float64 results equal to the reference's (the "torch" backend on the
    same inputs; the kernels would compute in fp32), gradients too, and gradcheck passes."""
    op, args, diff = _fp64_cases()[name]

    def run(backend):
        a = [t.detach().clone().requires_grad_(i in diff) if isinstance(t, torch.Tensor)
             and t.is_floating_point() else t for i, t in enumerate(args)]
        with fastmae.use_backend(backend):
            outs = op(*a)
        _backward(outs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return outs, [a[i].grad for i in diff]

    outs, grads = run("triton")
    ref_outs, ref_grads = run("torch")
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype == torch.float64
        assert torch.equal(o, r), f"{name}: output differs from the reference"
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float64 and torch.equal(g, r), f"{name}: gradient differs"

    def f(*d):
        a = list(args)
        for i, t in zip(diff, d):
            a[i] = t
        return op(*a)

    inputs = tuple(args[i].detach().clone().requires_grad_(True) for i in diff)
    assert torch.autograd.gradcheck(f, inputs)


def test_float64_block_runs_the_reference_exactly():
    """transformer_block in float64: the reference's outputs and every gradient, bit for bit."""
    B, N, C, H, hidden = 1, 4, 64, 2, 24
    g = _gen(11)
    x = torch.randn(B, N, C, generator=g)
    branch = (torch.randn(B, N, C, generator=g), torch.randn(C, generator=g))
    params = _block_params(C, hidden, seed=12)
    outs, grads, _ = _run_block(x, branch, params, H, torch.float64, "triton", strided=False)
    ref_outs, ref_grads, _ = _run_block(x, branch, params, H, torch.float64, "torch",
                                        strided=False)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == torch.float64 and torch.equal(o, r)
    for a, r in zip(grads, ref_grads):
        assert torch.equal(a, r)


# ----------------------------------------------------------------------------- bf16, interpreter

def _bf16(t, grad=True):
    return t.detach().to(torch.bfloat16).clone().requires_grad_(grad)


@pytest.mark.parametrize("name", ["attention", "packed_attention", "patch_embed_visible"])
def test_bf16_matmul_ops_run_the_reference_under_the_interpreter(name):
    """The interpreter's bf16 tl.dot is garbage: bf16 operands of a matmul kernel give the
    reference's results (bit for bit) and gradients, not the kernel's."""
    if name == "attention":
        case = attention_case(1, 2, 9, 32, seed=3)
        args = [_bf16(case[n]) for n in "qkv"]
        op = ops.attention
    elif name == "packed_attention":
        args = [_bf16(torch.randn(2, 7, 3 * 64, generator=_gen(4)))]
        op = lambda t: ops.packed_attention(t, 2)  # noqa: E731
    else:
        case = patch_embed_case(2, 3, 8, 8, 4, 16, seed=5)
        args = [_bf16(case["imgs"]), _bf16(case["weight"]), _bf16(case["bias"]),
                _bf16(case["pos_embed"], grad=False), case["ids_keep"]]
        op = ops.patch_embed_visible

    def run(backend):
        a = [t.detach().clone().requires_grad_(t.requires_grad) for t in args]
        with fastmae.use_backend(backend):
            out = op(*a)
        _backward(out)
        return out, [t.grad for t in a if t.requires_grad]

    out, grads = run("triton")
    ref_out, ref_grads = run("torch")
    assert out.dtype == ref_out.dtype and torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def test_bf16_autocast_patch_embed_and_block_under_the_interpreter():
    """Under CPU bf16 autocast the patch embedding and the transformer block (whose attention
    and MLP matmuls are fastmae kernels) stay within bf16 rounding of float64, where the
    interpreted bf16 dots gave garbage; the elementwise kernels still run in bf16."""
    case = patch_embed_case(2, 3, 8, 8, 4, 16, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.patch_embed_visible(**case)
        ref_out = reference.patch_embed_visible(**case)
    assert out.dtype == ref_out.dtype and torch.equal(out, ref_out)

    B, N, C, H, hidden = 2, 5, 64, 2, 48
    g = _gen(13)
    x = torch.randn(B, N, C, generator=g)
    branch = (torch.randn(B, N, C, generator=g), torch.randn(C, generator=g))
    params = _block_params(C, hidden, seed=14)
    outs, grads, _ = _run_block(x, branch, params, H, torch.float32, "triton", strided=False,
                                autocast=torch.bfloat16)
    ref_outs, ref_grads, _ = _run_block(x, branch, params, H, torch.float64, "torch",
                                        strided=False)
    for o, r in zip(outs, ref_outs):
        assert_rel_close(o.float(), r, 5e-2, "block output under bf16 autocast")
    for i, (a, r) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(a.float(), r, 5e-2, f"block gradient {i} under bf16 autocast")

    # an elementwise kernel keeps running in bf16 (its own autograd node, not the reference's)
    xb = _bf16(torch.randn(3, 40, generator=g))
    y = ops.layer_norm(xb, torch.ones(40), torch.zeros(40), 1e-6)
    assert type(y.grad_fn).__name__ == "layer_norm_functionBackward"


# ----------------------------------------------------------------------------- head dims

@pytest.mark.parametrize("d", [8, 16, 40, 48, 200])
def test_attention_other_head_dims_run_the_reference(d):
    """Head dims the kernel does not serve run the reference, like SDPA, no error."""
    case = attention_case(1, 2, 7, d, seed=d)
    ours = {n: case[n].clone().requires_grad_(True) for n in "qkv"}
    ref = {n: case[n].double().requires_grad_(True) for n in "qkv"}
    out = ops.attention(**ours, scale=0.3)
    ref_out = reference.attention(**ref, scale=0.3)
    assert_rel_close(out, ref_out, 1e-5, "attention")
    _backward(out)
    _backward(ref_out)
    for n in "qkv":
        assert_rel_close(ours[n].grad, ref[n].grad, 1e-5, f"grad of {n}")


# ----------------------------------------------------------------------------- functorch

def _vmap_cases():
    ln = layer_norm_case(4, 8, residual=True, seed=1)
    ln3 = {k: (v.reshape(2, 2, 8) if isinstance(v, torch.Tensor) and v.dim() == 2 else v)
           for k, v in ln.items()}
    un = unshuffle_case(3, 5, 6, 0.6, seed=2)
    q = torch.randn(3, 1, 2, 5, 32, generator=_gen(3))  # vmapped over dim 0
    return {
        "layer_norm": (lambda x: ops.layer_norm(x, ln["weight"], ln["bias"], 1e-6), ln3["x"]),
        "add_layer_norm": (lambda x: ops.add_layer_norm(x, ln3["residual"][0], ln["weight"],
                                                        ln["bias"], 1e-6)[1], ln3["x"]),
        "bias_gelu": (lambda x: ops.bias_gelu(x, ln["bias"]), ln3["x"]),
        "attention": (lambda q: ops.attention(q, q, q), q),
        "unshuffle": (lambda x: ops.unshuffle(x[None], un["mask_token"], un["ids_restore"][:1],
                                              un["pos_embed"])[0], un["x"]),
    }


@pytest.mark.parametrize("name", list(_vmap_cases()))
def test_vmap_runs_the_reference(name):
    """Under torch.vmap (batched tensors have no storage for a kernel) the ops run the
    reference: the "torch" backend's results."""
    fn, x = _vmap_cases()[name]
    out = torch.vmap(fn)(x)
    with fastmae.use_backend("torch"):
        ref_out = torch.vmap(fn)(x)
    assert torch.equal(out, ref_out)


def test_functorch_grad_and_jvp_run_the_reference():
    case = layer_norm_case(3, 8, seed=4)
    w, b = case["weight"], case["bias"]
    f = lambda x: ops.layer_norm(x, w, b, 1e-6).pow(2).sum()  # noqa: E731
    with fastmae.use_backend("torch"):
        want = torch.func.grad(f)(case["x"])
    assert torch.equal(torch.func.grad(f)(case["x"]), want)
    t = torch.randn(case["x"].shape, generator=_gen(5))
    _, got = torch.func.jvp(lambda x: ops.bias_gelu(x, b), (case["x"],), (t,))
    assert_rel_close(got, torch.func.jvp(lambda x: reference.bias_gelu(x, b),
                                         (case["x"],), (t,))[1], 0.0, "jvp")


# ----------------------------------------------------------------------------- indices

@pytest.mark.parametrize("bad", [-1, 5, 50])
def test_unshuffle_index_outside_range_raises_on_cpu(bad):
    """CPU tensors: an id outside [0, L) raises a ValueError naming ids_restore (the old
    kernel copied the cls token for -1 and the mask token for >= L, silently)."""
    case = unshuffle_case(2, 5, 6, 0.6, seed=6)
    ids = case["ids_restore"].clone()
    ids[1, 2] = bad
    with pytest.raises(ValueError, match=r"ids_restore must hold indices in \[0, 5\)"):
        ops.unshuffle(**dict(case, ids_restore=ids))


@pytest.mark.parametrize("bad", [-1, 4, 40])
def test_patch_embed_index_outside_range_raises_on_cpu(bad):
    case = patch_embed_case(2, 3, 8, 8, 4, 16, seed=7)  # L = 4
    ids = case["ids_keep"].clone()
    ids[0, -1] = bad
    with pytest.raises(ValueError, match=r"ids_keep must hold indices in \[0, 4\)"):
        ops.patch_embed_visible(**dict(case, ids_keep=ids))


# --------------------------------------------------- found by a mutation audit of ops.py

def test_packed_attention_default_scale_is_head_dim():
    B, N, H, d = 1, 9, 2, 32
    qkv = torch.randn(B, N, 3 * H * d, generator=torch.Generator().manual_seed(4))
    out = ops.packed_attention(qkv, H)  # scale defaulted
    q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    want = reference.attention(q, k, v, scale=d ** -0.5).transpose(1, 2).reshape(B, N, H * d)
    assert rel_err(out, want) < 1e-4


def test_add_layer_norm_s_only_gradient_of_branch_bias_for_3d_input():
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g)
    w, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    bb = torch.randn(40, generator=g).requires_grad_(True)
    s, _ = ops.add_layer_norm(x, r, w, b, 1e-6, bb)
    gs = torch.randn(s.shape, generator=g)
    s.backward(gs)
    assert bb.grad.shape == (40,)
    assert rel_err(bb.grad, gs.sum((0, 1))) < 1e-6


def test_add_layer_norm_mixed_dtypes_residual_gradient_is_fp32_exact():
    """x fp16, residual fp32 (autocast's branch and residual stream): the residual's gradient is
    the fp32 one -- the same as with x given in fp32 -- not rounded through fp16."""
    case = layer_norm_case(7, 40, residual=True, seed=5)
    x16 = case["x"].half()
    dy = torch.randn(7, 40, generator=torch.Generator().manual_seed(6)).half()
    ds = torch.randn(7, 40, generator=torch.Generator().manual_seed(7))
    grads = []
    for x in (x16, x16.float()):
        r = case["residual"].clone().requires_grad_(True)
        s, y = ops.add_layer_norm(x.clone().requires_grad_(True), r, case["weight"], case["bias"],
                                  case["eps"])
        torch.autograd.backward((s, y), (ds, dy.to(y.dtype)))
        grads.append(r.grad)
    assert grads[0].dtype == torch.float32
    assert rel_err(grads[0], grads[1]) < 1e-6


def test_block_node_passes_the_residual_gradient_through_in_fp32_under_autocast():
    """With the attention output projection zero and no gradient into the MLP branch, the block's
    branches contribute nothing: x's gradient is the incoming residual gradient, bit for bit,
    under fp16 autocast too (the fp32 residual stream's gradient is never rounded to fp16)."""
    g = torch.Generator().manual_seed(8)
    C, hidden = 64, 64
    shapes = ((C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (hidden, C), (hidden,),
              (C, hidden), (C,))
    params = [torch.randn(s, generator=g).requires_grad_(True) for s in shapes]
    params[4] = torch.zeros(C, C, requires_grad=True)  # proj.weight
    x = torch.randn(2, 5, C, generator=g).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        s, (m, _) = ops.transformer_block(x, None, tuple(params), 2, 32 ** -0.5, (1e-6, 1e-6))
    assert type(s.grad_fn).__name__ == "_BlockBackward"
    gs = torch.randn(s.shape, generator=g)
    torch.autograd.backward((s, m), (gs, torch.zeros_like(m)))
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, gs)


def test_unshuffle_mask_token_gradient_in_its_own_dtype():
    case = unshuffle_case(2, 16, 32, 0.75, seed=9)
    x = case["x"].half().requires_grad_(True)
    mt = case["mask_token"].clone().requires_grad_(True)
    out = ops.unshuffle(x, mt, case["ids_restore"], case["pos_embed"])
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(10))
    out.backward(go)
    ref_mt = case["mask_token"].double().requires_grad_(True)
    reference.unshuffle(x.detach().double(), ref_mt, case["ids_restore"],
                        case["pos_embed"].double()).backward(go.double())
    assert mt.grad.dtype == torch.float32
    assert rel_err(mt.grad, ref_mt.grad) < 1e-5


def test_patch_embed_visible_under_autocast_returns_the_references_dtype():
    case = patch_embed_case(2, 3, 8, 8, 4, 16, seed=11)
    with torch.autocast("cpu", dtype=torch.float16):
        out = ops.patch_embed_visible(**case)
        ref = reference.patch_embed_visible(**case)
    assert out.dtype == ref.dtype == torch.float32
    assert rel_err(out, ref) < 2e-3


# --------------------------------------------------- found by a mutation audit of ops.py (2)

def _grads_vs_float64(op, args, diff, tol, seed=0):
    """op on args (the ``diff`` positions as fresh fp32 leaves) and on float64 twins of them
    (the "torch" backend): outputs and those gradients within tol of the float64 ones."""
    def run(dtype, backend):
        a = [t.detach().to(dtype).clone().requires_grad_(i in diff)
             if isinstance(t, torch.Tensor) and t.is_floating_point() else t
             for i, t in enumerate(args)]
        with fastmae.use_backend(backend):
            out = op(*a)
        _backward(out, seed=seed)
        return out, [a[i].grad for i in diff]

    out, grads = run(torch.float32, "triton")
    ref_out, ref_grads = run(torch.float64, "torch")
    assert_rel_close(out, ref_out, tol, "output")
    for i, g, r in zip(diff, grads, ref_grads):
        assert g is not None, f"no gradient reached argument {i}"
        assert_rel_close(g, r, tol, f"gradient of argument {i}")


def test_trainable_position_tables_get_their_gradient():
    """A position table that requires grad (a learned one, where official's is frozen) gets its
    gradient, as the reference gives it: patch_embed_visible and unshuffle, whose kernels
    have no position-table gradient, run the reference for it."""
    pe = patch_embed_case(2, 3, 12, 8, 4, 24, seed=12)  # L = 6, keep = 1
    _grads_vs_float64(ops.patch_embed_visible, [pe[n] for n in
                      ("imgs", "weight", "bias", "pos_embed", "ids_keep")], (1, 2, 3), 1e-5)
    un = unshuffle_case(3, 7, 40, 0.6, seed=13)
    _grads_vs_float64(ops.unshuffle, [un[n] for n in ("x", "mask_token", "ids_restore",
                                                       "pos_embed")], (0, 1, 3), 1e-5)


def test_loss_gradient_reaches_a_mask_that_requires_it():
    """A float mask that requires grad (a soft mask) gets d loss / d mask, as the reference
    gives it (the fused loss kernel has none: the reference runs)."""
    case = loss_case(2, 3, 12, 8, 4, seed=14)
    mask = case["mask"] * 0.5 + 0.25  # soft weights, never 0
    _grads_vs_float64(lambda i, p, m: ops.masked_mse_loss(i, p, m, 4),
                      [case["imgs"], case["pred"], mask], (1, 2), 1e-5)


def test_add_layer_norm_promotes_a_lower_precision_residual():
    """s = residual + x keeps the promoted dtype, as the reference's add: an fp16 residual
    beside an fp32 x gives an fp32 s (not an fp16 one rounded from it) and fp32 gradients."""
    case = layer_norm_case(7, 40, residual=True, seed=15)
    r16 = case["residual"].half()
    x = case["x"].clone().requires_grad_(True)
    r = r16.clone().requires_grad_(True)
    s, y = ops.add_layer_norm(x, r, case["weight"], case["bias"], case["eps"])
    xd = case["x"].double().requires_grad_(True)
    rd = r16.double().requires_grad_(True)
    rs, ry = reference.add_layer_norm(xd, rd, case["weight"].double(), case["bias"].double(),
                                      case["eps"])
    assert s.dtype == y.dtype == torch.float32
    assert_rel_close(s, rs, 1e-6, "residual sum")
    assert_rel_close(y, ry, 1e-5, "normalized")
    _backward((s, y), seed=3)
    _backward((rs, ry), seed=3)
    assert r.grad.dtype == torch.float16
    assert_rel_close(x.grad, xd.grad, 1e-5, "grad of x")
    assert_rel_close(r.grad, rd.grad, 1e-3, "grad of residual")


def test_attention_scale_zero_is_a_scale():
    """scale=0.0 is a scale (every key weighted equally: the mean of v), not "use the default"."""
    case = attention_case(1, 2, 7, 32, seed=16)
    out = ops.attention(case["q"], case["k"], case["v"], scale=0.0)
    want = case["v"].double().mean(-2, keepdim=True).expand_as(out)
    assert_rel_close(out, want, 1e-5, "attention with scale 0")
    out = ops.packed_attention(torch.randn(1, 7, 3 * 64, generator=_gen(17)), 2, 0.0)
    assert out.shape == (1, 7, 64)


@pytest.mark.parametrize("d", [16, 40])
def test_packed_attention_other_head_dims_run_the_reference(d):
    """packed_attention and attention with a head dim the kernel does not serve run the
    reference (SDPA's autograd node, not the kernel's; the interpreter's kernel would compute
    these too, a GPU's is not built for them): its outputs and gradients."""
    qkv = torch.randn(2, 7, 3 * 3 * d, generator=_gen(d))
    _grads_vs_float64(lambda t: ops.packed_attention(t, 3, 0.3), [qkv], (0,), 1e-5)
    t = qkv.clone().requires_grad_(True)
    q = torch.randn(1, 2, 5, d, generator=_gen(d + 1), requires_grad=True)
    for out in (ops.packed_attention(t, 3), ops.attention(q, q, q)):
        assert not type(out.grad_fn).__name__.endswith("_functionBackward"), out.grad_fn
