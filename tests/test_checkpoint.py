"""fastmae.checkpoint: every layout and file format through ``load``, the conversions' round trips,
``load_into``'s strictness, position-table resizing, and files that must not load (or run code)."""
import argparse
import pickle
import random
import re
import warnings
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastmae
import fastmae.backend
from fastmae import checkpoint as ckpt
from fastmae.pos_embed import sincos_2d


def tiny_mae(img_size=32, patch_size=8, norm_pix_loss=True, eps=1e-6, mlp_ratio=4.0, seed=0):
    """A small MAE whose every parameter is random (LayerNorms and biases included), so that a
    misplaced tensor cannot go unnoticed; the position tables stay the fixed sin-cos ones."""
    torch.manual_seed(seed)
    model = fastmae.MaskedAutoencoderViT(
        img_size=img_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=2,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=eps), norm_pix_loss=norm_pix_loss)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm1.weight") else 0.0))
    return model


def encoder_only(sd):
    return {k: v for k, v in sd.items() if not (k.startswith("decoder_") or k == "mask_token")}


def assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


def save(obj, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


# --------------------------------------------------------------------------- official layouts

# a safetensors file holds a flat dict of tensors only: no {"model": ...} container
_OFFICIAL_CASES = [(c, f) for c in ("bare", "wrapped", "training") for f in ("dict", ".pth", ".bin", ".safetensors")
                   if f != ".safetensors" or c == "bare"]


@pytest.mark.parametrize("container, fmt", _OFFICIAL_CASES)
@pytest.mark.parametrize("full", [True, False], ids=["full", "encoder-only"])
def test_load_official(tmp_path, container, fmt, full):
    sd = tiny_mae().state_dict()
    if not full:
        sd = encoder_only(sd)
    obj = {"bare": sd,
           "wrapped": {"model": sd},
           # as main_pretrain.py saves it: the Namespace must load under weights_only
           "training": {"model": sd, "epoch": 3, "scaler": {"scale": 65536.0},
                        "args": argparse.Namespace(norm_pix_loss=True, input_size=32)}}[container]
    source = obj if fmt == "dict" else save(obj, tmp_path / f"ckpt{fmt}")
    assert_same_tensors(ckpt.load(source), sd)
    assert ckpt.detect_layout(obj) == ("official" if full else "official-encoder")


def test_verbose_prints_one_line_naming_the_layout(tmp_path, capsys):
    path = save(tiny_mae().state_dict(), tmp_path / "m.pth")
    ckpt.load(path, verbose=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "official" in out[0] and str(path) in out[0]


# --------------------------------------------------------------------------- Hugging Face layouts

def hf_4x_keys(sd_5x):
    """transformers 4.x names for a 5.x ViTMAE state_dict (written out from the 4.x modules, not
    from fastmae's tables: ViTMAEEncoder.layer, ViTMAESelfAttention, ViTMAESelfOutput, ...)."""
    renames = [(r"^(vit\.)?layers\.", r"\1encoder.layer."),
               (r"\.attention\.q_proj\.", ".attention.attention.query."),
               (r"\.attention\.k_proj\.", ".attention.attention.key."),
               (r"\.attention\.v_proj\.", ".attention.attention.value."),
               (r"\.attention\.o_proj\.", ".attention.output.dense."),
               (r"\.mlp\.fc1\.", ".intermediate.dense."),
               (r"\.mlp\.fc2\.", ".output.dense.")]
    out = {}
    for k, v in sd_5x.items():
        for pattern, repl in renames:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers


def hf_tiny(hf, norm_pix_loss=True, layer_norm_eps=1e-12, seed=1):
    """A random-weight ViTMAEForPreTraining of the tiny shape (HF's own default eps)."""
    torch.manual_seed(seed)
    config = hf.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=128, image_size=32, patch_size=8, num_channels=3,
        mask_ratio=0.75, norm_pix_loss=norm_pix_loss, layer_norm_eps=layer_norm_eps)
    model = hf.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "layernorm_before.weight" in name else 0.0))
    return model


