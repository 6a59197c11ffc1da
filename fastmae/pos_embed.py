"""Fixed 2-D sin-cos position tables in the official MAE layout.

For an h x w grid of patches the table is (h*w, D) in row-major patch order; the first D/2
channels encode the column coordinate and the last D/2 the row (as official, whose
``np.meshgrid(grid_w, grid_h)`` puts the column first); each half is [sin, cos] of the
coordinate times 1 / 10000 ** (2i / (D/2)). With ``cls_token`` a zero row comes first.
Computed in float32 step by step as official ``util/pos_embed.py`` computes it, so the tables
are its bits (in float64 about 40% of the entries came out up to 2e-6 apart).
"""
import numpy as np


def sincos_1d(embed_dim, pos):
    """(M,) positions -> (M, embed_dim): [sin(pos * omega), cos(pos * omega)]."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos table, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= np.float32(embed_dim / 2.0)
    omega = np.float32(1.0) / np.float32(10000) ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim, grid_hw, cls_token=False):
    """Table for an (h, w) patch grid (an int means a square grid): (1 + h*w, D) or (h*w, D)."""
    if isinstance(grid_hw, int):
        grid_hw = (grid_hw, grid_hw)
    h, w = grid_hw
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos table, got {embed_dim}")
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim], dtype=np.float32), emb], axis=0)
    return emb
