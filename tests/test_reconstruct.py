"""``fastmae reconstruct`` and fastmae.visualize: the demo's four panels, read back pixel by pixel."""
import argparse
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn
from PIL import Image

import fastmae
import fastmae.checkpoint
from fastmae import cli
from fastmae.visualize import GAP, IMAGENET_MEAN, IMAGENET_STD, load_images, reconstruction_image

SIZE, PATCH = 32, 4   # mae_vit_tiny_patch4
L = (SIZE // PATCH) ** 2
KEPT = int(L * (1 - 0.75))
MEAN_RGB = tuple(round(m * 255) for m in IMAGENET_MEAN)  # a blanked (0 in normalized units) pixel


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A mae_vit_tiny_patch4 training checkpoint (as main_pretrain.py saves one, norm_pix_loss on)
    and two PNGs of other sizes and aspect ratios."""
    d = tmp_path_factory.mktemp("recon")
    torch.manual_seed(0)
    model = fastmae.mae_vit_tiny_patch4(norm_pix_loss=True)
    ckpt = d / "checkpoint-0.pth"
    torch.save({"model": model.state_dict(), "epoch": 0,
                "args": argparse.Namespace(input_size=32, norm_pix_loss=True)}, ckpt)
    images = []
    for i, (w, h) in enumerate([(50, 40), (48, 64)]):
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rgb = torch.stack([xx * 255 // w, yy * 255 // h, (xx * yy * (i + 3)) % 256], dim=-1).to(torch.uint8)
        path = d / f"img{i}.png"
        Image.frombytes("RGB", (w, h), rgb.numpy().tobytes()).save(path)
        images.append(str(path))
    return ckpt, images


def panels(png, rows):
    """The (rows x 4) panels of a reconstruction PNG as (H, W, 3) uint8 tensors."""
    im = Image.open(png).convert("RGB")
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return [[t[r * (SIZE + GAP):r * (SIZE + GAP) + SIZE, c * (SIZE + GAP):c * (SIZE + GAP) + SIZE]
             for c in range(4)] for r in range(rows)]


def patches(img):
    """(H, W, 3) -> (L, p, p, 3) in row-major patch order."""
    g = SIZE // PATCH
    return img.reshape(g, PATCH, g, PATCH, 3).permute(0, 2, 1, 3, 4).reshape(L, PATCH, PATCH, 3)


def check_demo_view(png, rows=2):
    im = Image.open(png)
    assert im.format == "PNG"
    assert im.size == (4 * SIZE + 3 * GAP, rows * SIZE + (rows - 1) * GAP)
    blank = torch.tensor(MEAN_RGB, dtype=torch.uint8)
    for original, masked, recon, pasted in panels(png, rows):
        o, m, r, p = map(patches, (original, masked, recon, pasted))
        visible = (m == o).flatten(1).all(1)
        blanked = (m == blank).flatten(1).all(1)
        assert (visible ^ blanked).all(), "each masked-panel patch is the original or blanked"
        assert int(visible.sum()) == KEPT
        assert torch.equal(p[visible], o[visible]), "visible patches pasted back unchanged"
        assert torch.equal(p[~visible], r[~visible]), "removed patches come from the reconstruction"
        assert not torch.equal(r, o)


def test_reconstruct_through_the_cli(files, tmp_path, capsys):
    ckpt, images = files
    out = tmp_path / "sub" / "recon.png"
    rc = cli.main(["reconstruct", "--checkpoint", str(ckpt), *images, "--out", str(out), "--seed", "3"])
    text = capsys.readouterr().out
    assert rc == 0, text
    check_demo_view(out)
    assert "mae_vit_tiny_patch4 (inferred from the checkpoint's shapes)" in text
    assert "norm_pix_loss=True (from the checkpoint's training args)" in text
    assert "shown as 'patch': each patch's prediction un-normalized with that patch's own" in text

    # the same view from a fresh process
    out2 = tmp_path / "recon2.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "fastmae.cli", "reconstruct", "--checkpoint", str(ckpt),
                           *images, "--out", str(out2), "--seed", "3"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    assert Image.open(out2).tobytes() == Image.open(out).tobytes()


def test_reconstruct_options(files, tmp_path, capsys):
    ckpt, images = files
    out = tmp_path / "r.png"
    args = ["reconstruct", "--checkpoint", str(ckpt), images[0], "--out", str(out), "--model",
            "mae_vit_tiny_patch4", "--no-norm-pix-loss", "--mask-ratio", "0.5"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "mae_vit_tiny_patch4 (as asked)" in text and "prediction shown as is" in text
    assert Image.open(out).size == (4 * SIZE + 3 * GAP, SIZE)

    # fastmae pretrain saves its args as a dict, with the model's name
    pretrain_ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": fastmae.checkpoint.load(ckpt), "epoch": 0,
                "args": {"model": "mae_vit_tiny_patch4", "norm_pix_loss": False}}, pretrain_ckpt)
    args = ["reconstruct", "--checkpoint", str(pretrain_ckpt), images[0], "--out", str(out),
            "--unnormalize", "visible"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "mae_vit_tiny_patch4 (from the checkpoint's training args)" in text
    assert "norm_pix_loss=False (from the checkpoint's training args)" in text
    assert "shown as 'visible'" in text and "(but the model is not norm_pix_loss)" in text


@pytest.mark.parametrize("case, message", [
    ("missing image", "image not found"),
    ("not an image", "is not an image Pillow can read"),
    ("missing checkpoint", "checkpoint file not found"),
    ("encoder only", "holds no decoder, and a reconstruction needs one"),
    ("unknown shapes", "the checkpoint lacks model keys: blocks.1.norm1.weight"),
])
def test_reconstruct_errors(files, tmp_path, capsys, case, message):
    ckpt, images = files
    if case == "missing image":
        images = [images[0], str(tmp_path / "nope.png")]
    elif case == "not an image":
        (tmp_path / "notes.png").write_text("not an image")
        images = [str(tmp_path / "notes.png")]
    elif case == "missing checkpoint":
        ckpt = tmp_path / "nope.pth"
    elif case == "unknown shapes":  # matches no factory: falls back to mae_vit_base_patch16, and says why it fails
        ckpt = tmp_path / "other.pth"
        torch.save(fastmae.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                decoder_embed_dim=32, decoder_depth=1,
                                                decoder_num_heads=2).state_dict(), ckpt)
    else:
        sd = fastmae.checkpoint.load(ckpt)
        ckpt = tmp_path / "mae_pretrain.pth"
        torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}}, ckpt)
    rc = cli.main(["reconstruct", "--checkpoint", str(ckpt), *images, "--out", str(tmp_path / "o.png")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


# --------------------------------------------------------------------------- fastmae.visualize

class _Oracle(fastmae.MaskedAutoencoderViT):
    """Predicts exactly the normalized target: a perfect norm_pix_loss model."""

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        loss, _, mask = super().forward(imgs, mask_ratio, noise)
        t = self.patchify(imgs)
        return loss, (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5, mask


def _oracle():
    return _Oracle(img_size=SIZE, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                   decoder_depth=1, decoder_num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                   norm_pix_loss=True)


def test_unnormalize_modes(files):
    _, images = files
    imgs = load_images(images, SIZE)
    noise = torch.rand(2, L, generator=torch.Generator().manual_seed(0))
    model = _oracle().train()
    images = {mode: reconstruction_image(model, imgs, noise=noise, unnormalize_pix=mode)
              for mode in (None, "patch", "visible", "none", True, False)}
    views = {mode: panels_of(im) for mode, im in images.items()}
    assert model.training, "the model is put back in training mode"
    for (original, _, recon, _) in views["patch"]:
        assert (recon.int() - original.int()).abs().max() <= 1  # a perfect prediction shows the image
    for (original, _, recon, _) in views["none"]:
        assert (recon.int() - original.int()).abs().max() > 20  # normalized units are not pixels
    for (original, _, recon, _) in views["visible"]:
        o, r = patches(original), patches(recon)
        assert (r.int() - o.int()).abs().max() > 1
    same = [(None, "patch"), (True, "patch"), (False, "none")]
    assert all(images[a].tobytes() == images[b].tobytes() for a, b in same)
    with pytest.raises(ValueError, match="unnormalize_pix must be"):
        reconstruction_image(model, imgs, unnormalize_pix="global")


def panels_of(image):
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return [[p.clone() for p in row] for row in panels(buf, image.height // SIZE)]


def test_reconstruction_image_checks_its_input():
    model = _oracle()
    with pytest.raises(ValueError, match=r"ImageNet-normalized \(N, 3, H, W\)"):
        reconstruction_image(model, torch.zeros(3, SIZE, SIZE))


def test_load_images_resizes_the_shorter_side_and_center_crops(files, tmp_path):
    _, images = files
    x = load_images(images, (SIZE, 2 * SIZE))
    assert x.shape == (2, 3, SIZE, 2 * SIZE) and x.dtype == torch.float32
    # a wide image: the left and right are cropped, the red (column) gradient stays centered
    wide = tmp_path / "wide.png"
    Image.new("RGB", (200, 100), (255, 0, 0)).save(wide)
    y = load_images([wide], SIZE)
    torch.testing.assert_close(y[0, 0], torch.full((SIZE, SIZE), (1 - 0.485) / 0.229))
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_images([tmp_path / "nope.png"], SIZE)
    with pytest.raises(ValueError, match="at least one"):
        load_images([], SIZE)


# ------------------------------------------------------------------ bad arguments, before any work

@pytest.mark.parametrize("case, message", [
    ("out is a directory", "--out {tmp}: is a directory; give a file path"),
    ("out ends with a slash", "names a folder"),
    ("out below a file", "is not a directory"),
    ("out not .png", "--out {tmp}/recon.jpg: must end in .png"),
    ("unknown device", "--device must be cpu, cuda or cuda:N, got 'foo'"),
    ("cuda without a GPU", "--device cuda: no CUDA device is available"),
    ("missing image", "image not found: {tmp}/nope.png"),
    ("not an image", "is not an image Pillow can read"),
])
def test_reconstruct_checks_arguments_and_images_before_reading_the_checkpoint(
        files, tmp_path, capsys, monkeypatch, case, message):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    ckpt, images = files

    def no_work(*a, **k):
        raise AssertionError("the checkpoint was read before the arguments were checked")
    monkeypatch.setattr(fastmae.checkpoint, "_read", no_work)
    out, extra = tmp_path / "o.png", []
    if case == "out is a directory":
        out = tmp_path
    elif case == "out ends with a slash":
        out = f"{tmp_path}/new/"
    elif case == "out below a file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "o.png"
    elif case == "out not .png":
        out = tmp_path / "recon.jpg"
    elif case == "unknown device":
        extra = ["--device", "foo"]
    elif case == "cuda without a GPU":
        extra = ["--device", "cuda"]
    elif case == "missing image":
        images = [images[0], str(tmp_path / "nope.png")]
    else:
        (tmp_path / "notes.png").write_text("not an image")
        images = [str(tmp_path / "notes.png")]
    rc = cli.main(["reconstruct", "--checkpoint", str(ckpt), *images, "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmae reconstruct: error: "), err
    assert message.format(tmp=tmp_path) in lines[0]
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "recon.jpg").exists()


def test_reconstruct_device_cpu_and_out_case(files, tmp_path, capsys):
    ckpt, images = files
    out = tmp_path / "new" / "R.PNG"
    rc = cli.main(["reconstruct", "--checkpoint", str(ckpt), images[0], "--out", str(out),
                   "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).format == "PNG"


@pytest.mark.parametrize("argv, expected", [
    ([], "the following arguments are required"),
    (["x.png", "--checkpoint", "c.pth", "--mask-ratio", "half"], "--mask-ratio: invalid float"),
])
def test_reconstruct_argument_errors_return_2_like_the_other_commands(capsys, argv, expected):
    assert cli.main(["reconstruct", *argv]) == 2
    assert expected in capsys.readouterr().err
    assert cli.main(["reconstruct", "--help"]) == 0


# ------------------------------------------------- the views' numbers, not only their consistency

def _render(x):
    """(3, H, W) ImageNet-normalized -> (H, W, 3) uint8, as a panel shows it."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0)


def _max_diff(a, b):
    return int((a.int() - b.int()).abs().max())


def test_visible_mode_uses_nothing_from_the_hidden_patches():
    """unnormalize_pix="visible" (UNNORMALIZE_PIX): a visible patch is un-normalized with its
    own mean and std, a removed one with the mean of the visible patches' means and stds. A
    perfect prediction then shows the visible patches as they are, and rescaling the hidden
    patches (which leaves their normalized targets, hence the prediction, unchanged) changes
    nothing in the view."""
    model = _oracle().eval()
    imgs = torch.randn(2, 3, SIZE, SIZE) * 0.6
    noise = torch.rand(2, L)
    _, _, mask = model(imgs, noise=noise)
    hidden = mask.bool()                                              # (N, L)
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, PATCH * PATCH * 3)).bool()
    rescaled = torch.where(removed, 1.7 * imgs + 0.8, imgs)
    views = [panels_of(reconstruction_image(model, x, noise=noise, unnormalize_pix="visible"))
             for x in (imgs, rescaled)]
    t = model.patchify(imgs)
    mean = t.mean(-1, keepdim=True)
    std = (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    for i in range(2):
        (original, _, recon, _), (_, _, recon2, _) = views[0][i], views[1][i]
        o, r, r2 = patches(original), patches(recon), patches(recon2)
        h = hidden[i]
        assert _max_diff(r[~h], o[~h]) <= 1, "visible patches: their own mean and std"
        assert _max_diff(r[h], r2[h]) <= 1, "removed patches: nothing from the hidden ones"
        vis_mean, vis_std = mean[i][~h].mean(), std[i][~h].mean()
        expected = model.unpatchify(((t[i] - mean[i]) / std[i] * vis_std + vis_mean)[None])[0]
        assert _max_diff(r[h], patches(_render(expected))[h]) <= 1


def test_a_perfect_prediction_shows_near_flat_patches_as_they_are():
    """norm_pix_loss divides by (var + 1e-6) ** .5 (official): un-normalizing must use the same
    eps, or a low-contrast patch (variance near eps: sky, walls) is shown with its detail
    amplified. Each patch here is flat but for one value, its variance a few times 1e-6."""
    model = _oracle()
    n, d = 2, PATCH * PATCH * 3
    t = (torch.rand(n, L, 1) * 2 - 1).expand(n, L, d).clone()     # a flat patch: one value
    spike = torch.randint(0, d, (n, L, 1))
    t.scatter_add_(2, spike, (torch.randint(0, 2, (n, L, 1)) * 2 - 1) * (3e-6 * d) ** 0.5)
    imgs = model.unpatchify(t)
    view = panels_of(reconstruction_image(model, imgs, noise=torch.rand(n, L),
                                          unnormalize_pix="patch"))
    for original, _, recon, _ in view:
        assert _max_diff(recon, original) <= 1


def test_each_row_is_its_image_in_command_line_order(files, tmp_path):
    ckpt, images = files
    order = images[::-1]
    out = tmp_path / "rows.png"
    assert cli.main(["reconstruct", "--checkpoint", str(ckpt), *order, "--out", str(out)]) == 0
    for path, (original, *_) in zip(order, panels(out, len(order))):
        assert _max_diff(original, _render(load_images([path], SIZE)[0])) <= 1, path


class _Predicts(fastmae.MaskedAutoencoderViT):
    """Predicts one value everywhere (in the units the view shows as is: unnormalize_pix="none")."""
    value = 0.0

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        loss, pred, mask = super().forward(imgs, mask_ratio, noise)
        return loss, torch.full_like(pred, self.value), mask


def test_a_prediction_out_of_the_displayable_range_saturates():
    """A prediction beyond white or black (an untrained or overshooting model) shows as white or
    black, not wrapped around modulo 256."""
    model = _Predicts(img_size=SIZE, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(1, 3, SIZE, SIZE) * 0.5
    for sign, shown in ((1, 255), (-1, 0)):
        model.value = sign * float(torch.empty(()).uniform_(4, 40))
        (original, masked, recon, pasted), = panels_of(
            reconstruction_image(model, imgs, noise=torch.rand(1, L), unnormalize_pix="none"))
        assert (recon == shown).all(), (model.value, recon.unique())


@pytest.mark.parametrize("w, h", [(3 * SIZE, SIZE), (SIZE, 3 * SIZE), (6 * SIZE, 2 * SIZE)])
def test_load_images_keeps_the_middle_of_a_long_image(tmp_path, w, h):
    """Resized so that it covers SIZE x SIZE (its shorter side to SIZE), then center-cropped:
    of three equal bands along the long side, only the middle one is left."""
    first = torch.randint(0, 256, (3,))
    colours = [(first + 85 * k) % 256 for k in range(3)]            # far apart, each channel
    long_side, wide = max(w, h), w > h
    img = torch.zeros(h, w, 3, dtype=torch.uint8)
    for k, c in enumerate(colours):
        band = slice(k * long_side // 3, (k + 1) * long_side // 3)
        if wide:
            img[:, band] = c.to(torch.uint8)
        else:
            img[band, :] = c.to(torch.uint8)
    path = tmp_path / "long.png"
    Image.frombytes("RGB", (w, h), img.numpy().tobytes()).save(path)
    shown = _render(load_images([path], SIZE)[0])
    m = 4  # bicubic smears the band edges of a downscaled image over a few pixels
    inner = shown[:, m:-m] if wide else shown[m:-m, :]
    assert _max_diff(inner, colours[1].to(torch.uint8).expand_as(inner)) <= 2


def test_seed_and_mask_ratio_reach_the_mask(files, tmp_path):
    ckpt, images = files
    ratio = float(torch.tensor([0.25, 0.5, 0.6])[torch.randint(0, 3, ())])
    seed = int(torch.randint(0, 10 ** 6, ()))
    visible = []
    for s in (seed, seed + 1):
        out = tmp_path / f"seed{s}.png"
        assert cli.main(["reconstruct", "--checkpoint", str(ckpt), images[0], "--out", str(out),
                         "--seed", str(s), "--mask-ratio", str(ratio)]) == 0
        (original, masked, _, _), = panels(out, 1)
        visible.append((patches(masked) == patches(original)).flatten(1).all(1))
        assert int(visible[-1].sum()) == int(L * (1 - ratio)), ratio
    assert not torch.equal(*visible), "another seed, another mask"