def hf_variants(hf_model):
    """{name: (state_dict, expected layout)} for every HF layout a user can hold."""
    sd5 = hf_model.state_dict()
    encoder5 = hf_model.vit.state_dict()  # a ViTMAEModel: no "vit." prefix, no decoder
    no_prefix5 = {k[4:] if k.startswith("vit.") else k: v for k, v in sd5.items()}
    return {
        "5.x": (sd5, "hf-5.x"),
        "5.x-no-prefix": (no_prefix5, "hf-5.x"),
        "5.x-ViTMAEModel": (encoder5, "hf-5.x-encoder"),
        "4.x": (hf_4x_keys(sd5), "hf-4.x"),
        "4.x-no-prefix": (hf_4x_keys(no_prefix5), "hf-4.x"),
        "4.x-ViTMAEModel": (hf_4x_keys(encoder5), "hf-4.x-encoder"),
    }


@pytest.mark.parametrize("fmt", ["dict", ".bin", ".safetensors"])
def test_load_hf_layouts(hf, tmp_path, fmt):
    hf_model = hf_tiny(hf)
    expected = ckpt.load(hf_model.state_dict())
    for name, (sd, layout) in hf_variants(hf_model).items():
        source = sd if fmt == "dict" else save(sd, tmp_path / f"{name}{fmt}")
        got = ckpt.load(source)
        want = expected if "ViTMAEModel" not in name else encoder_only(expected)
        assert_same_tensors(got, want)
        assert ckpt.detect_layout(sd) == layout, name


def test_load_hf_save_pretrained_folder(hf, tmp_path):
    hf_model = hf_tiny(hf)
    hf_model.save_pretrained(tmp_path / "hf")
    # transformers 5 writes 4.x names, the decoder's as decoder.decoder_encoder.layer.N
    assert_same_tensors(ckpt.load(tmp_path / "hf"), ckpt.load(hf_model.state_dict()))
    from safetensors.torch import load_file
    assert ckpt.detect_layout(load_file(tmp_path / "hf" / "model.safetensors")) == "hf-4.x"


def test_official_to_hf_to_official_is_exact(hf):
    model = tiny_mae()
    sd = model.state_dict()
    hf_sd = ckpt.to_hf(sd)
    assert all(k.startswith(("vit.", "decoder.")) for k in hf_sd)
    hf_model = hf.ViTMAEForPreTraining(ckpt.hf_config(model))
    hf_model.load_state_dict(hf_sd, strict=True)
    assert_same_tensors(ckpt.load(hf_model.state_dict()), sd)
    assert_same_tensors(ckpt.load(hf_4x_keys(hf_sd)), sd)


