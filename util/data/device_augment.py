"""Training crops cut from the raw pixels first; with ``--gpu_augment`` the resize, flips and normalisation run on
the device, per batch.

The training transform (``util.data.transforms``: ``RandomResizedCrop`` + flips + ``Normalize``) is split: a
DataLoader worker draws the crop box and the flips exactly as the torchvision v2 transforms draw them (the same
calls, in the same order, on the same random stream) and slices the window out of the raw integer pixels; a
packed store (``util.data.packed``) then reads only the window's bytes. Without ``--gpu_augment`` the worker
resizes, flips and normalises the window (the CPU transform's result, exactly); with it the worker returns the
raw window and ``DeviceAugment`` does the rest on the batch's device. Evaluation transforms are not touched.
"""

import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from util.data.errors import CorruptFileError, DatasetError
from util.data.packed import PackedRef, read_packed
from util.data.readers import fill_non_finite


def add_gpu_augment_arg(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--gpu_augment",
        action="store_true",
        help="do the training crop's resize, the flips and the normalisation on --device, per batch, from the raw "
        "pixels (DataLoader workers only cut the crop windows); evaluation is unchanged",
    )


@dataclass
class RawBatch:
    """A batch of raw crop windows, zero-padded to the largest: pixels (N, C, Hmax, Wmax) in the files' dtype,
    sizes (N, 2) the windows' (height, width) (kept on the CPU), flips (N, 2) bool (horizontal, vertical)."""

    pixels: torch.Tensor
    sizes: torch.Tensor
    flips: torch.Tensor

    def __len__(self) -> int:
        return len(self.pixels)

    def pin_memory(self) -> "RawBatch":
        return RawBatch(self.pixels.pin_memory(), self.sizes, self.flips.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "RawBatch":
        move = dict(device=device, non_blocking=non_blocking)
        return RawBatch(self.pixels.to(**move), self.sizes, self.flips.to(**move))


def _batch_buffer(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, allocated in shared memory inside a DataLoader worker (as ``default_collate``
    allocates its stacks), so that handing the batch to the main process does not copy it once more."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype).untyped_storage()._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate_windows(items) -> tuple:
    """[((window (C0, h, w), channel ids or None for all, flips (2,)), label)] -> (RawBatch, labels (N,)).

    A window may be a view of a packed sample's memory map: each selected channel is copied once, straight from
    it into the batch (zero padding is not written; the device never reads it)."""
    windows = [(window, range(len(window)) if ids is None else ids) for (window, ids, _), _ in items]
    height, width = max(w.shape[1] for w, _ in windows), max(w.shape[2] for w, _ in windows)
    dtype = torch.from_numpy(np.empty(0, windows[0][0].dtype)).dtype
    buffer = _batch_buffer((len(windows), len(windows[0][1]), height, width), dtype)
    pixels = buffer.numpy()
    for i, (window, ids) in enumerate(windows):
        for k, c in enumerate(ids):
            pixels[i, k, : window.shape[1], : window.shape[2]] = window[c]
    sizes = torch.tensor([w.shape[1:] for w, _ in windows], dtype=torch.int64)
    flips = torch.stack([flips for (_, _, flips), _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return RawBatch(buffer, sizes, flips), labels


class DeviceAugment:
    """RawBatch on a device -> normalised crops (N, C, size, size) float32: each window resized as
    ``v2.Resize`` does (``F.interpolate``), flipped, and normalised with the dataset's mean/std (raw units)."""

    def __init__(self, size, interpolation: v2.InterpolationMode, antialias: bool, mean, std):
        self.size, self.mode, self.antialias = tuple(size), interpolation.value, antialias
        self.mean, self.std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def __call__(self, batch: RawBatch) -> torch.Tensor:
        device = batch.pixels.device
        out = torch.empty((len(batch), batch.pixels.shape[1], *self.size), device=device)
        for i, (height, width) in enumerate(batch.sizes.tolist()):
            window = batch.pixels[i, :, :height, :width].float()[None]
            out[i] = F.interpolate(window, self.size, mode=self.mode, align_corners=False, antialias=self.antialias)[0]
        flips = batch.flips[:, :, None, None, None]
        out = torch.where(flips[:, 0], out.flip(-1), out)
        out = torch.where(flips[:, 1], out.flip(-2), out)
        mean, std = self.mean.to(device)[:, None, None], self.std.to(device)[:, None, None]
        return (out - mean) / std


def split_train_transform(transform):
    """(RandomResizedCrop, [(flip p, axis: 0 horizontal, 1 vertical)] in order, Normalize) of a training transform
    built by ``util.data.transforms.build_transform``; None for any other transform (timm's RGB pipeline)."""
    ops = getattr(transform, "transforms", [])
    if not ops or not isinstance(ops[0], v2.RandomResizedCrop) or not isinstance(ops[-1], v2.Normalize):
        return None
    flips = []
    for op in ops[1:-1]:
        if not isinstance(op, (v2.RandomHorizontalFlip, v2.RandomVerticalFlip)):
            return None
        flips.append((op.p, int(isinstance(op, v2.RandomVerticalFlip))))
    return ops[0], flips, ops[-1]


class WindowCrops(torch.utils.data.Dataset):
    """The training items of ``dataset`` with the random resized crop cut from the raw pixels before anything else.

    Item: the CPU transform's (C, size, size) float tensor (``on_device`` False), or ((raw window, channel ids,
    flips (2,) bool), label) for ``collate_windows`` and ``device_augment`` (``on_device`` True).
    """

    def __init__(self, dataset, on_device: bool):
        self.dataset = dataset
        self.crop, self.flip_ops, self.normalize = split_train_transform(dataset.transform)
        self.on_device = on_device
        self.collate_fn = collate_windows if on_device else None
        crop = self.crop
        self.device_augment = (
            DeviceAugment(crop.size, crop.interpolation, crop.antialias, self.normalize.mean, self.normalize.std)
            if on_device
            else None
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def _pixels(self, index):
        """(C', H, W) pixels of sample ``index`` and whether the channels are still to be selected: a packed
        sample's memory-mapped view (nothing read yet), else the decoded, selected channels."""
        files, _ = self.dataset.samples[index]
        if isinstance(files, PackedRef):
            return read_packed(files), True
        return self.dataset.load_raw(index), False

    def _window(self, index):
        """(window (C0, h, w), the channel ids still to take from it or None, flips (2,) bool, the sample index
        read), with ``--skip_bad_samples``'s replacement of unreadable samples. A packed integer sample's window is
        a view of its memory map: nothing is read yet."""
        for _ in range(len(self.dataset)):
            try:
                pixels, select = self._pixels(index)
                break
            except CorruptFileError:
                if not self.dataset.skip_bad_samples:
                    raise
                self.dataset.num_skipped += 1
                index = (index + 1) % len(self.dataset)
        else:
            raise DatasetError("no sample of the dataset can be read")
        height, width = pixels.shape[-2:]
        box = self.crop.make_params([torch.empty((), dtype=torch.uint8).expand(1, height, width)])
        flips = torch.zeros(2, dtype=torch.bool)
        for p, axis in self.flip_ops:  # one draw per flip transform, as v2's RandomHorizontalFlip/VerticalFlip
            flips[axis] = bool(torch.rand(1) < p)
        window = pixels[:, box["top"] : box["top"] + box["height"], box["left"] : box["left"] + box["width"]]
        ids = self.dataset.channel_ids if select else None
        if select and window.dtype.kind == "f":
            window, ids = fill_non_finite(window[ids], self.dataset.samples[index][0], self.dataset.nan_fill), None
        return window, ids, flips, index

    def __getitem__(self, index):
        window, ids, flips, index = self._window(index)
        label = self.dataset.samples[index][1]
        if self.on_device:
            return (window, ids, flips), label
        crop = self.crop
        x = torch.from_numpy(np.asarray(window if ids is None else window[ids], dtype=np.float32))
        x = TF.resize(x, crop.size, interpolation=crop.interpolation, antialias=crop.antialias)
        x = TF.horizontal_flip(x) if flips[0] else x
        x = TF.vertical_flip(x) if flips[1] else x
        return self.normalize(x), label


def training_items(dataset, args):
    """The dataset a training loader reads: ``WindowCrops`` with ``--gpu_augment`` (on the device) or for a
    packed store (on the CPU, reading only the windows), else ``dataset`` itself."""
    on_device = bool(getattr(args, "gpu_augment", False))
    packed = isinstance(dataset.samples[0][0], PackedRef)
    if not (on_device or packed):
        return dataset
    if split_train_transform(dataset.transform) is None:
        if on_device:
            raise DatasetError(
                f"--gpu_augment: the training transform of --data_path {args.data_path} is not a random resized "
                "crop + flips + normalisation (8-bit RGB images use timm's CPU pipeline); drop --gpu_augment"
            )
        return dataset
    return WindowCrops(dataset, on_device)
