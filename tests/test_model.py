"""The model: official state_dict, position tables, parity with the official algorithm, masks,
gradients, bad inputs, in_chans and rectangular images (reference backend)."""
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastmae
from fastmae import reference
from fastmae.pos_embed import sincos_2d
from fastmae.testing import rel_err

import official_mae


def tiny(**kw):
    args = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3, mlp_ratio=4.0,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True)
    args.update(kw)
    return fastmae.MaskedAutoencoderViT(**args)


def official_keys(embed_dim, depth, decoder_dim, decoder_depth, patch, in_chans, num_patches, mlp=4):
    """The official models_mae.py state_dict, in its order (the model's own parameters first,
    then its submodules'): key -> shape, written out."""
    keys = {
        "cls_token": (1, 1, embed_dim),
        "pos_embed": (1, num_patches + 1, embed_dim),
        "mask_token": (1, 1, decoder_dim),
        "decoder_pos_embed": (1, num_patches + 1, decoder_dim),
        "patch_embed.proj.weight": (embed_dim, in_chans, patch, patch),
        "patch_embed.proj.bias": (embed_dim,),
    }

    def block(prefix, dim):
        return {
            f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
            f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
            f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
            f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
            f"{prefix}.mlp.fc1.weight": (mlp * dim, dim), f"{prefix}.mlp.fc1.bias": (mlp * dim,),
            f"{prefix}.mlp.fc2.weight": (dim, mlp * dim), f"{prefix}.mlp.fc2.bias": (dim,),
        }

    for i in range(depth):
        keys.update(block(f"blocks.{i}", embed_dim))
    keys.update({
        "norm.weight": (embed_dim,), "norm.bias": (embed_dim,),
        "decoder_embed.weight": (decoder_dim, embed_dim), "decoder_embed.bias": (decoder_dim,),
    })
    for i in range(decoder_depth):
        keys.update(block(f"decoder_blocks.{i}", decoder_dim))
    keys.update({
        "decoder_norm.weight": (decoder_dim,), "decoder_norm.bias": (decoder_dim,),
        "decoder_pred.weight": (patch * patch * in_chans, decoder_dim),
        "decoder_pred.bias": (patch * patch * in_chans,),
    })
    return keys


@pytest.mark.parametrize("factory, expected", [
    (fastmae.mae_vit_base_patch16, official_keys(768, 12, 512, 8, 16, 3, 196)),
    (fastmae.mae_vit_large_patch16, official_keys(1024, 24, 512, 8, 16, 3, 196)),
    (fastmae.mae_vit_huge_patch14, official_keys(1280, 32, 512, 8, 14, 3, 256)),
])
def test_factory_state_dict_is_official(factory, expected):
    with torch.device("meta"):
        model = factory()
    sd = model.state_dict()
    assert list(sd) == list(expected), set(sd) ^ set(expected)
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # factories use LayerNorm eps 1e-6, as official
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_dec512d8b_names_are_the_same_models():
    assert fastmae.mae_vit_base_patch16 is fastmae.mae_vit_base_patch16_dec512d8b
    assert fastmae.mae_vit_large_patch16 is fastmae.mae_vit_large_patch16_dec512d8b
    assert fastmae.mae_vit_huge_patch14 is fastmae.mae_vit_huge_patch14_dec512d8b


def test_constructor_defaults_are_official():
    import inspect
    params = inspect.signature(fastmae.MaskedAutoencoderViT).parameters
    defaults = {k: v.default for k, v in params.items()}
    assert defaults == dict(img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                            num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                            decoder_num_heads=16, mlp_ratio=4.0, norm_layer=nn.LayerNorm,
                            norm_pix_loss=False)


def sincos_by_hand(dim, gh, gw):
    """An independent formula: channel j < dim/2 encodes the column, the rest the row; each half
    is [sin(pos * w_i), cos(pos * w_i)] with w_i = 10000 ** (-i / (dim / 4))."""
    quarter = dim // 4
    table = np.zeros((1 + gh * gw, dim))
    for r in range(gh):
        for c in range(gw):
            row = 1 + r * gw + c
            for i in range(quarter):
                w = 1.0 / 10000 ** (i / quarter)
                table[row, i] = math.sin(c * w)
                table[row, quarter + i] = math.cos(c * w)
                table[row, 2 * quarter + i] = math.sin(r * w)
                table[row, 3 * quarter + i] = math.cos(r * w)
    return table