def test_to_hf_in_4x_names_loads_with_from_pretrained(hf, tmp_path):
    """names="4.x": the keys transformers 4.x modules have (renamed independently here), which
    transformers 5's from_pretrained reads back to the same weights."""
    model = tiny_mae(seed=6)
    sd = model.state_dict()
    hub_sd = ckpt.to_hf(sd, names="4.x")
    assert hub_sd.keys() == hf_4x_keys(ckpt.to_hf(sd)).keys()
    assert ckpt.detect_layout(hub_sd) == "hf-4.x"
    assert_same_tensors(ckpt.load(hub_sd), sd)
    from safetensors.torch import save_file
    folder = tmp_path / "hub"
    folder.mkdir()
    ckpt.hf_config(model).save_pretrained(folder)
    save_file(hub_sd, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = hf.ViTMAEForPreTraining.from_pretrained(folder)
    assert_same_tensors(ckpt.load(loaded.state_dict()), sd)
    with pytest.raises(ValueError, match="names"):
        ckpt.to_hf(sd, names="6.x")


def test_to_hf_encoder_only_gives_the_vit_keys(hf):
    model = tiny_mae()
    hf_sd = ckpt.to_hf(encoder_only(model.state_dict()))
    hf_model = hf.ViTMAEForPreTraining(ckpt.hf_config(model))
    assert sorted(hf_sd) == sorted(k for k in hf_model.state_dict() if k.startswith("vit."))


def _forward_both(fastmae_model, hf_model, seed=2):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(3, 3, 32, 32, generator=g)
    noise = torch.rand(3, 16, generator=g)
    with torch.no_grad():
        out = hf_model(pixel_values=imgs, noise=noise)
        loss, pred, mask = fastmae_model.eval()(imgs, mask_ratio=hf_model.config.mask_ratio, noise=noise)
    return (out.loss, out.logits, out.mask), (loss, pred, mask)


@pytest.mark.parametrize("layout", ["5.x", "5.x-no-prefix", "4.x", "4.x-no-prefix"])
def test_hf_to_fastmae_same_loss_pred_mask(hf, layout):
    hf_model = hf_tiny(hf, norm_pix_loss=True)
    sd, _ = hf_variants(hf_model)[layout]
    model = tiny_mae(norm_pix_loss=True, eps=hf_model.config.layer_norm_eps, seed=5)
    report = ckpt.load_into(model, sd)
    assert report.layout.startswith("hf-") and report.missing_keys == [] and report.resized == []
    (hl, hp, hm), (fl, fp, fm) = _forward_both(model, hf_model)
    assert torch.equal(hm, fm)
    torch.testing.assert_close(fp, hp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fl, hl, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not fastmae.backend.interpreter_on(), reason="the triton backend on CPU tensors needs "
                    "Triton's interpreter (conftest turns it on when there is no GPU)")
def test_hf_to_fastmae_same_loss_pred_mask_under_the_triton_backend(hf):
    hf_model = hf_tiny(hf, norm_pix_loss=True)
    model = tiny_mae(norm_pix_loss=True, eps=hf_model.config.layer_norm_eps, seed=5)
    ckpt.load_into(model, hf_4x_keys(hf_model.state_dict()))
    with fastmae.use_backend("triton"):
        (hl, hp, hm), (fl, fp, fm) = _forward_both(model, hf_model)
    assert torch.equal(hm, fm)
    torch.testing.assert_close(fp, hp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fl, hl, rtol=1e-4, atol=1e-5)


def test_fastmae_to_hf_same_loss_pred_mask(hf):
    model = tiny_mae(norm_pix_loss=True)
    hf_model = hf.ViTMAEForPreTraining(ckpt.hf_config(model)).eval()
    hf_model.load_state_dict(ckpt.to_hf(model.state_dict()), strict=True)
    assert hf_model.config.norm_pix_loss and hf_model.config.layer_norm_eps == 1e-6
    (hl, hp, hm), (fl, fp, fm) = _forward_both(model, hf_model)
    assert torch.equal(hm, fm)
    torch.testing.assert_close(fp, hp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fl, hl, rtol=1e-5, atol=1e-6)


def test_hf_qkv_without_bias_loads_as_zero_bias(hf):
    hf_model = hf_tiny(hf)
    sd = {k: v for k, v in hf_model.state_dict().items()
          if not re.search(r"\.[qkv]_proj\.bias$", k)}
    out = ckpt.load(sd)
    assert torch.equal(out["blocks.1.attn.qkv.bias"], torch.zeros(96))


def test_hf_config_rejects_rectangular_images(hf):
    model = fastmae.MaskedAutoencoderViT(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1,
                                         num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                         decoder_num_heads=2)
    with pytest.raises(ValueError, match="square"):
        ckpt.hf_config(model)


# --------------------------------------------------------------------------- timm

def test_to_timm_encoder_keys():
    model = tiny_mae()
    sd = ckpt.to_timm_encoder(model.state_dict())
    assert_same_tensors(sd, encoder_only(model.state_dict()))
    top = {k.split(".")[0] for k in sd}
    assert top == {"cls_token", "pos_embed", "patch_embed", "blocks", "norm"}


def test_to_timm_encoder_loads_into_timm_vit():
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    result = vit.load_state_dict(ckpt.to_timm_encoder(tiny_mae().state_dict()), strict=False)
    assert set(result.missing_keys) == {"head.weight", "head.bias"} and not result.unexpected_keys


# --------------------------------------------------------------------------- load_into

def test_encoder_only_is_an_error_unless_allowed():
    source, model = tiny_mae(seed=0), tiny_mae(seed=1)
    enc = encoder_only(source.state_dict())
    with pytest.raises(ValueError, match=r"holds no decoder.*allow_missing_decoder=True"):
        ckpt.load_into(model, enc)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if k not in enc}
    with pytest.warns(UserWarning, match="holds no decoder"):
        report = ckpt.load_into(model, enc, allow_missing_decoder=True)
    assert report.layout == "official-encoder"
    assert sorted(report.missing_keys) == sorted(decoder_before)
    assert_same_tensors({k: v for k, v in model.state_dict().items() if k in enc}, enc)
    assert_same_tensors({k: v for k, v in model.state_dict().items() if k not in enc}, decoder_before)


def test_load_into_is_strict_otherwise():
    model = tiny_mae()
    sd = model.state_dict()
    with pytest.raises(ValueError, match=r"lacks model keys: blocks\.1\.norm2\.bias"):
        ckpt.load_into(model, {k: v for k, v in sd.items() if k != "blocks.1.norm2.bias"},
                       allow_missing_decoder=True)
    with pytest.raises(ValueError, match=r"does not have: blocks\.2\."):
        ckpt.load_into(model, tiny_mae_deeper().state_dict())


