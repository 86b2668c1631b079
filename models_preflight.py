"""Checks of a run's model against its checkpoint, flags and data before compute is spent: before the data are
read, the checkpoint's kind (pretraining or classifier) and family (per-channel or whole-patch tokens) and the patch
size that tiles ``--input_size``; once the dataset is built (file headers only), the channels a whole-patch model
takes and the ``--group_regex`` groups of the sample paths. Each failure is a ``RunError`` / ``CheckpointError``
that names the flag that fits."""

import re

from models_checkpoint import is_channel_state, is_pretrain_state, size_defaults
from util.checkpoint import read_checkpoint, resolve_resume
from util.cli import parse_model_kwargs
from util.errors import CheckpointError, RunError

CHANNEL_TOKENS = "per-channel tokens (ChannelMAE / ChannelViT)"
PATCH_TOKENS = "whole-patch tokens (MAE / ViT)"


def is_channel_name(name: str) -> bool:
    """Whether a model name is a per-channel-token model (chamae_* / channelmae_* / channelvit_*)."""
    return name.startswith(("chamae_", "channelmae_", "channelvit_"))


def model_patch_size(name: str, patch_size: int | None, model_kwargs) -> int:
    """The patch size a model gets: ``--model_kwargs patch_size=``, else ``--patch_size``, else ``--model``'s."""
    return parse_model_kwargs(model_kwargs).get("patch_size") or patch_size or size_defaults(name)["patch_size"]


def check_patch_grid(input_size: int, patch_size: int, source: str):
    """Refuse an image size that the patches do not tile: the model would fail at its first step (pretraining) or
    silently drop the last pixels of each row and column (fine-tuning). ``source`` says where the patch size came
    from."""
    left = input_size % patch_size
    if left:
        below, above = input_size - left, input_size - left + patch_size
        raise RunError(
            f"--input_size {input_size} is not a multiple of the patch size {patch_size} ({source}): the last "
            f"{left} pixels of each row and column fit no patch; use --input_size {below or above} or {above}"
        )


def check_family(path: str, state_dict: dict, model: str, flag: str):
    """Refuse a checkpoint of per-channel tokens for a whole-patch-token model and the other way round."""
    channel = is_channel_state(state_dict)
    if channel == is_channel_name(model):
        return
    held, built = (CHANNEL_TOKENS, PATCH_TOKENS) if channel else (PATCH_TOKENS, CHANNEL_TOKENS)
    if model.startswith(("mae_", "chamae_", "channelmae_")):
        family = "chamae_*" if channel else "mae_*"
    else:
        family = "channelvit_*" if channel else "vit_*"
    raise CheckpointError(
        f"{flag} {path} holds a model with {held}, but --model {model} has {built}: pass a {family} --model (or "
        "leave --model out where the checkpoint chooses it)"
    )


def check_classifier_checkpoint(path: str, state_dict: dict, model: str, flag: str):
    """For main_finetune / main_linprobe: ``--resume`` continues a classifier run, so a pretraining checkpoint (with
    its decoder) belongs to ``--finetune``. A resumed checkpoint must be of ``--model``'s family (``check_family``),
    and so must a per-channel one given to ``--finetune`` (a whole-patch encoder may initialise a ChannelViT: its
    patch projection is summed into one plane)."""
    if flag == "--resume" and is_pretrain_state(state_dict):
        raise CheckpointError(
            f"--resume {path} is a pretraining checkpoint (it holds an MAE decoder); --resume continues a "
            f"fine-tuning or linear-probing run from one of its own checkpoints. To start from these weights pass "
            f"--finetune {path}"
        )
    if flag == "--resume" or is_channel_state(state_dict):
        check_family(path, state_dict, model, flag)


def check_pretrain_resume(args):
    """For main_pretrain: the checkpoint of ``--resume`` / ``--auto_resume`` is a pretraining one of ``--model``'s
    family. Its tensors are memory-mapped, not read, and nothing is unpickled but tensors and plain values: a file
    that needs --unsafe_load is left to the one full load of the resume (so no code in it runs twice)."""
    path = resolve_resume(args)
    if not path:
        return
    try:
        state_dict, checkpoint_args, _ = read_checkpoint(path, mmap=True)
    except CheckpointError:
        if args.unsafe_load:
            return
        raise
    if not is_pretrain_state(state_dict):
        raise CheckpointError(
            f"--resume {path} is a classifier checkpoint (it holds no decoder): main_pretrain.py continues "
            f"pretraining runs only. To train the classifier further use main_finetune.py --resume {path}"
        )
    trained = checkpoint_args.get("model")
    if trained and is_channel_name(trained) != is_channel_name(args.model):
        raise CheckpointError(
            f"--resume {path} was trained as '{trained}', but --model {args.model} has "
            f"{CHANNEL_TOKENS if is_channel_name(args.model) else PATCH_TOKENS}: pass --model {trained}"
        )
    check_family(path, state_dict, args.model, "--resume")


def check_model_channels(model, dataset, channels_flag):
    """A whole-patch model (MAE / ViT) takes exactly the channels it was trained on; only per-channel models take
    a subset. ``model.patch_embed.proj`` has one input plane per channel."""
    if hasattr(model, "channel_embed"):
        return
    planes = model.patch_embed.proj.in_channels
    if dataset.in_chans != planes:
        given = f"--channels {channels_flag} reads" if channels_flag else "the data have"
        raise RunError(
            f"{given} {dataset.in_chans} channels, but the checkpoint's whole-patch model takes exactly {planes} "
            f"(one input plane each); only per-channel models (ChannelMAE / ChannelViT) read channel subsets"
        )


def check_group_regex(regex: str, paths: list[str]):
    """Before encoding: ``--group_regex`` finds a group in every sample path (``util.features.group_means``)."""
    pattern = re.compile(regex)
    unmatched = [path for path in paths if pattern.search(path) is None]
    if unmatched:
        raise RunError(
            f"--group_regex {regex} matches {len(paths) - len(unmatched)} of {len(paths)} sample paths, not e.g. "
            f"{unmatched[0]}; every sample needs a group"
        )
