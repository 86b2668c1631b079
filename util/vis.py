"""Reconstruction grids of MAE / ChannelMAE models, as uint8 RGB arrays and PNG files (PIL, no matplotlib).

One row per (sample, channel), four panels per row: the original, the masked input, the reconstruction and the
reconstruction with the visible patches pasted back. Every row is contrast-stretched on its original channel
(1st-99th percentile) and the same mapping applies to all four panels. Optionally one extra row per sample shows
three channels as an RGB composite. Masked pixels (and pixels a cross-attention decoder did not predict) are
drawn in ``MASK_RGB``.

The masked MSE is measured where the loss measures it, against ``model.loss_target``: normalised pixels, or under
``norm_pix_loss`` patches normalised by their own mean and variance. A norm-pix model predicts no patch mean or
variance, so its pixels exist only with the hidden patch's true ones: the picture draws it so (and says so in a
note), but no error is computed from those pixels.
"""

import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from timm.utils import unwrap_model

from util.distributed import is_main_process
from util.rng import get_rng_state, set_rng_state

PANELS = ("original", "masked", "recon", "recon+vis")
MASK_RGB = (72, 72, 120)
LABEL_RGB = (230, 230, 230)
BACKGROUND_RGB = (16, 16, 16)
PERCENTILES = (1.0, 99.0)
MIN_TILE = 64
"""Tiles of images smaller than this are enlarged by an integer factor (nearest neighbour)."""
NOTE_LINE_H = 12
NORM_PIX_NOTE = (
    "* norm-pix prediction, drawn with each",
    "  hidden patch's true mean and std",
    "  mse: per-patch normalised (the loss's)",
)
"""Footer of the grid of a norm_pix_loss model: what its reconstruction panels and MSE labels show."""


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a reconstruction grid: `samples` blocks of `rows` rows of len(PANELS) tiles."""

    samples: int
    rows: int
    tile_h: int
    tile_w: int
    labels: bool = True
    gap: int = 2
    sample_gap: int = 6
    label_w: int = 60
    header_h: int = 14
    footer_h: int = 0

    @property
    def left(self):
        return self.gap + (self.label_w if self.labels else 0)

    @property
    def top(self):
        return self.gap + (self.header_h if self.labels else 0)

    @property
    def width(self):
        return self.left + len(PANELS) * (self.tile_w + self.gap)

    @property
    def height(self):
        rows_h = self.samples * self.rows * (self.tile_h + self.gap) + (self.samples - 1) * self.sample_gap
        return self.top + rows_h + self.footer_h

    def origin(self, sample, row, panel):
        """(x, y) of the top-left pixel of a tile."""
        x = self.left + panel * (self.tile_w + self.gap)
        y = self.top + (sample * self.rows + row) * (self.tile_h + self.gap) + sample * self.sample_gap
        return x, y


@contextmanager
def seeded_rng(seed):
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` for the block, then restore the caller's states.

    Drawing a mask or an augmented image here therefore leaves the training run's random stream untouched. CUDA
    is seeded only when already initialised (a lazily queued seed would outlive the block).
    """
    state = get_rng_state()
    try:
        torch.random.default_generator.manual_seed(seed)
        if state["cuda"] is not None:
            torch.cuda.manual_seed_all(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - the global RNGs are what third-party transforms draw from
        random.seed(seed)
        yield
    finally:
        set_rng_state(state)


def token_to_pixel_mask(model, token_mask, C):
    """token_mask (N, L) or (N, C*L) of 0/1 -> bool (N, C, H, W), each token covering its patch (and channel)."""
    N = token_mask.shape[0]
    h, w = model.patch_embed.grid_size
    p = model.patch_size
    m = token_mask.reshape(N, -1, h, w).bool()
    m = m.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    return m.expand(N, C, h * p, w * p)


def target_space_error(model, imgs, pred):
    """Squared error of pred against the loss's target, each element at its pixel: (N, C, H, W) float32.

    imgs: (N, C, H, W); pred: (N, T, P). The mean over the masked pixels is the loss over the masked tokens; a
    channel's pixels hold the loss's errors on that channel (for MAE under norm_pix_loss, on targets normalised
    by statistics of the whole patch, all channels together).
    """
    return model.unpatchify((pred.float() - model.loss_target(imgs)) ** 2)


def mse_space(model):
    """Words for the space of the masked MSE (see target_space_error)."""
    if model.norm_pix_loss:
        return "patches normalised by their own mean and variance, the --norm_pix_loss target"
    return "normalised pixels"


@torch.no_grad()
def reconstruct(model, imgs, channel_ids=None, mask_ratio=0.75, seed=0):
    """Mask, encode and decode a batch with a fixed random mask, outside the caller's RNG stream.

    model: MAE or ChannelMAE (DDP / torch.compile wrappers are unwrapped: only the bare module runs, so no
    collective is called); imgs: (N, C, H, W) as the model takes them; channel_ids: None, (C,) or (N, C). Runs
    without autograd, in eval mode and float32; restores the training flag and all RNG states (see seeded_rng).
    Returns a dict of CPU tensors: 'original', 'recon' (N, C, H, W) (for the picture only: under norm_pix_loss
    the predicted normalised patches rescaled with each target patch's true mean and std), 'masked' (bool, N, C,
    H, W: pixels hidden from the encoder), 'predicted' (bool, N, C, H, W: pixels with a prediction), 'pasted'
    (recon where masked, else the original), 'mse' (N, C: mean squared error in the loss's target space over
    each sample's masked pixels of each channel, NaN where none is masked; see target_space_error) and
    'channel_mse' (C,: the same over the whole batch); and 'norm_pix' (bool: the model's norm_pix_loss).
    """
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    imgs = imgs.float()
    N, C = imgs.shape[:2]
    try:
        with seeded_rng(seed):
            latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio, channel_ids)
            pred, decoded = model.forward_decoder(latent, ids_restore, channel_ids, 1.0)
    finally:
        model.train(was_training)
    pred = pred.float()
    drawn = pred
    if model.norm_pix_loss:  # for the picture only: rescaled with each hidden patch's own mean and std
        target = model.patchify(imgs)
        drawn = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = model.unpatchify(drawn)
    masked = token_to_pixel_mask(model, mask, C)
    # the full decoder predicts every token; the cross decoder only the masked ones (all of them: decode ratio 1)
    predicted = token_to_pixel_mask(model, decoded, C) if model.decoder == "cross" else torch.ones_like(masked)
    sq_err = target_space_error(model, imgs, pred) * masked
    count = masked.sum(dim=(2, 3)).float()
    mse = sq_err.sum(dim=(2, 3)) / count
    channel_mse = sq_err.sum(dim=(0, 2, 3)) / count.sum(dim=0)
    out = dict(
        original=imgs,
        recon=recon,
        masked=masked,
        predicted=predicted,
        pasted=torch.where(masked, recon, imgs),
        mse=mse,
        channel_mse=channel_mse,
    )
    return {**{k: v.detach().cpu() for k, v in out.items()}, "norm_pix": model.norm_pix_loss}