def tiny_mae_deeper():
    return fastmae.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def test_shape_mismatch_names_the_key_and_both_shapes():
    with pytest.raises(ValueError) as e:
        ckpt.load_into(tiny_mae(mlp_ratio=2.0), tiny_mae(mlp_ratio=4.0).state_dict())
    msg = str(e.value)
    assert "blocks.0.mlp.fc1.weight: checkpoint (128, 32) vs model (64, 32)" in msg


def official_interpolate_pos_embed(pos_embed_checkpoint, new_size):
    """facebookresearch/mae util/pos_embed.py interpolate_pos_embed, for one table."""
    embedding_size = pos_embed_checkpoint.shape[-1]
    orig_size = int((pos_embed_checkpoint.shape[-2] - 1) ** 0.5)
    extra_tokens = pos_embed_checkpoint[:, :1]
    pos_tokens = pos_embed_checkpoint[:, 1:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=new_size, mode="bicubic", align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


def test_sincos_position_tables_are_recomputed_for_another_image_size():
    source = tiny_mae(img_size=224, patch_size=16)
    target = tiny_mae(img_size=256, patch_size=16, seed=1)
    with pytest.warns(UserWarning, match=r"sin-cos table recomputed for a 14x14 -> 16x16"):
        report = ckpt.load_into(target, source.state_dict())
    assert len(report.resized) == 2
    for key in ("pos_embed", "decoder_pos_embed"):
        want = torch.from_numpy(sincos_2d(32, 16, cls_token=True)).float().unsqueeze(0)
        assert torch.equal(target.state_dict()[key], want), key
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    imgs = torch.randn(1, 3, 256, 256)
    assert torch.isfinite(target(imgs)[0])


@pytest.mark.parametrize("new_hw", [(256, 256), (224, 256)])
def test_learned_position_tables_are_interpolated_as_official(new_hw):
    source = tiny_mae(img_size=224, patch_size=16)
    with torch.no_grad():
        source.pos_embed.copy_(torch.randn_like(source.pos_embed))
    target = tiny_mae(img_size=new_hw, patch_size=16, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ckpt.load_into(target, source.state_dict())
    grid = (new_hw[0] // 16, new_hw[1] // 16)
    assert any("pos_embed: learned table interpolated bicubic" in str(w.message) for w in caught)
    assert any(r.startswith("decoder_pos_embed: fixed sin-cos") for r in report.resized)
    torch.testing.assert_close(target.pos_embed.data, official_interpolate_pos_embed(source.pos_embed.data, grid),
                               rtol=0, atol=0)


def test_fixed_tables_interpolated_on_request_as_official_finetuning():
    """pos_embed="interpolate": the fixed sin-cos tables resized bicubic as main_finetune.py's
    interpolate_pos_embed does, not recomputed; a table of the model's size loads as it is."""
    source = tiny_mae(img_size=224, patch_size=16)
    target = tiny_mae(img_size=256, patch_size=16, seed=1)
    with pytest.warns(UserWarning, match="pos_embed: table interpolated bicubic from a 14x14"):
        report = ckpt.load_into(target, source.state_dict(), pos_embed="interpolate")
    assert len(report.resized) == 2
    for key in ("pos_embed", "decoder_pos_embed"):
        want = official_interpolate_pos_embed(source.state_dict()[key], (16, 16))
        torch.testing.assert_close(target.state_dict()[key], want, rtol=0, atol=0)
        recomputed = torch.from_numpy(sincos_2d(32, 16, cls_token=True)).float().unsqueeze(0)
        assert not torch.equal(target.state_dict()[key], recomputed)
    same = tiny_mae(img_size=224, patch_size=16, seed=2)
    assert ckpt.load_into(same, source.state_dict(), pos_embed="interpolate").resized == []
    with pytest.raises(ValueError, match="pos_embed"):
        ckpt.load_into(same, source.state_dict(), pos_embed="bicubic")


def _small_mae(img_size):
    return fastmae.MaskedAutoencoderViT(img_size=img_size, patch_size=8, embed_dim=32, depth=1,
                                        num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                        decoder_num_heads=2)


def test_non_square_learned_table_cannot_be_resized():
    source, target = _small_mae((32, 48)), _small_mae(32)
    with torch.no_grad():
        source.pos_embed.add_(0.1 * torch.randn_like(source.pos_embed))
    with pytest.raises(ValueError, match="not a square grid"):
        ckpt.load_into(target, source.state_dict())


@pytest.mark.parametrize("src_hw, dst_hw", [((32, 48), 32), ((32, 128), 64), ((32, 128), (128, 32))],
                         ids=["4x6->4x4", "4x16->8x8", "4x16->16x4"])
def test_sincos_tables_of_another_grid_shape_are_recomputed(src_hw, dst_hw):
    """A fixed table of a non-square grid, or of the model's patch count in another shape (4 x 16
    patches for 8 x 8): recomputed for the model's grid, not loaded as it is."""
    source, target = _small_mae(src_hw), _small_mae(dst_hw)
    with torch.no_grad():
        target.pos_embed.zero_()
    h, w = target.patch_embed.grid_size
    with pytest.warns(UserWarning, match=rf"recomputed for a \d+x\d+ -> {h}x{w} patch grid"):
        report = ckpt.load_into(target, source.state_dict())
    assert len(report.resized) == 2
    want = torch.from_numpy(sincos_2d(32, (h, w), cls_token=True)).float().unsqueeze(0)
    assert torch.equal(target.pos_embed, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sincos_tables_are_recomputed_not_interpolated(dtype):
    """A checkpoint saved in fp16 or bf16 holds its sin-cos tables rounded (up to 2e-3 off in
    bf16): still recognised as fixed tables, recomputed in fp32 for the new grid."""
    source = tiny_mae(img_size=224, patch_size=16)
    target = tiny_mae(img_size=256, patch_size=16, seed=1)
    half = {k: v.to(dtype) for k, v in source.state_dict().items()}
    with pytest.warns(UserWarning, match=r"sin-cos table recomputed for a 14x14 -> 16x16"):
        ckpt.load_into(target, half)
    want = torch.from_numpy(sincos_2d(32, 16, cls_token=True)).float().unsqueeze(0)
    assert torch.equal(target.pos_embed, want)
    assert torch.equal(target.decoder_pos_embed, want)


def test_wrapped_checkpoints_and_models_load():
    """Keys saved from a DDP or torch.compile'd model (module., _orig_mod., and stacks of them in
    either order: torch.compile(DDP(m)) saves _orig_mod.module.), a timm-style
    {'state_dict': ...} file, and a compiled or DDP-style wrapped model to load into."""
    source = tiny_mae(seed=3)
    sd = source.state_dict()
    for wrapped in ({"module." + k: v for k, v in sd.items()},
                    {"_orig_mod." + k: v for k, v in sd.items()},
                    {"module._orig_mod." + k: v for k, v in sd.items()},
                    {"_orig_mod.module." + k: v for k, v in sd.items()},
                    {"module.module." + k: v for k, v in sd.items()},
                    {"state_dict": sd, "epoch": 3, "arch": "mae"}):
        got = ckpt.load(wrapped)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)

    class Wrapper(torch.nn.Module):  # as DistributedDataParallel holds its model
        def __init__(self, module):
            super().__init__()
            self.module = module

    for make in (lambda m: torch.compile(m, backend="eager"), Wrapper):
        target = tiny_mae(seed=4)
        ckpt.load_into(make(target), sd)
        assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


# --------------------------------------------------------------------------- what must not load

def test_missing_file_and_wrong_argument_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        ckpt.load(tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="path .* or a state_dict"):
        ckpt.load(42)
    with pytest.raises(ValueError, match="folder without model.safetensors"):
        ckpt.load(tmp_path)
    torch.save(torch.ones(3), tmp_path / "tensor.pth")
    with pytest.raises(TypeError, match="expected a state_dict"):
        ckpt.load(tmp_path / "tensor.pth")


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", b"\x89PNG\r\n\x1a\n" + bytes(64), b""])
def test_a_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"is not a checkpoint: expected a file written by torch.save"):
        ckpt.load(path)


def test_a_broken_safetensors_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save(tiny_mae().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ckpt.load(path)


def test_another_models_state_dict(tmp_path):
    resnetish = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2)).state_dict()
    with pytest.raises(ValueError, match=r"not an MAE checkpoint: expected an MAE state_dict: official keys"):
        ckpt.load(save(resnetish, tmp_path / "r.pth"))
    finetuned = dict(encoder_only(tiny_mae().state_dict()), **{"head.weight": torch.ones(2, 32)})
    with pytest.raises(ValueError, match=r"not part of an MAE model: head\.weight"):
        ckpt.load(finetuned)
    with pytest.raises(ValueError, match="mixes official MAE keys"):
        ckpt.detect_layout(dict(tiny_mae().state_dict(), **{"vit.layernorm.weight": torch.ones(32)}))


class _RunsCode:
    """Unpickling this calls open(marker, "w"): a file appears if a loader ran it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, about the plain pickle file
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_that_would_run_code_does_not(tmp_path, writer):
    marker, proof = tmp_path / "ran", tmp_path / "ran-when-unsafe"
    path, control = tmp_path / "evil.pth", tmp_path / "control.pth"
    for p, m in ((path, marker), (control, proof)):
        obj = {"model": {"cls_token": torch.zeros(1, 1, 4)}, "payload": _RunsCode(m)}
        if writer == "torch.save":
            torch.save(obj, p)
        else:
            with open(p, "wb") as f:
                pickle.dump(obj, f)
    with pytest.raises(ValueError, match=r"(refused to load|is not a checkpoint)"):
        ckpt.load(path)
    with pytest.raises(ValueError):
        ckpt.load_into(tiny_mae(), path)
    assert not marker.exists()
    # the payload is live: an unsafe loader does run it
    with open(control, "rb") as f:
        if writer == "torch.save":
            torch.load(f, weights_only=False)
        else:
            pickle.load(f)
    assert proof.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hf_qkv_without_bias_gets_a_zero_bias_of_the_weights_dtype(hf, dtype):
    """A half-precision HF checkpoint built with qkv_bias=False: the zero qkv bias load adds is in
    the checkpoint's dtype, like every other tensor of the state_dict."""
    hf_model = hf_tiny(hf, seed=random.randrange(1000))
    sd = {k: v.to(dtype) for k, v in hf_model.state_dict().items()
          if not re.search(r"\.[qkv]_proj\.bias$", k)}
    out = ckpt.load(sd)
    assert {v.dtype for v in out.values()} == {dtype}
    for key in ("blocks.0.attn.qkv.bias", "blocks.1.attn.qkv.bias",
                "decoder_blocks.0.attn.qkv.bias"):
        assert torch.equal(out[key], torch.zeros(96, dtype=dtype)), key


def test_interpolate_still_recomputes_a_sincos_table_of_the_models_count_in_another_shape():
    """pos_embed="interpolate" interpolates tables of another patch count only: a fixed table of
    the model's count in another shape (4x16 patches for 8x8) is recomputed, as by default, not
    loaded as it is."""
    source, target = _small_mae((32, 128)), _small_mae(64)
    with torch.no_grad():
        target.pos_embed.copy_(torch.randn_like(target.pos_embed))
        target.decoder_pos_embed.copy_(torch.randn_like(target.decoder_pos_embed))
    with pytest.warns(UserWarning, match=r"recomputed for a 4x16 -> 8x8 patch grid"):
        report = ckpt.load_into(target, source.state_dict(), pos_embed="interpolate")
    assert len(report.resized) == 2
    want = torch.from_numpy(sincos_2d(32, (8, 8), cls_token=True)).float().unsqueeze(0)
    assert torch.equal(target.pos_embed, want)
    assert torch.equal(target.decoder_pos_embed, want)


def test_hf_config_takes_the_decoders_own_heads_and_width(hf):
    """The official models' decoder has other heads than the encoder (ViT-B: 12 and 16): the
    config carries each stack's own, and the HF model computes fastmae's loss, pred and mask."""
    torch.manual_seed(random.randrange(1000))
    model = fastmae.MaskedAutoencoderViT(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=48,
        decoder_depth=1, decoder_num_heads=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm1.weight") else 0.0))
    config = ckpt.hf_config(model)
    assert (config.num_attention_heads, config.decoder_num_attention_heads) == (2, 4)
    assert (config.hidden_size, config.decoder_hidden_size) == (32, 48)
    hf_model = hf.ViTMAEForPreTraining(config).eval()
    hf_model.load_state_dict(ckpt.to_hf(model.state_dict()), strict=True)
    (hl, hp, hm), (fl, fp, fm) = _forward_both(model, hf_model)
    assert torch.equal(hm, fm)
    torch.testing.assert_close(fp, hp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fl, hl, rtol=1e-5, atol=1e-6)
