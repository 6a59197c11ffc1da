"""The model: official state_dict, position tables, parity with the official algorithm, masks,
gradients, bad inputs, in_chans and rectangular images (reference backend)."""
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastmae
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
