"""The classifier flags of main_finetune and main_linprobe, and the values they take from a checkpoint."""

import os
from dataclasses import dataclass, field

import models_vit
from models_checkpoint import (
    check_architecture,
    checkpoint_input_size,
    classifier_name,
    encoder_kwargs,
    load_state_dict_from,
)
from models_preflight import check_classifier_checkpoint, check_patch_grid, model_patch_size
from util.checkpoint import resolve_resume
from util.cli import parse_model_kwargs
from util.data.evaluation import DATA_FLAGS, inherit_args
from util.errors import CheckpointError, RunError

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


DEFAULTS = dict(
    model="channelvit_tiny_patch16",
    input_size=32,
    data_path=os.path.join(REPO_DIR, "sample_data", "digits"),
    global_pool=True,
)
"""Values of the flags that default to the checkpoint's, for a run without a checkpoint (or one recording none)."""


MODEL_FLAGS = ("model", "model_kwargs", "input_size")
"""Taken from the checkpoint the model is shaped after (--resume, else --finetune) unless given."""


RESUME_FLAGS = (*DATA_FLAGS, "global_pool")
"""Also taken from a checkpoint that is resumed or evaluated (--resume): the data and pooling it was trained with."""


CHECKPOINT_EPILOG = """\
defaults from the checkpoint:
  --model, --model_kwargs (per key) and --input_size default to those of the checkpoint the model is shaped after
  (--resume, else --finetune; a pretraining model gives the classifier of its family, a file without recorded
  arguments its position embedding's size). A resumed or evaluated checkpoint (--resume) also gives --data_path,
  --channels, --mean, --std, --channel_stats and --global_pool. A flag given wins; the log says where each value
  came from. A head count other than the checkpoint's (--model_kwargs num_heads=N) is refused: it does not show
  in the weights. --eval needs --resume.

normalisation (per channel, raw units; the first that applies):
  --mean/--std; --channel_stats; channel_stats.json in the data root; the statistics the checkpoint recorded
  (same channel count and pixel type); ImageNet mean/std for 8-bit RGB images; else estimated from up to 256
  training samples, with a warning. 8-bit RGB images (colour PNG/JPEG files, or 3 channels named R, G, B in
  channels.txt) also get timm's RandAugment / colour jitter / random erasing when training; other data, 3-band
  8-bit TIFF or NPY included, get random-resized crops and flips.
"""