def stretch_limits(x):
    """(N, C, H, W) -> per image and channel (lo, hi) (N, C) arrays: the 1st and 99th percentile."""
    flat = x.reshape(*x.shape[:2], -1).numpy().astype(np.float64)
    lo, hi = np.percentile(flat, PERCENTILES, axis=-1)
    return lo, hi


def to_uint8(x, lo, hi):
    """Map [lo, hi] to [0, 255] with clipping. x: (..., H, W); lo, hi broadcast to x.shape[:-2]."""
    lo = np.asarray(lo, dtype=np.float64)[..., None, None]
    scale = np.maximum(np.asarray(hi, dtype=np.float64)[..., None, None] - lo, 1e-12)
    return np.clip(np.rint((np.asarray(x, dtype=np.float64) - lo) / scale * 255.0), 0, 255).astype(np.uint8)


def panel_images(result, rgb=None):
    """Rendered panels: uint8 array (N, rows, len(PANELS), H, W, 3) with rows = C (+1 with an RGB composite).

    rgb: indices of three channels for the composite row, or None.
    """
    lo, hi = stretch_limits(result["original"])
    everywhere = torch.ones_like(result["masked"])
    shown = [everywhere, ~result["masked"], result["predicted"], everywhere]
    values = [result["original"], result["original"], result["recon"], result["pasted"]]
    panels = []
    for value, visible in zip(values, shown):
        grey = to_uint8(value.numpy(), lo, hi)
        colour = np.repeat(grey[..., None], 3, axis=-1)
        colour[~visible.numpy()] = MASK_RGB
        if rgb is not None:
            composite = grey[:, list(rgb)].transpose(0, 2, 3, 1).copy()
            for k, c in enumerate(rgb):
                composite[..., k][~visible[:, c].numpy()] = MASK_RGB[k]
            colour = np.concatenate([colour, composite[:, None]], axis=1)
        panels.append(colour)
    return np.stack(panels, axis=2)


def auto_scale(height):
    """Integer enlargement so that tiles are at least MIN_TILE pixels high."""
    return max(1, math.ceil(MIN_TILE / height))


