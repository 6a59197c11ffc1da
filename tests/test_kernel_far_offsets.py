"""Element offsets past 2**31: every kernel that reads an activation-sized tensor (or writes one
it is handed) reaches it through a view whose first dimension (for the token copies, also a row's
elements) steps past 2**31 elements, and gives the bits it gives on a compact copy of the same
values. An offset computed in int32 wraps
there (by 2**32) and reads other memory.

The views live in allocations the OS commits only where they are touched: a few pages of 8 GiB
of address space each, on this CPU. Before each view the allocation holds another 2**31
elements, so that a wrapped offset reads the allocation's own wrong values (and fails the
comparison) instead of faulting. Index tensors (ids_keep, ids_restore, noise: N x L) and the
per-program partial-sum buffers cannot reach 2**31 elements in any MAE and are left compact, as
are the outputs a launcher allocates itself (a far one would need real memory); kernels/scale.py
takes contiguous tensors only, so no view reaches its far offsets."""
import pytest
import torch

from fastmae.kernels import (attention, bias_gelu, gelu_matmul, layer_norm, masking, mse_loss,
                             patch_embed, unshuffle)
from fastmae.testing import poison_

pytestmark = pytest.mark.interpreter(
    covered_by="none: the interpreter types integer arguments as the compiler does (int64 from "
               "2**31) and wraps int32 arithmetic as the GPU does, so these addresses are the "
               "GPU's; on a GPU each view would take 4 to 8 GiB of its memory")

_WRAP = 2 ** 31  # elements: an int32 offset wraps here


def _far(t, dim=0):
    """A copy of ``t`` whose dimension ``dim`` (of size >= 3) steps so far that its last index
    starts past 2**31 elements while the step itself fits in int32 (so that only a product
    computed in int32 wraps), the other dimensions contiguous among themselves within a step,
    behind 2**31 elements of the same allocation (see the module's docstring)."""
    n = t.shape[dim]
    assert n >= 3
    rest = t.select(dim, 0).contiguous()
    step = -(-max(-(-_WRAP // (n - 1)), rest.numel()) // 64) * 64
    assert step < _WRAP <= step * (n - 1)
    strides = list(rest.stride())
    strides.insert(dim % t.dim(), step)
    size = _WRAP + (n - 1) * step + rest.numel()
    try:
        storage = torch.empty(size, dtype=t.dtype, device=t.device)
    except RuntimeError as e:  # a machine that commits memory when it is allocated
        pytest.skip(f"{size * t.element_size() / 2**30:.0f} GiB of address space refused: {e}")
    return storage.as_strided(t.shape, strides, _WRAP).copy_(t)


def _far_last(t):
    """_far along the last dimension: a huge stride between a row's elements."""
    return _far(t, -1)


def _far_poisoned(t):
    """An output buffer shaped like ``t``, far (as _far) and NaN-filled."""
    return poison_(_far(t))


def _compact(t):
    return t


def _compact_poisoned(t):
    return poison_(t.clone())


# Each case builds its inputs from a fixed seed, passes the tensors named in the test through
# ``far`` (the far views, or the compact tensors themselves) and returns its outputs.

def _randn(g, *shape, dtype=torch.float16, scale=1.0):
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def _masking(far, out, g):
    x = far(_randn(g, 3, 5, 24))
    ids_keep = torch.tensor([[4, 0], [2, 3], [1, 4]])
    gathered = masking.gather_tokens(x, ids_keep)
    ids_restore = torch.tensor([[1, 4, 2, 3, 0], [3, 2, 0, 1, 4], [4, 0, 2, 1, 3]])
    scattered = masking.scatter_tokens(far(_randn(g, 3, 2, 24)), ids_restore, 2)
    return gathered, scattered


def _unshuffle(far, out, g):
    ids_restore = torch.tensor([[1, 4, 2, 3, 0], [3, 2, 0, 1, 4], [4, 0, 2, 1, 3]])
    x, mask_token, pos = _randn(g, 3, 3, 24), _randn(g, 1, 1, 24), _randn(g, 1, 6, 24)
    y = unshuffle.unshuffle_fwd(far(x), mask_token, ids_restore, pos)
    dx, dmask = unshuffle.unshuffle_bwd(far(_randn(g, 3, 6, 24)), ids_restore, 2,
                                        torch.float16, torch.float16)
    return y, dx, dmask


def _layer_norm(far, out, g):
    x, residual = _randn(g, 3, 40, scale=2.0), _randn(g, 3, 40)
    weight, bias, branch_bias = (_randn(g, 40, dtype=torch.float32) for _ in range(3))
    y, s, mean, rstd = layer_norm.layer_norm_fwd(far(x), weight, bias, 1e-5, torch.float16,
                                                 residual=far(residual), branch_bias=branch_bias)
    dy, ds = _randn(g, 3, 40), _randn(g, 3, 40)
    dx, dwb = layer_norm.layer_norm_bwd(far(dy), far(s), weight, mean, rstd, ds=far(ds),
                                        branch_bias_grad=True)
    return y, s, mean, rstd, dx, dwb


def _bias_gelu(far, out, g):
    x, bias = _randn(g, 3, 40), _randn(g, 40, dtype=torch.float32)
    x = far(x)
    y = bias_gelu.bias_gelu_fwd(x, bias, torch.float16)
    dx, dbias = bias_gelu.bias_gelu_bwd(far(_randn(g, 3, 40)), x, bias)
    return y, dx, dbias


def _mse_loss(far, out, g):
    imgs, pred = _randn(g, 3, 2, 8, 12), _randn(g, 3, 6, 32)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 1, 0]]).float()
    return mse_loss.masked_mse_fwd(far(imgs), far(pred), mask, 4, True, True)


