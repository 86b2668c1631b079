"""Models from checkpoints: rebuild the architecture a checkpoint was trained with, build models from flags and
load pretrained weights into a classifier.

Formats read (``util.checkpoint.read_checkpoint``):
- ours (``util.checkpoint.save_model``): ``{'model': state_dict, 'args': dict, 'epoch': ...}``; the model name and
  its options come from ``args``;
- published MAE files: ``{'model': state_dict}`` (``mae_pretrain_vit_*.pth``: encoder only; ``*_full.pth`` and
  ``mae_visualize_vit_*.pth``: with the decoder) and fine-tuned ones whose ``'args'`` is an
  ``argparse.Namespace``; these need the model name from the caller when ``args`` is missing;
- a bare state dict.

Layer shapes (widths, depths, patch size, image size, channel count, decoder kind) are read from the tensors
themselves, so only what tensors cannot tell (the number of heads) comes from the model name and ``args``.
Problems the user can fix raise ``util.errors.CheckpointError`` (or ``RunError``), which ``util.cli.run_main``
prints without a traceback.
"""

import math
import re

import torch
from timm.layers import trunc_normal_
from timm.models import adapt_input_conv

import models_chamae
import models_mae
import models_vit
from util.checkpoint import check_state_dict, read_checkpoint
from util.cli import parse_model_kwargs
from util.data.channels import positional_names
from util.data.vocabulary import checkpoint_vocabulary
from util.errors import CheckpointError, CheckpointMismatchError
from util.pos_embed import interpolate_pos_embed

PRETRAIN_ONLY_KWARGS = ("norm_pix_loss", "decoder", "decode_ratio", "mask_mode", "hcs")
"""Pretraining-model options that a classifier built from the same run does not take."""


def is_pretrain_state(state_dict):
    """Whether the state dict holds an MAE decoder."""
    return "decoder_embed.weight" in state_dict


def is_channel_state(state_dict):
    """Whether the state dict is a per-channel-token model (ChannelMAE / ChannelViT)."""
    return "channel_embed" in state_dict


def pretrain_name(name):
    """Any model name -> the matching pretraining model name (vit_* -> mae_vit_*, channelvit_* -> chamae_vit_*)."""
    name = models_chamae.ALIASES.get(name, name)
    if name.startswith("channelvit_"):
        return "chamae_" + name[len("channel") :]
    if name.startswith("vit_"):
        return "mae_" + name
    return name


def classifier_name(name):
    """Any model name -> the matching classifier name (mae_vit_* -> vit_*, chamae_vit_* -> channelvit_*)."""
    name = models_chamae.ALIASES.get(name, name)
    if name.startswith("chamae_vit_"):
        return "channel" + name[len("chamae_") :]
    if name.startswith("mae_vit_"):
        return name[len("mae_") :]
    return name


def count_blocks(state_dict, prefix):
    """Number of `prefix`N.* blocks in the state dict."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def checkpoint_grid(state_dict):
    """Side of the (square) patch grid of the checkpoint's position embedding."""
    num_patches = state_dict["pos_embed"].shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(f"checkpoint pos_embed has {num_patches} patch positions, not a square grid")
    return side


