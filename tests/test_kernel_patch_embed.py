"""fastmae.kernels.patch_embed against the float64 reference (fastmae.reference.patch_embed_visible):
the output and every gradient, awkward shapes and strides, poisoned buffers, determinism."""
import pytest
import torch

from fastmae import reference as ref
from fastmae import testing as T
from fastmae.kernels import patch_embed as pe

TOL = 1e-4  # matmul-containing op


def _layout(imgs, layout, seed):
    if layout == "contiguous":
        return imgs
    if layout == "channels_last":
        return imgs.contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # a window of a larger image, every stride odd-sized
        N, C, H, W = imgs.shape
        g = T._gen(seed + 7, "cpu")
        big = torch.randn(N, C + 1, H + 3, W + 5, generator=g).to(imgs.device, imgs.dtype)
        view = big[:, 1:, 2:2 + H, 3:3 + W]
        view.copy_(imgs)
        return view
    raise ValueError(layout)


def _case(N, C, H, W, p, D, keep, layout, device, seed=0, dtype=torch.float32):
    case = T.patch_embed_case(N, C, H, W, p, D, dtype=dtype, device=device, seed=seed)
    L = (H // p) * (W // p)
    noise = T.distinct_noise(N, L, T._gen(seed + 1, "cpu"), "cpu")
    case["ids_keep"] = T.ids_keep_from_noise(noise, keep).to(device)  # a strided slice of argsort
    case["imgs"] = _layout(case["imgs"], layout, seed)
    return case


def _poison_allocations(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an unwritten element fails."""
    monkeypatch.setattr(pe, "_empty", T.poisoned_empty)


def _reference(case, grad_out):
    """float64 output and gradients (imgs, weight, bias) of the reference."""
    d = {k: (v.detach().double().requires_grad_() if v.is_floating_point() else v)
         for k, v in case.items()}
    out = ref.patch_embed_visible(**d)
    out.backward(grad_out.double())
    return out.detach(), d["weight"].grad, d["bias"].grad, d["imgs"].grad


# (N, C, H, W, p, D, keep, imgs layout)
CASES = [
    (1, 3, 12, 20, 4, 40, 15, "contiguous"),      # 3x5 grid, every patch kept
    (3, 3, 12, 20, 4, 40, 3, "channels_last"),    # batch 3, keep 3 of 15
    (3, 1, 28, 20, 4, 8, 1, "slice"),             # 7x5 grid, keep 1, C = 1, K = 16
    (2, 4, 16, 24, 8, 100, 5, "contiguous"),      # p = 8, C = 4, K = 256, D = 100
    (1, 3, 20, 28, 4, 100, 17, "slice"),          # 5x7 grid, prime keep
    (2, 3, 14, 22, 4, 8, 7, "channels_last"),     # H, W not multiples of p: 3x5 grid + margins
    (1, 3, 28, 42, 14, 40, 3, "contiguous"),      # p = 14, K = 588 (not a power of two)
    (1, 3, 32, 16, 16, 8, 1, "channels_last"),    # p = 16, K = 768
]


@pytest.mark.parametrize("N,C,H,W,p,D,keep,layout", CASES)
def test_patch_embed_fwd_bwd(N, C, H, W, p, D, keep, layout, device, monkeypatch):
    _poison_allocations(monkeypatch)
    case = _case(N, C, H, W, p, D, keep, layout, device)
    grad_out = torch.randn(N, keep, D, generator=T._gen(5, "cpu")).to(device)
    r_out, r_gw, r_gb, r_gi = _reference(case, grad_out)

    out = pe.patch_embed_visible_fwd(**case, out_dtype=torch.float32)
    assert out.shape == (N, keep, D) and out.dtype == torch.float32 and out.is_contiguous()
    T.assert_rel_close(out, r_out, TOL, "out")

    args = (grad_out, case["imgs"], case["weight"], case["ids_keep"])
    gw, gb, gi = pe.patch_embed_visible_bwd(*args, need_imgs_grad=True)
    assert gw.shape == (D, C, p, p) and gw.dtype == torch.float32
    assert gb.shape == (D,) and gb.dtype == torch.float32
    assert gi.shape == (N, C, H, W) and gi.dtype == case["imgs"].dtype
    T.assert_rel_close(gw, r_gw, TOL, "grad_weight")
    T.assert_rel_close(gb, r_gb, TOL, "grad_bias")
    T.assert_rel_close(gi, r_gi, TOL, "grad_imgs")
    # removed patches and the margins outside the grid: exactly zero
    assert torch.equal(gi.cpu()[r_gi.cpu() == 0], torch.zeros_like(gi.cpu()[r_gi.cpu() == 0]))

    # bit-identical reruns; need_imgs_grad=False returns the same weight / bias gradients
    assert torch.equal(pe.patch_embed_visible_fwd(**case, out_dtype=torch.float32), out)
    gw2, gb2, gi2 = pe.patch_embed_visible_bwd(*args, need_imgs_grad=False)
    assert gi2 is None and torch.equal(gw2, gw) and torch.equal(gb2, gb)


def test_patch_embed_bwd_strided_grad_out(device, monkeypatch):
    """An incoming gradient that is not contiguous (here: transposed storage)."""
    _poison_allocations(monkeypatch)
    N, C, H, W, p, D, keep = 3, 3, 12, 16, 4, 40, 5
    case = _case(N, C, H, W, p, D, keep, "contiguous", device, seed=3)
    grad_out = torch.randn(keep, N, D, generator=T._gen(9, "cpu")).to(device).transpose(0, 1)
    _assert_bwd_matches(case, grad_out)


def _assert_bwd_matches(case, grad_out, weight=None):
    """patch_embed_visible_bwd's three gradients (with ``weight`` in place of the case's, same
    values) against the reference's on ``case``."""
    _, r_gw, r_gb, r_gi = _reference(case, grad_out)
    gw, gb, gi = pe.patch_embed_visible_bwd(
        grad_out, case["imgs"], case["weight"] if weight is None else weight, case["ids_keep"],
        need_imgs_grad=True)
    T.assert_rel_close(gw, r_gw, TOL, "grad_weight")
    T.assert_rel_close(gb, r_gb, TOL, "grad_bias")
    T.assert_rel_close(gi, r_gi, TOL, "grad_imgs")


def test_patch_embed_bwd_reads_only_its_rows_of_windows(device, monkeypatch):
    """M = 50 visible patches: 3 weight-gradient splits of 17 rows, each more than one BLOCK_M
    under the interpreter, the last one short. grad_out (every other column: stride 2 along D),
    ids_keep and imgs are the first N images of tensors holding one more valid image: a kernel
    that reads past row M (or past a split's first block, or steps 1 along D) gets wrong values
    instead of masked zeros."""
    _poison_allocations(monkeypatch)
    N, C, H, W, p, D, keep = 2, 3, 10, 14, 2, 20, 25  # a 5x7 grid, L = 35
    case = _case(N + 1, C, H, W, p, D, keep, "contiguous", device, seed=12)
    grad_big = torch.randn(N + 1, keep, 2 * D, generator=T._gen(13, "cpu")).to(device)
    grad_out = grad_big[:, :, ::2][:N]
    case = dict(case, imgs=case["imgs"][:N], ids_keep=case["ids_keep"][:N])
    assert grad_out.reshape(N * keep, D).stride() == (2 * D, 2)
    _assert_bwd_matches(case, grad_out)


def test_patch_embed_strided_parameters(device, monkeypatch):
    """weight, bias and pos_embed as views with strides other than 1 along their last dim
    (every other / third element of larger tensors): forward and every gradient."""
    _poison_allocations(monkeypatch)
    N, C, H, W, p, D, keep = 2, 3, 12, 20, 4, 40, 7
    case = _case(N, C, H, W, p, D, keep, "contiguous", device, seed=15)
    g = T._gen(16, "cpu")
    w_big = torch.randn(D, C, p, 2 * p, generator=g).to(device)
    w_big[..., ::2] = case["weight"]
    b_big = torch.randn(3 * D, generator=g).to(device)
    b_big[::3] = case["bias"]
    pos_big = torch.randn(1, case["pos_embed"].shape[1], 2 * D, generator=g).to(device)
    pos_big[..., ::2] = case["pos_embed"]
    strided = dict(case, weight=w_big[..., ::2], bias=b_big[::3], pos_embed=pos_big[..., ::2])
    assert strided["weight"].reshape(D, -1).stride() == (2 * C * p * p, 2)
    grad_out = torch.randn(N, keep, D, generator=T._gen(17, "cpu")).to(device)
    out = pe.patch_embed_visible_fwd(**strided, out_dtype=torch.float32)
    T.assert_rel_close(out, _reference(case, grad_out)[0], TOL, "out")
    _assert_bwd_matches(case, grad_out, weight=strided["weight"])


def test_fwd_compute_dtype_reads_the_operands_in_it(device, monkeypatch):
    """An fp32 output with compute_dtype fp16 (autocast) multiplies the fp16-rounded image and
    weight, accumulating in fp32: the float64 reference of those rounded operands within 1e-5
    (the fp32 operands' product is ~3e-4 from it)."""
    _poison_allocations(monkeypatch)
    N, C, H, W, p, D, keep = 2, 3, 12, 20, 4, 40, 7
    case = _case(N, C, H, W, p, D, keep, "contiguous", device, seed=14)
    mixed = pe.patch_embed_visible_fwd(**case, out_dtype=torch.float32,
                                       compute_dtype=torch.float16)
    assert mixed.dtype == torch.float32
    rounded = {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}
    rounded.update(imgs=case["imgs"].half().double(), weight=case["weight"].half().double())
    T.assert_rel_close(mixed, ref.patch_embed_visible(**rounded), 1e-5, "out (fp16 operands)")


def _patches_by_torch(imgs, ids_keep, p):
    """The kept patches (N * keep, C * p * p) in the conv weight's (c, i, j) order, by views."""
    N, C, H, W = imgs.shape
    gh, gw = H // p, W // p
    grid = imgs[:, :, :gh * p, :gw * p].reshape(N, C, gh, p, gw, p)
    patches = grid.permute(0, 2, 4, 1, 3, 5).reshape(N, gh * gw, C * p * p)
    rows = torch.gather(patches, 1, ids_keep[:, :, None].expand(-1, -1, C * p * p))
    return rows.reshape(-1, C * p * p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,C,H,W,p,D,keep,layout", CASES)
def test_gather_visible_patches_is_an_exact_gather(N, C, H, W, p, D, keep, layout, dtype,
                                                   device, monkeypatch, interpreter_bf16):
    """The patches the weight gradient's split way hands to cuBLAS: every kept pixel, in the
    weight's column order, cast to dtype (exactly torch's cast); every element written. (The
    interpreter's own fp32 -> bf16 cast truncates: the interpreter_bf16 fixture mends it.)"""
    _poison_allocations(monkeypatch)
    case = _case(N, C, H, W, p, D, keep, layout, device, seed=N + keep)
    got = pe.gather_visible_patches(case["imgs"], case["ids_keep"], p, dtype)
    want = _patches_by_torch(case["imgs"], case["ids_keep"], p).to(dtype)
    assert got.shape == (N * keep, C * p * p) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, want)


def test_gather_visible_patches_then_a_matmul_is_the_weight_gradient(device):
    """grad_out^T @ the gathered patches is the fused kernel's grad_weight, and the launcher
    without it (need_weight_grad=False) still gives the bias and image gradients."""
    N, C, H, W, p, D, keep = 3, 3, 20, 28, 4, 40, 13
    case = _case(N, C, H, W, p, D, keep, "slice", device, seed=4)
    grad_out = torch.randn(N, keep, D, generator=T._gen(6, "cpu")).to(device)
    args = (grad_out, case["imgs"], case["weight"], case["ids_keep"])
    gw, gb, gi = pe.patch_embed_visible_bwd(*args, need_imgs_grad=True)
    patches = pe.gather_visible_patches(case["imgs"], case["ids_keep"], p, torch.float32)
    T.assert_rel_close((grad_out.reshape(-1, D).t() @ patches).view(D, C, p, p), gw, TOL,
                       "grad_weight")
    none, gb2, gi2 = pe.patch_embed_visible_bwd(*args, need_imgs_grad=True, need_weight_grad=False)
    assert none is None and torch.equal(gb2, gb) and torch.equal(gi2, gi)


def test_bwd_compute_dtype_reads_the_operands_in_it(device, monkeypatch):
    """An fp32 incoming gradient with compute_dtype fp16 (autocast: the fp32 position add
    promotes the output) gives the matmuls of an fp16 incoming gradient, bit for bit; the bias
    gradient sums the fp32 gradient as it came."""
    _poison_allocations(monkeypatch)
    N, C, H, W, p, D, keep = 2, 3, 12, 20, 4, 40, 7
    case = _case(N, C, H, W, p, D, keep, "contiguous", device, seed=8)
    grad_out = torch.randn(N, keep, D, generator=T._gen(2, "cpu")).to(device)
    args = (case["imgs"], case["weight"], case["ids_keep"])
    gw, gb, gi = pe.patch_embed_visible_bwd(grad_out, *args, need_imgs_grad=True,
                                            compute_dtype=torch.float16)
    hw, _, hi = pe.patch_embed_visible_bwd(grad_out.half(), *args, need_imgs_grad=True)
    assert torch.equal(gw, hw) and torch.equal(gi, hi)
    assert torch.equal(gb, grad_out.reshape(-1, D).sum(0))
    fw, _, _ = pe.patch_embed_visible_bwd(grad_out, *args, need_imgs_grad=False)
    assert not torch.equal(gw, fw)  # fp32 "ieee" operands otherwise


def test_gather_visible_patches_of_no_rows(device):
    imgs = torch.randn(2, 3, 8, 8).to(device)
    ids = torch.empty(2, 0, dtype=torch.int64, device=device)
    assert pe.gather_visible_patches(imgs, ids, 4, torch.float16).shape == (0, 48)


# ----------------------------------------------------------------------------- low precision

@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("N,C,H,W,p,D,keep", [(8, 3, 224, 224, 16, 768, 49),
                                              (4, 3, 224, 224, 14, 1280, 64),
                                              (5, 3, 96, 80, 8, 100, 17)])
def test_patch_embed_low_precision_cuda(N, C, H, W, p, D, keep, dtype, atol):
    _check_low_precision(N, C, H, W, p, D, keep, dtype, atol, "cuda")


@pytest.mark.interpreter(covered_by="test_patch_embed_low_precision_cuda")
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("N,C,H,W,p,D,keep", [(2, 3, 24, 16, 4, 40, 7), (1, 2, 12, 12, 6, 8, 1)])
def test_patch_embed_low_precision_interpreted(N, C, H, W, p, D, keep, dtype, atol,
                                               interpreter_bf16):
    """The GPU test's rule at small shapes, bf16 (the autocast compute dtype's tl.dot operands)
    with the interpreter's bf16 mended."""
    _check_low_precision(N, C, H, W, p, D, keep, dtype, atol, "cpu")


def _check_low_precision(N, C, H, W, p, D, keep, dtype, atol, device):
    """Kernel (operands in dtype, fp32 accumulation) vs the float64 reference: at most 2x the
    error of the eager reference run in dtype, plus atol."""
    case = _case(N, C, H, W, p, D, keep, "contiguous", device, seed=11)
    grad_out = torch.randn(N, keep, D, generator=T._gen(5, "cpu")).to(device)
    r_out, r_gw, r_gb, r_gi = _reference(case, grad_out)

    low = {k: (v.to(dtype).requires_grad_() if v.is_floating_point() else v)
           for k, v in case.items()}
    e_out = ref.patch_embed_visible(**low)
    e_out.backward(grad_out.to(dtype))

    out = pe.patch_embed_visible_fwd(**case, out_dtype=dtype)
    assert out.dtype == dtype
    assert T.rel_err(out, r_out) <= 2 * T.rel_err(e_out, r_out) + atol
    gw, gb, gi = pe.patch_embed_visible_bwd(grad_out.to(dtype), case["imgs"], case["weight"],
                                            case["ids_keep"], need_imgs_grad=True)
    assert T.rel_err(gw, r_gw) <= 2 * T.rel_err(low["weight"].grad, r_gw) + atol
    assert T.rel_err(gb, r_gb) <= 2 * T.rel_err(low["bias"].grad, r_gb) + atol
    assert T.rel_err(gi, r_gi) <= 2 * T.rel_err(low["imgs"].grad, r_gi) + atol


# ----------------------------------------------------------------------------- invalid ids

def _bad_id_case(device, N=2, C=3, H=8, W=12, p=2, D=24, seed=31):
    """A case whose imgs and pos_embed are windows of larger tensors (a read past them, as the
    old kernels made, lands in memory, not in a crash)."""
    case = _case(N, C, H, W, p, D, 1, "contiguous", device, seed=seed)
    L = (H // p) * (W // p)
    g = T._gen(seed + 3, "cpu")
    big = torch.randn(N + 2, C, H, W, generator=g).to(device)
    big[1:N + 1] = case["imgs"]
    pos_big = torch.randn(1, 1 + 2 * L, D, generator=g).to(device)
    pos_big[:, :1 + L] = case["pos_embed"]
    case["imgs"], case["pos_embed"] = big[1:N + 1], pos_big[:, :1 + L]
    return case, L


def test_patch_embed_ids_outside_range_give_nan_rows(device, monkeypatch):
    """An id of ids_keep outside [0, L) (-1, L, L + 3) is not followed: its output row is NaN
    (the old kernel read past the image and the position table), every other row is the
    reference's; the patches gathered for the split weight gradient have a zero row there."""
    _poison_allocations(monkeypatch)
    case, L = _bad_id_case(device)
    N = case["imgs"].shape[0]
    g = T._gen(4, "cpu")
    ids = torch.stack([torch.randperm(L, generator=g)[:5] for _ in range(N)]).to(device)
    bad = {(0, 1): -1, (1, 3): L, (1, 0): L + 3}
    twin = ids.clone()
    for (n, k), v in bad.items():
        ids[n, k] = v
    nan_rows = torch.zeros(ids.shape, dtype=torch.bool)
    for n, k in bad:
        nan_rows[n, k] = True
    out = pe.patch_embed_visible_fwd(**dict(case, ids_keep=ids), out_dtype=torch.float32).cpu()
    want = ref.patch_embed_visible(**{k: (v.double() if v.is_floating_point() else v)
                                      for k, v in dict(case, ids_keep=twin).items()}).cpu()
    assert out[nan_rows].isnan().all(), "an invalid id's row is not NaN"
    T.assert_rel_close(out[~nan_rows], want[~nan_rows], TOL, "the valid rows")
    p = case["weight"].shape[-1]
    patches = pe.gather_visible_patches(case["imgs"], ids, p, torch.float32).cpu()
    flat = nan_rows.reshape(-1)
    assert (patches[flat] == 0).all()
    assert torch.equal(patches[~flat], _patches_by_torch(case["imgs"], twin, p).cpu()[~flat])


def _pixels_named(ids, shape, p, L):
    """(N, C, H, W) bool: the pixels of the patches the ids in [0, L) name."""
    N, C, H, W = shape
    named = torch.zeros(N, C, H, W, dtype=torch.bool)
    grid_w = W // p
    for n in range(N):
        for l in ids[n].tolist():
            if 0 <= l < L:
                r, c = l // grid_w, l % grid_w
                named[n, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = True
    return named


def test_patch_embed_bwd_ids_outside_range_write_nothing_and_give_nan(device, monkeypatch):
    """In the backward an id outside [0, L) writes no image gradient (the old kernel wrote past
    the buffer) and adds nothing to the weight gradient (nothing is read through it): the
    weight gradient is the reference's with that row's incoming gradient zero, and NaN when
    that gradient is NaN (a loss reading the NaN output row); the bias gradient and the image
    gradient of every patch a valid id names are the reference's."""
    buffers = []
    monkeypatch.setattr(pe, "_empty", T.guarded_empty(buffers))
    case, L = _bad_id_case(device)
    N, C, H, W = case["imgs"].shape
    D, _, p, _ = case["weight"].shape
    g = T._gen(5, "cpu")
    twin = torch.stack([torch.randperm(L, generator=g) for _ in range(N)]).to(device)
    ids = twin.clone()
    # past the end of the last image, before the start of the first; every patch kept (no
    # removed-patch launch, whose torch scatter would raise on the ids first)
    ids[1, 2], ids[0, L - 1] = L + 50, -60
    grad_out = torch.randn(N, L, D, generator=T._gen(6, "cpu")).to(device)
    gw, gb, gi = pe.patch_embed_visible_bwd(grad_out, case["imgs"], case["weight"], ids,
                                            need_imgs_grad=True)
    T.assert_guards_intact(buffers)
    _, _, r_gb, r_gi = _reference(dict(case, ids_keep=twin), grad_out)
    T.assert_rel_close(gb, r_gb, TOL, "grad_bias")
    left_out = grad_out.clone()
    left_out[1, 2] = 0
    left_out[0, L - 1] = 0
    T.assert_rel_close(gw, _reference(dict(case, ids_keep=twin), left_out)[1], TOL,
                       "grad_weight without the invalid rows")
    nan_rows = grad_out.clone()
    nan_rows[1, 2] = float("nan")
    gw_nan, _, _ = pe.patch_embed_visible_bwd(nan_rows, case["imgs"], case["weight"], ids,
                                              need_imgs_grad=False)
    assert gw_nan.isnan().all()
    named = _pixels_named(ids, case["imgs"].shape, p, L)
    T.assert_rel_close(gi.cpu()[named], r_gi.cpu()[named], TOL, "grad_imgs (named patches)")


def test_patch_embed_bwd_invalid_ids_with_removed_patches_stop_nothing(device, monkeypatch):
    """Some patches removed (keep < L) and an id outside [0, L): the image gradient's
    removed-patch pass does not index with it (torch's scatter raised on a CPU, and on a GPU
    would stop the process with a device-side assert); nothing is written out of bounds, and
    every patch a valid id keeps gets the reference's gradient."""
    buffers = []
    monkeypatch.setattr(pe, "_empty", T.guarded_empty(buffers))
    case, L = _bad_id_case(device)
    N, C, H, W = case["imgs"].shape
    D, _, p, _ = case["weight"].shape
    g = T._gen(7, "cpu")
    twin = torch.stack([torch.randperm(L, generator=g)[:5] for _ in range(N)]).to(device)
    ids = twin.clone()
    ids[0, 1], ids[1, 4] = -1, L + 9
    grad_out = torch.randn(N, 5, D, generator=T._gen(8, "cpu")).to(device)
    _, _, gi = pe.patch_embed_visible_bwd(grad_out, case["imgs"], case["weight"], ids,
                                          need_imgs_grad=True)
    T.assert_guards_intact(buffers)
    _, _, _, r_gi = _reference(dict(case, ids_keep=twin), grad_out)
    kept = _pixels_named(ids, case["imgs"].shape, p, L)
    T.assert_rel_close(gi.cpu()[kept], r_gi.cpu()[kept], TOL, "grad_imgs (kept patches)")
