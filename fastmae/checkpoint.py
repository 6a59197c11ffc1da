"""Read MAE weights from any of the layouts in circulation and write them for timm and Hugging Face.

    sd = fastmae.checkpoint.load("mae_visualize_vit_large.pth")    # -> state_dict in official keys
    fastmae.checkpoint.load_into(model, "model.safetensors")      # strict; resizes position tables
    hf_sd = fastmae.checkpoint.to_hf(sd)                          # transformers 5.x ViTMAEForPreTraining
    hub_sd = fastmae.checkpoint.to_hf(sd, names="4.x")            # 4.x names: both versions read them
    timm_sd = fastmae.checkpoint.to_timm_encoder(sd)              # timm VisionTransformer encoder

Layouts ``load`` reads (``detect_layout`` names them):

  "official"           facebookresearch/mae keys (``blocks.N.attn.qkv``, ``decoder_blocks.N``, ...),
                       a bare state_dict or ``{"model": state_dict, ...}`` as ``main_pretrain.py`` saves
  "official-encoder"   the same without a decoder: the released ``mae_pretrain_*`` files, timm's ViT
                       without a head (``num_classes=0``, ``global_pool="token"``)
  "hf-5.x"             transformers >= 5 ``ViTMAEForPreTraining``: ``vit.layers.N.attention.q_proj``,
                       ``mlp.fc1``, ... (``vit.`` prefix optional: ``ViTMAEModel`` has none)
  "hf-4.x"             transformers 4.x: ``vit.encoder.layer.N.attention.attention.query``,
                       ``attention.output.dense``, ``intermediate.dense``, ``output.dense``, ...;
                       also what transformers 5's ``save_pretrained`` writes for a model built
                       in memory (it converts back to these names, its decoder layers as
                       ``decoder.decoder_encoder.layer.N``; one loaded from 5.x names keeps them)
  ("hf-*-encoder" when an HF state_dict holds no decoder.)

A state_dict may come wrapped as ``{"model": ...}`` or ``{"state_dict": ...}`` (timm's training
files), its keys prefixed by a wrapper's ``module.`` (DDP) or ``_orig_mod.`` (torch.compile), and
``load_into`` takes such a wrapped model too.

Files are a ``torch.save`` pickle (``.pth``, ``.bin``), read with ``weights_only=True``, or a
safetensors file (recognised by its content, whatever its name): a checkpoint never runs code.
"""
import argparse
import os
import pickle
import re
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastmae.pos_embed import sincos_2d

# --------------------------------------------------------------------------- key tables

# Official (= timm) names. A block parameter is "<container>.<i>.<module>.<weight|bias>".
_OFFICIAL_TENSORS = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed")
_OFFICIAL_MODULES = ("patch_embed.proj", "norm", "decoder_embed", "decoder_norm", "decoder_pred")
_BLOCK_MODULES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_OFFICIAL_RE = re.compile(
    r"^(?:(?:%s)|(?:%s)\.(?:weight|bias)|(?:blocks|decoder_blocks)\.\d+\.(?:%s)\.(?:weight|bias))$"
    % ("|".join(_OFFICIAL_TENSORS), "|".join(map(re.escape, _OFFICIAL_MODULES)),
       "|".join(map(re.escape, _BLOCK_MODULES))))
# decoder keys: what an encoder-only checkpoint lacks
_DECODER_RE = re.compile(r"^(?:mask_token|decoder_)")

