"""The MAE model with the official API (facebookresearch/mae ``models_mae.py``): constructor,
factories, methods, ``forward`` and ``state_dict`` keys.

Under the "torch" backend every method runs the official algorithm step by step. Under the
"triton" backend the same weights run fastmae's fused path: masking indices first, then only the
kept patches embedded straight from the image, blocks whose LayerNorm, residual adds, bias +
GELU and attention are fused kernels (matmuls stay with torch), a one-pass decoder unshuffle and
a one-pass loss. All of it goes through ``fastmae.ops``.
"""
import math
import numbers
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.module as _nn_module

from fastmae import ops
from fastmae.pos_embed import sincos_2d


def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return tuple(v)
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


_MISSING = object()


class _Derived:
    """A read-only view of the model's own state that an instance may still set, as any plain
    attribute (a non-data descriptor: an instance's own value, once set, is the one read)."""

    def __init__(self, read):
        self.read = read

    def __get__(self, obj, owner=None):
        return self if obj is None else self.read(obj)


def _member(module, name):
    """``module.<name>`` for a parameter or submodule, read from the module's own tables. The
    plain attribute read misses the instance dict first, raising (and formatting) an
    AttributeError inside Python before nn.Module.__getattr__ finds the name in those tables,
    24 reads a block a step (benches/host_cost.py --call-costs times both ways). A name the
    tables lack (a parametrization's property, say) is read the plain way."""
    found = module._parameters.get(name, _MISSING)
    if found is _MISSING:
        found = module._modules.get(name, _MISSING)
    return getattr(module, name) if found is _MISSING else found


def _fusable_norm(norm):
    return (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine
            and _member(norm, "bias") is not None)


