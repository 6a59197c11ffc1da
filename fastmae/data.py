"""Pretraining data: an image folder or procedurally generated images, both reproducible.

Every random choice a sample needs (the crop and flip of a real image, the content of a synthetic
one) is drawn from a generator seeded by ``derive_seed(seed, epoch, index)``, never from a global
random state. So an image depends only on the run's seed, the epoch and its index in the data
set: not on the number of ranks, the batch size, the DataLoader workers or whether the run was
interrupted and resumed.

Both data sets return ``(image, index)``: ``image`` a (3, S, S) float tensor normalized with the
ImageNet mean and std (the official pipeline's), ``index`` the sample's index, which the trainer
uses to derive the sample's masking noise the same way.
"""
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's IMG_EXTENSIONS, so a folder torchvision's ImageFolder reads is read here too
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_MASK64 = (1 << 64) - 1


class DataError(ValueError):
    """The data cannot be used: an empty folder, an unreadable image."""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (negative ones too), through splitmix64.

    Neighbouring inputs such as (seed, epoch, 7) and (seed, epoch, 8) give unrelated seeds, so
    generators seeded from them give independent streams."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# Tags keep the streams of different uses apart even when their other parts coincide.
_TAG_AUGMENT, _TAG_SYNTHETIC = 1, 2


def _normalize(img01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img01 - mean) / std


# ============================================================================ synthetic images

class SyntheticImages(Dataset):
    """``size`` procedurally generated RGB images: a colour gradient, often a stripe or checker
    texture, and one to four filled shapes (discs, ellipses, rectangles, triangles).

    Image ``i`` depends only on ``(seed, i)`` — the same in every epoch, on every machine — so a
    run needs no data at hand. Smooth regions and sharp edges give the MAE something to learn
    that is neither noise nor trivially flat."""

    def __init__(self, size: int, img_size: int, seed: int = 0):
        if size < 1:
            raise DataError(f"the synthetic data set needs at least one image, got size={size}")
        self.size, self.img_size, self.seed = int(size), int(img_size), int(seed)

    def __len__(self):
        return self.size

    def set_epoch(self, epoch: int):
        """Synthetic images do not change between epochs (the masks do)."""

    def image(self, index: int, epoch: int = 0) -> torch.Tensor:
        return _normalize(synthetic_image(self.seed, index, self.img_size))

    def __getitem__(self, index):
        return self.image(index), index


def synthetic_image(seed: int, index: int, size: int) -> torch.Tensor:
    """Image ``index`` of the synthetic set as a (3, size, size) float tensor in [0, 1]."""
    g = _generator(seed, index, _TAG_SYNTHETIC)

    def uniform(*shape, lo=0.0, hi=1.0):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    # pixel centres in [0, 1]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")

    # background: a linear gradient between two colours at a random angle
    c0, c1 = uniform(3, 1, 1), uniform(3, 1, 1)
    angle = uniform(1, hi=2 * math.pi)
    t = x * torch.cos(angle) + y * torch.sin(angle)
    t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    img = c0 + (c1 - c0) * t

    # texture: sinusoidal stripes or a checkerboard, tinted, in two images of three
    kind = int(torch.randint(0, 3, (1,), generator=g))
    freq = uniform(1, lo=2.0, hi=8.0)
    amp = uniform(3, 1, 1, lo=0.05, hi=0.25)
    if kind == 1:
        phi = uniform(1, hi=math.pi)
        img = img + amp * torch.sin(2 * math.pi * freq * (x * torch.cos(phi) + y * torch.sin(phi)))
    elif kind == 2:
        checker = (torch.floor(x * freq) + torch.floor(y * freq)) % 2 * 2 - 1
        img = img + amp * checker

    # shapes, painted in order
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        shape = int(torch.randint(0, 4, (1,), generator=g))
        colour = uniform(3, 1, 1)
        cx, cy = uniform(2, lo=0.15, hi=0.85)
        rx, ry = uniform(2, lo=0.08, hi=0.35)
        if shape == 0:    # disc
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= rx ** 2
        elif shape == 1:  # ellipse
            inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        elif shape == 2:  # rectangle
            inside = ((x - cx).abs() <= rx) & ((y - cy).abs() <= ry)
        else:             # triangle: apex up, base at cy + ry
            inside = (y <= cy + ry) & ((x - cx).abs() <= rx * (y - (cy - ry)) / (2 * ry))
        img = torch.where(inside, colour, img)
    return img.clamp_(0.0, 1.0)


