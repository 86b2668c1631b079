"""Transforms of raw float tensors (C, H, W) of any C: crops, flips, normalisation; timm's pipeline for RGB.

Transforms (``build_transform``) act on float tensors of any C with torchvision.transforms.v2. One exception:
fine-tune training on 8-bit RGB images uses timm's ``create_transform`` (RandAugment ``--aa``,
``--color_jitter``, random erasing ``--reprob/--remode/--recount``) on a PIL image, so ImageNet recipes keep
working. Other 3-channel 8-bit data get a warning saying that neither this nor ImageNet mean/std applies.
"""

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import v2

from util.data.config import DataConfig
from util.data.errors import DatasetError
from util.data.stats import parse_floats


def _uint8_tensor_to_pil(x):
    """float tensor (3, H, W) of 8-bit values -> PIL RGB image."""
    return Image.fromarray(np.ascontiguousarray(x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()))


def _timm_rgb_transform(config: DataConfig, mean, std):
    """timm's ImageNet fine-tuning pipeline for 3-channel 8-bit data; mean/std in 0..255 units."""
    timm_transform = create_transform(
        input_size=config.input_size,
        is_training=True,
        color_jitter=config.color_jitter,
        auto_augment=config.aa,
        interpolation="bicubic",
        re_prob=config.reprob,
        re_mode=config.remode,
        re_count=config.recount,
        scale=_crop_scale(config, pretrain=False),
        hflip=config.hflip,
        mean=tuple(m / 255 for m in mean),
        std=tuple(s / 255 for s in std),
    )
    return v2.Compose([_uint8_tensor_to_pil, timm_transform])


def _crop_scale(config: DataConfig, pretrain: bool):
    """RandomResizedCrop area range: ``--scale MIN MAX``, else MAE's (0.2, 1) for pretraining, (0.08, 1) otherwise."""
    scale = config.scale
    if scale is None:
        return (0.2, 1.0) if pretrain else (0.08, 1.0)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise DatasetError(f"--scale {' '.join(map(str, scale))}: expected MIN MAX with 0 < MIN <= MAX <= 1")
    return tuple(scale)


def build_transform(is_train, args, pretrain=False, *, mean=None, std=None, uint8_rgb=False):
    """Transform of a raw float tensor (C, H, W) -> normalised (C, input_size, input_size).

    pretrain: RandomResizedCrop(scale 0.2-1) + hflip (MAE); fine-tune train: RandomResizedCrop(scale 0.08-1)
    + hflip, or timm's pipeline on a PIL image when uint8_rgb; eval: resize the shorter side to
    input_size / 0.875 (to input_size when it is above 224, as MAE does) + center crop. Bicubic, antialiased.
    ``--scale MIN MAX`` replaces the crop's area range and ``--hflip P`` the flip probability (timm's flags);
    ``--vflip`` adds a vertical flip to training. mean/std (raw pixel units) default to --mean/--std.
    args: an argparse namespace or a ``DataConfig``.
    """
    config = DataConfig.from_args(args)
    size = config.input_size
    mean = mean if mean is not None else parse_floats(config.mean, "--mean")
    std = std if std is not None else parse_floats(config.std, "--std")
    if mean is None or std is None:
        raise DatasetError("build_transform needs --mean and --std (or use build_dataset, which resolves them)")
    bicubic = v2.InterpolationMode.BICUBIC
    if is_train and not pretrain and uint8_rgb:
        return _timm_rgb_transform(config, mean, std)
    if is_train:
        ops = [
            v2.RandomResizedCrop(size, scale=_crop_scale(config, pretrain), interpolation=bicubic, antialias=True),
            v2.RandomHorizontalFlip(config.hflip),
        ]
        ops += [v2.RandomVerticalFlip()] if config.vflip else []
    else:
        crop_pct = 224 / 256 if size <= 224 else 1.0
        ops = [v2.Resize(int(size / crop_pct), interpolation=bicubic, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*ops, v2.Normalize(mean, std)])
