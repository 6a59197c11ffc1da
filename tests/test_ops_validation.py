"""Bad input to the public ops gets a clear error naming the argument, before any kernel runs."""
import pytest
import torch

import fastmae
from fastmae import ops
from fastmae.testing import attention_case, loss_case, patch_embed_case, unshuffle_case


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    with fastmae.use_backend(request.param):
        yield request.param


def test_random_masking_checks(backend):
    x = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="x must be 3-D"):
        ops.random_masking(x[0], 0.5)
    with pytest.raises(TypeError, match="x must be a floating"):
        ops.random_masking(x.long(), 0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.random_masking(x, 1.5)
    with pytest.raises(TypeError, match="mask_ratio"):
        ops.random_masking(x, "0.5")
    with pytest.raises(ValueError, match="noise must have shape"):
        ops.random_masking(x, 0.5, noise=torch.rand(2, 15))


def test_unshuffle_checks(backend):
    case = unshuffle_case(2, 16, 8)
    bad = dict(case, ids_restore=case["ids_restore"].int())
    with pytest.raises(TypeError, match="ids_restore must be an int64"):
        ops.unshuffle(**bad)
    with pytest.raises(ValueError, match="mask_token must have shape"):
        ops.unshuffle(**dict(case, mask_token=torch.randn(1, 1, 9)))
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        ops.unshuffle(**dict(case, pos_embed=torch.randn(1, 16, 8)))
    with pytest.raises(ValueError, match="x must be"):
        ops.unshuffle(**dict(case, x=torch.randn(2, 1, 8)))
    with pytest.raises(ValueError, match="on meta"):
        ops.unshuffle(**dict(case, mask_token=case["mask_token"].to("meta")))


def test_loss_checks(backend):
    case = loss_case(2, 3, 16, 16, 4)
    with pytest.raises(ValueError, match="pred must have shape"):
        ops.masked_mse_loss(**dict(case, pred=case["pred"][:, :-1]))
    with pytest.raises(ValueError, match="mask must have shape"):
        ops.masked_mse_loss(**dict(case, mask=case["mask"][:, :-1]))
    with pytest.raises(ValueError, match="divisible by the patch size"):
        ops.masked_mse_loss(**dict(case, patch_size=5))
    with pytest.raises(ValueError, match="imgs must be 4-D"):
        ops.masked_mse_loss(**dict(case, imgs=case["imgs"][0]))


def test_attention_checks(backend):
    case = attention_case(1, 2, 5, 32)
    with pytest.raises(ValueError, match="one shape"):
        ops.attention(case["q"], case["k"][:, :, :4], case["v"])
    with pytest.raises(TypeError, match="one dtype"):
        ops.attention(case["q"], case["k"].double(), case["v"])
    with pytest.raises(ValueError, match="q must be 4-D"):
        ops.attention(case["q"][0], case["k"][0], case["v"][0])


def test_norm_checks(backend):
    x = torch.randn(4, 8)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.layer_norm(x, torch.ones(7), b, 1e-6)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, w, b, 0.0)
    with pytest.raises(ValueError, match="residual must have"):
        ops.add_layer_norm(x, torch.randn(4, 9), w, b, 1e-6)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bias_gelu(x, torch.zeros(9))


# --------------------------------------------------- found by a mutation audit of ops.py (2)

def test_norm_checks_name_the_bad_parameter(backend):
    """The LayerNorm checks name the parameter of the wrong shape (bias, branch_bias), not
    another one; a branch bias of the wrong length is refused before a kernel reads past it."""
    x = torch.randn(3, 5, 8)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"^bias must have shape \(8,\)"):
        ops.layer_norm(x, w, torch.zeros(7), 1e-6)
    with pytest.raises(ValueError, match=r"^branch_bias must have shape \(8,\)"):
        ops.add_layer_norm(x, torch.randn(3, 5, 8), w, b, 1e-6, branch_bias=torch.zeros(9))


def test_attention_checks_every_operand(backend):
    """v is checked as q and k are: its shape and its dtype."""
    case = attention_case(1, 2, 5, 32)
    with pytest.raises(ValueError, match="one shape"):
        ops.attention(case["q"], case["k"], case["v"][:, :, :4])
    with pytest.raises(TypeError, match="one dtype"):
        ops.attention(case["q"], case["k"], case["v"].half())


def test_packed_attention_checks_the_head_split(backend):
    with pytest.raises(ValueError, match="num_heads=4"):
        ops.packed_attention(torch.randn(1, 3, 3 * 2 * 32 + 3), 4)


def test_patch_embed_checks(backend):
    """patch_embed_visible names a bias or a position table of the wrong shape."""
    case = patch_embed_case(2, 3, 8, 8, 4, 16)  # L = 4, D = 16
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        ops.patch_embed_visible(**dict(case, bias=torch.zeros(15)))
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 5, 16\)"):
        ops.patch_embed_visible(**dict(case, pos_embed=torch.zeros(1, 4, 16)))


def test_loss_and_unshuffle_reject_what_official_would_not_take(backend):
    """A bool patch size, and more tokens than patches for unshuffle, raise naming them."""
    case = loss_case(2, 3, 16, 16, 4)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        ops.masked_mse_loss(case["imgs"], case["pred"], case["mask"], True)
    un = unshuffle_case(2, 6, 8)
    with pytest.raises(ValueError, match="x must be"):
        ops.unshuffle(**dict(un, x=torch.randn(2, 8, 8)))  # 1 + 7 tokens, L = 6


def test_bias_gelu_checks_the_bias_device(backend):
    with pytest.raises(ValueError, match="bias is on meta"):
        ops.bias_gelu(torch.randn(3, 8), torch.zeros(8, device="meta"))
