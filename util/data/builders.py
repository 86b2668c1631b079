"""Dataset builders: samples of a layout, channel selection, normalisation and transform in one dataset."""

import logging

from util.data.channels import CHANNEL_NAMES_FILENAME, read_channel_names, select_channel_ids
from util.data.config import DataConfig
from util.data.dataset import MultiChannelDataset
from util.data.layouts import labelled_split, resolve_data_path, stats_folder, unlabelled_samples
from util.data.metadata import kept_metadata
from util.data.stats import estimate_mean_std, is_rgb, recorded_mean_std, resolve_mean_std
from util.data.transforms import build_transform
from util.data.validate import validate_samples

logger = logging.getLogger(__name__)


def _build(
    samples, classes, csv_names, path, config, *, train, pretrain, stats_samples, checkpoint_stats=None, metadata=None
):
    """Validate samples and attach channel selection, normalisation and transform; stats_samples feed estimates.

    The dataset also carries its normalisation: ``mean``, ``std`` (raw units, per channel read) and ``norm_source``,
    and the CSV metadata of its samples (``metadata``, ``util.data.metadata``).
    """
    listed = samples
    stats_dir = stats_folder(path)
    num_listed = len(samples)
    split = "" if pretrain else f" ({'train' if train else 'val'} split)"
    samples, shape, dtypes = validate_samples(samples, config, f"--data_path {path}{split}")
    names = read_channel_names(stats_dir, csv_names, shape[0], config.channel_names)
    ids = select_channel_ids(config, shape[0], samples[0][0], names)

    def estimate():
        return estimate_mean_std(stats_samples or samples, ids, shape[0], str(path), config)

    rgb = is_rgb(stats_samples or samples, ids, dtypes, names)
    recorded = recorded_mean_std(checkpoint_stats, ids, shape[0], dtypes, names)
    mean, std, source = resolve_mean_std(
        config, stats_dir, ids, shape[0], dtypes, estimate, rgb=rgb, checkpoint=recorded, names=names
    )
    if train and len(ids) == 3 and dtypes == {"uint8"} and not rgb:
        logger.warning(
            "%s: 3 8-bit channels that are not RGB images (colour PNG/JPEG files, or channels named R, G, B in %s), "
            "so neither ImageNet mean/std nor the RGB fine-tuning augmentation (RandAugment, colour jitter, random "
            "erasing) is used; normalising with %s",
            *(path, CHANNEL_NAMES_FILENAME, source),
        )
    transform = build_transform(train, config, pretrain, mean=mean, std=std, uint8_rgb=rgb)
    dataset = MultiChannelDataset(
        samples,
        classes,
        ids,
        transform,
        num_channels=shape[0],
        dtypes=dtypes,
        channel_names=names,
        **config.reading_kwargs(),
    )
    dataset.num_dropped = num_listed - len(samples)
    dataset.mean, dataset.std, dataset.norm_source = mean, std, source
    dataset.metadata = kept_metadata(listed, samples, metadata or {})
    return dataset


def build_dataset(is_train, args, checkpoint_stats=None, classes=None):
    """Labelled dataset of --data_path/{train,val} (class folders or {train,val}.csv) for fine-tuning and eval;
    args: an argparse namespace or a ``DataConfig``; checkpoint_stats: the ``normalization_record`` of the
    checkpoint the run starts from, if any; classes: the class names labels index (default: the train split's)."""
    config = DataConfig.from_args(args)
    root = resolve_data_path(config)
    train_samples, classes, names, metadata = labelled_split(root, "train", classes, config.metadata_columns)
    if not is_train:
        samples, _, _, metadata = labelled_split(root, "val", classes, config.metadata_columns)
    return _build(
        train_samples if is_train else samples,
        classes,
        names,
        root,
        config,
        train=is_train,
        pretrain=False,
        stats_samples=train_samples,
        checkpoint_stats=checkpoint_stats,
        metadata=metadata,
    )


def build_pretrain_dataset(args, checkpoint_stats=None):
    """Unlabelled dataset (labels -1) of --data_path: a CSV, root/train.csv, root/train/ or root/; args: an argparse
    namespace or a ``DataConfig``."""
    config = DataConfig.from_args(args)
    path = resolve_data_path(config)
    samples, names, metadata = unlabelled_samples(path, config.metadata_columns)
    return _build(
        samples,
        [],
        names,
        path,
        config,
        train=True,
        pretrain=True,
        stats_samples=None,
        checkpoint_stats=checkpoint_stats,
        metadata=metadata,
    )