def add_model_args(parser):
    """Model flags shared with main_linprobe."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        choices=models_vit.FINETUNE_MODELS,
        metavar="MODEL",
        help=f"default: the checkpoint's, else {DEFAULTS['model']}",
    )
    g.add_argument(
        "--patch_size", default=None, type=int, help="override the patch size (default: the checkpoint's, or --model's)"
    )
    g.add_argument(
        "--model_kwargs",
        default=[],
        nargs="*",
        metavar="KEY=VALUE",
        help="other model overrides, e.g. depth=2 (default: the checkpoint's)",
    )
    g.add_argument("--hcs", action="store_true", help="hierarchical channel sampling in training (ChannelViT)")
    g.add_argument("--finetune", default="", help="initialise the encoder from this checkpoint (file or model folder)")
    g.add_argument("--nb_classes", default=None, type=int, help="number of classes (default: from the dataset)")
    g.add_argument(
        "--new_channels",
        default=None,
        metavar="NAME[,NAME]",
        help="channels the --finetune checkpoint does not know, each given a fresh embedding row (ChannelViT), or "
        "'all' for every unknown one (default: an unknown channel name is an error)",
    )
    return g


@dataclass
class Checkpoints:
    """What a run takes from its checkpoints (``resolve_checkpoint_flags``).

    reference: the state dict the model is shaped after (--resume, else --finetune), or None; pretrained: the
    --finetune state dict to load, or None; stats: the normalisation the reference recorded (``args.normalization``);
    vocabulary: the channel names of the reference's embedding rows (None without a checkpoint); resumed: whether the
    reference is --resume (its classifier's rows are fixed: no new channels); sources: lines saying where the flags
    that belong to a checkpoint took their values from.
    """

    reference: dict | None = None
    pretrained: dict | None = None
    stats: dict | None = None
    vocabulary: list | None = None
    resumed: bool = False
    sources: list[str] = field(default_factory=list)


def _flag_text(key, value) -> str:
    """'--key value' as on a command line."""
    if isinstance(value, list | tuple):
        value = " ".join(map(str, value))
    return f"--{key} {value}"


def take_checkpoint_flags(args, checkpoint_args, state_dict, path, resumed) -> dict:
    """Fill the unset flags that belong to the checkpoint at ``path``: --model (the classifier of its family),
    the --model_kwargs keys not given, --input_size, --patch_size and, when ``resumed``, ``RESUME_FLAGS``. Returns
    {flag: value} of what was taken."""
    taken = {}
    if args.model is None and checkpoint_args.get("model"):
        args.model = taken["model"] = classifier_name(checkpoint_args["model"])
        if args.model not in models_vit.FINETUNE_MODELS:
            raise CheckpointError(f"{path} was trained as '{checkpoint_args['model']}': pass --model")
    given = parse_model_kwargs(args.model_kwargs)
    recorded = [f"{k}={v!r}" for k, v in encoder_kwargs(checkpoint_args).items() if k not in given]
    if recorded:
        args.model_kwargs = [*recorded, *args.model_kwargs]
        taken["model_kwargs"] = recorded
    input_size = checkpoint_input_size(checkpoint_args, state_dict)
    if args.input_size is None and input_size:
        args.input_size = taken["input_size"] = input_size
    if args.patch_size is None and "patch_size" not in given and "patch_embed.proj.weight" in state_dict:
        args.patch_size = taken["patch_size"] = int(state_dict["patch_embed.proj.weight"].shape[-1])
    if resumed:
        taken.update({key: getattr(args, key) for key in inherit_args(args, checkpoint_args, RESUME_FLAGS)})
    return taken


def check_input_size(args, checkpoint: str | None):
    """Set ``args.patch_size`` to the patch size the classifier gets and refuse an --input_size it does not tile;
    ``checkpoint``: the file the patch size came from, if it did."""
    given = args.patch_size is not None and checkpoint is None
    source = f"from {checkpoint}" if checkpoint else "--patch_size" if given else f"--model {args.model}"
    args.patch_size = model_patch_size(args.model, args.patch_size, args.model_kwargs)
    check_patch_grid(args.input_size, args.patch_size, source)


def resolve_checkpoint_flags(args, defaults: dict = DEFAULTS) -> Checkpoints:
    """Refuse --eval without a checkpoint, read the checkpoints and fill the flags left unset, before any compute.

    Unset flags take the values of the checkpoint the model is shaped after (``take_checkpoint_flags``), then
    ``defaults``. A head count other than the checkpoint's is refused (``check_architecture``), and so are a
    pretraining checkpoint given to --resume, a per-channel one given to a ViT (``check_classifier_checkpoint``)
    and an --input_size that the patch size does not tile (``check_input_size``).
    """
    resume = resolve_resume(args)
    if args.eval and not resume:
        raise RunError(
            "--eval scores a checkpoint, and none was given: pass --resume CHECKPOINT (--finetune only initialises "
            "training)"
        )
    given = {key: getattr(args, key) for key in (*MODEL_FLAGS, *RESUME_FLAGS) if getattr(args, key) not in (None, [])}
    found, taken = Checkpoints(), {}
    if args.finetune and not args.eval:
        found.pretrained, checkpoint_args, found.vocabulary = load_state_dict_from(args.finetune, args)
        found.reference = found.pretrained
    if resume:
        found.reference, checkpoint_args, found.vocabulary = load_state_dict_from(resume, args)
        found.resumed = True
    path = resume or args.finetune
    if found.reference is not None:
        taken = take_checkpoint_flags(args, checkpoint_args, found.reference, path, resumed=bool(resume))
        found.stats = checkpoint_args.get("normalization")
        flags = " ".join(_flag_text(*kv) for kv in taken.items())
        found.sources.append(f"From the checkpoint {path}: {flags or '-'}")
    defaulted = {key: value for key, value in defaults.items() if getattr(args, key) is None}
    for key, value in defaulted.items():
        setattr(args, key, value)
    if found.pretrained is not None:
        check_classifier_checkpoint(args.finetune, found.pretrained, args.model, "--finetune")
    if resume:
        check_classifier_checkpoint(resume, found.reference, args.model, "--resume")
    if found.reference is not None:
        own = parse_model_kwargs(given.get("model_kwargs"))
        check_architecture(path, checkpoint_args, args.model, parse_model_kwargs(args.model_kwargs), own)
    check_input_size(args, path if "patch_size" in taken else None)
    for title, values in (("From the command line", given), ("Defaults", defaulted)):
        if values:
            found.sources.append(f"{title}: " + " ".join(_flag_text(*kv) for kv in values.items()))
    return found
