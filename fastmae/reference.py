"""The eager PyTorch reference of every fastmae op: the official MAE semantics, written to be read.

This module is the specification the kernels are tested against and the "torch" backend.
It knows nothing about kernels. Shapes: N images, L patches per image, D channels,
p patch size, C image channels, keep = int(L * (1 - mask_ratio)) visible patches.
"""
import torch
import torch.nn.functional as F

NORM_PIX_EPS = 1e-6


def grid_size(img_h, img_w, patch_size):
    return img_h // patch_size, img_w // patch_size


def patchify(imgs, patch_size):
    """(N, C, H, W) -> (N, L, p*p*C); a patch's values in (p, q, c) order, channel fastest."""
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x, patch_size, grid_hw, in_chans):
    """(N, L, p*p*C) -> (N, C, h*p, w*p), the inverse of ``patchify``."""
    p = patch_size
    h, w = grid_hw
    x = x.reshape(x.shape[0], h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], in_chans, h * p, w * p)


def keep_count(L, mask_ratio):
    return int(L * (1 - mask_ratio))


def masking_indices(noise, len_keep):
    """noise (N, L) -> ids_keep (N, keep), mask (N, L) fp32 with 0 = kept, ids_restore (N, L).

    The ``len_keep`` smallest-noise patches are kept; ids_restore = argsort(argsort(noise))."""
    N, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([N, L], device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, mask, ids_restore


def gather_tokens(x, ids_keep):
    """x (N, L, D), ids_keep (N, keep) -> (N, keep, D)."""
    return torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def random_masking(x, mask_ratio, noise):
    """Official ``random_masking`` with the noise given: -> x_masked, mask, ids_restore."""
    N, L, D = x.shape
    ids_keep, mask, ids_restore = masking_indices(noise, keep_count(L, mask_ratio))
    return gather_tokens(x, ids_keep), mask, ids_restore


def patch_embed(imgs, weight, bias):
    """Official PatchEmbed: a stride-p convolution, flattened to (N, L, D)."""
    p = weight.shape[-1]
    return F.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2)


def patch_embed_visible(imgs, weight, bias, pos_embed, ids_keep):
    """gather(patch_embed(imgs) + pos_embed[:, 1:], ids_keep) -> (N, keep, D)."""
    x = patch_embed(imgs, weight, bias) + pos_embed[:, 1:, :]
    return gather_tokens(x, ids_keep)


def unshuffle(x, mask_token, ids_restore, pos_embed):
    """Official forward_decoder's token work: append mask tokens, unshuffle, re-attach cls, add
    positions. x (N, 1 + keep, D), mask_token (1, 1, D), ids_restore (N, L),
    pos_embed (1, 1 + L, D) -> (N, 1 + L, D)."""
    N, _, D = x.shape
    mask_tokens = mask_token.repeat(N, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, D))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


def masked_mse_loss(imgs, pred, mask, patch_size, norm_pix=True):
    """Official forward_loss: per-patch MSE against the (optionally normalized) patchified image,
    averaged over removed patches (mask == 1)."""
    return patch_mse_loss(patchify(imgs, patch_size), pred, mask, norm_pix)


def patch_mse_loss(target, pred, mask, norm_pix=True):
    """Official forward_loss from its target on: target and pred (N, L, K), mask (N, L)."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as official
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v over (B, H, N, d), non-causal; scale defaults to d ** -0.5."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps, branch_bias=None):
    """The pre-norm block's hand-off: s = residual + x (x + branch_bias: the output of a linear
    layer with its bias); returns (s, layer_norm(s))."""
    s = residual + (x if branch_bias is None else x + branch_bias)
    return s, layer_norm(s, weight, bias, eps)


def bias_gelu(x, bias):
    """Exact (erf) GELU of x + bias, as nn.GELU() in the official Mlp."""
    return F.gelu(x + bias)
