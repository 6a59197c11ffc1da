"""fastmae's public functional ops: input checks, backend dispatch and autograd glue.

Each op checks its inputs (a clear error naming the argument, before any kernel runs), then
runs the eager reference (``fastmae.reference``, backend "torch") or fastmae's Triton kernels
(backend "triton"). The kernel paths are registered as ``torch.library`` custom ops with fake
(meta) implementations and autograd formulas, so ``torch.compile`` traces them without graph
breaks and ``torch.library.opcheck`` can check them. Kernel modules are imported lazily: the
Triton interpreter must be switched on before their first import on a CPU machine.
"""
import importlib
import numbers
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmae import reference
from fastmae.backend import backend_for

__all__ = [
    "random_masking", "unshuffle", "masked_mse_loss", "attention",
    "masking_indices", "patch_embed_visible", "packed_attention",
    "layer_norm", "add_layer_norm", "bias_gelu", "transformer_block", "patchify", "unpatchify",
    "keep_count",
]


# ============================================================================ op registration

_KERNEL_MODULES = {}


def _kernel(name):
    """The kernel module ``fastmae.kernels.<name>``, imported on first use: Triton's interpreter
    must be switched on before it is imported (a dict lookup afterwards, where an import
    statement in the op would cost microseconds of host time on every call)."""
    module = _KERNEL_MODULES.get(name)
    if module is None:
        module = _KERNEL_MODULES[name] = importlib.import_module(f"fastmae.kernels.{name}")
    return module


class _Op:
    """One fastmae kernel op, two ways in.

    ``custom``: the ``torch.library`` custom op, with its fake (meta) implementation and autograd
    formula; torch.compile traces it and ``torch.library.opcheck`` checks it. Eager calls run the
    same Python implementation, and the same ``setup_context`` / ``backward``, through a plain
    ``torch.autograd.Function`` instead: on an H200 with torch 2.11 the custom op's eager dispatch
    cost ~0.3 ms of host time per call (benches/step_overhead.py), more than most of fastmae's
    kernels run, and made an eager training step host-bound."""

    def __init__(self, name, impl):
        self.name = name
        self.custom = torch.library.custom_op(name, mutates_args=())(impl)
        self.impl = impl
        self.function = None

    def register_fake(self, fn):
        return self.custom.register_fake(fn)

    def register_autograd(self, backward, setup_context):
        self.custom.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        # once_differentiable: a double backward through a kernel raises instead of silently
        # returning gradients without a graph
        @torch.autograd.function.once_differentiable
        def backward_once(ctx, *grads):
            return backward(ctx, *grads)

        # named after the op: grad_fn shows as e.g. <layer_norm_functionBackward>
        self.function = type(self.name.split("::")[-1] + "_function", (torch.autograd.Function,),
                             {"forward": staticmethod(forward), "backward": staticmethod(backward_once)})

    def __call__(self, *args):
        if not _plain_eager(args):
            return self.custom(*args)
        if (self.function is not None and torch.is_grad_enabled()
                and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            return self.function.apply(*args)
        return self.impl(*args)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _plain_eager(args):
    """True for a plain eager call: not traced by torch.compile, no dispatch mode active (fake
    tensors, proxies, functionalization: opcheck and AOT tracing), no tensor subclass, nothing
    on the meta device (shape-only runs take the custom op's fake implementation)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(a) in _PLAIN_TENSORS and not a.is_meta for a in args if isinstance(a, Tensor))


def _op(name):
    """Decorator: ``@_op("fastmae::name")`` on the implementation (no mutated arguments)."""
    return lambda impl: _Op(name, impl)


def _cast(t, dtype):
    """t in dtype. Tensor.to returns t itself when the dtype already matches, but only after a
    trip through the dispatcher (microseconds: a hundred-odd no-op casts a training step). The
    dtype goes by keyword: a positional one is first tried, and fails, as to()'s device (an
    exception raised and dropped inside torch's argument parser; benches/host_cost.py
    --call-costs times both)."""
    return t if t.dtype == dtype else t.to(dtype=dtype)


def _cast_together(tensors, dtype):
    """[_cast(t, dtype) for t in tensors] (None stays None), the casts of one source dtype done
    by one torch._foreach_copy_ into fresh tensors: on CUDA a single multi-tensor kernel for a
    block's weights (torch's fast path takes sources of one dtype into outputs of another, with
    the rounding of Tensor.to), where .to launches a kernel a tensor."""
    out = list(tensors)
    groups = {}  # source dtype -> positions to cast
    for i, t in enumerate(tensors):
        if t is not None and t.dtype != dtype:
            groups.setdefault(t.dtype, []).append(i)
    for positions in groups.values():
        src = [tensors[i] for i in positions]
        dst = [torch.empty_like(t, dtype=dtype) for t in src]
        torch._foreach_copy_(dst, src)
        for i, t in zip(positions, dst):
            out[i] = t
    return out


# ============================================================================ input checks

def _check_tensor(t, name, ndim=None, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_index(t, name, shape):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_same_device(ref_name, ref, **others):
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: "
                             "all inputs must be on one device")


def keep_count(L, mask_ratio):
    """Patches kept by ``mask_ratio`` (official ``int(L * (1 - mask_ratio))``), checked. Any real
    number is taken, a NumPy scalar or a 0-d tensor too, as official's arithmetic takes them."""
    if isinstance(mask_ratio, torch.Tensor) and mask_ratio.dim() == 0:
        mask_ratio = mask_ratio.item()
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real):
        raise TypeError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    mask_ratio = float(mask_ratio)
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = int(L * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of {L}: "
                         f"int({L} * (1 - {mask_ratio})) = 0")
    return len_keep


def _check_noise(noise, N, L, device):
    _check_tensor(noise, "noise", ndim=2)
    if tuple(noise.shape) != (N, L):
        raise ValueError(f"noise must have shape (N, L) = ({N}, {L}), got {tuple(noise.shape)}")
    if noise.device != device:
        raise ValueError(f"noise is on {noise.device} but the images/tokens are on {device}")


def _compute_dtype(t):
    """The dtype matmul-feeding outputs are written in: the autocast dtype when autocast is on."""
    device_type = t.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


_functorch_active = torch._C._are_functorch_transforms_active


def _uses_triton(t):
    """Whether the kernels may run for an op whose main input is t: backend "triton", and no
    functorch transform (vmap, grad, jvp, ...) active, whose wrapped tensors have no storage for
    a kernel to read -- the reference runs under them."""
    return backend_for(t) == "triton" and not _functorch_active()


def _has_fp64(*tensors):
    """Any float64 tensor among these (None skipped): the kernels compute in fp32, so a
    float64 op runs the reference, float64-exact (and torch.autograd.gradcheck passes)."""
    for t in tensors:  # a plain loop: this runs on every op call
        if t is not None and t.dtype == torch.float64:
            return True
    return False


def _interpreted_bf16_dot(*tensors, compute_dtype=None):
    """Whether bf16 operands (a bf16 tensor among these, None skipped, or a bf16 compute dtype,
    e.g. autocast's) would reach a kernel's tl.dot under Triton's interpreter, whose bf16 dot
    returns garbage (fp16 and fp32 ones are right): such an op runs the reference instead.
    The first tensor is never None: on a GPU this is one attribute read (the interpreter runs
    CPU tensors only)."""
    if tensors[0].is_cuda:
        return False
    if compute_dtype == torch.bfloat16:
        return _kernel("_common").interpreting()
    for t in tensors:
        if t is not None and t.dtype == torch.bfloat16:
            return _kernel("_common").interpreting()
    return False


