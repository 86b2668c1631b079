"""Evaluation data: a checkpoint's data flags for unset ones, and datasets with the evaluation transform.

`eval_dataset` gives a split with the deterministic evaluation transform (resize + center crop + normalise) even
where training would augment, with data flags inherited from the checkpoint's args (`inherit_data_args`).
"""

from util.data.builders import build_dataset, build_pretrain_dataset
from util.data.transforms import build_transform
from util.errors import RunError

DATA_FLAGS = (
    "data_path",
    "channels",
    "channel_names",
    "mean",
    "std",
    "channel_stats",
    "channel_axis",
    "nan_fill",
    "metadata_columns",
)
"""Data flags that default to the values the checkpoint was trained with."""

SPLITS = ("pretrain", "train", "val")


def inherit_args(args, checkpoint_args, flags):
    """Set each of ``flags`` that ``args`` leaves unset (None) to the checkpoint's value; returns those it set."""
    taken = []
    for key in flags:
        if getattr(args, key, None) is None and checkpoint_args.get(key) is not None:
            setattr(args, key, checkpoint_args[key])
            taken.append(key)
    return taken


def inherit_data_args(args, checkpoint_args, model):
    """Fill unset (None) data flags of `args` from the checkpoint's args; input_size from the model."""
    inherit_args(args, checkpoint_args, DATA_FLAGS)
    args.input_size = model.patch_embed.img_size[0]
    if not args.data_path:
        raise RunError("--data_path is required (the checkpoint records none)")
    return args


def eval_dataset(args, split="pretrain", checkpoint_stats=None):
    """A dataset of --data_path with the evaluation transform.

    split: 'pretrain' (the pretraining layout: a CSV, root/train.csv, root/train/ or root/; labels -1), 'train'
    or 'val' (labelled class folders or {train,val}.csv; 'train' also needs the val split, whose evaluation
    transform it borrows: both normalise with the same statistics). checkpoint_stats: the normalisation the
    checkpoint recorded (``args.normalization``), used, matched by channel name, where no flag or statistics file
    gives one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if split == "pretrain":
        dataset = build_pretrain_dataset(args, checkpoint_stats)
        dataset.transform = build_transform(False, args, mean=dataset.mean, std=dataset.std)
        return dataset
    dataset = build_dataset(False, args, checkpoint_stats)
    if split == "train":
        train = build_dataset(True, args, checkpoint_stats)
        train.transform = dataset.transform
        dataset = train
    return dataset