# ============================================================================ image folders

def find_images(root: str) -> list:
    """Every image file under ``root`` (class subfolders or flat), sorted by relative path so
    that index ``i`` is the same file on every rank and machine."""
    if not os.path.isdir(root):
        raise DataError(f"--data {root!r} is not a directory (give an image folder or 'synthetic')")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    if not found:
        raise DataError(f"no images found under {root!r} (looked for files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}, in the folder and its subfolders)")
    return [os.path.join(root, rel) for rel in sorted(found)]


def _load_rgb(path: str):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # as torchvision's pil_loader; also forces the full decode
    except Exception as e:  # PIL raises several types for a bad file; name the file whatever it was
        raise DataError(f"cannot read image {path!r}: {e}") from e


def _torchvision_transforms():
    try:
        import torchvision.transforms as T
        from torchvision.transforms import InterpolationMode
    except Exception:  # torchvision missing, or built for another torch
        return None
    return T, InterpolationMode


class _RandomResizedCropFlip:
    """RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic) + RandomHorizontalFlip +
    ToTensor + Normalize, on Pillow and torch alone: torchvision's algorithm, drawing from the
    global torch random state in the same order, for machines without torchvision."""

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def _crop_box(self, width, height):
        """(top, left, height, width) of the crop: torchvision's ``RandomResizedCrop.get_params``
        step for step, so a seed gives the same box and leaves the generator in the same state.
        Its log-ratio and exp are float32 tensor ops, not math.log/math.exp: in float64 a box now
        and then comes out a pixel off, and every draw after it differs."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        # ten misses (a very long or tall image): a central crop of the nearest allowed ratio
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:  # the whole image
            w = width
            h = height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        from PIL import Image
        i, j, h, w = self._crop_box(*img.size)
        img = img.crop((j, i, j + w, i + h)).resize((self.size, self.size), Image.BICUBIC)
        if torch.rand(1) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        return _normalize(arr.permute(2, 0, 1).float().div_(255))


class ImageFolderImages(Dataset):
    """The images under ``root`` with the official MAE training augmentation:
    RandomResizedCrop(img_size, scale=(0.2, 1.0), bicubic), horizontal flip, ImageNet
    normalization — torchvision's transforms when torchvision imports, an equivalent Pillow +
    torch implementation otherwise. Labels are not needed and not read.

    The augmentation of sample ``i`` in epoch ``e`` is seeded by ``(seed, e, i)``; call
    ``set_epoch`` before iterating (DataLoader workers are started per epoch and copy it)."""

    def __init__(self, root: str, img_size: int, seed: int = 0):
        self.root, self.img_size, self.seed = root, int(img_size), int(seed)
        self.paths = find_images(root)
        self.epoch = 0
        tv = _torchvision_transforms()
        if tv is not None:
            T, InterpolationMode = tv
            self.transform = T.Compose([
                T.RandomResizedCrop(self.img_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        else:
            self.transform = _RandomResizedCropFlip(self.img_size)

    def __len__(self):
        return len(self.paths)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def image(self, index: int, epoch: int = 0) -> torch.Tensor:
        img = _load_rgb(self.paths[index])
        # torchvision's transforms draw from the global torch generator: seed it for this sample
        # inside fork_rng, so the caller's random state is left exactly as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index, _TAG_AUGMENT))
            return self.transform(img)

    def __getitem__(self, index):
        return self.image(index, self.epoch), index


def training_root(data: str) -> str:
    """``data/train`` when ``data`` holds a ``train/`` folder, as the official code always reads
    ``--data_path/train`` (searching the whole tree would train on ``val/`` or ``test/`` too);
    otherwise ``data`` itself, searched whole (class subfolders or a flat folder of images)."""
    train = os.path.join(data, "train")
    return train if os.path.isdir(train) else data


def build_dataset(data: str, img_size: int, seed: int = 0, synthetic_size: int = 10_000) -> Dataset:
    """``data`` is "synthetic" or an image folder (see ``training_root``)."""
    if data == "synthetic":
        return SyntheticImages(synthetic_size, img_size, seed)
    return ImageFolderImages(training_root(data), img_size, seed)