def _contiguous(t):
    """t (None stays None) in a contiguous layout: a parameter the kernels read with unit
    stride (a (D,) weight or bias). t itself when already contiguous; else a copy through
    autograd, so the gradient still reaches t."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _check_ids_in_range(ids, name, L):
    """ids (int64) in [0, L), checked on the host where that costs nothing: CPU tensors under
    Triton's interpreter, a plain eager call. On a GPU nothing is checked (no sync): the kernels
    make the rows of an index outside [0, L) NaN instead."""
    if ids.is_cuda or ids.numel() == 0 or not _plain_eager((ids,)):
        return
    if not _kernel("_common").interpreting():
        return
    lo, hi = torch.aminmax(ids)
    if lo.item() < 0 or hi.item() >= L:
        raise ValueError(f"{name} must hold indices in [0, {L}), got values in "
                         f"[{lo.item()}, {hi.item()}]")


# ============================================================================ patchify

def patchify(imgs, patch_size):
    """(N, C, H, W) -> (N, L, p*p*C), official (p, q, c) order."""
    _check_images(imgs, patch_size)
    return reference.patchify(imgs, patch_size)


def unpatchify(x, patch_size, grid_hw, in_chans):
    _check_tensor(x, "x", ndim=3)
    h, w = grid_hw
    if x.shape[1] != h * w or x.shape[2] != patch_size * patch_size * in_chans:
        raise ValueError(f"x must have shape (N, {h * w}, {patch_size * patch_size * in_chans}) "
                         f"for a {h}x{w} grid of {patch_size}-pixel patches with {in_chans} "
                         f"channels, got {tuple(x.shape)}")
    return reference.unpatchify(x, patch_size, grid_hw, in_chans)


def _check_images(imgs, patch_size, in_chans=None):
    _check_tensor(imgs, "imgs", ndim=4)
    N, C, H, W = imgs.shape
    if in_chans is not None and C != in_chans:
        raise ValueError(f"imgs must have {in_chans} channels (N, {in_chans}, H, W), got {C}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"imgs height and width must be divisible by the patch size "
                         f"{patch_size}, got {H}x{W}")
    return N, C, H, W


# ============================================================================ masking

@_op("fastmae::masking_indices")
def _masking_indices_op(noise: Tensor, len_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    launch = _kernel("masking").masking_indices
    return launch(noise, len_keep)


@_masking_indices_op.register_fake
def _(noise, len_keep):
    N, L = noise.shape
    return (noise.new_empty(N, len_keep, dtype=torch.int64),
            noise.new_empty(N, L, dtype=torch.float32),
            noise.new_empty(N, L, dtype=torch.int64))


def masking_indices(noise, len_keep):
    """noise (N, L) -> ids_keep (N, keep) int64, mask (N, L) fp32 (0 = kept), ids_restore (N, L).

    The ``len_keep`` smallest-noise patches are kept, as official ``random_masking``."""
    _check_tensor(noise, "noise", ndim=2)
    if not 1 <= len_keep <= noise.shape[1]:
        raise ValueError(f"len_keep must be in [1, L={noise.shape[1]}], got {len_keep}")
    if _uses_triton(noise) and _sorts_exactly(noise):
        return _masking_indices_op(noise, len_keep)
    return reference.masking_indices(noise, len_keep)


def _sorts_exactly(noise):
    """The masking kernel sorts fp32 keys: fp16, bf16 and fp32 noise converts to them exactly,
    fp64 noise can round two values to one (a tie the fp64 sort would not have): torch sorts it."""
    return noise.dtype != torch.float64


@_op("fastmae::gather_tokens")
def _gather_tokens_op(x: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
    launch = _kernel("masking").gather_tokens
    return launch(x, ids_keep)


@_gather_tokens_op.register_fake
def _(x, ids_keep, ids_restore):
    return x.new_empty(x.shape[0], ids_keep.shape[1], x.shape[2])


@_op("fastmae::scatter_tokens")
def _scatter_tokens_op(grad: Tensor, ids_restore: Tensor, len_keep: int) -> Tensor:
    launch = _kernel("masking").scatter_tokens
    return launch(grad, ids_restore, len_keep)


@_scatter_tokens_op.register_fake
def _(grad, ids_restore, len_keep):
    return grad.new_empty(grad.shape[0], ids_restore.shape[1], grad.shape[2])


def _gather_tokens_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.len_keep = inputs[1].shape[1]


def _gather_tokens_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    return _scatter_tokens_op(grad, ids_restore, ctx.len_keep), None, None


_gather_tokens_op.register_autograd(_gather_tokens_backward, setup_context=_gather_tokens_setup)


def random_masking(x, mask_ratio, noise=None):
    """Official ``random_masking``: keep the ``int(L * (1 - mask_ratio))`` patches of smallest
    noise. x (N, L, D) -> x_masked (N, keep, D), mask (N, L) fp32 (0 = kept, 1 = removed),
    ids_restore (N, L) int64. ``noise`` (N, L) in [0, 1) replaces ``torch.rand``."""
    _check_tensor(x, "x", ndim=3)
    N, L, D = x.shape
    len_keep = keep_count(L, mask_ratio)
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    _check_noise(noise, N, L, x.device)
    if not (_uses_triton(x) and _sorts_exactly(noise)) or x.dtype == torch.float64:
        return reference.random_masking(x, mask_ratio, noise)
    ids_keep, mask, ids_restore = _masking_indices_op(noise, len_keep)
    return _gather_tokens_op(x, ids_keep, ids_restore), mask, ids_restore


# ============================================================================ patch embedding

@_op("fastmae::patch_embed_visible")
def _patch_embed_visible_op(imgs: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor,
                            ids_keep: Tensor, out_dtype: torch.dtype,
                            compute_dtype: torch.dtype) -> Tensor:
    launch = _kernel("patch_embed").patch_embed_visible_fwd
    return launch(imgs, weight, bias, pos_embed, ids_keep, out_dtype, compute_dtype)


@_patch_embed_visible_op.register_fake
def _(imgs, weight, bias, pos_embed, ids_keep, out_dtype, compute_dtype):
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], weight.shape[0], dtype=out_dtype)


# The patch embedding's backward reads its matmuls' operands in the forward's compute dtype, as
# autocast's convolution backward does (the incoming gradient is fp32: the fp32 position add).
# Its weight gradient G^T @ A (A: the kept patches) runs one of two ways in fp16 / bf16: one
# fastmae kernel that gathers its operands tile by tile ("fused"), or the patches gathered once
# by a fastmae kernel and cuBLAS's matmul ("split"). On a GPU both are timed on the first call
# of each shape and the faster is kept (FASTMAE_PATCH_WGRAD=fused|split forces one); elsewhere,
# and in fp32, the fused one.
_PATCH_WGRAD_CHOICE = {}


@_op("fastmae::patch_embed_visible_bwd")
def _patch_embed_visible_bwd_op(grad_out: Tensor, imgs: Tensor, weight: Tensor, ids_keep: Tensor,
                                need_imgs_grad: bool,
                                compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    kernels = _kernel("patch_embed")
    g = grad_out.contiguous()
    D, C, p, _ = weight.shape
    rows = g.numel() // D

    def split():
        patches = kernels.gather_visible_patches(imgs, ids_keep, p, compute_dtype)
        g_rows = _cast(g.view(rows, D), compute_dtype)
        return _weight_grad(g_rows, patches, torch.float32).view(D, C, p, p)

    def fused():
        return kernels.patch_embed_visible_bwd(g, imgs, weight, ids_keep, False,
                                               compute_dtype=compute_dtype)[0]

    use_split = False
    if compute_dtype in (torch.float16, torch.bfloat16) and rows > 0:
        key = ("patch_embed wgrad", rows, D, C * p * p, compute_dtype, g.device)
        use_split = _kernel("_common").keep_faster(
            _PATCH_WGRAD_CHOICE, key, "FASTMAE_PATCH_WGRAD", {"fused": fused, "split": split},
            "fused") == "split"
    gw, gb, gi = kernels.patch_embed_visible_bwd(g, imgs, weight, ids_keep, need_imgs_grad,
                                                 need_weight_grad=not use_split,
                                                 compute_dtype=compute_dtype)
    if use_split:
        gw = split()
    return gw, gb, (gi if gi is not None else imgs.new_empty(0))


@_patch_embed_visible_bwd_op.register_fake
def _(grad_out, imgs, weight, ids_keep, need_imgs_grad, compute_dtype):
    gi = imgs.new_empty(imgs.shape) if need_imgs_grad else imgs.new_empty(0)
    return (weight.new_empty(weight.shape, dtype=torch.float32),
            weight.new_empty(weight.shape[0], dtype=torch.float32), gi)


def _patch_embed_setup(ctx, inputs, output):
    imgs, weight, bias, pos_embed, ids_keep, _, compute_dtype = inputs
    ctx.save_for_backward(imgs, weight, ids_keep)
    ctx.need_imgs_grad = imgs.requires_grad
    ctx.compute_dtype = compute_dtype
    ctx.dtypes = (weight.dtype, bias.dtype)


def _patch_embed_backward(ctx, grad_out):
    imgs, weight, ids_keep = ctx.saved_tensors
    gw, gb, gi = _patch_embed_visible_bwd_op(grad_out, imgs, weight, ids_keep, ctx.need_imgs_grad,
                                             ctx.compute_dtype)
    return (gi if ctx.need_imgs_grad else None, _cast(gw, ctx.dtypes[0]), _cast(gb, ctx.dtypes[1]),
            None, None, None, None)


_patch_embed_visible_op.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup)


def patch_embed_visible(imgs, weight, bias, pos_embed, ids_keep):
    """Embed only the kept patches: ``gather(patch_embed(imgs) + pos_embed[:, 1:], ids_keep)``.

    imgs (N, C, H, W), weight (D, C, p, p), bias (D,), pos_embed (1, 1 + L, D),
    ids_keep (N, keep) -> (N, keep, D). Under autocast the projection runs in the autocast
    dtype and the result, like the official fp32 position add, is in pos_embed's dtype.

    Under the "triton" backend an index outside [0, L) gives NaN rows, where torch's gather
    raises (a GPU is not synchronized to check; CPU tensors raise a ValueError). float64, and
    bf16 under Triton's interpreter, run the reference."""
    _check_tensor(weight, "weight", ndim=4)
    D, C, p, q = weight.shape
    if p != q:
        raise ValueError(f"weight must be (D, C, p, p), got {tuple(weight.shape)}")
    N, _, H, W = _check_images(imgs, p, in_chans=C)
    L = (H // p) * (W // p)
    _check_tensor(bias, "bias", ndim=1)
    if bias.shape[0] != D:
        raise ValueError(f"bias must have shape ({D},), got {tuple(bias.shape)}")
    _check_tensor(pos_embed, "pos_embed", ndim=3)
    if tuple(pos_embed.shape) != (1, 1 + L, D):
        raise ValueError(f"pos_embed must have shape (1, {1 + L}, {D}), got {tuple(pos_embed.shape)}")
    if not isinstance(ids_keep, torch.Tensor) or ids_keep.dim() != 2 or ids_keep.shape[0] != N:
        raise ValueError(f"ids_keep must be (N={N}, keep) int64")
    _check_index(ids_keep, "ids_keep", ids_keep.shape)
    _check_same_device("imgs", imgs, weight=weight, bias=bias, pos_embed=pos_embed, ids_keep=ids_keep)
    compute_dtype = _compute_dtype(imgs)
    if (not _uses_triton(imgs) or pos_embed.requires_grad
            or _has_fp64(imgs, weight, bias, pos_embed)
            or _interpreted_bf16_dot(imgs, weight, bias, pos_embed, compute_dtype=compute_dtype)):
        # a trainable position table has no kernel gradient: the reference gives it one
        return reference.patch_embed_visible(imgs, weight, bias, pos_embed, ids_keep)
    _check_ids_in_range(ids_keep, "ids_keep", L)
    out_dtype = torch.promote_types(compute_dtype, pos_embed.dtype)
    return _patch_embed_visible_op(imgs, weight, bias, pos_embed, ids_keep, out_dtype, compute_dtype)


# ============================================================================ decoder unshuffle

@_op("fastmae::unshuffle")
def _unshuffle_op(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor) -> Tensor:
    launch = _kernel("unshuffle").unshuffle_fwd
    return launch(x, mask_token, ids_restore, pos_embed)


@_unshuffle_op.register_fake
def _(x, mask_token, ids_restore, pos_embed):
    dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    return x.new_empty(x.shape[0], 1 + ids_restore.shape[1], x.shape[2], dtype=dtype)


@_op("fastmae::unshuffle_bwd")
def _unshuffle_bwd_op(grad_out: Tensor, ids_restore: Tensor, len_keep: int, x_dtype: torch.dtype,
                      mask_token_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    launch = _kernel("unshuffle").unshuffle_bwd
    return launch(grad_out, ids_restore, len_keep, x_dtype, mask_token_dtype)


@_unshuffle_bwd_op.register_fake
def _(grad_out, ids_restore, len_keep, x_dtype, mask_token_dtype):
    N, _, D = grad_out.shape
    return (grad_out.new_empty(N, 1 + len_keep, D, dtype=x_dtype),
            grad_out.new_empty(1, 1, D, dtype=mask_token_dtype))


def _unshuffle_setup(ctx, inputs, output):
    x, mask_token, ids_restore, _ = inputs
    ctx.save_for_backward(ids_restore)
    ctx.len_keep = x.shape[1] - 1
    ctx.dtypes = (x.dtype, mask_token.dtype)


def _unshuffle_backward(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    gx, gm = _unshuffle_bwd_op(grad_out, ids_restore, ctx.len_keep, *ctx.dtypes)
    return gx, gm, None, None


_unshuffle_op.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)


def unshuffle(x, mask_token, ids_restore, pos_embed):
    """Official forward_decoder's token work in one pass: append mask tokens, unshuffle to the
    original patch order, re-attach the cls token and add positions.

    x (N, 1 + keep, D) cls first, mask_token (1, 1, D), ids_restore (N, L), pos_embed
    (1, 1 + L, D) -> (N, 1 + L, D).

    Under the "triton" backend an index outside [0, L) gives NaN rows, where torch's gather
    raises (a GPU is not synchronized to check; CPU tensors raise a ValueError). float64 runs
    the reference."""
    _check_tensor(x, "x", ndim=3)
    N, T, D = x.shape
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dim() != 2 or ids_restore.shape[0] != N:
        raise ValueError(f"ids_restore must be (N={N}, L) int64, got "
                         f"{tuple(ids_restore.shape) if isinstance(ids_restore, torch.Tensor) else ids_restore!r}")
    L = ids_restore.shape[1]
    _check_index(ids_restore, "ids_restore", (N, L))
    if not 2 <= T <= L + 1:
        raise ValueError(f"x must be (N, 1 + keep, D) with 1 <= keep <= L={L}, got {tuple(x.shape)}")
    _check_tensor(mask_token, "mask_token", ndim=3)
    if tuple(mask_token.shape) != (1, 1, D):
        raise ValueError(f"mask_token must have shape (1, 1, {D}), got {tuple(mask_token.shape)}")
    _check_tensor(pos_embed, "pos_embed", ndim=3)
    if tuple(pos_embed.shape) != (1, 1 + L, D):
        raise ValueError(f"pos_embed must have shape (1, {1 + L}, {D}), got {tuple(pos_embed.shape)}")
    _check_same_device("x", x, mask_token=mask_token, ids_restore=ids_restore, pos_embed=pos_embed)
    if not _uses_triton(x) or pos_embed.requires_grad or _has_fp64(x, mask_token, pos_embed):
        return reference.unshuffle(x, mask_token, ids_restore, pos_embed)
    _check_ids_in_range(ids_restore, "ids_restore", L)
    return _unshuffle_op(x, mask_token, ids_restore, pos_embed)


# ============================================================================ loss

def _loss_grad_dtype(pred_dtype):
    """The dtype the loss keeps d loss / d pred in until its backward scales it. fp16 cannot
    hold it: 2 (pred - target) / (p*p*C * removed patches) is ~1e-7 at ViT-B/16 batch 64, below
    fp16's smallest normal (6e-5), where the reference multiplies by the incoming gradient (a
    GradScaler's 2**16) in fp32 and rounds once; bf16 has fp32's exponent range."""
    return torch.float32 if pred_dtype == torch.float16 else pred_dtype


@_op("fastmae::masked_mse")
def _masked_mse_op(imgs: Tensor, pred: Tensor, mask: Tensor, patch_size: int, norm_pix: bool,
                   need_grad: bool) -> tuple[Tensor, Tensor]:
    launch = _kernel("mse_loss").masked_mse_fwd
    loss, grad_pred = launch(imgs, pred, mask, patch_size, norm_pix, need_grad,
                             _loss_grad_dtype(pred.dtype))
    return loss, (grad_pred if grad_pred is not None else pred.new_empty(0))


@_masked_mse_op.register_fake
def _(imgs, pred, mask, patch_size, norm_pix, need_grad):
    g = (pred.new_empty(pred.shape, dtype=_loss_grad_dtype(pred.dtype)) if need_grad
         else pred.new_empty(0))
    return pred.new_empty((), dtype=torch.float32), g


@_op("fastmae::scale")
def _scale_op(x: Tensor, alpha: Tensor, out_dtype: torch.dtype) -> Tensor:
    launch = _kernel("scale").scale
    return launch(x, alpha, out_dtype)


@_scale_op.register_fake
def _(x, alpha, out_dtype):
    return torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)


# _NO_ZERO_GRADS: an op output that gets no gradient (a saved buffer marked non-differentiable,
# row statistics, the final LayerNorm's residual sum s, which nothing reads) would otherwise
# reach the backward as a tensor of zeros that autograd allocates and fills -- the loss's
# (N, L, p*p*C) gradient buffer, the decoder's (N, L + 1, D) fp32 s, which the LayerNorm
# backward would then read back -- so those backwards take None instead.
def _masked_mse_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # see _NO_ZERO_GRADS
    ctx.save_for_backward(output[1])
    ctx.pred_dtype = inputs[1].dtype


def _masked_mse_backward(ctx, grad_loss, _unused):
    (grad_pred,) = ctx.saved_tensors
    return None, _scale_op(grad_pred, grad_loss, ctx.pred_dtype), None, None, None, None


_masked_mse_op.register_autograd(_masked_mse_backward, setup_context=_masked_mse_setup)


def masked_mse_loss(imgs, pred, mask, patch_size, norm_pix=True):
    """Official forward_loss: mean squared error per patch against the patchified image
    (normalized per patch with its mean and unbiased variance when ``norm_pix``), averaged
    over the removed patches (mask == 1). imgs (N, C, H, W), pred (N, L, p*p*C), mask (N, L)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    N, C, H, W = _check_images(imgs, patch_size)
    L, K = (H // patch_size) * (W // patch_size), patch_size * patch_size * C
    _check_tensor(pred, "pred", ndim=3)
    if tuple(pred.shape) != (N, L, K):
        raise ValueError(f"pred must have shape (N, L, p*p*C) = ({N}, {L}, {K}), got {tuple(pred.shape)}")
    _check_tensor(mask, "mask", ndim=2, floating=False)
    if tuple(mask.shape) != (N, L):
        raise ValueError(f"mask must have shape (N, L) = ({N}, {L}), got {tuple(mask.shape)}")
    if not mask.dtype.is_floating_point:  # a bool or integer 0/1 mask, as official takes
        mask = mask.to(torch.float32)
    _check_same_device("imgs", imgs, pred=pred, mask=mask)
    if (not _uses_triton(pred) or imgs.requires_grad or mask.requires_grad
            or _has_fp64(imgs, pred, mask)):
        # gradients reaching the images or the mask come from the reference, and float64
        return reference.masked_mse_loss(imgs, pred, mask, patch_size, norm_pix)
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    loss, _ = _masked_mse_op(imgs, pred, mask, patch_size, bool(norm_pix), need_grad)
    return loss


def patch_mse_loss(target, pred, mask, norm_pix=True):
    """Official forward_loss on a given target (N, L, K) -- what a model whose patchify is
    overridden computes: the reference's arithmetic (no kernel: the fused loss patchifies the
    images itself). mask as masked_mse_loss takes it."""
    _check_tensor(target, "target", ndim=3)
    _check_tensor(pred, "pred", ndim=3)
    if target.shape != pred.shape:
        raise ValueError(f"target and pred must have one shape, got {tuple(target.shape)} and "
                         f"{tuple(pred.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(pred.shape[:2]):
        raise ValueError(f"mask must be a tensor of shape {tuple(pred.shape[:2])}")
    if not mask.dtype.is_floating_point:
        mask = mask.to(torch.float32)
    return reference.patch_mse_loss(target, pred, mask, norm_pix)


# ============================================================================ attention

_HEAD_DIMS = (32, 64, 80, 96, 128)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the attention kernel's


@_op("fastmae::attention")
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    launch = _kernel("attention").attention_fwd
    return launch(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale):
    B, H, N, d = q.shape
    return (q.new_empty(B, N, H, d).transpose(1, 2),
            q.new_empty(B, H, N, dtype=torch.float32))


@_op("fastmae::attention_bwd")
def _attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                      scale: float) -> tuple[Tensor, Tensor, Tensor]:
    launch = _kernel("attention").attention_bwd
    # three separate buffers: a custom op's outputs may not alias one another
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    return launch(do, q, k, v, o, lse, scale, dq=dq, dk=dk, dv=dv)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # see _NO_ZERO_GRADS
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _attention_backward(ctx, do, _unused):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _check_attention(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(t, name, ndim=4)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have one shape (B, H, N, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_same_device("q", q, k=k, v=v)


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v for (B, H, N, d) tensors of any strides: SDPA's non-causal
    semantics, ``scale`` defaulting to d ** -0.5. The kernel serves head dims
    {32, 64, 80, 96, 128} in fp32, fp16 and bf16 (not bf16 under Triton's interpreter); others,
    and float64, run the reference (SDPA)."""
    _check_attention(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if (not _uses_triton(q) or q.shape[-1] not in _HEAD_DIMS or q.dtype not in _KERNEL_DTYPES
            or _interpreted_bf16_dot(q)):
        return reference.attention(q, k, v, scale=scale)
    o, _ = _attention_op(q, k, v, float(scale))
    return o


@_op("fastmae::packed_attention")
def _packed_attention_op(qkv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    launch = _kernel("attention").attention_fwd
    B, N, C3 = qkv.shape
    d = C3 // (3 * num_heads)
    q, k, v = qkv.view(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    out = qkv.new_empty(B, N, num_heads * d)
    _, lse = launch(q, k, v, scale, out=out.view(B, N, num_heads, d).transpose(1, 2))
    return out, lse


@_packed_attention_op.register_fake
def _(qkv, num_heads, scale):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


def _packed_attention_grads(do, qkv, o, lse, num_heads, scale, bias_grad=False, reduce=True):
    """(dqkv (B, N, 3C) packed as qkv, and with ``bias_grad`` its fp32 column sums (3C,) -- the
    qkv projection's bias gradient, from the attention backward's per-program partial sums
    instead of a pass over dqkv -- else None). With reduce=False those partial sums unreduced,
    (rows, 3C) fp32, for partial_sums.sum_partials."""
    attention = _kernel("attention")
    B, N, C3 = qkv.shape
    d = C3 // (3 * num_heads)
    heads = lambda t: t.view(B, N, num_heads, d).transpose(1, 2)  # noqa: E731
    q, k, v = qkv.view(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    # the three gradients land in one packed buffer: the qkv projection's backward reads it as is
    dqkv = qkv.new_empty(B, N, 3, num_heads, d)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    dsum = (qkv.new_empty(*attention.grad_sum_shape(B, num_heads, N, d), dtype=torch.float32)
            if bias_grad else None)
    attention.attention_bwd(heads(do.contiguous()), q, k, v, heads(o), lse, scale, dq=dq, dk=dk,
                            dv=dv, dsum=dsum)
    if dsum is None:
        return dqkv.view(B, N, C3), None
    dsum = dsum.view(-1, C3)
    return dqkv.view(B, N, C3), dsum.sum(0) if reduce else dsum


@_op("fastmae::packed_attention_bwd")
def _packed_attention_bwd_op(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, num_heads: int,
                             scale: float) -> Tensor:
    return _packed_attention_grads(do, qkv, o, lse, num_heads, scale)[0]


@_packed_attention_bwd_op.register_fake
def _(do, qkv, o, lse, num_heads, scale):
    return torch.empty_like(qkv)


def _packed_attention_setup(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # see _NO_ZERO_GRADS
    ctx.save_for_backward(qkv, o, lse)
    ctx.num_heads, ctx.scale = num_heads, scale


def _packed_attention_backward(ctx, do, _unused):
    qkv, o, lse = ctx.saved_tensors
    return _packed_attention_bwd_op(do, qkv, o, lse, ctx.num_heads, ctx.scale), None, None


_packed_attention_op.register_autograd(_packed_attention_backward, setup_context=_packed_attention_setup)


def packed_attention(qkv, num_heads, scale=None):
    """Multi-head attention on a packed projection output, as the official Attention module:
    qkv (B, N, 3 * C) laid out (B, N, 3, H, d) -> (B, N, C), heads concatenated."""
    _check_tensor(qkv, "qkv", ndim=3)
    B, N, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv's last dim must be 3 * num_heads * head_dim, got {C3} for "
                         f"num_heads={num_heads}")
    d = C3 // (3 * num_heads)
    if scale is None:
        scale = d ** -0.5
    use_kernel = (_uses_triton(qkv) and d in _HEAD_DIMS and qkv.dtype in _KERNEL_DTYPES
                  and not _interpreted_bf16_dot(qkv))
    if not use_kernel:
        q, k, v = qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        return reference.attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, C3 // 3)
    o, _ = _packed_attention_op(qkv.contiguous(), num_heads, float(scale))
    return o


# ============================================================================ LayerNorm, GELU

# The LayerNorm and bias + GELU ops take and return (..., D) tensors: the (M, D) row views the
# kernels want are taken inside the op, where autograd does not record them (a recorded view
# costs a node in the forward and one in the backward, host time on every call).

@_op("fastmae::layer_norm")
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    launch = _kernel("layer_norm").layer_norm_fwd
    y, _, mean, rstd = launch(_rows(x), weight, bias, eps, out_dtype, out_shape=x.shape)
    return y, mean, rstd


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(M, dtype=torch.float32),
            x.new_empty(M, dtype=torch.float32))


@_op("fastmae::add_layer_norm")
def _add_layer_norm_op(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float,
                       out_dtype: torch.dtype,
                       branch_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    launch = _kernel("layer_norm").layer_norm_fwd
    y, s, mean, rstd = launch(_rows(x), weight, bias, eps, out_dtype, residual=_rows(residual),
                              residual_dtype=residual.dtype, branch_bias=branch_bias,
                              out_shape=x.shape)
    return s, y, mean, rstd


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype, branch_bias):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty_like(residual, memory_format=torch.contiguous_format),
            x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32))


@_op("fastmae::layer_norm_bwd")
def _layer_norm_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                       ds: Tensor | None, dx_dtype: torch.dtype,
                       branch_bias_grad: bool) -> tuple[Tensor, Tensor]:
    launch = _kernel("layer_norm").layer_norm_bwd
    D = x.shape[-1]
    dx, dwb = launch(dy.reshape(-1, D), _rows(x), weight, mean, rstd,
                     ds=None if ds is None else ds.reshape(-1, D), dx_dtype=dx_dtype,
                     branch_bias_grad=branch_bias_grad)
    return dx.view_as(x), dwb


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, ds, dx_dtype, branch_bias_grad):
    # dwb: the weight (row 0), bias (row 1) and branch bias (row 2, if asked) gradients, fp32
    return (x.new_empty(x.shape, dtype=dx_dtype),
            weight.new_empty(3 if branch_bias_grad else 2, weight.shape[0], dtype=torch.float32))


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # see _NO_ZERO_GRADS
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)