def _unhooked(module):
    """No forward or backward hook of the module's own."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks():
    """A module hook registered for every module (torch.nn.modules.module.register_module_*)."""
    g = _nn_module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


def _as_built(module, kind):
    """``module`` is exactly a ``kind`` and unhooked: running its computation from its parameter
    tables (the fused path) does what calling it would. A subclass (FSDP2's, a LoRA layer's), a
    wrapper (activation checkpointing) or a hook is left to be called."""
    return type(module) is kind and _unhooked(module)


def _exact_gelu(act):
    return _as_built(act, nn.GELU) and act.approximate == "none"


class PatchEmbed(nn.Module):
    """Image to patch embedding: a stride-p convolution (keys ``proj.weight``, ``proj.bias``)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = _pair(img_size, "img_size")
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        # through self.proj, as timm's: its hooks run, and a replaced proj is what computes
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (keys ``qkv.*``, ``proj.*``), as timm's."""

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        # q, k, v are read as views of the packed projection output; the result is laid out
        # (B, N, H * d), so the output projection reads it without a copy
        return self.proj(ops.packed_attention(self.qkv(x), self.num_heads, self.scale))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (keys ``fc1.*``, ``fc2.*``)."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        if (ops.backend_for(x) == "triton" and _as_built(self.fc1, nn.Linear)
                and _exact_gelu(self.act) and not _global_hooks()):
            return self.fc2(ops.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(.)) (timm's Block keys)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def fusable(self):
        """Whether ``forward_fused`` computes what calling the block's submodules would: each is
        the kind the block built, unhooked (no module hook is global either), its LayerNorms
        with weight and bias and its GELU exact."""
        return self._fused_args() is not None

    def forward(self, x):
        args = self._fused_args() if ops.backend_for(x) == "triton" else None
        if args is not None:
            x, (out, out_bias) = ops.transformer_block(x, None, *args)
            return x + (out if out_bias is None else out + out_bias)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_fused(self, x, branch=None):
        """One block on the residual stream ``x`` with the previous block's MLP output ``branch``
        = (fc2 output without its bias, fc2.bias) not yet added: that add is fused into this
        block's first LayerNorm, and this block's own MLP output is handed on the same way.
        The attention and MLP output projections run without their biases: each bias is added in
        the fused residual add + LayerNorm, whose backward produces its gradient in the same
        pass. Returns (x, branch); the caller adds the last branch (``ops.transformer_block``).
        Only for a block that is ``fusable()``: it reads the parameters, calling no submodule."""
        args = self._fused_args()
        if args is None:
            raise ValueError("forward_fused: this block's submodules are replaced or hooked, or "
                             "its norms are not affine LayerNorms: call the block instead")
        return ops.transformer_block(x, branch, *args)

    def _fused_args(self):
        """ops.transformer_block's (params, num_heads, scale, eps) for this block, read with
        _member; None unless the block is ``fusable()``."""
        m = _member
        attn, mlp, norm1, norm2 = m(self, "attn"), m(self, "mlp"), m(self, "norm1"), m(self, "norm2")
        if not (_as_built(attn, Attention) and _as_built(mlp, Mlp) and _as_built(norm1, nn.LayerNorm)
                and _as_built(norm2, nn.LayerNorm) and _fusable_norm(norm1)
                and _fusable_norm(norm2)):
            return None
        qkv, proj, fc1, fc2 = m(attn, "qkv"), m(attn, "proj"), m(mlp, "fc1"), m(mlp, "fc2")
        if not (_as_built(qkv, nn.Linear) and _as_built(proj, nn.Linear)
                and _as_built(fc1, nn.Linear) and _as_built(fc2, nn.Linear)
                and _exact_gelu(m(mlp, "act")) and not _global_hooks()):
            return None
        params = (m(norm1, "weight"), m(norm1, "bias"), m(qkv, "weight"), m(qkv, "bias"),
                  m(proj, "weight"), m(proj, "bias"), m(norm2, "weight"), m(norm2, "bias"),
                  m(fc1, "weight"), m(fc1, "bias"), m(fc2, "weight"), m(fc2, "bias"))
        return params, attn.num_heads, attn.scale, (norm1.eps, norm2.eps)


def _stack_args(blocks, norm):
    """Every block's ``_fused_args()`` where the stack may run as fused blocks, reading their
    parameters without calling them: each block a plain, unhooked, fusable Block and the norm a
    plain affine LayerNorm. Else None: a block wrapped (activation checkpointing), sharded by
    FSDP2 (whose hooks gather its parameters when it is called), subclassed or hooked is called."""
    if not (_as_built(norm, nn.LayerNorm) and _fusable_norm(norm)):
        return None
    args = []
    for blk in blocks:
        a = blk._fused_args() if _as_built(blk, Block) else None
        if a is None:
            return None
        args.append(a)
    return args


def _run_blocks(blocks, norm, x):
    """blocks then the final norm; under the "triton" backend each residual add is fused into the
    LayerNorm that follows it."""
    args = _stack_args(blocks, norm) if ops.backend_for(x) == "triton" else None
    if args is not None:
        # each block's arguments read once: for the weight casts, under autocast every block's
        # at once (ops.cast_block_weights), and for the block (as Block.forward_fused passes them)
        casts = ops.cast_block_weights(x, [params for params, *_ in args])
        branch = None
        for (params, num_heads, scale, eps), cast in zip(args, casts):
            x, branch = ops.transformer_block(x, branch, params, num_heads, scale, eps, cast)
        if branch is None:
            return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
        return ops.add_layer_norm(branch[0], x, norm.weight, norm.bias, norm.eps, branch[1])[1]
    for blk in blocks:
        x = blk(x)
    return norm(x)


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone (official signature and defaults).

    ``img_size`` may be an int or an (H, W) pair; ``in_chans`` may be any positive number."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        img_hw = _pair(img_size, "img_size")
        if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) \
                or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        patch_size = int(patch_size)
        for dim, heads, names in ((embed_dim, num_heads, "embed_dim and num_heads"),
                                  (decoder_embed_dim, decoder_num_heads,
                                   "decoder_embed_dim and decoder_num_heads")):
            if heads < 1 or dim % heads:
                raise ValueError(f"{names}: {dim} must be divisible by {heads} heads")
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"img_size {img_hw} must be divisible by patch_size {patch_size}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be positive, got {in_chans}")

        # encoder
        self.patch_embed = PatchEmbed(img_hw, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    # ------------------------------------------------------------------ init (official)
    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        pos = sincos_2d(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        dec = sincos_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec).float().unsqueeze(0))

        # patch_embed like nn.Linear (not nn.Conv2d)
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ official methods
    # conveniences the official model lacks; an instance (a subclass's __init__, say) may set its
    # own, which fastmae does not read: it reads patch_embed's, as the official methods do
    patch_size = _Derived(lambda self: self._patch())
    in_chans = _Derived(lambda self: self._chans())

    def _patch(self):
        return self.patch_embed.patch_size[0]

    def _chans(self):
        return self.patch_embed.proj.in_channels

    def patchify(self, imgs):
        """imgs (N, C, H, W) -> (N, L, p**2 * C): any H and W the patch size divides, as
        official (which patchifies images of other sizes than the model's too)."""
        self._check_imgs(imgs, model_size=False)
        return ops.patchify(imgs, self._patch())

    def unpatchify(self, x):
        """(N, L, p**2 * C) -> imgs (N, C, H, W), on the model's patch grid when L is its patch
        count, else on a square grid of L patches (as official, which takes h = w = sqrt(L))."""
        grid = self.patch_embed.grid_size
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] != grid[0] * grid[1]:
            side = math.isqrt(x.shape[1])
            if side * side == x.shape[1]:
                grid = (side, side)
        return ops.unpatchify(x, self._patch(), grid, self._chans())

    def random_masking(self, x, mask_ratio, noise=None):
        """Per-sample random masking by argsort of noise (N, L) -> x_masked, mask, ids_restore."""
        return ops.random_masking(x, mask_ratio, noise)

    def forward_encoder(self, x, mask_ratio, noise=None):
        imgs = x
        self._check_imgs(imgs)
        N, L = imgs.shape[0], self.patch_embed.num_patches
        len_keep = ops.keep_count(L, mask_ratio)
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (N, L):
                got = (tuple(noise.shape) if isinstance(noise, torch.Tensor)
                       else type(noise).__name__)
                raise ValueError(f"noise must be a tensor of shape (N, L) = ({N}, {L}), got {got}")
            if noise.device != imgs.device:
                raise ValueError(f"noise is on {noise.device} but imgs are on {imgs.device}")

        if ops.backend_for(imgs) == "triton" and self._embeds_as_built():
            # mask first, then embed only the kept patches straight from the image (the noise
            # drawn as official random_masking draws it: no random number is drawn in between)
            if noise is None:
                noise = torch.rand(N, L, device=imgs.device)
            ids_keep, mask, ids_restore = ops.masking_indices(noise, len_keep)
            x = ops.patch_embed_visible(imgs, self.patch_embed.proj.weight,
                                        self.patch_embed.proj.bias, self.pos_embed, ids_keep)
        else:
            x = self.patch_embed(imgs)
            x = x + self.pos_embed[:, 1:, :]
            # noise passed only when given: an override with the official signature
            # random_masking(self, x, mask_ratio) is called as official calls it
            x, mask, ids_restore = (self.random_masking(x, mask_ratio) if noise is None
                                    else self.random_masking(x, mask_ratio, noise))

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens.to(x.dtype), x), dim=1)
        x = _run_blocks(self.blocks, self.norm, x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        x = ops.unshuffle(x, self.mask_token, ids_restore, self.decoder_pos_embed)
        x = _run_blocks(self.decoder_blocks, self.decoder_norm, x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]  # remove cls token

    def forward_loss(self, imgs, pred, mask):
        """imgs (N, C, H, W), pred (N, L, p*p*C), mask (N, L) with 0 = keep, 1 = remove. The
        target is ``self.patchify(imgs)``, as official: an overridden patchify is what makes
        it (the fused loss, which patchifies as it reads, runs only where it is not)."""
        if (type(self).patchify is not MaskedAutoencoderViT.patchify
                or "patchify" in self.__dict__):
            return ops.patch_mse_loss(self.patchify(imgs), pred, mask, self.norm_pix_loss)
        return ops.masked_mse_loss(imgs, pred, mask, self._patch(), norm_pix=self.norm_pix_loss)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        # noise passed only when given, for an override of forward_encoder with the official
        # signature (self, x, mask_ratio)
        latent, mask, ids_restore = (self.forward_encoder(imgs, mask_ratio) if noise is None
                                     else self.forward_encoder(imgs, mask_ratio, noise))
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, p*p*C)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def _embeds_as_built(self):
        """Whether embedding only the kept patches (the fused path, which calls neither
        patch_embed nor random_masking) computes what calling them would: patch_embed as built
        and unhooked, random_masking not overridden."""
        pe = self.patch_embed
        return (_as_built(pe, PatchEmbed) and _as_built(_member(pe, "proj"), nn.Conv2d)
                and type(self).random_masking is MaskedAutoencoderViT.random_masking
                and "random_masking" not in self.__dict__ and not _global_hooks())

    def _check_imgs(self, imgs, model_size=True):
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if imgs.dim() != 4:
            raise ValueError(f"imgs must be 4-D (N, C, H, W), got shape {tuple(imgs.shape)}")
        if not imgs.dtype.is_floating_point:
            raise TypeError(f"imgs must be floating point, got {imgs.dtype}")
        C, H, W = imgs.shape[1:]
        if C != self._chans():
            raise ValueError(f"imgs must have in_chans={self._chans()} channels, got {C}")
        p = self._patch()
        if H % p or W % p:
            raise ValueError(f"imgs height and width must be divisible by patch_size {p}, got {H}x{W}")
        if model_size and (H, W) != self.patch_embed.img_size:
            raise ValueError(f"imgs must be {self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]} "
                             f"(the model's img_size), got {H}x{W}")


def _factory(embed_dim, depth, num_heads, patch_size, **kwargs):
    kwargs.setdefault("decoder_embed_dim", 512)
    kwargs.setdefault("decoder_depth", 8)
    kwargs.setdefault("decoder_num_heads", 16)
    kwargs.setdefault("mlp_ratio", 4)
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
    return MaskedAutoencoderViT(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                num_heads=num_heads, **kwargs)


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _factory(768, 12, 12, 16, **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _factory(1024, 24, 16, 16, **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return _factory(1280, 32, 16, 14, **kwargs)


def mae_vit_tiny_patch4(**kwargs):
    """A small MAE for 32x32 images (CIFAR-sized data) and CPU runs."""
    kwargs.setdefault("img_size", 32)
    kwargs.setdefault("decoder_embed_dim", 128)
    kwargs.setdefault("decoder_depth", 2)
    kwargs.setdefault("decoder_num_heads", 4)
    return _factory(192, 4, 3, 4, **kwargs)


# recommended names, as official
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b

MODELS = {
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
    "mae_vit_tiny_patch4": mae_vit_tiny_patch4,
}
