"""The public ops under the "triton" backend, through autograd, against the reference in float64:
outputs and every gradient; the custom-op registrations through torch.library.opcheck."""
import pytest
import torch

import fastmae
from fastmae import ops, reference
from fastmae.testing import (assert_rel_close, attention_case, bias_gelu_case, layer_norm_case,
                             loss_case, masking_case, patch_embed_case, rel_err, unshuffle_case)

pytestmark = pytest.mark.interpreter(
    covered_by="fastmae check, every op and gradient against the reference on the GPU "
               "(tests/test_check_cli.py), and the kernel tests' cuda cases")


def leaves(case, names):
    """Fresh leaf copies of the named tensors, requiring grad, and float64 twins of them (every
    other floating tensor of the reference case in float64 too)."""
    ours = dict(case)
    ref = {n: (t.double() if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t)
           for n, t in case.items()}
    for n in names:
        ours[n] = case[n].detach().clone().requires_grad_(True)
        ref[n] = case[n].detach().double().requires_grad_(True)
    return ours, ref


def check_grads(out, ref_out, ours, ref, names, tol, seed=0, floor=0.0):
    """Backward through both with one random incoming gradient; each named input's gradient
    within ``tol`` relative to the float64 one, its scale at least ``floor`` times the largest
    of the expected gradients (see ``rel_err``)."""
    g = torch.Generator().manual_seed(seed)
    outs = out if isinstance(out, tuple) else (out,)
    ref_outs = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    grads = [torch.randn(o.shape, generator=g) for o in outs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(ref_outs, [gr.double() for gr in grads])
    for n in names:
        assert ours[n].grad is not None, f"no gradient reached {n}"
    scale = floor * max(ref[n].grad.abs().max().item() for n in names)
    for n in names:
        assert_rel_close(ours[n].grad, ref[n].grad, tol, f"grad of {n}", floor=scale)


@pytest.fixture(autouse=True)
def triton_backend():
    with fastmae.use_backend("triton"):
        yield


@pytest.mark.parametrize("N, L, D, ratio", [(1, 1, 8, 0.0), (2, 7, 40, 0.5), (3, 49, 100, 0.75)])
def test_random_masking(N, L, D, ratio):
    case = masking_case(N, L, D, ratio, seed=N + L)
    ours, ref = leaves(case, ["x"])
    x_masked, mask, ids_restore = ops.random_masking(**ours)
    r_masked, r_mask, r_restore = reference.random_masking(ref["x"], ratio, case["noise"])
    assert torch.equal(x_masked, r_masked.float())  # a bit-exact gather
    assert torch.equal(mask, r_mask) and mask.dtype == torch.float32
    assert torch.equal(ids_restore, r_restore)
    check_grads(x_masked, r_masked, ours, ref, ["x"], 0.0)


@pytest.mark.parametrize("N, C, H, W, p, D", [(1, 3, 8, 8, 4, 16), (2, 1, 12, 20, 4, 40), (3, 4, 16, 8, 8, 24)])
def test_patch_embed_visible(N, C, H, W, p, D):
    case = patch_embed_case(N, C, H, W, p, D, seed=D)
    names = ["imgs", "weight", "bias"]
    ours, ref = leaves(case, names)
    out = ops.patch_embed_visible(**ours)
    ref_out = reference.patch_embed_visible(**ref)
    assert_rel_close(out, ref_out, 1e-5, "embedding")
    check_grads(out, ref_out, ours, ref, names, 1e-5)


def _patch_embed_grads(case, autocast):
    """The weight, bias and image gradients of ops.patch_embed_visible on ``case``, optionally
    under fp16 autocast (fp32 leaves)."""
    ours, _ = leaves(case, ["imgs", "weight", "bias"])
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        out = ops.patch_embed_visible(**ours)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return [ours[n].grad for n in ("weight", "bias", "imgs")]


def test_patch_embed_weight_gradient_ways_agree(monkeypatch):
    """In fp16 the weight gradient runs one fused kernel or the patches gathered for a matmul
    (FASTMAE_PATCH_WGRAD; on a GPU the faster is kept): the same gradients either way, fp32
    weight gradient; in fp32 the fused kernel always (no gather)."""
    from fastmae.kernels import patch_embed
    gathers = []
    real = patch_embed.gather_visible_patches
    monkeypatch.setattr(patch_embed, "gather_visible_patches",
                        lambda *a, **k: gathers.append(a[-1]) or real(*a, **k))
    case = patch_embed_case(2, 3, 20, 12, 4, 40, seed=3)
    grads = {}
    for way in ("fused", "split"):
        monkeypatch.setenv("FASTMAE_PATCH_WGRAD", way)
        grads[way] = _patch_embed_grads(case, autocast=True)
        assert gathers == ([torch.float16] if way == "split" else []), way
        assert grads[way][0].dtype == torch.float32
    for name, a, b in zip(("weight", "bias", "imgs"), grads["fused"], grads["split"]):
        assert_rel_close(a, b, 1e-3, f"grad of {name}")
    gathers.clear()
    _patch_embed_grads(case, autocast=False)
    assert gathers == [] and ops._PATCH_WGRAD_CHOICE == {}


def test_patch_embed_weight_gradient_way_forced_by_an_unknown_name_raises(monkeypatch):
    monkeypatch.setenv("FASTMAE_PATCH_WGRAD", "cublas")
    with pytest.raises(ValueError, match="FASTMAE_PATCH_WGRAD must be one of"):
        _patch_embed_grads(patch_embed_case(1, 3, 8, 8, 4, 16), autocast=True)


@pytest.mark.parametrize("N, L, D, ratio", [(1, 1, 8, 0.0), (2, 15, 40, 0.6), (3, 49, 100, 0.75)])
def test_unshuffle(N, L, D, ratio):
    case = unshuffle_case(N, L, D, ratio, seed=L)
    names = ["x", "mask_token"]
    ours, ref = leaves(case, names)
    out = ops.unshuffle(**ours)
    ref_out = reference.unshuffle(**ref)
    assert_rel_close(out, ref_out, 1e-5, "unshuffle")
    check_grads(out, ref_out, ours, ref, names, 1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("N, C, H, W, p", [(1, 3, 8, 8, 4), (2, 1, 12, 20, 4), (3, 4, 16, 8, 8)])
def test_masked_mse_loss(N, C, H, W, p, norm_pix):
    case = loss_case(N, C, H, W, p, norm_pix=norm_pix, seed=H * W)
    ours, ref = leaves(case, ["pred"])
    loss = ops.masked_mse_loss(**ours)
    ref_loss = reference.masked_mse_loss(**ref)
    assert loss.shape == () and loss.dtype == torch.float32
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    check_grads(loss, ref_loss, ours, ref, ["pred"], 1e-5)


def test_masked_mse_loss_fp16_gradient_is_scaled_before_it_is_rounded():
    """fp16 pred (as under autocast) and a GradScaler's 2**16 on the loss: d loss / d pred, here
    below fp16's smallest normal (6e-5) before the scale, reaches pred's fp16 gradient with the
    reference's error against float64 (it was rounded to fp16 unscaled: ~3e-2, 2% of it zeros)."""
    case = loss_case(256, 3, 32, 32, 16, pred_dtype=torch.float16, seed=5)  # K = 768, S = 768
    ours, ref = leaves(case, ["pred"])
    torch_side = dict(case, pred=case["pred"].detach().clone().requires_grad_(True))
    grad_scale = 2.0 ** 16
    (ops.masked_mse_loss(**ours) * grad_scale).backward()
    (reference.masked_mse_loss(**ref) * grad_scale).backward()
    with fastmae.use_backend("torch"):
        (ops.masked_mse_loss(**torch_side) * grad_scale).backward()
    exact = ref["pred"].grad
    assert exact.abs().max() < 6e-5 * grad_scale  # the unscaled gradient is subnormal in fp16
    assert ours["pred"].grad.dtype == torch.float16
    ours_err = rel_err(ours["pred"].grad, exact)
    assert ours_err <= 2 * rel_err(torch_side["pred"].grad, exact) + 1e-4, ours_err
    removed = case["mask"].bool()
    assert (ours["pred"].grad[removed] != 0).all()


def test_masked_mse_loss_with_image_gradient_goes_through_the_reference():
    case = loss_case(2, 3, 8, 8, 4)
    ours, ref = leaves(case, ["pred", "imgs"])
    loss = ops.masked_mse_loss(**ours)
    ref_loss = reference.masked_mse_loss(**ref)
    check_grads(loss, ref_loss, ours, ref, ["pred", "imgs"], 1e-5)


@pytest.mark.parametrize("B, H, N, d, layout", [
    (1, 1, 1, 32, "contiguous"), (2, 3, 7, 64, "qkv"), (1, 2, 50, 80, "transposed"),
])
def test_attention(B, H, N, d, layout):
    case = attention_case(B, H, N, d, layout, seed=N)
    names = ["q", "k", "v"]
    ours, ref = leaves(case, names)
    out = ops.attention(**ours)
    ref_out = reference.attention(**ref)
    assert_rel_close(out, ref_out, 1e-4, "attention")
    # with N = 1 the softmax is constant: dq = dk = 0 exactly, and what is left is rounding of
    # terms the size of dv, measured against dv's size (as the kernel tests do)
    check_grads(out, ref_out, ours, ref, names, 1e-4, floor=1e-2)


@pytest.mark.parametrize("B, N, H, d", [(2, 5, 2, 32), (1, 17, 3, 64)])
def test_packed_attention(B, N, H, d):
    g = torch.Generator().manual_seed(N)
    qkv = torch.randn(B, N, 3 * H * d, generator=g)
    ours, ref = leaves(dict(qkv=qkv), ["qkv"])
    out = ops.packed_attention(ours["qkv"], H)
    assert out.shape == (B, N, H * d) and out.is_contiguous()
    with fastmae.use_backend("torch"):
        ref_out = ops.packed_attention(ref["qkv"], H)
    assert_rel_close(out, ref_out, 1e-4, "packed attention")
    check_grads(out, ref_out, ours, ref, ["qkv"], 1e-4)


@pytest.mark.parametrize("M, D", [(1, 8), (7, 40), (5, 100)])
def test_layer_norm(M, D):
    case = layer_norm_case(M, D, seed=D)
    names = ["x", "weight", "bias"]
    ours, ref = leaves(case, names)
    out = ops.layer_norm(**ours)
    ref_out = reference.layer_norm(**ref)
    assert_rel_close(out, ref_out, 1e-5, "layer_norm")
    check_grads(out, ref_out, ours, ref, names, 1e-5)


@pytest.mark.parametrize("M, D", [(1, 8), (7, 40), (3, 1280)])
def test_add_layer_norm(M, D):
    case = layer_norm_case(M, D, residual=True, seed=D)
    names = ["x", "residual", "weight", "bias"]
    ours, ref = leaves(case, names)
    s, y = ops.add_layer_norm(**ours)
    rs, ry = reference.add_layer_norm(**ref)
    assert_rel_close(s, rs, 1e-6, "residual sum")
    assert_rel_close(y, ry, 1e-5, "normalized")
    check_grads((s, y), (rs, ry), ours, ref, names, 1e-5)


@pytest.mark.parametrize("used", ["s", "y"])
@pytest.mark.parametrize("branch_bias", [False, True])
def test_add_layer_norm_with_one_output_used(used, branch_bias):
    """Only the normalized y reaches the loss (the model's final norm: nothing reads its s), or
    only s: the other output's gradient stays None rather than a tensor of zeros, and every
    gradient is still right (with only s used, the normalization's own are zero)."""
    M, D = 7, 40
    case = layer_norm_case(M, D, residual=True, seed=11)
    names = ["x", "residual", "weight", "bias"]
    if branch_bias:
        case["branch_bias"] = torch.randn(D, generator=torch.Generator().manual_seed(3))
        names.append("branch_bias")
    ours, ref = leaves(case, names)
    s, y = ops.add_layer_norm(**ours)
    rs, ry = reference.add_layer_norm(**ref)
    if used == "y":
        check_grads(y, ry, ours, ref, names, 1e-5)
        return
    # the reference's weight and bias get no gradient at all: ours are zeros
    check_grads(s, rs, ours, ref, [n for n in names if n not in ("weight", "bias")], 1e-5)
    assert torch.equal(ours["weight"].grad, torch.zeros(D))
    assert torch.equal(ours["bias"].grad, torch.zeros(D))


def _zero_fills_in_backward(outputs, grads):
    """aten::zeros / zero_ / fill_ calls made while autograd runs the backward of ``outputs``,
    other than inside another aten op (a CPU reduction initializing its output)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.backward(outputs, grads)
    return [e.name for e in prof.events()
            if e.name in ("aten::zeros", "aten::zero_", "aten::fill_")
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]


def test_outputs_without_gradient_get_no_zero_tensors():
    """An output nothing differentiates (the loss's saved gradient buffer, LayerNorm's row
    statistics, attention's log-sum-exp, the final norm's residual sum) reaches the backward as
    None: autograd allocates and fills no zeros for it (the (N, L, p*p*C) buffer and the
    decoder's (N, L + 1, D) s are the size of activations)."""
    case = loss_case(2, 3, 8, 8, 4, seed=1)
    pred = case["pred"].clone().requires_grad_(True)
    loss = ops.masked_mse_loss(case["imgs"], pred, case["mask"], 4)
    assert _zero_fills_in_backward(loss, torch.tensor(1.5)) == []

    case = layer_norm_case(5, 40, residual=True, seed=2)
    x = case["x"].clone().requires_grad_(True)
    y = ops.layer_norm(x, case["weight"], case["bias"], case["eps"])
    assert _zero_fills_in_backward(y, torch.randn(y.shape)) == []
    _, y = ops.add_layer_norm(x, case["residual"], case["weight"], case["bias"], case["eps"])
    assert _zero_fills_in_backward(y, torch.randn(y.shape)) == []

    case = attention_case(1, 2, 7, 32, "qkv", seed=3)
    q, k, v = (case[n].detach().clone().requires_grad_(True) for n in "qkv")
    o = ops.attention(q, k, v)
    assert _zero_fills_in_backward(o, torch.randn(o.shape)) == []
    qkv = torch.randn(1, 7, 3 * 64, requires_grad=True)
    o = ops.packed_attention(qkv, 2)
    assert _zero_fills_in_backward(o, torch.randn(o.shape)) == []


@pytest.mark.parametrize("M, D", [(1, 8), (7, 40), (3, 100)])
def test_bias_gelu(M, D):
    case = bias_gelu_case(M, D, seed=D)
    names = ["x", "bias"]
    ours, ref = leaves(case, names)
    out = ops.bias_gelu(**ours)
    ref_out = reference.bias_gelu(**ref)
    assert_rel_close(out, ref_out, 1e-5, "bias_gelu")
    check_grads(out, ref_out, ours, ref, names, 1e-5)


def test_expanded_incoming_gradients_are_handled():
    """Autograd can hand an op a stride-0 gradient (from .sum() or .expand())."""
    case = layer_norm_case(6, 40)
    ours, ref = leaves(case, ["x"])
    ops.layer_norm(**ours).sum().backward()
    reference.layer_norm(**ref).sum().backward()
    assert_rel_close(ours["x"].grad, ref["x"].grad, 1e-5, "grad of x")
    q = attention_case(1, 2, 9, 32)
    ours, ref = leaves(q, ["q", "k", "v"])
    ops.attention(**ours).sum().backward()
    reference.attention(**ref).sum().backward()
    for n in "qkv":
        assert_rel_close(ours[n].grad, ref[n].grad, 1e-4, f"grad of {n}")


OPCHECKS = {
    "masking_indices": lambda: (ops._masking_indices_op, (masking_case(2, 9, 4)["noise"], 3)),
    "gather_tokens": lambda: (ops._gather_tokens_op, (
        torch.randn(2, 9, 8, requires_grad=True), *ops.masking_indices(torch.rand(2, 9), 3)[::2])),
    "patch_embed_visible": lambda: (ops._patch_embed_visible_op, tuple(
        (t.requires_grad_(True) if n in ("weight", "bias") else t)
        for n, t in patch_embed_case(2, 3, 8, 8, 4, 16).items()) + (torch.float32, torch.float32)),
    "unshuffle": lambda: (ops._unshuffle_op, tuple(
        (t.requires_grad_(True) if n in ("x", "mask_token") else t)
        for n, t in unshuffle_case(2, 9, 8, 0.5).items())),
    "masked_mse": lambda: (ops._masked_mse_op, (
        loss_case(2, 3, 8, 8, 4)["imgs"], loss_case(2, 3, 8, 8, 4)["pred"].requires_grad_(True),
        loss_case(2, 3, 8, 8, 4)["mask"], 4, True, True)),
    "masked_mse_fp16": lambda: (ops._masked_mse_op, (
        loss_case(2, 3, 8, 8, 4)["imgs"],
        loss_case(2, 3, 8, 8, 4, pred_dtype=torch.float16)["pred"].requires_grad_(True),
        loss_case(2, 3, 8, 8, 4)["mask"], 4, True, True)),
    "attention": lambda: (ops._attention_op, tuple(
        t.detach().requires_grad_(True) for t in attention_case(1, 2, 5, 32).values()) + (0.3,)),
    "packed_attention": lambda: (ops._packed_attention_op, (torch.randn(1, 5, 3 * 64, requires_grad=True), 2, 0.2)),
    "layer_norm": lambda: (ops._layer_norm_op, tuple(
        t.requires_grad_(True) if isinstance(t, torch.Tensor) else t
        for t in layer_norm_case(3, 8).values()) + (torch.float32,)),
    "add_layer_norm": lambda: (ops._add_layer_norm_op, (
        torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True),
        torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True), 1e-6, torch.float32,
        None)),
    "add_layer_norm_branch_bias": lambda: (ops._add_layer_norm_op, (
        torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True),
        torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True), 1e-6, torch.float32,
        torch.randn(8, requires_grad=True))),
    "bias_gelu": lambda: (ops._bias_gelu_op, (
        torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True), torch.float32)),
}