def official_sincos(embed_dim, grid_size):
    """facebookresearch/mae util/pos_embed.py's get_2d_sincos_pos_embed(..., cls_token=True),
    transcribed: float32 all the way, as it computes."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.
        omega = 1. / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize("dim, gh, gw", [(16, 4, 4), (32, 3, 5), (8, 1, 7), (1024, 13, 11)])
def test_sincos_table_matches_independent_formula(dim, gh, gw):
    """Against the formula in float64: the float32 rounding of the official computation only."""
    np.testing.assert_allclose(sincos_2d(dim, (gh, gw), cls_token=True), sincos_by_hand(dim, gh, gw),
                               rtol=0, atol=3e-6)


@pytest.mark.parametrize("dim, grid", [(512, 14), (768, 14), (1024, 14), (1280, 16), (24, 5)])
def test_sincos_table_is_officials_bits(dim, grid):
    want = official_sincos(dim, grid).astype(np.float32)
    np.testing.assert_array_equal(sincos_2d(dim, grid, cls_token=True), want)


def test_model_position_tables_are_the_sincos_tables():
    m = tiny(img_size=(24, 40))
    np.testing.assert_allclose(m.pos_embed[0].numpy(), sincos_by_hand(32, 3, 5), atol=3e-6)
    np.testing.assert_allclose(m.decoder_pos_embed[0].numpy(), sincos_by_hand(24, 3, 5), atol=3e-6)
    m = tiny(img_size=40)  # a 5 x 5 grid of 8-pixel patches
    np.testing.assert_array_equal(m.pos_embed[0].numpy(), official_sincos(32, 5).astype(np.float32))


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("img_size, in_chans", [(32, 3), ((24, 40), 1), ((16, 24), 4)])
def test_reference_model_matches_official_transcription(norm_pix, img_size, in_chans):
    torch.manual_seed(0)
    m = tiny(img_size=img_size, in_chans=in_chans, norm_pix_loss=norm_pix)
    H, W = m.patch_embed.img_size
    imgs = torch.randn(3, in_chans, H, W)
    noise = torch.rand(3, m.patch_embed.num_patches)
    with fastmae.use_backend("torch"):
        loss, pred, mask = m(imgs, mask_ratio=0.75, noise=noise)
    with torch.no_grad():
        ref_loss, ref_pred, ref_mask = official_mae.forward(m, imgs, 0.75, noise)
    assert torch.equal(mask, ref_mask)
    assert rel_err(loss, ref_loss) < 1e-6
    assert rel_err(pred, ref_pred) < 1e-6


@pytest.mark.parametrize("L_grid, ratio", [((4, 4), 0.75), ((3, 5), 0.6), ((1, 7), 0.5), ((2, 2), 0.0)])
def test_mask_rows_have_exactly_the_removed_count(L_grid, ratio):
    gh, gw = L_grid
    m = tiny(img_size=(8 * gh, 8 * gw))
    L = gh * gw
    with fastmae.use_backend("torch"):
        _, pred, mask = m(torch.randn(5, 3, 8 * gh, 8 * gw), mask_ratio=ratio)
    assert mask.dtype == torch.float32
    assert torch.equal(mask.sum(1), torch.full((5,), float(L - int(L * (1 - ratio)))))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert pred.shape == (5, L, 8 * 8 * 3)


def test_noise_gives_a_reproducible_mask():
    m = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with fastmae.use_backend("torch"):
        a = m(imgs, noise=noise)
        b = m(imgs, noise=noise)
    assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0])
    # the kept patches are the smallest-noise ones
    kept = (a[2] == 0)
    assert torch.equal(kept, noise <= noise.sort(1).values[:, 3:4])


def test_backward_reaches_every_trainable_parameter_and_no_position_table():
    torch.manual_seed(1)
    m = tiny()
    with fastmae.use_backend("torch"):
        loss, _, _ = m(torch.randn(2, 3, 32, 32))
    loss.backward()
    for name, p in m.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_patchify_unpatchify_round_trip_rectangular_and_any_channels():
    m = tiny(img_size=(24, 40), in_chans=4)
    imgs = torch.randn(2, 4, 24, 40)
    x = m.patchify(imgs)
    assert x.shape == (2, 15, 8 * 8 * 4)
    # (p, q, c) order, channel fastest: patch (1, 2), pixel (3, 5), channel 2
    assert x[1, 1 * 5 + 2, (3 * 8 + 5) * 4 + 2] == imgs[1, 2, 8 + 3, 16 + 5]
    assert torch.equal(m.unpatchify(x), imgs)


def test_patchify_and_unpatchify_take_other_sizes_as_official():
    """Official patchify takes any square image the patch size divides, and unpatchify a square
    grid of sqrt(L) patches: images of another size than the model's round-trip too."""
    m = tiny()  # 32 x 32 images, 8-pixel patches
    imgs = torch.randn(3, 3, 48, 48)
    x = m.patchify(imgs)
    want = imgs.reshape(3, 3, 6, 8, 6, 8).permute(0, 2, 4, 3, 5, 1).reshape(3, 36, 8 * 8 * 3)
    assert torch.equal(x, want)
    assert torch.equal(m.unpatchify(x), imgs)
    with pytest.raises(ValueError, match="channels"):
        m.patchify(torch.randn(1, 2, 48, 48))
    with pytest.raises(ValueError, match="divisible"):
        m.patchify(torch.randn(1, 3, 44, 48))
    with pytest.raises(ValueError, match="x must have shape"):
        m.unpatchify(torch.randn(1, 35, 8 * 8 * 3))  # neither the model's 16 nor a square


