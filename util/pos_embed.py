"""Fixed 2-D sine-cosine position embeddings and their resampling to a new grid."""

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """Sine-cosine embedding of positions.

    embed_dim: even output width D; pos: (M,) positions. Returns (M, D): sines in the first half, cosines in the
    second, with frequencies 1 / 10000^(2i/D).
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """2-D sine-cosine table for a grid of patches.

    grid_size: int or (h, w). Returns (h*w, D), or (1 + h*w, D) with a leading zero row for the class token when
    cls_token is True. Half of D encodes the column (x), half the row (y), rows enumerated in raster order.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    emb_x = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols)
    emb_y = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)
    table = np.concatenate([emb_x, emb_y], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table


def interpolate_pos_embed(model, checkpoint_model, key="pos_embed"):
    """Resample checkpoint_model[key] (1, 1 + h0*w0, D) in place to the grid of model.patch_embed.

    Bicubic interpolation of the patch positions (timm's resampler); the class-token row is kept as is. A square
    source grid is assumed, as in every published MAE checkpoint. Returns True when the table was resampled.
    """
    if key not in checkpoint_model:
        return False
    source = checkpoint_model[key]
    num_prefix = getattr(model, "num_prefix_tokens", 1)
    new_grid = list(model.patch_embed.grid_size)
    old_len = source.shape[1] - num_prefix
    old_side = int(round(old_len**0.5))
    if old_side * old_side != old_len:
        raise ValueError(f"checkpoint '{key}' has {old_len} patch positions, which is not a square grid")
    if [old_side, old_side] == new_grid:
        return False
    checkpoint_model[key] = resample_abs_pos_embed(
        source.float(),
        new_size=new_grid,
        old_size=[old_side, old_side],
        num_prefix_tokens=num_prefix,
        interpolation="bicubic",
        antialias=False,
    ).to(source.dtype)
    print(f"Position embedding '{key}' resampled from {old_side}x{old_side} to {new_grid[0]}x{new_grid[1]}")
    return True


def sincos_parameter(embed_dim, grid_size):
    """A frozen (1, 1 + h*w, D) parameter holding the 2-D sin-cos table with a class-token row."""
    table = torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True)).float()
    return torch.nn.Parameter(table.unsqueeze(0), requires_grad=False)