def encoder_shapes(state_dict):
    """Encoder hyper-parameters that the tensors determine: embed_dim, depth, patch_size, mlp_ratio, img_size."""
    embed_dim = state_dict["cls_token"].shape[-1]
    patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
    shapes = dict(
        embed_dim=embed_dim,
        depth=count_blocks(state_dict, "blocks."),
        patch_size=patch_size,
        img_size=checkpoint_grid(state_dict) * patch_size,
    )
    if "blocks.0.mlp.fc1.weight" in state_dict:
        shapes["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    if is_channel_state(state_dict):
        shapes["num_channels"] = state_dict["channel_embed"].shape[0]
    else:
        shapes["in_chans"] = state_dict["patch_embed.proj.weight"].shape[1]
    return shapes


def decoder_shapes(state_dict):
    """Decoder hyper-parameters that the tensors determine."""
    return dict(
        decoder_embed_dim=state_dict["mask_token"].shape[-1],
        decoder_depth=count_blocks(state_dict, "decoder_blocks."),
        decoder="cross" if "decoder_blocks.0.attn.q.weight" in state_dict else "full",
    )


def recorded_model_kwargs(args):
    """A run's ``--model_kwargs`` as a dict (recorded as a list of 'key=value' strings, or as a dict)."""
    model_kwargs = args.get("model_kwargs") or {}
    return dict(model_kwargs) if isinstance(model_kwargs, dict) else parse_model_kwargs(model_kwargs)


def kwargs_from_args(args, pretrain):
    """Model kwargs recorded in a training run's args (main_pretrain / main_finetune flags)."""
    kwargs = {}
    if args.get("input_size"):
        kwargs["img_size"] = args["input_size"]
    if args.get("patch_size"):
        kwargs["patch_size"] = args["patch_size"]
    if pretrain:
        for key in ("norm_pix_loss", "decoder", "decode_ratio", "mask_mode"):
            if args.get(key) is not None:
                kwargs[key] = args[key]
    kwargs.update(recorded_model_kwargs(args))
    return kwargs


def encoder_kwargs(args):
    """The encoder options of a run's ``--model_kwargs``: without the decoder's and the pretraining-only ones."""
    kwargs = recorded_model_kwargs(args)
    return {k: v for k, v in kwargs.items() if k not in PRETRAIN_ONLY_KWARGS and not k.startswith("decoder")}


def model_size(name):
    """'channelvit_small_patch16' -> 'small' (None for a name without a known size)."""
    found = re.search(r"vit_([a-z]+)_patch", name or "")
    return found.group(1) if found and found.group(1) in models_mae.SIZES else None


def size_defaults(name):
    """The options --model's size sets: patch_size, embed_dim, depth, num_heads and the decoder's."""
    size = model_size(name)
    return {**models_mae.SIZES[size], **models_mae.DECODER_SIZES.get(size, dict(decoder_num_heads=16))}


def check_heads(kwargs, name):
    """Refuse a head count that does not divide the width (heads are not visible in the tensors)."""
    defaults = {**size_defaults(name), **kwargs}
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        if width in defaults and heads in defaults and defaults[width] % defaults[heads]:
            raise CheckpointError(
                f"{width}={defaults[width]} of the checkpoint is not divisible by {heads}={defaults[heads]} of "
                f"'{name}'; pass the trained head count, e.g. --model_kwargs {heads}=N"
            )


def _flag_of(key, value, model_kwargs, name):
    """The flag a model option came from: --model_kwargs when it was given there, else --model's size."""
    return f"--model_kwargs {key}={value}" if key in model_kwargs else f"--model {name}"


def check_architecture(path, checkpoint_args, name, kwargs, given, decoder=False):
    """Refuse a model whose head counts differ from those ``path`` was trained with: no tensor shape shows them,
    so the checkpoint would load without complaint and compute something else.

    checkpoint_args: the args of the run that wrote ``path`` (nothing to compare without a model name, as in the
    published MAE files); name, kwargs: the model to build and its options; given: the options the user passed
    (``--model_kwargs``), named in the message; decoder: compare the decoder's heads too. Raises
    ``CheckpointMismatchError``.
    """
    trained_name = checkpoint_args.get("model")
    if model_size(trained_name) is None or model_size(name) is None:
        return
    trained_kwargs = recorded_model_kwargs(checkpoint_args) if decoder else encoder_kwargs(checkpoint_args)
    trained = {**size_defaults(trained_name), **trained_kwargs}
    built = {**size_defaults(name), **kwargs}
    for key in ("num_heads", "decoder_num_heads") if decoder else ("num_heads",):
        if trained[key] == built[key]:
            continue
        trained_flag = _flag_of(key, trained[key], trained_kwargs, trained_name)
        built_flag = _flag_of(key, built[key], given, name)
        raise CheckpointMismatchError(
            f"{path} was trained with {key}={trained[key]} ({trained_flag}) but the model to build has "
            f"{key}={built[key]} ({built_flag}); {key} does not show in the weights' shapes, so the checkpoint would "
            f"load and compute something else. Pass --model_kwargs {key}={trained[key]}, or leave --model / "
            "--model_kwargs out to build the checkpoint's architecture"
        )


def checkpoint_input_size(checkpoint_args, state_dict):
    """The image size a checkpoint was trained at: its ``--input_size``, else its position embedding's grid side
    times its patch size; None where neither tells."""
    if checkpoint_args.get("input_size"):
        return int(checkpoint_args["input_size"])
    if "pos_embed" in state_dict and "patch_embed.proj.weight" in state_dict:
        return checkpoint_grid(state_dict) * state_dict["patch_embed.proj.weight"].shape[-1]
    return None


def model_from_checkpoint(path, model=None, input_size=None, encoder_only=False, unsafe=False, **overrides):
    """Build the model a checkpoint was saved from and load its weights (on the CPU, in eval mode).

    path: checkpoint file. model: model name; needed when the file has no 'args' (published MAE files),
    otherwise it overrides args['model']. input_size: build for this image size (default: the checkpoint's);
    pretraining models regenerate their fixed sin-cos tables, classifiers resample the learned ones.
    encoder_only: build a classifier (vit_* / channelvit_*) without head even from a pretraining checkpoint.
    overrides: further model kwargs (e.g. norm_pix_loss=True, mask_mode='spatial', num_heads=2).

    Returns (model, info) with info = {'name', 'kind' ('pretrain' | 'classifier'), 'args', 'epoch', 'kwargs' (the
    ``create_model`` kwargs it was built with), 'vocabulary' (the channel names of its embedding rows,
    ``state_vocabulary``)}.
    A pretraining checkpoint gives the MAE / ChannelMAE with its decoder unless encoder_only; a classifier
    checkpoint (or an encoder-only published file) gives the classifier with num_classes=0 (no head).
    """
    state_dict, args, checkpoint = read_checkpoint(path, unsafe=unsafe)
    name = model or args.get("model")
    if not name:
        raise CheckpointError(
            f"{path} records no model name (published MAE format?): pass --model, e.g. mae_vit_large_patch16"
        )
    pretrain = is_pretrain_state(state_dict) and not encoder_only
    name = pretrain_name(name) if pretrain else classifier_name(name)
    channel = is_channel_state(state_dict)
    if channel != (name.startswith("chamae_") or name.startswith("channelvit_")):
        kind = "per-channel tokens (ChannelMAE/ChannelViT)" if channel else "whole-patch tokens (MAE/ViT)"
        raise CheckpointError(f"{path} holds a model with {kind}, which '{name}' is not")

    kwargs = kwargs_from_args(args, pretrain)
    ckpt_shapes = encoder_shapes(state_dict)
    if pretrain:
        ckpt_shapes.update(decoder_shapes(state_dict))
        if channel:
            kwargs.setdefault("in_chans", args.get("in_chans") or ckpt_shapes["num_channels"])
    else:
        kwargs = {k: v for k, v in kwargs.items() if k not in PRETRAIN_ONLY_KWARGS and not k.startswith("decoder")}
        kwargs["num_classes"] = 0
        kwargs["global_pool"] = "fc_norm.weight" in state_dict
        if channel:
            kwargs.setdefault("in_chans", args.get("in_chans") or ckpt_shapes["num_channels"])
    kwargs.update(ckpt_shapes)
    if input_size:
        kwargs["img_size"] = input_size
    kwargs.update(overrides)
    check_heads(kwargs, name)
    check_architecture(path, args, name, kwargs, overrides, decoder=pretrain)

    if pretrain:
        net = models_chamae.create_model(name, **kwargs)
        fixed = ()
        if checkpoint_grid(state_dict) != net.patch_embed.grid_size[0]:
            # fixed sin-cos tables: the new model already holds the exact ones for its grid
            fixed = ("pos_embed", "decoder_pos_embed")
            state_dict = {k: v for k, v in state_dict.items() if k not in fixed}
        check_state_dict(net, state_dict, path, allow_missing=fixed)
        net.load_state_dict(state_dict, strict=not fixed)
    else:
        net = models_vit.create_model(name, **kwargs)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("head.", "decoder_", "mask_token"))}
        interpolate_pos_embed(net, state_dict)
        check_state_dict(net, state_dict, path)
        net.load_state_dict(state_dict)
    net.eval()
    epoch = checkpoint.get("epoch")
    epoch = epoch if isinstance(epoch, int) else None
    kind = "pretrain" if pretrain else "classifier"
    vocabulary = state_vocabulary(checkpoint, state_dict, path)
    return net, dict(name=name, kind=kind, args=args, epoch=epoch, kwargs=kwargs, vocabulary=vocabulary)


