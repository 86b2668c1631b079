"""Checkpoint files: written atomically, read back into (state dict, args), checked against a model, resumed.

Checkpoints hold only tensors and plain Python values, so ``torch.load(weights_only=True)`` (torch's default since
2.6) reads them; they are written atomically (``*.tmp``, fsync, rename, fsync of the directory).
"""

import argparse
import glob
import os
import re
import shutil
import zipfile

import torch
from timm.models import clean_state_dict

from util.data.vocabulary import checkpoint_vocabulary
from util.distributed import get_rank, get_world_size, is_main_process
from util.errors import CheckpointError, CheckpointMismatchError, OutputError
from util.model_folder import is_model_folder, read_model_folder
from util.preemption import PROGRESS_KEY
from util.rng import epoch_seed, gather_rng_states, seed_everything, set_rng_state

MAX_LISTED = 10
"""How many mismatched keys of each kind a ``CheckpointMismatchError`` lists."""


def _plain(value):
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def args_to_dict(args) -> dict:
    """``vars(args)`` with every value made a plain Python value (unknown types become ``str``); the channel
    vocabulary (``args.vocabulary``) is left out: it is saved at the top level (``save_model``)."""
    return {k: _plain(v) for k, v in vars(args).items() if k != "vocabulary"}


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err`` (itself, or in its chain of causes)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def atomic_save(obj, path: str):
    """``torch.save`` to ``path + '.tmp'``, flush and fsync, rename over ``path``, fsync the directory.

    A write error (disk full, file too large, read-only file system) raises an ``OSError`` naming the file, also
    where ``torch.save`` reports it without a file name or as an opaque ``RuntimeError``; ``path`` is then left
    as it was.
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        cause = _os_error(err)
        if cause is None or (cause is err and (cause.filename or cause.errno is None)):
            raise
        raise OSError(cause.errno, cause.strerror, tmp) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _atomic_link_or_copy(src: str, dst: str):
    """Make ``dst`` a hard link to ``src`` (a copy where links are unsupported), atomically."""
    tmp = dst + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def save_model(args, epoch: int, model_without_ddp, optimizer, loss_scaler, extra: dict | None = None, tag=None):
    """Write a checkpoint of ``epoch`` (0-based) into ``args.output_dir``; call on every process.

    Without ``tag``: ``checkpoint-last.pth`` always, and ``checkpoint-{epoch}.pth`` too every ``args.save_every``
    epochs and at the final epoch (a hard link to the same file). With ``tag`` (e.g. 'best'):
    ``checkpoint-{tag}.pth`` only. ``extra`` entries are added to the dict (plain values/tensors only), and so
    is the channel vocabulary ``args.vocabulary`` when the run set one: ``channel_names`` (one per channel-embedding
    row, in row order) and ``channel_stats`` (``{'mean': [...], 'std': [...]}``, raw units, per name; see
    ``util.data.vocabulary``). Returns the path written (rank 0) or None.
    """
    rng = gather_rng_states()
    if not is_main_process() or not args.output_dir:
        return None
    checkpoint = {
        "model": model_without_ddp.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
        "epoch": epoch,
        "args": args_to_dict(args),
        "rng": rng,
        **_plain(getattr(args, "vocabulary", None) or {}),
        **(extra or {}),
    }
    path = os.path.join(args.output_dir, f"checkpoint-{'last' if tag is None else tag}.pth")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        atomic_save(checkpoint, path)
        save_every = getattr(args, "save_every", 0) or 0
        if tag is None and ((save_every > 0 and (epoch + 1) % save_every == 0) or epoch + 1 == args.epochs):
            _atomic_link_or_copy(path, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
    except OSError as err:
        raise OutputError(
            f"could not save the checkpoint of epoch {epoch}: {err}. The checkpoints already in {args.output_dir} "
            "are intact; free some space (or fix --output_dir) and continue with --auto_resume"
        ) from err
    return path


def not_a_checkpoint(path: str) -> str | None:
    """Why the file ``path`` cannot be a ``torch.save`` file (None when it may be one): torch.save writes a zip
    archive (a pickle starting with protocol byte 0x80 before torch 1.6); a truncated archive has no central
    directory."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None  # torch.load names the problem
    if zipfile.is_zipfile(path) or head.startswith(b"\x80"):
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"{path} is a text file, not a checkpoint (it starts with {text[:40]!r})"
    if head.startswith(b"PK"):
        return f"{path} is not a checkpoint: a truncated or corrupt zip archive (an interrupted download or copy?)"
    return (
        f"{path} is not a checkpoint: neither a zip archive (torch.save's format) nor a pickle; the file is corrupt, "
        "truncated or of another kind"
    )