@pytest.mark.parametrize("name", list(OPCHECKS))
def test_custom_op_registration_passes_opcheck(name):
    op, args = OPCHECKS[name]()
    result = torch.library.opcheck(op.custom, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def _fresh(args):
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                 else a for a in args)


def _run_and_grads(call, args):
    outs = call(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(0)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
                for o in outs if o.dtype.is_floating_point and o.requires_grad)
    grads = ()
    if isinstance(total, torch.Tensor):
        total.backward()
        grads = tuple(a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
    return outs, grads


@pytest.mark.parametrize("name", list(OPCHECKS))
def test_eager_path_is_the_custom_op(name):
    """Eager calls go through a torch.autograd.Function around the same implementation and
    formulas as the custom op (which torch.compile traces): identical outputs and gradients."""
    op, args = OPCHECKS[name]()
    assert op.function is not None or name == "masking_indices"
    eager_outs, eager_grads = _run_and_grads(op, _fresh(args))
    custom_outs, custom_grads = _run_and_grads(op.custom, _fresh(args))
    assert len(eager_outs) == len(custom_outs) and len(eager_grads) == len(custom_grads)
    for a, b in zip(eager_outs + eager_grads, custom_outs + custom_grads):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        out = op(*_fresh(args))
        first = out[0] if isinstance(out, tuple) else out
        assert type(first.grad_fn).__name__.endswith("_functionBackward"), first.grad_fn


def test_double_backward_through_a_kernel_raises():
    """The kernels' backward is not itself differentiable: create_graph=True must not hand back
    gradients that silently lack their own graph."""
    case = layer_norm_case(3, 8, seed=1)
    x = case["x"].requires_grad_()
    y = ops.layer_norm(x, case["weight"], case["bias"], case["eps"])
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|marked with @once_differentiable"):
        gx.sum().backward()


def test_add_layer_norm_mixed_dtypes_writes_both_gradients_in_one_pass():
    """Under autocast the branch is half precision and the residual stream fp32: the backward
    writes the residual gradient (fp32) and the branch gradient (fp16) from the same values."""
    case = layer_norm_case(7, 40, residual=True, seed=5)
    case["x"] = case["x"].half()
    names = ["x", "residual", "weight", "bias"]
    ours, ref = leaves(case, names)
    s, y = ops.add_layer_norm(**ours)
    assert s.dtype == torch.float32 and y.dtype == torch.float16
    rs, ry = reference.add_layer_norm(**ref)
    assert_rel_close(y, ry, 2e-3, "normalized (fp16)")
    check_grads((s, y), (rs, ry), ours, ref, ["residual", "weight", "bias"], 2e-3)
    assert ours["x"].grad.dtype == torch.float16
    assert torch.equal(ours["x"].grad, ours["residual"].grad.half())


def test_ops_trace_on_the_meta_device():
    """Shape-only runs (meta tensors, as when sizing a model) go through the fake kernels."""
    x = torch.empty(6, 40, device="meta")
    w, b = torch.empty(40, device="meta"), torch.empty(40, device="meta")
    y = ops.layer_norm(x, w, b, 1e-6)
    s, y2 = ops.add_layer_norm(x.half(), x, w, b, 1e-6)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == torch.float32
    assert s.dtype == torch.float32 and y2.dtype == torch.float16


# --------------------------------------------------- found by a mutation audit of ops.py (2)

def _ln_stats(x, w, b):
    """(mean, rstd) of layer_norm's forward on x (fp32 row statistics)."""
    _, mean, rstd = ops._layer_norm_op.impl(x, w, b, 1e-6, x.dtype)
    return mean, rstd


def _half_and_backward_opchecks():
    """Custom ops in the dtypes their fake implementations get wrong unless they follow the
    kernels (outputs in another dtype than the inputs: fp32 row statistics and parameter
    gradients from fp16 operands, the two gradients of a mixed-dtype add), and the backward ops
    autograd calls (their fakes are what torch.compile traces a backward with)."""
    g = torch.Generator().manual_seed(31)
    h = torch.float16
    M, D = 5, 24
    x16 = torch.randn(M, D, generator=g).to(h)
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    s = torch.randn(M, D, generator=g)
    mean, rstd = _ln_stats(s, w, b)
    dy16, ds = torch.randn(M, D, generator=g).to(h), torch.randn(M, D, generator=g)
    un = unshuffle_case(2, 9, 8, 0.5, seed=4)
    pe = patch_embed_case(2, 3, 8, 8, 4, 16, seed=6)
    grad_pe = torch.randn(2, pe["ids_keep"].shape[1], 16, generator=g)
    return {
        "layer_norm_fp16": (ops._layer_norm_op, (x16, w, b, 1e-6, h)),
        "add_layer_norm_fp16_x": (ops._add_layer_norm_op, (x16, s, w, b, 1e-6, h, None)),
        "layer_norm_bwd_branch_bias": (ops._layer_norm_bwd_op,
                                       (ds, s, w, mean, rstd, ds, torch.float32, True)),
        "add_layer_norm_bwd_mixed": (ops._add_layer_norm_bwd_op,
                                     (dy16, s, w, mean, rstd, ds, torch.float32, h, True)),
        "bias_gelu_bwd_fp16": (ops._bias_gelu_bwd_op, (dy16, x16, b.to(h), h)),
        "unshuffle_bwd_mixed": (ops._unshuffle_bwd_op, (
            torch.randn(2, 10, 8, generator=g), un["ids_restore"], un["x"].shape[1] - 1, h,
            torch.float32)),
        "patch_embed_visible_fp16": (ops._patch_embed_visible_op, (
            pe["imgs"].to(h), pe["weight"].to(h), pe["bias"].to(h), pe["pos_embed"],
            pe["ids_keep"], torch.float32, h)),
        "patch_embed_visible_bwd_fp16": (ops._patch_embed_visible_bwd_op, (
            grad_pe, pe["imgs"].to(h), pe["weight"].to(h), pe["ids_keep"], True, h)),
        "masking_indices_fp16": (ops._masking_indices_op,
                                 (masking_case(2, 9, 4)["noise"].to(h), 3)),
        "scale_to_fp16": (ops._scale_op, (ds, torch.tensor(1.5), h)),
    }


@pytest.mark.parametrize("name", list(_half_and_backward_opchecks()))
def test_half_precision_and_backward_ops_pass_opcheck(name):
    """The fake (meta) implementations give the kernels' dtypes, shapes and strides where they
    differ from the inputs' -- what torch.compile plans a graph's buffers by -- and the backward
    ops pass opcheck too (each fake mutated to the input dtype passed the fp32 checks above)."""
    op, args = _half_and_backward_opchecks()[name]
    result = torch.library.opcheck(op.custom, args)
    assert all(v == "SUCCESS" for v in result.values()), result
