"""The official MAE demo's view of a reconstruction, as one PIL image.

One row per image, four panels per row, as ``demo/mae_visualize.ipynb``: the original, the image
with the removed patches blanked (to 0 in normalized space, which shows as the ImageNet mean
colour, as the official demo), the reconstruction, and the reconstruction with the visible
patches pasted back.
"""
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")
GAP = 2  # white pixels between panels and between rows

# How the prediction of a norm_pix_loss model, made in per-patch normalized units, is turned back
# into pixels (``unnormalize_pix``).
UNNORMALIZE_PIX = {
    "none": "the raw prediction, as the official demo shows it",
    "patch": "each patch's prediction un-normalized with that patch's own target mean and std "
             "(common practice; for removed patches these two numbers come from the hidden patch)",
    "visible": "removed patches un-normalized with the mean of the visible patches' target means "
               "and stds (uses nothing from the hidden patches)",
}


def _unnormalize_mode(model, unnormalize_pix):
    if unnormalize_pix is None:  # the default: un-normalize exactly when the model predicts normalized patches
        return "patch" if getattr(model, "norm_pix_loss", False) else "none"
    if unnormalize_pix is True or unnormalize_pix is False:
        return "patch" if unnormalize_pix else "none"
    if unnormalize_pix not in UNNORMALIZE_PIX:
        raise ValueError(f"unnormalize_pix must be None, a bool or one of {tuple(UNNORMALIZE_PIX)}, "
                         f"got {unnormalize_pix!r}")
    return unnormalize_pix


def _unreadable(path, e):
    return ValueError(f"{path} is not an image Pillow can read (expected e.g. PNG or JPEG): {e}")


def open_image(path):
    """``Image.open(path)`` (lazy: the header only until the pixels are asked for), a missing
    file or one Pillow cannot read raising an error that names the path."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise _unreadable(path, e) from None


def load_images(paths, size) -> torch.Tensor:
    """Read images with Pillow -> (N, 3, H, W) float32, ImageNet-normalized as the official code.

    ``size`` is an int or (H, W). Each image is resized (bicubic) so that it covers H x W — its
    shorter side for a square size — then center-cropped to H x W."""
    if isinstance(size, int):
        size = (size, size)
    h, w = size
    if isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__"):
        raise TypeError(f"paths must be a list of image paths, got {type(paths).__name__}")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for path in paths:
        with open_image(path) as im:
            try:
                im = im.convert("RGB")
            except (OSError, ValueError) as e:  # a header Pillow reads, pixels it cannot
                raise _unreadable(path, e) from None
        scale = max(h / im.height, w / im.width)
        rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((rw, rh), Image.Resampling.BICUBIC)
        left, top = (rw - w) // 2, (rh - h) // 2
        im = im.crop((left, top, left + w, top + h))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
        out.append((x.permute(2, 0, 1).float() / 255 - mean) / std)
    if not out:
        raise ValueError("paths is empty; expected at least one image path")
    return torch.stack(out)


def _to_pixels(x):
    """(C, H, W) ImageNet-normalized -> uint8 (H, W, C)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return ((x * std + mean) * 255).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu()


@torch.no_grad()
def reconstruction_image(model, imgs, mask_ratio=0.75, noise=None, unnormalize_pix=None) -> Image.Image:
    """The demo view of ``model`` reconstructing ``imgs``: N rows of 4 panels (``PANELS``), with
    ``GAP`` white pixels between them, one image pixel per pixel.

    imgs: (N, 3, H, W), ImageNet-normalized (as ``load_images`` returns), moved to the model's device.
    noise: (N, L) as ``model.forward`` takes it, for a reproducible mask; without it the mask is drawn
    from torch's global generator. unnormalize_pix: a key of ``UNNORMALIZE_PIX``; None picks "patch"
    for a ``norm_pix_loss`` model and "none" otherwise (True / False mean "patch" / "none").
    The model runs in eval mode under no_grad and is put back in the mode it was in."""
    mode = _unnormalize_mode(model, unnormalize_pix)
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or imgs.shape[1] != 3:
        shape = tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__
        raise ValueError(f"imgs must be an ImageNet-normalized (N, 3, H, W) tensor, got {shape}")
    param = next(model.parameters())
    x = imgs.to(device=param.device, dtype=torch.float32)
    if noise is not None:
        noise = noise.to(param.device)

    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(x, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    pred = pred.float()

    if mode != "none":
        # invert the loss's normalization: target = (patch - mean) / (var + 1e-6) ** .5, var unbiased
        target = model.patchify(x)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        if mode == "visible":
            kept = (1 - mask).unsqueeze(-1)  # (N, L, 1), 1 = visible
            n_kept = kept.sum(dim=1, keepdim=True).clamp(min=1)
            mean = torch.where(kept.bool(), mean, (mean * kept).sum(dim=1, keepdim=True) / n_kept)
            std = torch.where(kept.bool(), std, (std * kept).sum(dim=1, keepdim=True) / n_kept)
        pred = pred * std + mean

    y = model.unpatchify(pred)
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).float()).bool()
    panels = (x, torch.where(removed, torch.zeros_like(x), x), y, torch.where(removed, y, x))

    n, _, h, w = x.shape
    canvas = Image.new("RGB", (4 * w + 3 * GAP, n * h + (n - 1) * GAP), "white")
    for i in range(n):
        for j, panel in enumerate(panels):
            tile = Image.frombytes("RGB", (w, h), _to_pixels(panel[i]).contiguous().numpy().tobytes())
            canvas.paste(tile, (j * (w + GAP), i * (h + GAP)))
    return canvas