def test_forward_loss_takes_a_bool_or_integer_mask():
    m = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 8 * 8 * 3)
    mask = torch.rand(2, 16) < 0.75
    want = m.forward_loss(imgs, pred, mask.float())
    assert torch.equal(m.forward_loss(imgs, pred, mask), want)
    assert torch.equal(m.forward_loss(imgs, pred, mask.long()), want)


@pytest.mark.parametrize("bad, err, words", [
    (lambda: torch.randn(3, 32, 32), ValueError, "4-D"),
    (lambda: torch.randint(0, 255, (2, 3, 32, 32)), TypeError, "floating"),
    (lambda: torch.randn(2, 1, 32, 32), ValueError, "channels"),
    (lambda: torch.randn(2, 3, 30, 32), ValueError, "divisible"),
    (lambda: torch.randn(2, 3, 40, 40), ValueError, "img_size"),
])
def test_bad_images_are_named(bad, err, words):
    m = tiny()
    with pytest.raises(err, match=words):
        m(bad())


@pytest.mark.parametrize("ratio, words", [(1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"), (0.99, "keeps no patch")])
def test_bad_mask_ratio_is_named(ratio, words):
    m = tiny()
    with pytest.raises(ValueError, match=words):
        m(torch.randn(2, 3, 32, 32), mask_ratio=ratio)


def test_bad_noise_is_named():
    m = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="noise"):
        m(imgs, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="noise"):
        m(imgs, noise=torch.rand(2, 16, device="meta"))
    with pytest.raises(ValueError, match="noise"):
        fastmae.ops.random_masking(torch.randn(2, 16, 8), 0.5, noise=torch.rand(3, 16))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible"):
        tiny(img_size=30)
    with pytest.raises(ValueError, match="num_heads"):
        tiny(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="decoder_embed_dim and decoder_num_heads"):
        tiny(decoder_embed_dim=24, decoder_num_heads=5)
    for bad in (0, -8, 8.0):
        with pytest.raises(ValueError, match="patch_size"):
            tiny(patch_size=bad)


# ------------------------------------------- found by a mutation audit of reference.py / model.py

def randomized(m, seed):
    """Every parameter random, the position tables (their row 0 too), LayerNorms, biases and
    tokens included: at initialization the biases and row 0 are zeros and the LayerNorms are
    identities, which hides a dropped, swapped or misplaced tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            one = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + one)
    return m


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reference_model_with_every_parameter_random_matches_official(norm_pix):
    """Forward and every gradient against the transcription, the LayerNorms' eps other than
    each other's (norm1, norm2 and the final norms each read their own)."""
    m = randomized(tiny(img_size=(24, 40), in_chans=2, norm_pix_loss=norm_pix), seed=5)
    for i, norm in enumerate(n for n in m.modules() if isinstance(n, nn.LayerNorm)):
        norm.eps = 0.05 * (i + 1)
    g = torch.Generator().manual_seed(6)
    imgs, noise = torch.randn(3, 2, 24, 40, generator=g), torch.rand(3, 15, generator=g)
    params = [p for p in m.parameters() if p.requires_grad]
    with fastmae.use_backend("torch"):
        loss, pred, mask = m(imgs, mask_ratio=0.6, noise=noise)
    grads = torch.autograd.grad(loss, params)
    ref_loss, ref_pred, ref_mask = official_mae.forward(m, imgs, 0.6, noise)
    ref_grads = torch.autograd.grad(ref_loss, params)
    assert torch.equal(mask, ref_mask) and mask.sum() == 3 * (15 - 6)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(pred, ref_pred) < 1e-5
    for (name, _), got, want in zip(
            [(n, p) for n, p in m.named_parameters() if p.requires_grad], grads, ref_grads):
        assert rel_err(got, want) < 1e-4, name


def loss_by_hand(imgs, pred, mask, p, norm_pix):
    """Official forward_loss written out patch by patch in float64: a patch's values in (row,
    column, channel) order, normalized by its mean and unbiased variance + 1e-6; the per-patch
    mean squared error averaged over the removed patches (mask 1)."""
    imgs, pred, mask = imgs.double(), pred.double(), mask.double()
    N, C, H, W = imgs.shape
    w = W // p
    num = torch.zeros((), dtype=torch.float64)
    for n in range(N):
        for l in range(pred.shape[1]):
            r, c = divmod(l, w)
            t = imgs[n, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
            if norm_pix:
                mu = t.mean()
                var = ((t - mu) ** 2).sum() / (t.numel() - 1)
                t = (t - mu) / torch.sqrt(var + 1e-6)
            num += ((pred[n, l] - t) ** 2).mean() * mask[n, l]
    return num / mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_the_formula_by_hand_on_low_contrast_patches(norm_pix):
    """Flat and nearly flat patches, where the 1e-6 and the unbiased variance decide the target,
    a rectangular grid, 2 channels: the reference's loss and the model's (torch backend)."""
    g = torch.Generator().manual_seed(7)
    imgs = torch.randn(2, 2, 12, 20, generator=g)
    imgs[0, :, :4, :4] = 0.3  # a constant patch: zero variance
    imgs[1, :, 4:8, 8:12] = 0.1 + 1e-3 * torch.randn(2, 4, 4, generator=g)  # variance ~ 1e-6
    imgs[1, :, 8:, :4] *= 2e-3
    pred = torch.randn(2, 15, 32, generator=g)
    mask = (torch.rand(2, 15, generator=g) < 0.6).float()
    mask[0, 0] = mask[1, 7] = mask[1, 10] = 1.0  # the low-contrast patches are scored
    want = loss_by_hand(imgs, pred, mask, 4, norm_pix)
    got = reference.masked_mse_loss(imgs.double(), pred.double(), mask.double(), 4, norm_pix)
    assert rel_err(got, want) < 1e-12
    m = tiny(img_size=(12, 20), patch_size=4, in_chans=2, norm_pix_loss=norm_pix)
    with fastmae.use_backend("torch"):
        assert rel_err(m.forward_loss(imgs, pred, mask), want) < 1e-5


def test_initialize_weights_is_official():
    """xavier_uniform on every Linear weight and on patch_embed.proj.weight viewed (D, C*p*p),
    zero biases, LayerNorms weight 1 bias 0, cls and mask tokens normal with std .02, the
    position tables the fixed sin-cos ones (no gradient)."""
    torch.manual_seed(8)
    m = tiny(img_size=(24, 40), embed_dim=128, num_heads=4, decoder_embed_dim=96,
             decoder_num_heads=4)

    def xavier_uniform(w, fan_in, fan_out):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        a = w.detach().abs().max().item()
        assert 0.97 * bound < a <= bound, (a, bound)  # uniform: fills [-bound, bound], no further

    pw = m.patch_embed.proj.weight
    xavier_uniform(pw, pw[0].numel(), pw.shape[0])
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            xavier_uniform(mod.weight, mod.in_features, mod.out_features)
        if isinstance(mod, nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)), name
        if isinstance(mod, (nn.Linear, nn.LayerNorm, nn.Conv2d)) and mod is not m.patch_embed.proj:
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
    for tok in (m.cls_token, m.mask_token):
        assert 0.014 < tok.std().item() < 0.026 and abs(tok.mean().item()) < 0.008
    assert torch.equal(m.pos_embed[0], torch.from_numpy(sincos_2d(128, (3, 5), cls_token=True)))
    assert torch.equal(m.decoder_pos_embed[0],
                       torch.from_numpy(sincos_2d(96, (3, 5), cls_token=True)))
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad


@pytest.mark.parametrize("factory, dims", [
    # patch, embed_dim, depth, heads, decoder dim, depth, heads
    (fastmae.mae_vit_base_patch16_dec512d8b, (16, 768, 12, 12, 512, 8, 16)),
    (fastmae.mae_vit_large_patch16_dec512d8b, (16, 1024, 24, 16, 512, 8, 16)),
    (fastmae.mae_vit_huge_patch14_dec512d8b, (14, 1280, 32, 16, 512, 8, 16)),
])
def test_factory_hyperparameters_are_official(factory, dims):
    """What the state_dict's shapes do not show: the heads of each stack, mlp_ratio 4,
    norm_pix_loss False unless passed, 224 x 224 RGB images."""
    p, dim, depth, heads, ddim, ddepth, dheads = dims
    with torch.device("meta"):
        m = factory()
        m_pix = factory(norm_pix_loss=True)
    assert m.patch_embed.patch_size == (p, p) and m.patch_embed.img_size == (224, 224)
    assert m.patch_embed.proj.in_channels == 3
    assert m.norm_pix_loss is False and m_pix.norm_pix_loss is True
    for blocks, d, n, h in ((m.blocks, dim, depth, heads),
                            (m.decoder_blocks, ddim, ddepth, dheads)):
        assert len(blocks) == n
        for blk in blocks:
            assert blk.attn.num_heads == h
            assert blk.attn.scale == (d // h) ** -0.5
            assert blk.mlp.fc1.out_features == 4 * d
            assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"


def test_constructor_plumbs_norm_layer_and_mlp_ratio_into_every_stack():
    """Official builds every LayerNorm with norm_layer (the constructor's default: eps 1e-5) and
    both stacks' MLPs with mlp_ratio."""
    with torch.device("meta"):
        plain = fastmae.MaskedAutoencoderViT()
        m = tiny(mlp_ratio=2.0, norm_layer=partial(nn.LayerNorm, eps=1e-3))
    for model, eps in ((plain, 1e-5), (m, 1e-3)):
        norms = [n for n in model.modules() if isinstance(n, nn.LayerNorm)]
        assert len(norms) == 2 * (len(model.blocks) + len(model.decoder_blocks)) + 2
        assert all(n.eps == eps for n in norms)
    for blk in list(m.blocks) + list(m.decoder_blocks):
        assert blk.mlp.fc1.out_features == 2 * blk.mlp.fc1.in_features


def test_forward_masks_three_quarters_by_default():
    """Official forward(imgs, mask_ratio=0.75)."""
    import inspect
    m = tiny(img_size=(24, 40))
    assert inspect.signature(m.forward).parameters["mask_ratio"].default == 0.75
    g = torch.Generator().manual_seed(9)
    with fastmae.use_backend("torch"):
        _, _, mask = m(torch.randn(2, 3, 24, 40, generator=g))
    assert torch.equal(mask.sum(1), torch.full((2,), 15.0 - int(15 * 0.25)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_norm_ops_use_their_eps(backend, device):
    """LayerNorm and the residual add + LayerNorm (with and without the branch bias) against the
    formula in float64, with an eps large enough to show: a fixed or default eps does not pass.
    (On the kernels' device: "triton" on CPU tensors needs the interpreter, off on a GPU.)"""
    g = torch.Generator().manual_seed(11)
    x, r = (torch.randn(2, 5, 32, generator=g).to(device) for _ in range(2))
    w, b, bb = (torch.randn(32, generator=g).to(device) for _ in range(3))
    eps = 0.3

    def ln(s):
        s = s.double()
        mu = s.mean(-1, keepdim=True)
        var = ((s - mu) ** 2).mean(-1, keepdim=True)
        return (s - mu) / torch.sqrt(var + eps) * w.double() + b.double()

    with fastmae.use_backend(backend):
        assert rel_err(fastmae.ops.layer_norm(x, w, b, eps), ln(x)) < 1e-5
        for branch_bias, s_want in ((None, r + x), (bb, r + x + bb)):
            s, y = fastmae.ops.add_layer_norm(x, r, w, b, eps, branch_bias)
            assert rel_err(s, s_want) < 1e-6 and rel_err(y, ln(s_want)) < 1e-5
    x, r, w, b, bb = (t.double() for t in (x, r, w, b, bb))
    assert rel_err(reference.add_layer_norm(x, r, w, b, eps, bb)[1], ln(r + x + bb)) < 1e-12


def test_mask_is_float32_whatever_the_noise_dtype():
    """Official builds the mask with torch.ones (the default dtype), not in the noise's dtype."""
    m = tiny(img_size=(24, 40))
    g = torch.Generator().manual_seed(12)
    imgs, noise = torch.randn(2, 3, 24, 40, generator=g), torch.rand(2, 15, generator=g)
    with fastmae.use_backend("torch"):
        want = m(imgs, noise=noise)[2]
        assert want.dtype == torch.float32
        assert torch.equal(m(imgs, noise=noise.double())[2], want)
        x = torch.randn(2, 15, 8, dtype=torch.float64, generator=g)
        assert fastmae.ops.random_masking(x, 0.6, noise.double())[1].dtype == torch.float32
    assert reference.masking_indices(noise.double(), 6)[1].dtype == torch.float32


def test_reference_token_ops_are_the_official_lines():
    """The reference's visible-patch embedding and unshuffle, which the kernels are held to,
    against the official forward's own lines (tests/official_mae.py) on one random step: the
    conv patch embedding + pos_embed[:, 1:] gathered by random_masking, and forward_decoder's
    mask tokens, unshuffle, cls and positions. Before, they were tied to official only through
    the kernels agreeing with them."""
    g = torch.Generator().manual_seed(13)
    N, C, H, W, p, D = 3, 2, 12, 20, 4, 24  # a 3 x 5 grid
    L = (H // p) * (W // p)
    imgs = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(D, C, p, p, generator=g, dtype=torch.float64)
    bias, pos = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((D,), (1, 1 + L, D)))
    noise = torch.rand(N, L, generator=g, dtype=torch.float64)
    x = torch.nn.functional.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2)
    want, mask, ids_restore = official_mae.random_masking(x + pos[:, 1:, :], 0.6, noise)
    ids_keep = torch.argsort(noise, dim=1)[:, :L - int(mask[0].sum())]
    assert torch.equal(reference.patch_embed_visible(imgs, weight, bias, pos, ids_keep), want)

    tokens = torch.randn(N, 1 + ids_keep.shape[1], D, generator=g, dtype=torch.float64)
    mask_token = torch.randn(1, 1, D, generator=g, dtype=torch.float64)
    dec_pos = torch.randn(1, 1 + L, D, generator=g, dtype=torch.float64)
    assert torch.equal(reference.unshuffle(tokens, mask_token, ids_restore, dec_pos),
                       official_mae.unshuffle(tokens, mask_token, ids_restore, dec_pos))