def fit_text(text, font, width):
    """text, shortened with a trailing '~' until it is at most `width` pixels wide in `font`."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength(text + "~") > width:
        text = text[:-1]
    return text + "~"


def render_grid(result, channel_names=None, rgb=None, labels=True, scale=None):
    """Draw the panels of `reconstruct` into one uint8 (height, width, 3) image (see GridLayout).

    channel_names: C strings for the row labels (default 'ch<i>'). With labels, a header names the panels and
    each row is labelled with its channel and that sample's masked MSE; for a norm_pix_loss model the
    reconstruction titles carry a '*' and a footer (NORM_PIX_NOTE) says what they show. scale: integer tile
    enlargement (default: auto_scale).
    """
    tiles = panel_images(result, rgb)
    N, rows, _, H, W, _ = tiles.shape
    scale = scale or auto_scale(H)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=3).repeat(scale, axis=4)
    note = NORM_PIX_NOTE if labels and result["norm_pix"] else ()
    layout = GridLayout(N, rows, H * scale, W * scale, labels=labels, footer_h=len(note) * NOTE_LINE_H)
    canvas = np.empty((layout.height, layout.width, 3), np.uint8)
    canvas[:] = BACKGROUND_RGB
    for n in range(N):
        for r in range(rows):
            for k in range(len(PANELS)):
                x, y = layout.origin(n, r, k)
                canvas[y : y + layout.tile_h, x : x + layout.tile_w] = tiles[n, r, k]
    if not labels:
        return canvas
    C = result["original"].shape[1]
    names = list(channel_names) if channel_names is not None else [f"ch{c}" for c in range(C)]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for k, title in enumerate(PANELS):
        title = title.replace("recon", "recon*") if note else title
        draw.text((layout.origin(0, 0, k)[0], 1), title, fill=LABEL_RGB, font=font)
    for k, line in enumerate(note):
        y = layout.height - layout.footer_h + k * NOTE_LINE_H
        draw.text((layout.gap, y), fit_text(line, font, layout.width - layout.gap), fill=LABEL_RGB, font=font)
    for n in range(N):
        for r in range(rows):
            y = layout.origin(n, r, 0)[1]
            if r < C:
                mse = float(result["mse"][n, r])
                text = f"{names[r]}\nmse {mse:.3f}" if math.isfinite(mse) else names[r]
            else:
                text = "RGB\n" + ",".join(names[c] for c in rgb)
            text = "\n".join(fit_text(line, font, layout.label_w - 2) for line in text.split("\n"))
            draw.multiline_text((layout.gap, y + 1), text, fill=LABEL_RGB, font=font, spacing=2)
    return np.asarray(image)


def default_rgb(C):
    """Channels of the RGB composite row: (0, 1, 2) for 3-channel inputs, else none."""
    return (0, 1, 2) if C == 3 else None


def reconstruction_grid(
    model, imgs, channel_ids=None, mask_ratio=0.75, seed=0, channel_names=None, rgb="auto", labels=True, scale=None
):
    """Reconstruct a batch and draw it: -> (uint8 (height, width, 3) array, per-channel masked MSE list of C floats).

    imgs: (N, C, H, W) normalised as the model takes them; rgb: 'auto' (a composite row for C == 3), None or three
    channel indices. The MSE is over the masked pixels of the batch, in the loss's target space (mse_space).
    """
    result = reconstruct(model, imgs, channel_ids, mask_ratio, seed)
    rgb = default_rgb(imgs.shape[1]) if rgb == "auto" else rgb
    grid = render_grid(result, channel_names, rgb, labels, scale)
    return grid, result["channel_mse"].tolist()


def save_png(grid, path):
    """Write a uint8 (H, W, 3) array as a PNG, creating the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(grid).save(path)


def fixed_batch(dataset, n, seed=0):
    """n evenly spaced items of the dataset stacked into (n, C, H, W), random transforms drawn from `seed`.

    Does not touch the caller's RNG state; the same (dataset, n, seed) gives the same batch.
    """
    n = min(n, len(dataset))
    indices = [i * len(dataset) // n for i in range(n)]
    with seeded_rng(seed):
        return torch.stack([dataset[i][0] for i in indices])


def channel_labels(dataset):
    """Row labels of the dataset's selected channels: names from the dataset, else 'ch<id>'."""
    names = dataset.channel_names
    return [names[c] if names and c < len(names) else f"ch{c}" for c in dataset.channel_ids]


def log_reconstructions(model, imgs, channel_ids, args, epoch, log_writer=None, channel_names=None):
    """Rank 0: draw the grid of a fixed batch; write it to TensorBoard and output_dir/vis/epoch_XXX.png.

    Uses args.mask_ratio and args.seed (the mask is the same every epoch). Other ranks return None at once.
    Returns the PNG path (None when there is no output_dir) on rank 0.
    """
    if not is_main_process():
        return None
    grid, channel_mse = reconstruction_grid(
        model, imgs, channel_ids, args.mask_ratio, seed=getattr(args, "seed", 0), channel_names=channel_names
    )
    if log_writer is not None:
        step = (epoch + 1) * 1000  # TensorBoard's x axis: 1000 x the epochs done (util.metric_log.log_train_step)
        log_writer.add_image("reconstruction", grid, step, dataformats="HWC")
        names = channel_names or [f"ch{c}" for c in range(len(channel_mse))]
        for name, mse in zip(names, channel_mse):
            log_writer.add_scalar(f"vis_masked_mse/{name}", mse, step)
    if not getattr(args, "output_dir", ""):
        return None
    path = os.path.join(args.output_dir, "vis", f"epoch_{epoch:03d}.png")
    save_png(grid, path)
    return path