def load_checkpoint(path: str, unsafe: bool = False, mmap: bool = False) -> dict:
    """Load a checkpoint onto the CPU; ``weights_only=True`` unless ``unsafe`` (full unpickling, trusted files);
    ``mmap``: map the tensors instead of reading them (to look at keys and shapes only).

    ``argparse.Namespace`` is allowed as well: the published fine-tuned MAE checkpoints store their ``'args'`` as one
    (it holds plain values only). Raises ``CheckpointError`` for a missing or unreadable file, one that is no
    ``torch.save`` file (``not_a_checkpoint``), and one holding pickled objects other than tensors and plain values
    (refused without ``unsafe``: unpickling them could run arbitrary code). A directory is read as a model folder
    (``util.model_folder.read_model_folder``).
    """
    if is_model_folder(path):
        return read_model_folder(path)
    problem = not_a_checkpoint(path)
    if problem:
        raise CheckpointError(problem)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:
        if not unsafe and re.search(r"GLOBAL|Unsupported global", str(err)):
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" (it contains a pickled {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain values{what}, so torch.load(weights_only=True) "
                "refused it: unpickling them could run arbitrary code. If you trust the file, pass --unsafe_load"
            ) from err
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read the checkpoint {path}: {reason}") from err


def read_checkpoint(path: str, unsafe: bool = False, mmap: bool = False) -> tuple[dict, dict, dict]:
    """Read the checkpoint ``path``: ours, MAE's published ones, a bare state dict or a model folder.

    Returns (state dict without DDP / compile prefixes, recorded args ({} if absent; a Namespace becomes a dict),
    the whole checkpoint dict). Raises ``CheckpointError`` for a file that is no checkpoint.
    """
    checkpoint = load_checkpoint(path, unsafe=unsafe, mmap=mmap)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        state_dict = checkpoint["model"]
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        state_dict = checkpoint["state_dict"]
    elif all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        raise CheckpointError(f"{path} holds no model state dict (keys: {sorted(checkpoint)[:10]})")
    args = checkpoint.get("args") if state_dict is not checkpoint else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return clean_state_dict(state_dict), dict(args or {}), checkpoint


def checkpoint_channel_names(checkpoint: dict, path: str) -> list[str]:
    """The channel vocabulary of ``checkpoint`` (read from ``path``; ``util.data.vocabulary.checkpoint_vocabulary``):
    its ``channel_names``, else positional names for the rows of its channel embedding (or its input planes)."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else {}
    rows = state.get("channel_embed", state.get("patch_embed.proj.weight"))
    num_rows = None if rows is None else rows.shape[0 if "channel_embed" in state else 1]
    return checkpoint_vocabulary(checkpoint, num_rows, path)


def check_state_dict(model, state_dict: dict, source: str, allow_missing=(), allow_unexpected: bool = False):
    """Raise ``CheckpointMismatchError`` unless ``state_dict`` fits ``model``.

    Compares keys and tensor shapes; keys in ``allow_missing`` may be absent, extra keys are allowed with
    ``allow_unexpected``. The message lists up to ``MAX_LISTED`` problems of each kind.
    """
    own = model.state_dict()
    shapes = [
        f"{key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape)
    ]
    missing = [key for key in own if key not in state_dict and key not in set(allow_missing)]
    unexpected = [] if allow_unexpected else [key for key in state_dict if key not in own]
    if not (shapes or missing or unexpected):
        return
    lines = [f"{source} does not fit the model ({type(model).__name__}):"]
    for title, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            more = f" (first {MAX_LISTED} shown)" if len(items) > MAX_LISTED else ""
            lines += [f"  {len(items)} {title}{more}:"] + [f"    {item}" for item in items[:MAX_LISTED]]
    lines.append(
        "It was written for another model, size or channel count: check --model, --model_kwargs, --patch_size, "
        "--input_size and the data's channels (--channels / --in_chans) against the run that wrote it."
    )
    raise CheckpointMismatchError("\n".join(lines))


def find_latest_checkpoint(output_dir: str) -> str | None:
    """``checkpoint-last.pth`` in ``output_dir`` if present, else the highest-numbered ``checkpoint-N.pth``."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    last = os.path.join(output_dir, "checkpoint-last.pth")
    if os.path.isfile(last):
        return last
    numbered = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if match:
            numbered.append((int(match.group(1)), path))
    return max(numbered)[1] if numbered else None


