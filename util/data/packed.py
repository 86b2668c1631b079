"""The packed store: a dataset converted into uncompressed, memory-mapped arrays for random access.

Written by ``python pack_dataset.py --data_path SRC [SRC ...] --out DST`` (``util.data.pack``); ``--data_path DST``
then works wherever a dataset is accepted. Layout of DST::

    packed.json            format, version, sources, classes, channel names, per-split groups, state
    <split>-<g>.npy        samples of one (C, H, W) shape and dtype: a (N, C, H, W) .npy array (numpy format)
    <split>-index.npy      (n, 3) int64 per sample in listing order: group, row in the group, label (-1: none)
    <split>-done.npy       (n,) uint8 progress marker: 1 once the sample's pixels are written (resuming)
    <split>-sources.json   the source file(s) of every sample, in listing order (per-channel files joined by '|')
    channels.txt           channel names, one per line, when the sources name their channels
    channel_stats.json     per-channel statistics of the train split (``python -m util.data.stats`` format)

Splits are ``train`` (the pretraining samples, or the labelled train split) and, for labelled sources, ``val``.
A sample reads as a ``PackedRef`` (a ``str`` naming ``<split>-<g>.npy[row]``), which the readers map to a view of
the memory-mapped array: slicing the view reads only the bytes of the slice (``window``), so a crop of a field
reads only its rows. The pixels are the source files' own values and dtype, exactly.
"""

import json
import os
from pathlib import Path

import numpy as np

from util.data.errors import CorruptFileError, DatasetError, MissingPathError

STORE_FILENAME = "packed.json"
FORMAT = "channelmae-packed"
VERSION = 1
SPLITS = ("train", "val")

_MEMMAPS = {}  # (pid, path) -> the opened array, one mapping per process and file


class PackedRef(str):
    """One sample of a packed store: the path of its group array and its row. As a string it is the sample's
    source file (per-channel files joined by '|'), so paths in outputs and ``--group_regex`` see the originals."""

    def __new__(cls, array: str, row: int, source: str):
        ref = super().__new__(cls, source)
        ref.array, ref.row = str(array), int(row)
        return ref

    def __reduce__(self):
        return PackedRef, (self.array, self.row, str(self))


def is_packed_store(path) -> bool:
    """Whether ``path`` is a packed store directory (it holds ``packed.json``)."""
    return (Path(path) / STORE_FILENAME).is_file()


def read_manifest(root) -> dict:
    """``packed.json`` of the store ``root``, checked for format, version and completeness."""
    path = Path(root) / STORE_FILENAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"cannot read the packed store index {path}: {e}") from e
    manifest = manifest if isinstance(manifest, dict) else {}
    splits, keys = manifest.get("splits"), ("groups", "index", "sources")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION or not isinstance(splits, dict):
        raise DatasetError(f"{path} is not a {FORMAT} version {VERSION} store")
    if not all(isinstance(info, dict) and all(k in info for k in keys) for info in splits.values()):
        raise CorruptFileError(f"{path}: a split lacks one of {', '.join(keys)}; repack the store")
    if not manifest.get("complete"):
        raise DatasetError(
            f"--data_path {root}: the packed store is incomplete (packing was interrupted); rerun "
            f"python pack_dataset.py with the same --data_path and --out {root} to finish it"
        )
    return manifest


def _array(path: str) -> np.ndarray:
    """The memory-mapped (N, C, H, W) array of a group file, opened once per process."""
    key = (os.getpid(), path)
    if key not in _MEMMAPS:
        try:
            _MEMMAPS[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CorruptFileError(f"cannot open packed array {path}: {type(e).__name__}: {e}") from e
    return _MEMMAPS[key]


def read_packed(ref: PackedRef) -> np.ndarray:
    """The (C, H, W) memory-mapped view of one packed sample; nothing is read until it is sliced or copied."""
    return _array(ref.array)[ref.row]


def packed_shape(ref: PackedRef) -> tuple:
    """(C, H, W) shape and dtype of one packed sample, from the array header (no pixels read)."""
    arr = _array(ref.array)
    return tuple(arr.shape[1:]), arr.dtype


def packed_samples(root, split: str, classes=None):
    """(samples [(PackedRef, label)], class names) of one split of the store ``root``; ``classes``: the train
    split's, which a val split must share."""
    root = Path(root)
    manifest = read_manifest(root)
    info = manifest["splits"].get(split)
    if info is None:
        held = ", ".join(manifest["splits"])
        raise MissingPathError(f"--data_path {root}: the packed store has no {split} split (it holds {held})")
    if classes is not None and list(classes) != manifest["classes"]:
        raise DatasetError(f"--data_path {root}: the packed {split} split's classes differ from the train split's")
    try:
        index = np.load(root / info["index"], allow_pickle=False)
        sources = json.loads((root / info["sources"]).read_text())
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CorruptFileError(f"--data_path {root}: cannot read the {split} split's index: {e}") from e
    if index.ndim != 2 or index.shape[1] != 3 or len(index) != len(sources):
        raise CorruptFileError(f"--data_path {root}: the {split} split's index and sources do not match; repack")
    files = [str(root / group["file"]) for group in info["groups"]]
    samples = [(PackedRef(files[g], row, src), int(label)) for (g, row, label), src in zip(index.tolist(), sources)]
    return samples, list(manifest["classes"])
