"""``fastmae reconstruct``: the official demo's reconstruction view of some images, as a PNG.

    fastmae reconstruct --checkpoint mae_visualize_vit_large.pth cat.jpg dog.jpg --out recon.png
"""
import argparse
import os
import sys
import unittest.mock
import warnings

import torch

from fastmae import checkpoint as ckpt
from fastmae.cli import output_file_error
from fastmae.model import MODELS, MaskedAutoencoderViT
from fastmae.visualize import (PANELS, UNNORMALIZE_PIX, load_images, open_image,
                               reconstruction_image)

DEFAULT_MODEL = "mae_vit_base_patch16"


def _parser():
    p = argparse.ArgumentParser(
        prog="fastmae reconstruct",
        description="Write the MAE demo's view (original | masked | reconstruction | reconstruction "
                    "+ visible patches), one row per image, as a PNG.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files Pillow can read")
    p.add_argument("--checkpoint", required=True,
                   help="official (.pth), Hugging Face (.bin, .safetensors or a save_pretrained folder) "
                        "or fastmae checkpoint with a decoder")
    p.add_argument("--model", choices=sorted(MODELS),
                   help="model factory (default: inferred from the checkpoint's shapes, else "
                        f"{DEFAULT_MODEL})")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed (0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask (0)")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="the model was trained with norm_pix_loss (default: the checkpoint's saved "
                        "training args when it has them, else off)")
    p.add_argument("--unnormalize", choices=tuple(UNNORMALIZE_PIX), default=None,
                   help="how a norm_pix_loss model's prediction is turned back into pixels (default: "
                        "'patch' for a norm_pix_loss model, else 'none'): "
                        + "; ".join(f"{k}: {v}" for k, v in UNNORMALIZE_PIX.items()))
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--out", default="recon.png",
                   help="PNG file to write, ending in .png; missing folders are made (recon.png)")
    return p


def _img_size(sd):
    """The square image size the checkpoint's position table was made for, or None."""
    pos, proj = sd.get("pos_embed"), sd.get("patch_embed.proj.weight")
    if pos is None or proj is None or pos.dim() != 3 or proj.dim() != 4 or proj.shape[-1] != proj.shape[-2]:
        return None
    g = int(round((pos.shape[1] - 1) ** 0.5))
    return g * proj.shape[-1] if g * g == pos.shape[1] - 1 else None


def _infer_model_name(sd):
    """The name in ``MODELS`` whose architecture has exactly ``sd``'s shapes (a decoder may be
    absent), or None. Candidates are built on the meta device, without their weight init: only the
    shapes are needed, and random init on meta tensors imports torch._dynamo (seconds)."""
    img_size = _img_size(sd)
    for name, factory in MODELS.items():
        try:
            with torch.device("meta"), \
                    unittest.mock.patch.object(MaskedAutoencoderViT, "initialize_weights", lambda self: None):
                model = factory(**({"img_size": img_size} if img_size else {}))
        except (ValueError, TypeError):  # img_size not divisible by this model's patch size
            continue
        own = model.state_dict()
        if all(k in own and own[k].shape == t.shape for k, t in sd.items()) and \
                all(k in sd or ckpt._DECODER_RE.match(k) for k in own):
            return name
    return None


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse reports bad arguments (2) and --help (0) by exiting
        return e.code if isinstance(e.code, int) else 2
    try:
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        # each is a bad argument or input (a checkpoint, an image): 2, as argparse's and the
        # other commands' usage errors
        print(f"fastmae reconstruct: error: {e}", file=sys.stderr)
        return 2


def _device(text):
    """The torch device ``--device`` names (default: cuda when available, else cpu), checked
    before any work; a ValueError naming --device otherwise."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_out(out):
    """--out must be a file path ending in .png (a PNG is what is written), checked before any
    work."""
    why = output_file_error("--out", out)
    if why:
        raise ValueError(why)
    if os.path.splitext(out)[1].lower() != ".png":
        raise ValueError(f"--out {out}: must end in .png (the view is written as a PNG)")


def _check_images(paths):
    """Every image exists and Pillow can identify it (its header only), before the checkpoint is
    read, with load_images' messages."""
    for path in paths:
        with open_image(path):
            pass


def _run(args):
    # the arguments and inputs first: reading a checkpoint (up to GBs) and running the model
    # come after
    if not 0 <= args.mask_ratio < 1:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    _check_out(args.out)
    device = _device(args.device)
    _check_images(args.images)
    raw, source = ckpt._read(args.checkpoint)
    sd = ckpt.load(raw)
    layout = ckpt.detect_layout(raw)
    print(f"checkpoint: {source}: {layout} ({ckpt.LAYOUTS[layout]})")

    saved_args = ckpt._training_args(raw)  # main_pretrain.py and fastmae pretrain save their args
    name, how = args.model, "as asked"
    if name is None and saved_args.get("model") in MODELS:
        name, how = saved_args["model"], "from the checkpoint's training args"
    if name is None:
        name = _infer_model_name(sd)
        name, how = (name, "inferred from the checkpoint's shapes") if name else \
            (DEFAULT_MODEL, "the default: the checkpoint's shapes match no model in fastmae.model.MODELS")
    norm_pix, norm_how = args.norm_pix_loss, "as asked"
    if norm_pix is None:
        saved = saved_args.get("norm_pix_loss")
        norm_pix, norm_how = (bool(saved), "from the checkpoint's training args") if saved is not None \
            else (False, "off: the checkpoint saves no training args; pass --norm-pix-loss if it was on")

    img_size = _img_size(sd)
    model = MODELS[name](norm_pix_loss=norm_pix, **({"img_size": img_size} if img_size else {}))
    h, w = model.patch_embed.img_size
    print(f"model: {name} ({how}), {h}x{w} images, norm_pix_loss={norm_pix} ({norm_how})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report is printed below instead
            report = ckpt.load_into(model, sd)
    except ValueError as e:
        if "holds no decoder" in str(e):
            raise ValueError(f"{source} holds no decoder, and a reconstruction needs one: use a "
                             "checkpoint with the decoder (e.g. the official mae_visualize_*)") from None
        raise
    for note in report.resized:
        print(f"resized {note}")

    model.to(device)
    imgs = load_images(args.images, (h, w))
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=gen)
    mode = args.unnormalize or ("patch" if norm_pix else "none")
    image = reconstruction_image(model, imgs, mask_ratio=args.mask_ratio, noise=noise, unnormalize_pix=mode)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    image.save(args.out, format="PNG")
    if norm_pix:
        print(f"norm_pix_loss prediction shown as '{mode}': {UNNORMALIZE_PIX[mode]}")
    elif mode == "none":
        print("prediction shown as is: a model without norm_pix_loss predicts pixels")
    else:
        print(f"prediction shown as '{mode}': {UNNORMALIZE_PIX[mode]} (but the model is not norm_pix_loss)")
    print(f"wrote {args.out}: {len(args.images)} row(s) x 4 panels ({' | '.join(PANELS)}), "
          f"mask ratio {args.mask_ratio}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
