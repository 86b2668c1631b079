"""Model folders: ``model.safetensors`` + ``config.json``, the layout of huggingface_hub's ``PyTorchModelHubMixin``
(``save_pretrained`` / ``from_pretrained``), written by ``export_model.py`` and read back as a checkpoint dict.

``config.json`` (``FORMAT_VERSION`` 1) describes the model without the training arguments:

- ``model``, ``model_kwargs``: ``models_chamae.create_model`` (pretraining) or ``models_vit.create_model``
  (classifier) of ``model`` with ``model_kwargs`` rebuilds it, head included; ``head``: 'linear', 'batchnorm_linear'
  (a linear probe's) or null;
- ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``in_chans``, ``num_channels``,
  ``global_pool`` (classifiers: mean of the patch tokens + ``fc_norm``, else the class token), ``num_classes``;
- ``decoder``: null, or the decoder's kind, width, depth, heads, ``norm_pix_loss`` and ``mask_ratio``;
- ``channels``: one entry per embedding row (channel models) or input plane (MAE / ViT), in that order:
  ``{"name", "mean", "std"}`` (mean/std in raw pixel units, null where unknown);
- ``architecture``, ``model_args``, ``pretrained_cfg``: timm's own config.json keys, for a ``vit_*`` model that plain
  timm can hold (``timm.create_model('local-dir:DIR', pretrained=True)``);
- ``epoch``, ``source`` (the checkpoint's file name) and ``training_args``: provenance (the training run's flags,
  null with ``--no_training_args``; only data flags are taken from them, as from a checkpoint).
"""

import json
import os

import torch
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from util.errors import CheckpointError

FORMAT_VERSION = 1
LIBRARY_NAME = "channelmae"

NOT_FLAG_KWARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_channels",
    "num_classes",
    "global_pool",
    "hcs",
    "norm_pix_loss",
    "decoder",
    "decode_ratio",
    "mask_mode",
)
"""Constructor kwargs that training runs record as flags of their own, not in ``--model_kwargs``."""


def is_model_folder(path) -> bool:
    """Whether ``path`` is a directory (read as a model folder by ``util.checkpoint.load_checkpoint``)."""
    return os.path.isdir(path)


def _write_atomic(path: str, write):
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_model_folder(out_dir: str, state_dict: dict, config: dict) -> list[str]:
    """Write ``out_dir/model.safetensors`` (tensors, ``{'format': 'pt'}`` metadata as huggingface_hub writes it) and
    ``out_dir/config.json`` (``config`` plus ``library_name`` and ``format_version``); returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    weights = os.path.join(out_dir, SAFETENSORS_SINGLE_FILE)
    _write_atomic(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = {"library_name": LIBRARY_NAME, "format_version": FORMAT_VERSION, **config}
    config_path = os.path.join(out_dir, CONFIG_NAME)
    text = json.dumps(config, sort_keys=True, indent=2) + "\n"

    def write_text(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _write_atomic(config_path, write_text)
    return [weights, config_path]


def read_config(path: str) -> dict:
    """``path/config.json`` of a model folder; ``CheckpointError`` when it is missing, unreadable or not ours."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{path} is a directory without {CONFIG_NAME}, so not a model folder (export_model.py writes those); "
            "for a run's --output_dir pass one of its checkpoint-*.pth files"
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {config_path}: {err}") from err
    if not isinstance(config, dict) or config.get("library_name") != LIBRARY_NAME or "model" not in config:
        raise CheckpointError(f"{config_path} was not written by export_model.py (no library_name '{LIBRARY_NAME}')")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format_version {config.get('format_version')}; this code reads {FORMAT_VERSION}"
        )
    return config


def read_weights(path: str) -> dict:
    """The tensors of ``path/model.safetensors``, on the CPU."""
    weights = os.path.join(path, SAFETENSORS_SINGLE_FILE)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{path} has a {CONFIG_NAME} but no {SAFETENSORS_SINGLE_FILE}")
    try:
        return load_file(weights, device="cpu")
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read {weights}: {err}") from err


def folder_args(config: dict) -> dict:
    """The args a checkpoint of the folder's model would record: ``training_args`` with the model's flags
    (``--model``, ``--model_kwargs`` (size options only), ``--input_size``, ``--patch_size``, ``--global_pool``,
    the decoder's flags) taken from the config."""
    kwargs = config["model_kwargs"]
    args = dict(config.get("training_args") or {})
    args.update(
        model=config["model"],
        model_kwargs={k: v for k, v in kwargs.items() if k not in NOT_FLAG_KWARGS},
        input_size=config["img_size"],
        patch_size=config["patch_size"],
        in_chans=config["in_chans"],
    )
    if config.get("global_pool") is not None:
        args["global_pool"] = config["global_pool"]
    decoder = config.get("decoder")
    if decoder:
        args.update(decoder=decoder["kind"], norm_pix_loss=decoder["norm_pix_loss"])
        args.update({k: kwargs[k] for k in ("decode_ratio", "mask_mode") if k in kwargs})
        if decoder.get("mask_ratio") is not None:
            args["mask_ratio"] = decoder["mask_ratio"]
    return args


def channel_fields(config: dict) -> dict:
    """``channel_names`` and ``channel_stats`` ({'mean', 'std'}) in embedding-row order, as a checkpoint holds them."""
    channels = config.get("channels") or []
    return dict(
        channel_names=[c["name"] for c in channels],
        channel_stats={"mean": [c.get("mean") for c in channels], "std": [c.get("std") for c in channels]},
    )


def read_model_folder(path: str) -> dict:
    """A model folder as a checkpoint dict: ``{'model': state dict, 'args': folder_args, 'epoch', 'channel_names',
    'channel_stats', 'config'}`` (no optimizer state)."""
    config = read_config(path)
    state_dict = read_weights(path)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: {SAFETENSORS_SINGLE_FILE} holds no tensors")
    return dict(
        model=state_dict, args=folder_args(config), epoch=config.get("epoch"), config=config, **channel_fields(config)
    )