def resolve_resume(args) -> str:
    """``args.resume``, filled in from ``find_latest_checkpoint(args.output_dir)`` under ``--auto_resume``."""
    if not getattr(args, "resume", "") and getattr(args, "auto_resume", False):
        args.resume = find_latest_checkpoint(args.output_dir) or ""
        if args.resume:
            print(f"Auto-resuming from {args.resume}")
    return getattr(args, "resume", "")


def load_model(args, model_without_ddp, optimizer=None, loss_scaler=None, checkpoint=None) -> dict | None:
    """Resume from ``args.resume`` (or, with ``args.auto_resume``, the newest checkpoint in ``args.output_dir``).

    Restores the model and, unless ``args.eval``, the optimizer, scaler, ``args.start_epoch`` (= saved epoch + 1;
    the saved epoch itself for a mid-epoch checkpoint, see ``resume_progress``) and this process's RNG states, so
    call it after everything that draws random numbers at start-up. A checkpoint that does not fit raises
    ``CheckpointMismatchError``. ``checkpoint``: the file's contents when the caller has read them already (so it is
    unpickled once). Returns the checkpoint dict (None when there is nothing to resume).
    """
    if not resolve_resume(args):
        return None
    if checkpoint is None:
        checkpoint = load_checkpoint(args.resume, unsafe=getattr(args, "unsafe_load", False))
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{args.resume} is not a training checkpoint (no 'model' state dict)")
    check_state_dict(model_without_ddp, checkpoint["model"], args.resume)
    model_without_ddp.load_state_dict(checkpoint["model"])
    print(f"Resume checkpoint {args.resume}")
    if getattr(args, "eval", False) or checkpoint.get("optimizer") is None or "epoch" not in checkpoint:
        return checkpoint
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointMismatchError(
            f"{args.resume}: its optimizer state does not fit this run's optimizer ({err}); it was written by "
            "another script or optimizer setup. To start from its weights only, pass it to --finetune"
        ) from err
    if loss_scaler is not None and checkpoint.get("scaler") is not None:
        loss_scaler.load_state_dict(checkpoint["scaler"])
    # a checkpoint saved on a stop signal mid-epoch continues that epoch (see resume_progress)
    args.start_epoch = checkpoint["epoch"] + (0 if checkpoint.get(PROGRESS_KEY) else 1)
    rng = checkpoint.get("rng")
    rank = get_rank()
    if rng is not None and len(rng) == get_world_size():
        set_rng_state(rng[rank])
    else:
        print("Checkpoint RNG states do not match this world size; reseeding from (seed, epoch, rank)")
        seed_everything(epoch_seed(args.seed, args.start_epoch, rank))
    print(f"With optimizer and scaler; continuing at epoch {args.start_epoch}")
    return checkpoint


def save_stopped(stop, args, epoch: int, model_without_ddp, optimizer, loss_scaler, log_writer, extra=None):
    """After an engine raised ``TrainingStopped``: save ``checkpoint-last.pth`` with the position inside the epoch
    (``PROGRESS_KEY``, read back by ``resume_progress``) and flush TensorBoard; ``run_main`` then exits."""
    extra = {**(extra or {}), PROGRESS_KEY: stop.progress}
    stop.checkpoint = save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra, tag="last")
    stop.unsaved = not args.output_dir
    if log_writer is not None:
        log_writer.flush()