# Hugging Face top-level names (after an optional "vit." on the encoder's) -> official names.
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
# Per-layer module names: official -> (transformers 5.x, transformers 4.x). q, k and v are three
# Linears in HF and one packed Linear (rows q, then k, then v) in the official model.
_HF_LAYER_MODULES = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "attn.proj": ("attention.o_proj", "attention.output.dense"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}
_HF_QKV = (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
           ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
# Encoder layers are "layers.N" in 5.x and "encoder.layer.N" in 4.x; decoder layers are
# "decoder.decoder_layers.N" in both. transformers 5's save_pretrained writes files in the 4.x names,
# and its reversed "encoder.layer." -> "layers." rule turns the decoder's into
# "decoder.decoder_encoder.layer.N" (from_pretrained reads them back), so files with those exist.
_HF_LAYER_RE = re.compile(
    r"^(?:(?P<enc>layers|encoder\.layer)|(?P<dec>decoder\.decoder_(?:layers|encoder\.layer)))"
    r"\.(?P<i>\d+)\.(?P<module>.+)\.(?P<param>weight|bias)$")

_HF_MODULE_TO_OFFICIAL = {}   # HF module name -> (official module or ("qkv", j), version or None)
for _official, (_v5, _v4) in _HF_LAYER_MODULES.items():
    _HF_MODULE_TO_OFFICIAL[_v5] = (_official, None if _v5 == _v4 else "5.x")
    _HF_MODULE_TO_OFFICIAL[_v4] = (_official, None if _v5 == _v4 else "4.x")
for _version, _names in zip(("5.x", "4.x"), _HF_QKV):
    for _j, _name in enumerate(_names):
        _HF_MODULE_TO_OFFICIAL[_name] = (("qkv", _j), _version)

LAYOUTS = {
    "official": "official MAE keys, encoder and decoder",
    "official-encoder": "official MAE / timm ViT keys, encoder only (no decoder)",
    "hf-5.x": "Hugging Face ViTMAE, transformers 5.x names",
    "hf-4.x": "Hugging Face ViTMAE, transformers 4.x names (also the files transformers 5 writes)",
    "hf-5.x-encoder": "Hugging Face ViTMAE, transformers 5.x names, encoder only (no decoder)",
    "hf-4.x-encoder": "Hugging Face ViTMAE, transformers 4.x names, encoder only (no decoder)",
}

_EXPECTED = ("an MAE state_dict: official keys (cls_token, pos_embed, patch_embed.proj.weight, "
             "blocks.N.attn.qkv.weight, ...) or Hugging Face ViTMAE keys (vit.embeddings.cls_token, "
             "vit.layers.N.attention.q_proj.weight or vit.encoder.layer.N.attention.attention.query.weight, ...)")


def _some(keys, n=5):
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# --------------------------------------------------------------------------- reading

class RefusedObject(ValueError):
    """A pickle that would have the unpickler build a Python object other than tensors, numbers,
    strings and containers (or argparse.Namespace): ``name`` is its class or function."""

    def __init__(self, name):
        super().__init__(f"Unsupported global: GLOBAL {name}")
        self.name = name


def torch_load_safely(path):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with argparse.Namespace
    allowed: main_pretrain.py saves its arguments beside the weights, and building one only
    sets attributes, so a checkpoint still cannot run code. A pickle of any other Python object
    raises RefusedObject; other failures are torch's."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if refused:
            raise RefusedObject(refused.group(1)) from None
        raise


def _read(checkpoint):
    """A path, or an object already loaded -> (object, description of where it came from)."""
    if isinstance(checkpoint, dict):
        return checkpoint, "the checkpoint"
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError("checkpoint must be a path (str or os.PathLike) or a state_dict (dict), "
                        f"got {type(checkpoint).__name__}")
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        # a save_pretrained() folder: take its weights file
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise ValueError(f"{path} is a folder without model.safetensors or pytorch_model.bin; "
                             "expected a checkpoint file (.pth, .bin or .safetensors)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        # safetensors: an 8-byte little-endian header length (under 100 MB), then the JSON header
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu"), path
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        return torch_load_safely(path), path
    except RefusedObject as e:  # a class or function the file would have had the unpickler call
        raise ValueError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain "
            "containers, and fastmae reads checkpoints with torch.load(weights_only=True) so that "
            f"a checkpoint can never run code ({e})") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError, ...
        msg = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line),
                   str(e).strip().splitlines()[0] if str(e).strip() else "")
        raise ValueError(f"{path} is not a checkpoint: expected a file written by torch.save "
                         f"(.pth, .bin) or a .safetensors file ({type(e).__name__}: {msg})") from None


def _state_dict_of(obj, source):
    """Unwrap {"model": sd, ...} (official and fastmae training checkpoints) and check the values."""
    if not isinstance(obj, dict):
        raise TypeError(f"{source}: expected a state_dict (a dict of tensors) or {{'model': state_dict}}, "
                        f"got {type(obj).__name__}")
    for wrapper in ("model", "state_dict"):  # official and fastmae; timm's training checkpoints
        if wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    obj = _without_wrapper_prefix(obj)
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: expected {_EXPECTED}, but these entries are not named tensors: "
                         f"{_some(map(str, bad))}")
    if not obj:
        raise ValueError(f"{source}: the state_dict is empty; expected {_EXPECTED}")
    return obj


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / FSDP1 and torch.compile's key prefixes


