"""The smallest kernel: y = x * alpha. It proves the harness end to end (the interpreter on a
CPU machine, the compiler on a GPU) and scales incoming gradients where an op needs it."""
import torch
import triton
import triton.language as tl

from ._common import cdiv, launch


@triton.jit
def _scale_kernel(
    x_ptr,  # (numel,) any float dtype, contiguous
    y_ptr,  # (numel,) any float dtype (the caller's out_dtype)
    alpha_ptr,  # (1,) fp32: a tensor, so a gradient scale needs no host sync
    numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < numel
    x = tl.load(x_ptr + offs, mask=in_bounds).to(tl.float32)
    alpha = tl.load(alpha_ptr)
    tl.store(y_ptr + offs, (x * alpha).to(y_ptr.dtype.element_ty), mask=in_bounds)


def scale(x: torch.Tensor, alpha: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """x * alpha for a 1-element fp32 tensor alpha, computed in fp32, stored in out_dtype (x's
    dtype unless given): one rounding, after the product."""
    x = x.contiguous()
    y = torch.empty_like(x, dtype=out_dtype or x.dtype)
    alpha = alpha.reshape(1).to(device=x.device, dtype=torch.float32)
    numel = x.numel()
    if numel:
        block = 1024
        launch(_scale_kernel, (cdiv(numel, block),), x, y, alpha, numel, BLOCK=block)
    return y
