"""Model folders of checkpoints and models of model folders (the format: ``util/model_folder.py``).

``export(path)`` rebuilds the model a checkpoint holds (``models_checkpoint.model_from_checkpoint``, head included)
and describes it in a ``config.json``; ``model_from_config`` builds that model again and loads its weights strictly;
``load(path)`` does either for a folder or a checkpoint file (``hubconf.py``).
"""

import os

import torch.nn as nn

import models_chamae
import models_vit
from models_checkpoint import classifier_name, model_from_checkpoint, model_size
from models_mae import SIZES
from util.checkpoint import check_state_dict, read_checkpoint
from util.errors import CheckpointError
from util.features import is_channel_model
from util.model_folder import is_model_folder, read_config, read_weights


def head_of(state_dict: dict) -> tuple[str | None, int]:
    """(head kind, number of classes): ('linear', K), ('batchnorm_linear', K) for a linear probe's, or (None, 0)."""
    if "head.weight" in state_dict:
        return "linear", state_dict["head.weight"].shape[0]
    if "head.1.weight" in state_dict and "head.0.running_mean" in state_dict:
        return "batchnorm_linear", state_dict["head.1.weight"].shape[0]
    return None, 0


def build(config: dict) -> nn.Module:
    """The model a folder's ``config`` describes, randomly initialised."""
    name, kwargs = config["model"], config["model_kwargs"]
    if config.get("decoder"):
        return models_chamae.create_model(name, **kwargs)
    net = models_vit.create_model(name, **kwargs)
    if config.get("head") == "batchnorm_linear":
        net.head = models_vit.probe_head(net.head)
    return net


def model_from_config(config: dict, state_dict: dict, source: str) -> nn.Module:
    """``build(config)`` with ``state_dict`` loaded (keys and shapes checked, nothing left out), in eval mode."""
    net = build(config)
    check_state_dict(net, state_dict, source)
    net.load_state_dict(state_dict)
    return net.eval()


def _input_planes(net) -> int:
    return net.in_chans if is_channel_model(net) else net.patch_embed.proj.in_channels


def channel_entries(net, checkpoint: dict, names=None, mean=None, std=None) -> list[dict]:
    """One ``{'name', 'mean', 'std'}`` per embedding row (channel models) or input plane (MAE / ViT), in order.

    Names: ``names``, else the checkpoint's ``channel_names``, else 'ch<id>'. Mean/std: ``mean``/``std``, else the
    checkpoint's ``channel_stats``, else its ``args.normalization`` (the training data's, by channel id), else null.
    """
    rows = net.num_channels if is_channel_model(net) else _input_planes(net)
    record = (checkpoint.get("args") or {}).get("normalization") or {}
    ids = list(record.get("channels") or [])
    if is_channel_model(net):  # row c is channel id c
        row_ids, positions = list(range(rows)), [ids.index(c) if c in ids else None for c in range(rows)]
    elif len(ids) == rows:  # plane i is the i-th channel read
        row_ids, positions = ids, list(range(rows))
    else:
        row_ids, positions = list(range(rows)), [None] * rows
    stats = checkpoint.get("channel_stats") or {}
    given = {
        "name": names or checkpoint.get("channel_names") or [f"ch{c}" for c in row_ids],
        "mean": mean or stats.get("mean") or [None if p is None else record["mean"][p] for p in positions],
        "std": std or stats.get("std") or [None if p is None else record["std"][p] for p in positions],
    }
    for key, values in given.items():
        if len(values) != rows:
            raise CheckpointError(f"{len(values)} channel {key}s given for a model with {rows} channel rows")
    return [{key: given[key][row] for key in given} for row in range(rows)]


def decoder_entry(net, args: dict) -> dict | None:
    """The decoder's description (None without one)."""
    if not hasattr(net, "decoder_blocks"):
        return None
    return dict(
        kind=net.decoder,
        embed_dim=net.mask_token.shape[-1],
        depth=len(net.decoder_blocks),
        num_heads=net.decoder_blocks[0].attn.num_heads if len(net.decoder_blocks) else None,
        norm_pix_loss=net.norm_pix_loss,
        mask_ratio=args.get("mask_ratio"),
    )