def _without_wrapper_prefix(sd):
    """``sd`` with the prefix every key shares taken off when it is a wrapper's (a state_dict saved
    from a DDP or torch.compile'd model)."""
    stripped = True
    while stripped and sd:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


# --------------------------------------------------------------------------- layouts

def _strip_vit(key):
    return key[4:] if key.startswith("vit.") else key


def _hf_version(key):
    """"5.x" / "4.x" when an HF key's name tells, None when the name is the same in both, "" when the
    key is not an HF ViTMAE key."""
    k = _strip_vit(key)
    if k in _HF_TOP:
        return None
    m = _HF_LAYER_RE.match(k)
    if not m or m["module"] not in _HF_MODULE_TO_OFFICIAL:
        return ""
    version = _HF_MODULE_TO_OFFICIAL[m["module"]][1]
    if version is None:
        container = m["enc"] or m["dec"]
        version = "4.x" if container.endswith("encoder.layer") else "5.x" if m["enc"] else None
    return version


def _layout(sd, source="the checkpoint"):
    official = [k for k in sd if _OFFICIAL_RE.match(k)]
    hf = {k: _hf_version(k) for k in sd if not _OFFICIAL_RE.match(k)}
    unknown = [k for k, v in hf.items() if v == ""]
    if not official and len(unknown) == len(hf):
        raise ValueError(f"{source} is not an MAE checkpoint: expected {_EXPECTED}; "
                         f"found keys {_some(sd)}")
    if official and len(unknown) < len(hf):
        raise ValueError(f"{source} mixes official MAE keys ({_some(official, 2)}) with Hugging Face "
                         f"ViTMAE keys ({_some([k for k, v in hf.items() if v != ''], 2)}); expected one layout")
    if unknown:
        raise ValueError(f"{source}: keys that are not part of an MAE model: {_some(unknown)} (a fine-tuned "
                         "classifier, or another model?); expected " + _EXPECTED)
    if official:
        has_decoder = any(_DECODER_RE.match(k) for k in official)
        return "official" if has_decoder else "official-encoder"
    versions = set(hf.values()) - {None}
    version = "4.x" if "4.x" in versions else "5.x"
    has_decoder = any(_strip_vit(k).startswith("decoder.") for k in hf)
    return f"hf-{version}" + ("" if has_decoder else "-encoder")


def detect_layout(state_dict) -> str:
    """The layout of ``state_dict`` (or of ``{"model": state_dict}``): one of ``LAYOUTS``. Raises
    ValueError for a state_dict that is not an MAE's."""
    return _layout(_state_dict_of(state_dict, "the checkpoint"))


def _from_hf(sd, source):
    out, qkv = {}, {}
    for key, t in sd.items():
        k = _strip_vit(key)
        if k in _HF_TOP:
            out[_HF_TOP[k]] = t
            continue
        m = _HF_LAYER_RE.match(k)
        prefix = f"{'blocks' if m['enc'] else 'decoder_blocks'}.{int(m['i'])}"
        target = _HF_MODULE_TO_OFFICIAL[m["module"]][0]
        if isinstance(target, tuple):
            qkv.setdefault((prefix, m["param"]), [None, None, None])[target[1]] = t
        else:
            out[f"{prefix}.{target}.{m['param']}"] = t
    for (prefix, param), parts in qkv.items():
        if any(p is None for p in parts):
            missing = [n for n, p in zip("qkv", parts) if p is None]
            raise ValueError(f"{source}: {prefix} has no {'/'.join(missing)} projection {param}; "
                             "expected all three of query, key and value")
        out[f"{prefix}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    # an HF model built with qkv_bias=False has no q/k/v biases; the official always has a qkv bias,
    # and a zero bias computes the same thing
    for key in [k for k in out if k.endswith(".attn.qkv.weight")]:
        bias_key = key[:-len("weight")] + "bias"
        if bias_key not in out:
            w = out[key]
            out[bias_key] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out


def _to_official(sd, source):
    layout = _layout(sd, source)
    out = dict(sd) if layout.startswith("official") else _from_hf(sd, source)
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in out]
    if missing:
        raise ValueError(f"{source}: an incomplete MAE state_dict ({LAYOUTS[layout]}) without "
                         f"{', '.join(missing)}; expected at least the patch embedding, cls token and "
                         "position table")
    return out, layout