def _layer_norm_grads(dy, x, weight, mean, rstd, dtypes, ds=None):
    """(dx (+ ds, a gradient reaching x by another path), dweight, dbias) of layer_norm;
    dtypes = (x, weight, bias) dtypes."""
    dx, dwb = _layer_norm_bwd_op(dy, x, weight, mean, rstd, ds, dtypes[0], False)
    return dx, _cast(dwb[0], dtypes[1]), _cast(dwb[1], dtypes[2])


def _layer_norm_backward(ctx, dy, _m, _r):
    x, weight, mean, rstd = ctx.saved_tensors
    return (*_layer_norm_grads(dy, x, weight, mean, rstd, ctx.dtypes), None, None)


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


@_op("fastmae::add_layer_norm_bwd")
def _add_layer_norm_bwd_op(dy: Tensor, s: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                           ds: Tensor | None, ds_dtype: torch.dtype, dx_dtype: torch.dtype,
                           branch_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    launch = _kernel("layer_norm").layer_norm_bwd
    D = s.shape[-1]
    dsum, dwb, dx = launch(dy.reshape(-1, D), _rows(s), weight, mean, rstd,
                           ds=None if ds is None else ds.reshape(-1, D), dx_dtype=ds_dtype,
                           dx2_dtype=dx_dtype, branch_bias_grad=branch_bias_grad)
    return dsum.view_as(s), dwb, dx.view_as(s)


@_add_layer_norm_bwd_op.register_fake
def _(dy, s, weight, mean, rstd, ds, ds_dtype, dx_dtype, branch_bias_grad):
    return (s.new_empty(s.shape, dtype=ds_dtype),
            weight.new_empty(3 if branch_bias_grad else 2, weight.shape[0], dtype=torch.float32),
            s.new_empty(s.shape, dtype=dx_dtype))


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _, _, branch_bias = inputs
    s, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # see _NO_ZERO_GRADS: the final norm's s has no gradient
    # s (needed downstream anyway) and the row statistics: x_hat is recomputed from them
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.dtypes = (x.dtype, residual.dtype, weight.dtype, bias.dtype,
                  None if branch_bias is None else branch_bias.dtype)


def _add_layer_norm_grads(ds, dy, s, weight, mean, rstd, dtypes):
    """(dx, dresidual, dweight, dbias, dbranch_bias or None) of add_layer_norm, given ds and dy,
    the gradients of its outputs s and y; dtypes = (x, residual, weight, bias, branch bias or
    None) dtypes."""
    x_dtype, r_dtype, w_dtype, b_dtype, bb_dtype = dtypes
    with_bb = bb_dtype is not None
    if x_dtype == r_dtype:
        dsum, dwb = _layer_norm_bwd_op(dy, s, weight, mean, rstd, ds, r_dtype, with_bb)
        dx = dsum
    else:
        # under autocast: the fp32 residual-stream gradient and the bf16 branch gradient, one pass
        dsum, dwb, dx = _add_layer_norm_bwd_op(dy, s, weight, mean, rstd, ds, r_dtype, x_dtype,
                                               with_bb)
    # the branch bias's gradient: the column sums of dsum, from the same pass
    dbb = _cast(dwb[2], bb_dtype) if with_bb else None
    return dx, dsum, _cast(dwb[0], w_dtype), _cast(dwb[1], b_dtype), dbb


def _add_layer_norm_backward(ctx, ds, dy, _m, _r):
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # only s reached the loss: the normalization's own gradients are zero
        x_dtype, r_dtype, w_dtype, b_dtype, bb_dtype = ctx.dtypes
        dbb = None
        if bb_dtype is not None:
            dbb = _cast(ds.reshape(-1, ds.shape[-1]).sum(0, dtype=torch.float32), bb_dtype)
        return (_cast(ds, x_dtype), _cast(ds, r_dtype), weight.new_zeros(weight.shape, dtype=w_dtype),
                weight.new_zeros(weight.shape, dtype=b_dtype), None, None, dbb)
    dx, dsum, dw, db, dbb = _add_layer_norm_grads(ds, dy, s, weight, mean, rstd, ctx.dtypes)
    return dx, dsum, dw, db, None, None, dbb


_add_layer_norm_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


def _check_norm(x, weight, bias, eps):
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        _check_tensor(t, name, ndim=1)
        if t.shape[0] != D:
            raise ValueError(f"{name} must have shape ({D},) to normalize x of shape "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    _check_same_device("x", x, weight=weight, bias=bias)


def _rows(x):
    """x as a (M, D) row-contiguous matrix (a view when x is contiguous)."""
    return x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().view(-1, x.shape[-1])


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim (fp32 statistics); under autocast the output is written in the
    autocast dtype, ready for the next matmul. float64 runs the reference."""
    _check_norm(x, weight, bias, eps)
    if not _uses_triton(x) or _has_fp64(x, weight, bias):
        return reference.layer_norm(x, weight, bias, eps)
    y, _, _ = _layer_norm_op(x, _contiguous(weight), _contiguous(bias), float(eps),
                             _compute_dtype(x))
    return y


def add_layer_norm(x, residual, weight, bias, eps, branch_bias=None):
    """The pre-norm block's hand-off in one pass: s = residual + x (+ branch_bias, the (D,) bias
    of the linear layer that produced x, when that layer ran without it: its gradient then comes
    from this op's backward pass, with no separate reduction); returns (s, layer_norm(s)).
    s keeps residual's dtype (fp32 under autocast, as the official residual stream). float64
    runs the reference."""
    _check_norm(x, weight, bias, eps)
    _check_tensor(residual, "residual")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_same_device("x", x, residual=residual)
    if branch_bias is not None:
        _check_tensor(branch_bias, "branch_bias", ndim=1)
        if branch_bias.shape[0] != x.shape[-1]:
            raise ValueError(f"branch_bias must have shape ({x.shape[-1]},), got {tuple(branch_bias.shape)}")
        _check_same_device("x", x, branch_bias=branch_bias)
    if not _uses_triton(x) or _has_fp64(x, residual, weight, bias, branch_bias):
        return reference.add_layer_norm(x, residual, weight, bias, eps, branch_bias)
    r_dtype = torch.promote_types(x.dtype, residual.dtype)
    s, y, _, _ = _add_layer_norm_op(x, _cast(residual, r_dtype), _contiguous(weight),
                                    _contiguous(bias), float(eps), _compute_dtype(x),
                                    _contiguous(branch_bias))
    return s, y


@_op("fastmae::bias_gelu")
def _bias_gelu_op(x: Tensor, bias: Tensor, out_dtype: torch.dtype) -> Tensor:
    launch = _kernel("bias_gelu").bias_gelu_fwd
    return launch(_rows(x), bias, out_dtype, out_shape=x.shape)


@_bias_gelu_op.register_fake
def _(x, bias, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@_op("fastmae::bias_gelu_bwd")
def _bias_gelu_bwd_op(dy: Tensor, x: Tensor, bias: Tensor, dx_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    launch = _kernel("bias_gelu").bias_gelu_bwd
    dx, db = launch(dy.reshape(-1, x.shape[-1]), _rows(x), bias, dx_dtype)
    return dx.view_as(x), db


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias, dx_dtype):
    return x.new_empty(x.shape, dtype=dx_dtype), bias.new_empty(bias.shape, dtype=torch.float32)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, _ = inputs
    ctx.save_for_backward(x, bias)


def _bias_gelu_grads(dy, x, bias):
    """(dx, dbias) of bias_gelu."""
    dx, db = _bias_gelu_bwd_op(dy, x, bias, x.dtype)
    return dx, _cast(db, bias.dtype)


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return (*_bias_gelu_grads(dy, x, bias), None)


_bias_gelu_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


def bias_gelu(x, bias):
    """Exact (erf) GELU of x + bias, the MLP's activation with fc1's bias folded in. float64
    runs the reference."""
    _check_tensor(x, "x")
    _check_tensor(bias, "bias", ndim=1)
    if bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
    _check_same_device("x", x, bias=bias)
    if not _uses_triton(x) or _has_fp64(x, bias):
        return reference.bias_gelu(x, bias)
    return _bias_gelu_op(x, _contiguous(bias), _compute_dtype(x))


# ============================================================================ transformer block

def transformer_block(x, branch, params, num_heads, scale, eps, cast_weights=None):
    """One pre-norm transformer block (timm's Block: x + attn(norm1(x)), then + mlp(norm2(.)))
    on the residual stream x (B, N, C), in the hand-off form the "triton" model runs it.

    ``branch`` is None, or (m, bias): the previous block's MLP output without its output bias,
    whose add into x is fused into this block's first LayerNorm (and the bias gradient produced
    there). ``params`` = (norm1.weight, norm1.bias, qkv.weight, qkv.bias or None, proj.weight,
    proj.bias, norm2.weight, norm2.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias);
    ``eps`` = (norm1.eps, norm2.eps). ``cast_weights``: this block's entry of
    ``cast_block_weights`` (its matmul weights already in the matmul dtype), or None. Returns
    (x, (m, fc2.bias)): the caller adds the branch.

    A plain eager call that needs gradients runs as one autograd node (``_Block``): the same
    kernels and matmuls as the op-by-op composition, without the per-op autograd nodes, whose
    host cost made an eager step host-bound. Anything else (torch.compile, fake tensors, no
    gradients, shapes the attention kernel does not serve, float64, bf16 matmuls under Triton's
    interpreter) runs op by op. Strided (D,) parameters are fine: the kernels get contiguous
    copies (through autograd)."""
    if len(params) != 12:
        raise ValueError(f"params must hold the block's 12 parameters, got {len(params)}")
    tensors = (x,) + tuple(t for t in params if t is not None) + (() if branch is None else branch)
    cd = _block_node_dtype(x, branch, params, num_heads, tensors)
    if cd is not None:
        m_bias = params[11]
        params = _contiguous_vectors(params)
        if branch is not None and not branch[1].is_contiguous():
            branch = (branch[0], branch[1].contiguous())
        if cast_weights is not None and cast_weights[0].dtype != cd:
            cast_weights = None  # cast for another matmul dtype: the block casts its own
        s, m = _Block.apply(x, *(branch if branch is not None else (None, None)), *params,
                            (eps[0], eps[1], num_heads, float(scale), cd, cast_weights))
        return s, (m, m_bias)
    return _block_by_op(x, branch, params, num_heads, scale, eps)


def cast_block_weights(x, blocks_params):
    """For a run of transformer blocks on the residual stream x (one ``transformer_block``
    params tuple a block): each block's matmul weights and qkv bias (qkv.weight, proj.weight,
    fc1.weight, fc2.weight, qkv.bias) in the autocast dtype its one-node block would cast them
    to, all the blocks' cast by one torch._foreach_copy_ (on CUDA a few multi-tensor launches
    for a whole encoder or decoder, instead of one launch of a few chunks a block); a None
    entry a block where no cast applies (autocast off, no gradient, a traced call). The copies
    are what each block keeps for its backward anyway, so the cast moves earlier, not the peak
    of memory."""
    nothing = [None] * len(blocks_params)
    if not (torch.is_grad_enabled() and _uses_triton(x) and x.device.type != "meta"
            and torch.is_autocast_enabled(x.device.type)):
        return nothing
    cd = _compute_dtype(x)
    flat = [t for p in blocks_params for t in (p[2], p[4], p[8], p[10], p[3])]
    tensors = [t for t in flat if t is not None]
    if (not _plain_eager(tensors) or all(t.dtype == cd for t in tensors)
            or not (x.requires_grad or any(t.requires_grad for t in tensors))):
        return nothing
    with torch.no_grad():  # plain copies, as a block's own cast inside its autograd node
        cast = _cast_together(flat, cd)
    return [tuple(cast[5 * i:5 * i + 5]) for i in range(len(blocks_params))]


_VECTOR_PARAMS = (0, 1, 3, 5, 6, 7, 9, 11)  # the (D,) entries of transformer_block's params


def _contiguous_vectors(params):
    """params with its (D,) entries contiguous, as the kernels read them (the matmul weights go
    to torch's matmuls and to kernels that take any strides): params itself when they are."""
    for i in _VECTOR_PARAMS:
        t = params[i]
        if t is not None and not t.is_contiguous():
            return tuple(_contiguous(p) if j in _VECTOR_PARAMS else p
                         for j, p in enumerate(params))
    return params


def _block_by_op(x, branch, params, num_heads, scale, eps):
    n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b = params
    if branch is None:
        h = layer_norm(x, n1w, n1b, eps[0])
    else:
        x, h = add_layer_norm(branch[0], x, n1w, n1b, eps[0], branch[1])
    a = packed_attention(F.linear(h, qkv_w, qkv_b), num_heads, scale)
    # the output projection runs without its bias: the fused add + LayerNorm adds it
    x, h = add_layer_norm(F.linear(a, proj_w), x, n2w, n2b, eps[1], proj_b)
    return x, (F.linear(bias_gelu(F.linear(h, fc1_w), fc1_b), fc2_w), fc2_b)


def _block_node_dtype(x, branch, params, num_heads, tensors):
    """The matmul dtype the one-node block runs in, or None where the block runs op by op."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    if not (_plain_eager(tensors) and _uses_triton(x)) or x.dim() != 3:
        return None
    cd = _compute_dtype(x)
    C = x.shape[-1]
    if cd not in (torch.float32, torch.float16, torch.bfloat16) or C % num_heads \
            or C // num_heads not in _HEAD_DIMS:
        return None
    # float64 anywhere runs the reference op by op; so do bf16 matmul operands under Triton's
    # interpreter (its bf16 tl.dot is wrong): attention and the fused MLP matmuls use it
    if _has_fp64(*tensors) or _interpreted_bf16_dot(*tensors, compute_dtype=cd):
        return None
    if torch.promote_types(cd, x.dtype) != x.dtype or any(t.device != x.device for t in tensors):
        return None
    if branch is not None and torch.promote_types(branch[0].dtype, x.dtype) != x.dtype:
        return None
    # without autocast the matmuls take the weights as they are: one dtype throughout
    weights = (params[2], params[4], params[8], params[10])
    if torch.is_autocast_enabled(x.device.type) or all(w.dtype == cd for w in weights):
        return cd
    return None


# torch.mm(..., out_dtype=torch.float32) multiplies half-precision operands into an fp32 result
# (CUDA, torch >= 2.8): a weight gradient straight in its parameter's dtype, without the half
# result and the cast kernel after it (one launch and a pass over the gradient per weight, ~80 a
# ViT-B step), and without rounding it to the half dtype first. Where the overload is missing the
# first call says so and every call casts instead, as autocast's backward does.
_MM_FP32_OUT = {"available": True}


def _weight_grad(dy_rows, x_rows, weight_dtype):
    """dy_rows.T @ x_rows (the weight gradient of y = x @ weight.T) in weight_dtype."""
    if (weight_dtype == torch.float32 and dy_rows.dtype in (torch.float16, torch.bfloat16)
            and dy_rows.is_cuda and _MM_FP32_OUT["available"]):
        try:
            return torch.mm(dy_rows.t(), x_rows, out_dtype=torch.float32)
        except (RuntimeError, TypeError) as exc:
            _MM_FP32_OUT["available"] = False
            warnings.warn(f"torch.mm(out_dtype=torch.float32) is not available here ({exc}); "
                          f"weight gradients are computed in {dy_rows.dtype} and cast")
    return _cast(torch.mm(dy_rows.t(), x_rows), weight_dtype)


def _linear_grads(dy, x, weight, weight_dtype):
    """(dx, dweight) of y = x @ weight.T for x (..., in) and weight (out, in) as the matmul read
    it; dweight in the parameter's dtype, as autocast's cast backward gives it."""
    dx = torch.matmul(dy, weight)
    dw = _weight_grad(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), weight_dtype)
    return dx, dw


# The MLP's fc1 forward and fc2's input gradient each run one of three ways: cuBLAS's matmul,
# then the bias + GELU kernel ("split"), or one fastmae matmul with that work in its epilogue
# (kernels/gelu_matmul.py: no second kernel reads the matmul's output back), its tiles moved by
# threads ("fused") or, on sm_90 and newer where the operands can be described, by the TMA
# ("fused_tma"). Which is faster depends on the card and the shapes, so on a GPU each is timed
# on the first call of each shape and dtype, and the fastest is kept (_common.keep_faster;
# FASTMAE_MLP=fused|fused_tma|split forces one). The interpreter takes "fused" without timing;
# a GPU call during CUDA-graph capture that finds no choice kept for its shape takes "split".
_MLP_CHOICE = {}


def _mlp_way(key, ways, tma_ok):
    """The way ("fused", "fused_tma", "split") to run the MLP product of ``key``; ``ways`` maps
    each to a zero-argument callable (the TMA one used only where ``tma_ok``, which the key
    holds too: a call whose operands no descriptor describes, e.g. an expanded gradient, is
    not given a choice made among the ways with TMA's)."""
    if not tma_ok:
        if os.environ.get("FASTMAE_MLP", "").strip().lower() == "fused_tma":
            raise ValueError(f"FASTMAE_MLP=fused_tma: the TMA kernels need an sm_90 or newer GPU "
                             f"with 16-bit operands (or the interpreter), 16-byte aligned rows "
                             f"and FASTMAE_TMA not 0; not so for {key[:-1]} on {key[-1]}")
        ways = {k: v for k, v in ways.items() if k != "fused_tma"}
    default = "split" if key[-1].type == "cuda" else "fused"
    return _kernel("_common").keep_faster(_MLP_CHOICE, key, "FASTMAE_MLP", ways, default)


def _fc1_bias_gelu(h, w1, fc1_b, cd):
    """(f, g): f = h @ w1.T (fc1 without its bias) and g = gelu(f + fc1_b), both in cd."""
    *lead, K = h.shape
    N = w1.shape[0]
    h_rows = h.reshape(-1, K)
    gm = _kernel("gelu_matmul")

    def fused(tma=False):
        f, g = gm.matmul_bias_gelu(h_rows, w1, fc1_b, cd, tma=tma)
        return f.view(*lead, N), g.view(*lead, N)

    def split():
        f = F.linear(h, w1)
        return f, _bias_gelu_op.impl(f, fc1_b, cd)

    tma_ok = gm.tma_ok(h.device, cd, N, a=h_rows, w=w1)
    key = ("fc1", h_rows.shape[0], N, K, cd, tma_ok, h.device)
    way = _mlp_way(key, {"fused": fused, "fused_tma": lambda: fused(tma=True), "split": split},
                   tma_ok)
    return split() if way == "split" else fused(tma=way == "fused_tma")


def _fc2_gelu_grads(d_m, g, f, w2, fc1_b, fc2_w_dtype):
    """(df, d_fc1_b's partial sums (rows, hidden) fp32, for partial_sums.sum_partials, d_fc2_w)
    through m = gelu(f + fc1_b) @ w2.T (g the saved GELU output)."""
    d_rows = d_m.reshape(-1, d_m.shape[-1])
    d_fc2_w = _weight_grad(d_rows, g.reshape(-1, g.shape[-1]), fc2_w_dtype)
    f_rows = f.reshape(-1, f.shape[-1])
    gm = _kernel("gelu_matmul")

    def fused(tma=False):
        df, db_part = gm.matmul_gelu_bwd(d_rows, w2, f_rows, fc1_b, f.dtype, reduce=False,
                                         tma=tma)
        return df.view_as(f), db_part

    def split():
        df, db_part = _kernel("bias_gelu").bias_gelu_bwd(torch.mm(d_rows, w2), f_rows, fc1_b,
                                                         f.dtype, reduce=False)
        return df.view_as(f), db_part

    tma_ok = gm.tma_ok(f.device, f.dtype, w2.shape[1], dm=d_rows, w=w2, f=f_rows)
    key = ("fc2_dgrad", d_rows.shape[0], w2.shape[1], d_rows.shape[1], f.dtype, tma_ok,
           f.device)
    way = _mlp_way(key, {"fused": fused, "fused_tma": lambda: fused(tma=True), "split": split},
                   tma_ok)
    df, d_fc1_b_part = split() if way == "split" else fused(tma=way == "fused_tma")
    return df, d_fc1_b_part, d_fc2_w


def _norm_grads_unreduced(dy, s, weight, mean, rstd, ds, ds_dtype, dx_dtype, branch_bias_grad):
    """The block's LayerNorm backward: (dsum = the gradient of the norm's input s, plus ds, in
    ds_dtype; the same in dx_dtype (dsum itself where the dtypes match); the weight, bias (and
    branch bias) gradients' partial sums (2 or 3, programs, D) fp32, for
    partial_sums.sum_partials)."""
    D = s.shape[-1]
    two = dx_dtype != ds_dtype
    out = _kernel("layer_norm").layer_norm_bwd(
        dy.reshape(-1, D), _rows(s), weight, mean, rstd,
        ds=None if ds is None else ds.reshape(-1, D), dx_dtype=ds_dtype,
        dx2_dtype=dx_dtype if two else None, branch_bias_grad=branch_bias_grad, reduce=False)
    dsum = out[0].view_as(s)
    return dsum, out[2].view_as(s) if two else dsum, out[1]


class _Block(torch.autograd.Function):
    """transformer_block as one autograd node: forward and backward call the ops'
    implementations and gradient formulas directly, and torch's matmuls."""

    @staticmethod
    def forward(ctx, x, branch, branch_bias, n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n2w, n2b,
                fc1_w, fc1_b, fc2_w, fc2_b, config):
        eps1, eps2, num_heads, scale, cd, cast_weights = config
        if branch is None:
            s1 = x
            h1, mean1, rstd1 = _layer_norm_op.impl(x, n1w, n1b, eps1, cd)
        else:
            s1, h1, mean1, rstd1 = _add_layer_norm_op.impl(branch, x, n1w, n1b, eps1, cd,
                                                           branch_bias)
        # the weights (and qkv bias) in the matmul dtype, cast once (autocast's casts, kept for
        # the backward), in one launch, or already cast with the other blocks' (cast_block_weights)
        wq, wp, w1, w2, bq = cast_weights or _cast_together((qkv_w, proj_w, fc1_w, fc2_w, qkv_b),
                                                            cd)
        qkv = F.linear(h1, wq, bq)
        a, lse = _packed_attention_op.impl(qkv, num_heads, scale)
        s2, h2, mean2, rstd2 = _add_layer_norm_op.impl(F.linear(a, wp), s1, n2w, n2b, eps2, cd,
                                                       proj_b)
        f, g = _fc1_bias_gelu(h2, w1, fc1_b, cd)
        m = F.linear(g, w2)
        ctx.save_for_backward(s1, h1, qkv, a, lse, s2, h2, f, g, wq, wp, w1, w2, n1w, n2w, fc1_b,
                              mean1, rstd1, mean2, rstd2)
        ctx.config = config[:5]
        ctx.dtypes = tuple(None if t is None else t.dtype
                           for t in (x, branch, branch_bias, n1w, n1b, qkv_w, qkv_b, proj_w,
                                     proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b))
        return s2, m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_s2, d_m):
        (s1, h1, qkv, a, lse, s2, h2, f, g, wq, wp, w1, w2, n1w, n2w, fc1_b,
         mean1, rstd1, mean2, rstd2) = ctx.saved_tensors
        _, _, num_heads, scale, cd = ctx.config
        (x_dt, branch_dt, bb_dt, n1w_dt, n1b_dt, qkv_w_dt, qkv_b_dt, proj_w_dt, proj_b_dt,
         n2w_dt, n2b_dt, fc1_w_dt, _, fc2_w_dt, _) = ctx.dtypes
        # the bias and norm gradients come from the kernels' per-program partial sums, all
        # four buffers reduced by one launch at the end (partial_sums.sum_partials)
        df, p_fc1_b, d_fc2_w = _fc2_gelu_grads(d_m, g, f, w2, fc1_b, fc2_w_dt)
        d_fc2_b = None  # fc2's bias is added (and differentiated) by the next LayerNorm
        dh2, d_fc1_w = _linear_grads(df, h2, w1, fc1_w_dt)
        ds1, do, p_norm2 = _norm_grads_unreduced(dh2, s2, n2w, mean2, rstd2, d_s2, s1.dtype, cd,
                                                 True)
        da, d_proj_w = _linear_grads(do, a, wp, proj_w_dt)
        dqkv, p_qkv_b = _packed_attention_grads(da, qkv, a, lse, num_heads, scale,
                                                bias_grad=qkv_b_dt is not None, reduce=False)
        dh1, d_qkv_w = _linear_grads(dqkv, h1, wq, qkv_w_dt)
        if branch_dt is None:  # the first block: a plain LayerNorm of x, ds1 added to its dx
            dx, _, p_norm1 = _norm_grads_unreduced(dh1, s1, n1w, mean1, rstd1, ds1, x_dt, x_dt,
                                                   False)
            d_branch = None
        else:
            # the previous block's MLP branch: its gradient in its dtype, its bias's from here
            dx, d_branch, p_norm1 = _norm_grads_unreduced(dh1, s1, n1w, mean1, rstd1, ds1, x_dt,
                                                          branch_dt, True)
        parts = [p_fc1_b, p_norm2, p_norm1] + ([] if p_qkv_b is None else [p_qkv_b])
        sums = _kernel("partial_sums").sum_partials(parts)  # each buffer's sections, in order
        d_fc1_b, d_n2w, d_n2b, d_proj_b, d_n1w, d_n1b = (
            _cast(t, dt) for t, dt in zip(sums, (fc1_b.dtype, n2w_dt, n2b_dt, proj_b_dt, n1w_dt,
                                                 n1b_dt)))
        rest = sums[6:]
        d_bb = None if branch_dt is None else _cast(rest[0], bb_dt)
        d_qkv_b = None if p_qkv_b is None else _cast(rest[-1], qkv_b_dt)
        return (dx, d_branch, d_bb, d_n1w, d_n1b, d_qkv_w, d_qkv_b, d_proj_w, d_proj_b, d_n2w,
                d_n2b, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b, None)