def build_pretrain_model(args, in_chans: int, num_channels: int):
    """The pretraining model for ``args.model``: ``in_chans`` planes per input (MAE), ``num_channels`` rows of
    channel embeddings (ChannelMAE: the size of the channel vocabulary)."""
    kwargs = dict(
        img_size=args.input_size,
        in_chans=in_chans,
        num_channels=num_channels,
        norm_pix_loss=args.norm_pix_loss,
        decoder=args.decoder,
        decode_ratio=args.decode_ratio,
        mask_mode=args.mask_mode,
        hcs=args.hcs,
    )
    if args.patch_size:
        kwargs["patch_size"] = args.patch_size
    kwargs.update(parse_model_kwargs(args.model_kwargs))
    return models_chamae.create_model(args.model, **kwargs)


def build_classifier(args, in_chans: int, num_channels: int, reference_state: dict | None = None, **overrides):
    """The classifier for ``args.model``: ``in_chans`` planes per input (ViT), ``num_channels`` channel-embedding
    rows (ChannelViT: the size of the channel vocabulary); the patch size follows ``reference_state`` (the
    checkpoint to be loaded) unless ``--patch_size`` says otherwise."""
    kwargs = dict(img_size=args.input_size, in_chans=in_chans, num_classes=args.nb_classes, hcs=args.hcs)
    if reference_state is not None:
        if args.patch_size is None and "patch_embed.proj.weight" in reference_state:
            kwargs["patch_size"] = reference_state["patch_embed.proj.weight"].shape[-1]
    if args.patch_size:
        kwargs["patch_size"] = args.patch_size
    kwargs.update(num_channels=num_channels, **overrides)
    kwargs.update(parse_model_kwargs(args.model_kwargs))
    return models_vit.create_model(args.model, **kwargs)