def load(checkpoint, verbose=False) -> dict:
    """A state_dict in official MAE keys from ``checkpoint``: a path (``.pth``/``.bin`` pickle,
    ``.safetensors``, or a ``save_pretrained`` folder) or a dict (a state_dict or ``{"model": sd}``),
    in any layout of ``LAYOUTS``. With ``verbose`` it prints one line naming the layout it found.
    Tensors are not copied except q/k/v, which are packed into one ``attn.qkv``."""
    obj, source = _read(checkpoint)
    sd, layout = _to_official(_state_dict_of(obj, source), source)
    if verbose:
        print(f"fastmae.checkpoint: {source}: {layout} ({LAYOUTS[layout]}), {len(sd)} tensors")
    return sd


def _training_args(checkpoint_object):
    """The ``args`` a training script saved beside the weights (argparse.Namespace or dict), as a
    dict; empty when there are none."""
    if not isinstance(checkpoint_object, dict):
        return {}
    args = checkpoint_object.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


# --------------------------------------------------------------------------- writing

def to_hf(checkpoint, names="5.x") -> dict:
    """``checkpoint`` (a state_dict or file in any layout ``load`` reads) in transformers 5.x
    ``ViTMAEForPreTraining`` keys, loadable with ``strict=True`` into
    ``ViTMAEForPreTraining(hf_config(model))``. An encoder-only checkpoint gives only the ``vit.*``
    keys (strip ``vit.`` for ``ViTMAEModel``). ``names="4.x"``: transformers 4.x keys instead,
    the names of the files on the Hub, which ``from_pretrained`` of either version reads."""
    if names not in ("5.x", "4.x"):
        raise ValueError(f"names must be '5.x' or '4.x', got {names!r}")
    v = 0 if names == "5.x" else 1
    sd = load(checkpoint)
    official_to_hf = {v: k for k, v in _HF_TOP.items()}
    out = {}
    for key, t in sd.items():
        if key in official_to_hf:
            hf = official_to_hf[key]
            out[hf if hf.startswith("decoder.") else "vit." + hf] = t
            continue
        container, i, rest = key.split(".", 2)
        module, param = rest.rsplit(".", 1)
        encoder_layers = ("vit.layers", "vit.encoder.layer")[v]
        prefix = f"{encoder_layers}.{i}" if container == "blocks" else f"decoder.decoder_layers.{i}"
        if module == "attn.qkv":
            for name, part in zip(_HF_QKV[v], t.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{param}"] = part.clone()  # own storage: safetensors rejects views
        else:
            out[f"{prefix}.{_HF_LAYER_MODULES[module][v]}.{param}"] = t
    return out


def to_timm_encoder(checkpoint) -> dict:
    """The encoder of ``checkpoint`` (a state_dict or file in any layout ``load`` reads) in timm
    ``VisionTransformer`` keys: ``cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*``.
    It loads with ``strict=True`` into a ``VisionTransformer(num_classes=0)`` of the same shape. For
    fine-tuning, load it as the official ``main_finetune.py`` does, ``strict=False``: a new ``head.*``
    is missing, and with ``global_pool="avg"`` timm's ``fc_norm.*`` is missing and ``norm.*`` unused."""
    return {k: t for k, t in load(checkpoint).items() if not _DECODER_RE.match(k)}


def hf_config(model, **overrides):
    """The transformers ``ViTMAEConfig`` matching a fastmae ``MaskedAutoencoderViT`` (dims, heads,
    LayerNorm eps, ``norm_pix_loss``); ``overrides`` set other fields, e.g. ``mask_ratio``."""
    try:
        from transformers import ViTMAEConfig
    except ImportError as e:
        raise ImportError("hf_config needs transformers: pip install transformers") from e
    img_h, img_w = model.patch_embed.img_size
    if img_h != img_w:
        raise ValueError(f"Hugging Face ViTMAE takes square images only; the model's img_size is {img_h}x{img_w}")
    norms = [model.norm, model.decoder_norm] + [n for b in (*model.blocks, *model.decoder_blocks)
                                                for n in (b.norm1, b.norm2)]
    eps = {getattr(n, "eps", None) for n in norms}
    if len(eps) != 1 or not all(isinstance(n, torch.nn.LayerNorm) for n in norms):
        raise ValueError("Hugging Face ViTMAE uses one LayerNorm eps everywhere; the model's norm "
                         f"layers are {sorted({type(n).__name__ for n in norms})} with eps {eps}")
    enc = model.blocks[0] if len(model.blocks) else None
    dec = model.decoder_blocks[0] if len(model.decoder_blocks) else None
    fields = dict(
        hidden_size=model.cls_token.shape[-1],
        num_hidden_layers=len(model.blocks),
        num_attention_heads=enc.attn.num_heads if enc else 1,
        intermediate_size=enc.mlp.fc1.out_features if enc else 4 * model.cls_token.shape[-1],
        decoder_hidden_size=model.mask_token.shape[-1],
        decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=dec.attn.num_heads if dec else 1,
        decoder_intermediate_size=dec.mlp.fc1.out_features if dec else 4 * model.mask_token.shape[-1],
        image_size=img_h,
        patch_size=model.patch_embed.patch_size[0],
        num_channels=model.patch_embed.proj.in_channels,
        norm_pix_loss=bool(model.norm_pix_loss),
        layer_norm_eps=eps.pop(),
        hidden_act="gelu",  # exact (erf) GELU, as the official
        qkv_bias=True,
    )
    fields.update(overrides)
    return ViTMAEConfig(**fields)


# --------------------------------------------------------------------------- loading into a model

class LoadReport(NamedTuple):
    layout: str          # what load() found, a key of LAYOUTS
    missing_keys: list   # model keys the checkpoint lacked and that kept the model's own values
    resized: list        # one line per position table resized to the model's patch grid


def _square_grid(n, key, source):
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"{source}: {key} holds {n} patch positions, which is not a square grid, so its "
                         "grid cannot be inferred to resize it; expected a square grid's table")
    return g