def timm_fields(name: str, kwargs: dict, head: str | None) -> dict:
    """For a ``vit_*`` model whose keys and computation are plain timm's: timm's own config.json keys
    (``architecture``, ``model_args``, ``pretrained_cfg``), so ``timm.create_model('local-dir:DIR', pretrained=True)``
    rebuilds it; {} for any other model."""
    if not name.startswith("vit_") or head == "batchnorm_linear":
        return {}
    size = model_size(name)
    architecture = f"vit_{size}_patch{SIZES[size]['patch_size']}_224" if size else "vit_base_patch16_224"
    model_args = {k: v for k, v in kwargs.items() if k not in ("num_channels", "hcs", "global_pool")}
    pool = bool(kwargs.get("global_pool"))
    model_args.update(global_pool="avg" if pool else "token", fc_norm=pool)
    image = [model_args["in_chans"], model_args["img_size"], model_args["img_size"]]
    return dict(
        architecture=architecture,
        model_args=model_args,
        pretrained_cfg=dict(input_size=image, num_classes=model_args["num_classes"]),
    )


def export(path: str, model=None, no_decoder=False, unsafe=False, channels=None, **overrides) -> tuple[nn.Module, dict]:
    """(model, config) of the checkpoint ``path`` (any kind ``util.checkpoint.read_checkpoint`` reads): the model
    rebuilt from the config alone, holding the checkpoint's weights (head included). model: the model name of files
    that record none (published MAE files), else only checked against the recorded one's family (``family``);
    overrides: model kwargs, as for ``model_from_checkpoint``; no_decoder: the encoder only; channels:
    ``{'names', 'mean', 'std'}`` overrides."""
    source, args, checkpoint = read_checkpoint(path, unsafe=unsafe)
    recorded = args.get("model")
    if model and recorded:
        check_family(path, recorded, model)
    model = None if recorded else model
    net, info = model_from_checkpoint(path, model=model, encoder_only=no_decoder, unsafe=unsafe, **overrides)
    kwargs = dict(info["kwargs"])
    kwargs["num_heads"] = net.blocks[0].attn.num_heads if len(net.blocks) else kwargs.get("num_heads")
    decoder = decoder_entry(net, info["args"])
    if decoder is not None:
        kwargs["decoder_num_heads"] = decoder["num_heads"]
    state_dict, head = net.state_dict(), None
    if info["kind"] == "classifier":
        head, kwargs["num_classes"] = head_of(source)
        if head is not None:
            state_dict.update({key: value for key, value in source.items() if key.startswith("head.")})
    config = dict(
        model=info["name"],
        model_kwargs=kwargs,
        head=head,
        img_size=net.patch_embed.img_size[0],
        patch_size=net.patch_embed.patch_size[0],
        embed_dim=net.cls_token.shape[-1],
        depth=len(net.blocks),
        num_heads=kwargs["num_heads"],
        in_chans=_input_planes(net),
        num_channels=net.num_channels if is_channel_model(net) else _input_planes(net),
        global_pool=bool(kwargs["global_pool"]) if info["kind"] == "classifier" else None,
        num_classes=kwargs.get("num_classes", 0),
        decoder=decoder,
        channels=channel_entries(net, checkpoint, **(channels or {})),
        epoch=info["epoch"],
        source=os.path.basename(os.path.normpath(str(path))),
        training_args=info["args"] or None,
    )
    if info["kind"] == "classifier":
        config.update(timm_fields(info["name"], kwargs, head))
    return model_from_config(config, state_dict, str(path)), config


def family(name: str) -> str:
    """'mae_vit_base_patch16' -> 'vit', 'chamae_vit_tiny_patch16' -> 'channelvit' (a model with or without decoder)."""
    return classifier_name(name).split("_")[0]


def check_family(path: str, saved: str, model: str):
    """Refuse a saved model of another family than ``model``'s."""
    if family(model) != family(saved):
        raise CheckpointError(f"{path} holds a {saved}, not a model of the {family(model)}_* family ('{model}')")


def load(path: str, model=None, decoder: bool | None = None, **overrides) -> nn.Module:
    """The model of a model folder or a checkpoint file (head included), in eval mode.

    model: names the architecture of files that record none (published MAE files); the saved model must be of
    its family (``family``). decoder: True needs one, False drops it (the encoder as a classifier without head),
    None keeps what was saved. overrides: model kwargs for a checkpoint file, as for ``model_from_checkpoint``.
    """
    if not is_model_folder(path):
        net, config = export(path, model=model, no_decoder=decoder is False, **overrides)
    else:
        config = read_config(path)
        if model:
            check_family(path, config["model"], model)
        if decoder is False and config.get("decoder"):
            return export(path, no_decoder=True)[0]
        net = model_from_config(config, read_weights(path), path)
    if decoder and not config.get("decoder"):
        raise CheckpointError(f"{path} holds no decoder (it is a {config['model']}): load it as a vit_* / channelvit_*")
    return net
