"""Bad input to the public ops gets a clear error naming the argument, before any kernel runs."""
import pytest
import torch

import fastmae
from fastmae import ops
from fastmae.testing import attention_case, loss_case, unshuffle_case


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