def _sincos_table(dim, grid_hw):
    return torch.from_numpy(sincos_2d(dim, grid_hw, cls_token=True)).to(torch.float32)


def _sincos_grid(table, first_try):
    """The (h, w) patch grid whose fixed sin-cos table the (1, 1 + n, D) ``table`` is, or None (a
    learned table). The grids of n patches are tried, ``first_try`` and the square one first; a
    table stored in fp16 or bf16 is within its dtype's rounding of the fp32 one."""
    n, dim = table.shape[1] - 1, table.shape[2]
    if dim % 4 or n < 1 or not table.dtype.is_floating_point:
        return None
    atol = max(1e-5, torch.finfo(table.dtype).eps)
    g = int(round(n ** 0.5))
    grids = [first_try, (g, g)] + [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    values = table[0].float()
    for h, w in dict.fromkeys(grid for grid in grids if grid[0] * grid[1] == n):
        if torch.allclose(values, _sincos_table(dim, (h, w)), rtol=0, atol=atol):
            return (h, w)
    return None


def _resize_pos_table(table, grid_hw, key, source, pos_embed="recompute"):
    """Fit a (1, 1 + n, D) position table to the model's (h, w) grid -> (new table, what was done),
    or None when it fits as it is.

    The tables MAE trains with are fixed 2-D sin-cos; one that is such a table for another grid
    (another patch count, or the same count in another shape, 4x16 for 8x8) is recomputed for the
    model's grid, exactly what a model built at that size holds. Any other (learned) table of
    another patch count is resized as the official ``interpolate_pos_embed``: bicubic,
    align_corners=False, cls row kept; one of the model's patch count loads as it is. With
    ``pos_embed="interpolate"`` every table of another patch count is interpolated so, as
    official ``main_finetune.py`` does (a fixed table then holds what it would hold there)."""
    n, dim = table.shape[1] - 1, table.shape[2]
    h, w = grid_hw
    if pos_embed == "interpolate" and n != h * w:
        src = None
    else:
        src = _sincos_grid(table, (h, w))
    if src is not None:
        if src == (h, w):
            return None
        return (_sincos_table(dim, (h, w)).unsqueeze(0),
                f"{key}: fixed sin-cos table recomputed for a {src[0]}x{src[1]} -> {h}x{w} patch grid")
    if n == h * w:
        return None
    g = _square_grid(n, key, source)
    extra, tokens = table[:, :1], table[:, 1:]
    tokens = tokens.float().reshape(1, g, g, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(h, w), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2).to(table.dtype)
    return (torch.cat((extra, tokens), dim=1),
            f"{key}: {'table' if pos_embed == 'interpolate' else 'learned table'} interpolated "
            f"bicubic from a {g}x{g} to a {h}x{w} patch grid "
            "(as the official interpolate_pos_embed)")


def _unwrapped(model):
    """The MAE inside torch.compile's OptimizedModule (``_orig_mod``) or a DDP-style ``module``
    wrapper: its own state_dict keys are the checkpoint's."""
    while True:
        # an OptimizedModule forwards attribute reads to its model, so look in its own tables
        inner = model._modules.get("_orig_mod")
        if inner is None and not hasattr(model, "patch_embed"):
            inner = model._modules.get("module")
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def load_into(model, checkpoint, allow_missing_decoder=False, pos_embed="recompute") -> LoadReport:
    """Load ``checkpoint`` (anything ``load`` reads) into a fastmae ``MaskedAutoencoderViT``.

    Strict: every model key must be in the checkpoint with the model's shape, and the checkpoint may
    hold nothing else. Two exceptions, each announced with a warning and listed in the returned
    ``LoadReport``: position tables of another image size are resized to the model's patch grid; and
    with ``allow_missing_decoder=True`` an encoder-only checkpoint (``mae_pretrain_*``) loads the
    encoder and leaves the model's decoder as it is.

    ``pos_embed``: "recompute" (the default) gives a fixed sin-cos table of another grid the
    model's own sin-cos table; "interpolate" resizes every table of another patch count bicubic,
    as official ``main_finetune.py`` (``interpolate_pos_embed``), for its numbers."""
    if pos_embed not in ("recompute", "interpolate"):
        raise ValueError(f"pos_embed must be 'recompute' or 'interpolate', got {pos_embed!r}")
    obj, source = _read(checkpoint)
    sd, layout = _to_official(_state_dict_of(obj, source), source)
    model = _unwrapped(model)
    own = model.state_dict()

    resized = []
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in sd and key in own and sd[key].dim() == 3 \
                and sd[key].shape[-1] == own[key].shape[-1]:
            fitted = _resize_pos_table(sd[key], model.patch_embed.grid_size, key, source,
                                       pos_embed)
            if fitted is not None:
                sd[key], note = fitted
                resized.append(note)

    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise ValueError(f"{source} holds keys the model does not have: {_some(unexpected)} "
                         "(a deeper model, or another architecture?)")
    missing = [k for k in own if k not in sd]
    missing_decoder = [k for k in missing if _DECODER_RE.match(k)]
    if len(missing_decoder) < len(missing):
        raise ValueError(f"{source} lacks model keys: {_some(k for k in missing if not _DECODER_RE.match(k))} "
                         "(a shallower model, or an incomplete checkpoint?)")
    if missing_decoder and not allow_missing_decoder:
        if not any(_DECODER_RE.match(k) for k in sd):
            raise ValueError(
                f"{source} holds no decoder ({LAYOUTS[layout]}, like the released mae_pretrain_* files): "
                f"the model's {len(missing_decoder)} decoder keys ({_some(missing_decoder, 3)}) are missing. "
                "Pass allow_missing_decoder=True to load the encoder and keep the model's own decoder.")
        raise ValueError(f"{source} lacks decoder keys: {_some(missing_decoder)}; "
                         "pass allow_missing_decoder=True to keep the model's own values for them")
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if sd[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{source} does not fit the model; shape mismatches: " + "; ".join(mismatched[:5])
                         + (f"; ... ({len(mismatched)} in all)" if len(mismatched) > 5 else ""))

    model.load_state_dict(sd, strict=not missing_decoder)
    for note in resized:
        warnings.warn(f"fastmae.checkpoint: {note}", stacklevel=2)
    if missing_decoder:
        warnings.warn(f"fastmae.checkpoint: {source} holds no decoder; kept the model's own values for "
                      f"{len(missing_decoder)} decoder keys: {_some(missing_decoder, 3)}", stacklevel=2)
    return LoadReport(layout, missing_decoder, resized)