def _patch_embed(far, out, g):
    imgs = far(_randn(g, 3, 2, 8, 12))
    weight, bias = _randn(g, 24, 2, 4, 4, scale=0.3), _randn(g, 24, dtype=torch.float32)
    pos = _randn(g, 1, 7, 24, dtype=torch.float32)
    ids_keep = torch.tensor([[4], [0], [5]])
    y = patch_embed.patch_embed_visible_fwd(imgs, weight, bias, pos, ids_keep,
                                            torch.float32, torch.float16)
    patches = patch_embed.gather_visible_patches(imgs, ids_keep, 4, torch.float16)
    grads = patch_embed.patch_embed_visible_bwd(far(_randn(g, 3, 1, 24)), imgs, weight,
                                                ids_keep, need_imgs_grad=True)
    return (y, patches) + grads


def _gelu_matmul(far, out, g, ways=None):
    """The pointer kernels, and the TMA ones where they apply (or the ``ways`` given)."""
    a, w1 = _randn(g, 3, 16), _randn(g, 40, 16, scale=0.25)
    bias = _randn(g, 40, dtype=torch.float32)
    dm, w2 = _randn(g, 3, 16), _randn(g, 16, 40, scale=0.25)
    outs = []
    if ways is None:
        ways = (False, True) if gelu_matmul.tma_applies(a.device, a.dtype) else (False,)
    for tma in ways:
        f, act = gelu_matmul.matmul_bias_gelu(far(a), w1, bias, torch.float16, tma=tma)
        df, dbias = gelu_matmul.matmul_gelu_bwd(far(dm), w2, far(f), bias, torch.float16, tma=tma)
        outs += [f, act, df, dbias]
    return tuple(outs)


def _attention(far, out, g):
    """The forward and the backward way FASTMAE_ATTN_BWD names."""
    B, N, H, d = 3, 50, 2, 32
    qkv = far(_randn(g, B, N, 3, H, d))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = out(_randn(g, B, N, H, d)).transpose(1, 2)
    o, lse = attention.attention_fwd(q, k, v, d ** -0.5, out=o)
    do = far(_randn(g, B, N, H, d)).transpose(1, 2)
    grads = out(_randn(g, B, N, 3, H, d)).permute(2, 0, 3, 1, 4).unbind(0)
    dsum = poison_(torch.empty(attention.grad_sum_shape(B, H, N, d)))
    attention.attention_bwd(do, q, k, v, o, lse, d ** -0.5, *grads, dsum=dsum)
    return (o, lse) + tuple(grads) + (dsum.sum((0, 1)),)


_CASES = {"masking": _masking, "unshuffle": _unshuffle, "layer_norm": _layer_norm,
          "bias_gelu": _bias_gelu, "mse_loss": _mse_loss, "patch_embed": _patch_embed,
          "gelu_matmul": _gelu_matmul,
          "gelu_matmul_tma_warp_specialized": lambda *a: _gelu_matmul(*a, ways=(True,)),
          "attention_fused": _attention,
          "attention_fused_q": _attention, "attention_split": _attention}


@pytest.mark.parametrize("name", list(_CASES))
def test_far_views_give_the_compact_bits(name, monkeypatch):
    if name.startswith("attention_"):
        monkeypatch.setenv("FASTMAE_ATTN_BWD", name[len("attention_"):])
    if name == "gelu_matmul_tma_warp_specialized":  # pointer epilogues, the backward's transposed
        from test_kernel_gelu_matmul import _tma_config

        _tma_config(monkeypatch, 1, warp_specialize=True)
    _compare(_CASES[name], _far)


@pytest.mark.parametrize("name", ["masking", "unshuffle"])
def test_views_far_along_a_row_give_the_compact_bits(name):
    """The token copies take any strides, a row's too: column offsets in int64 as well."""
    _compare(_CASES[name], _far_last)


def _compare(case, far):
    want = case(_compact, _compact_poisoned, torch.Generator().manual_seed(7))
    got = case(far, _far_poisoned, torch.Generator().manual_seed(7))
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert not b.isnan().any(), i
        assert torch.equal(a, b), f"output {i}: {(a.float() - b.float()).abs().max().item()}"
