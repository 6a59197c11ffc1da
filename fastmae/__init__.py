"""fastmae: a drop-in, fast Masked Autoencoder (He et al. 2021) for PyTorch.

    import fastmae
    model = fastmae.mae_vit_base_patch16(norm_pix_loss=True)
    loss, pred, mask = model(imgs, mask_ratio=0.75)

Importing fastmae touches no GPU: kernels are imported on first use.
"""
from fastmae import ops
from fastmae.backend import use_backend
from fastmae.graphs import cuda_graph_step
from fastmae.model import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_huge_patch14_dec512d8b,
    mae_vit_large_patch16,
    mae_vit_large_patch16_dec512d8b,
    mae_vit_tiny_patch4,
)

__version__ = "0.1.0"

__all__ = [
    "MaskedAutoencoderViT", "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
    "mae_vit_base_patch16_dec512d8b", "mae_vit_large_patch16_dec512d8b",
    "mae_vit_huge_patch14_dec512d8b", "mae_vit_tiny_patch4", "ops", "use_backend",
    "cuda_graph_step",
]