HEAD_KEYS = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


DROPPABLE_PREFIXES = ("norm.", "fc_norm.", "head.")
"""Pretrained keys a classifier may lack: the final norm (fc_norm replaces it under global pooling) and heads."""


def _other_planes_only(weight, own) -> bool:
    """Whether a patch projection (O, I, p, p) differs from the model's in its input planes I alone (so it can be
    adapted; any other difference is left for the mismatch error, which then shows the checkpoint's shape)."""
    return weight.shape[1] != own.shape[1] and (weight.shape[0], *weight.shape[2:]) == (own.shape[0], *own.shape[2:])


def load_pretrained(model, state_dict: dict, path: str = ""):
    """Load a pretraining state dict into a classifier, MAE style.

    Decoder weights and the mask token are dropped, a head of the wrong shape is dropped, the position
    embedding is resampled to the model's grid, a patch projection with a different number of input planes is
    adapted (timm's ``adapt_input_conv`` from the checkpoint's plane count: summed into one plane, else repeated and
    scaled). Only head/fc_norm (and channel_embed when the checkpoint has none)
    may be missing, and only the final norm and heads (``DROPPABLE_PREFIXES``) may be left over: a per-channel
    encoder does not go into a ViT, nor a deeper one into a shallower model. A freshly initialised head gets
    ``trunc_normal_(std=2e-5)``. Returns load_state_dict's result.
    """
    print(f"Load pre-trained checkpoint from: {path}")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("decoder_") and k not in ("mask_token",)}
    model_state = model.state_dict()
    if "channel_embed" in state_dict and "channel_embed" not in model_state:
        raise CheckpointMismatchError(
            f"{path or 'the pretrained checkpoint'} holds a ChannelMAE / ChannelViT encoder (one token per channel "
            f"and patch), which a {type(model).__name__} does not take: use a channelvit_* --model, or leave --model "
            "out to build the checkpoint's"
        )
    rows = state_dict.get("channel_embed")
    if rows is not None and "channel_embed" in model_state and len(rows) < len(model_state["channel_embed"]):
        fresh = model_state["channel_embed"][len(rows) :]
        print(f"channel_embed: {len(rows)} pretrained rows, {len(fresh)} new ones (new channels) freshly initialised")
        state_dict["channel_embed"] = torch.cat([rows, fresh.to(rows.dtype)])
    for key in ("head.weight", "head.bias"):
        if key in state_dict and state_dict[key].shape != model_state[key].shape:
            print(f"Removing key {key} from pretrained checkpoint (shape {tuple(state_dict[key].shape)})")
            del state_dict[key]
    key = "patch_embed.proj.weight"
    if key in state_dict and _other_planes_only(state_dict[key], model_state[key]):
        planes = state_dict[key].shape[1]
        print(f"Adapting {key} from {planes} to {model_state[key].shape[1]} input planes")
        state_dict[key] = adapt_input_conv(model_state[key].shape[1], state_dict[key], base_chans=planes)
    interpolate_pos_embed(model, state_dict)
    allowed = set(HEAD_KEYS)
    if "channel_embed" not in state_dict:
        allowed.add("channel_embed")
    checked = {k: v for k, v in state_dict.items() if k in model_state or not k.startswith(DROPPABLE_PREFIXES)}
    check_state_dict(model, checked, path or "the pretrained checkpoint", allowed)
    msg = model.load_state_dict(state_dict, strict=False)
    print(f"missing keys: {msg.missing_keys}\nunexpected keys: {msg.unexpected_keys}")
    if "head.weight" in msg.missing_keys:
        trunc_normal_(model.head.weight, std=2e-5)
    return msg


def state_vocabulary(checkpoint: dict, state_dict: dict, path: str) -> list[str]:
    """The channel names of a checkpoint's embedding rows (``util.data.vocabulary.checkpoint_vocabulary``); for a
    whole-patch model, of its patch projection's input planes."""
    if "channel_embed" in state_dict:
        return checkpoint_vocabulary(checkpoint, state_dict["channel_embed"].shape[0], path)
    planes = state_dict.get("patch_embed.proj.weight")
    names = checkpoint_vocabulary(checkpoint, None, path)
    return names if names or planes is None else positional_names(planes.shape[1])


def load_state_dict_from(path: str, args) -> tuple[dict, dict, list[str]]:
    """(model state dict, recorded args ({} if none), channel vocabulary) of a checkpoint file: ours, MAE's
    ({'model': state_dict}, maybe with a Namespace of args) or a bare state dict (``util.checkpoint.read_checkpoint``),
    whose state dict must hold tensors only."""
    state_dict, checkpoint_args, checkpoint = read_checkpoint(path, unsafe=args.unsafe_load)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} holds no model state dict (expected a dict of tensors under 'model')")
    return state_dict, checkpoint_args, state_vocabulary(checkpoint, state_dict, path)
