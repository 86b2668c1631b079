"""Data layer for multi-channel images: readers, dataset layouts, per-channel normalisation, transforms.

Readers
    ``read_image(path)`` returns the raw pixel values as float32 (C, H, W); nothing is rescaled, so 16-bit
    data keep their 0..65535 range. Suffixes: .tif/.tiff (tifffile, first series), .npy, .png/.jpg/.jpeg
    (PIL; 16-bit colour PNGs, which PIL would cut to 8 bit, are decoded with imagecodecs).

Layout rule for TIFF and NPY arrays
    (H, W) -> (1, H, W). Leading size-1 axes of 4-D+ arrays are dropped. A 3-D array is read as (C, H, W)
    when its last two axes are a plausible image plane for its first and its first two axes are not for its
    last, and as (H, W, C) in the opposite case. (H, W) is a plausible plane for C channels when H == W or
    both are at least 2 C. So (200, 64, 64) is 200 channels of 64 x 64 and (64, 64, 200) the same stored
    channels-last, (3, 480, 640) is (C, H, W), (480, 640, 3) is (H, W, C). A shape where both or neither
    reading fits, such as (64, 64, 64), (3, 64, 3) or (30, 40, 50), is an error naming the file unless
    ``--channel_axis first|last`` says which axis holds the channels (for every file). There is no limit on
    the number of channels.

Dataset layouts (``--data_path``)
    * class folders ``root/{train,val}/<class>/<image>``;
    * a CSV index ``root/{train,val}.csv`` (for pretraining also any ``file.csv``) with either a ``path``
      column (one file per sample) or one column per channel (one single-channel file per channel, as in
      cell painting; every column other than ``label`` is a channel). ``label`` holds class names and may be
      empty; relative paths resolve against the CSV's folder;
    * unlabelled, pretraining only: every image under ``root/train`` if that folder exists, else under ``root``.
    ``--channels 0,2,4`` keeps those channel ids, in that order, at read time (CSV: column order).

Normalisation, per channel and in raw pixel units; the first that applies wins
    1. ``--mean`` and ``--std``: one value per channel in the files, in file order (also when ``--channels``
       reorders all of them), or one per ``--channels`` id, in ``--channels`` order, for a subset;
    2. ``--channel_stats FILE``;
    3. ``channel_stats.json`` in the data root (the CSV's folder for a CSV path), written by
       ``python -m util.datasets stats --data_path ROOT --out ROOT/channel_stats.json``;
    4. the statistics recorded in the checkpoint the run starts from (``checkpoint_stats``, a
       ``normalization_record``), when it was trained on files of the same channel count and pixel types;
    5. ImageNet mean/std x 255 for 8-bit RGB images (``is_rgb``: one colour PNG/JPEG file per sample read in file
       order, or 3 channels named R, G, B); a 3-band 8-bit TIFF or NPY is not assumed to be RGB;
    6. otherwise mean/std estimated when the dataset is built from up to 256 evenly spaced training samples,
       with a logged warning (the same samples on every call, so train, val and all ranks agree).
    The dataset keeps the values and their source (``mean``, ``std``, ``norm_source``).

Transforms (``build_transform``) act on float tensors of any C with torchvision.transforms.v2. One exception:
fine-tune training on 8-bit RGB images uses timm's ``create_transform`` (RandAugment ``--aa``,
``--color_jitter``, random erasing ``--reprob/--remode/--recount``) on a PIL image, so ImageNet recipes keep
working. Other 3-channel 8-bit data get a warning saying that neither this nor ImageNet mean/std applies.

Validation: every file's header (shape and dtype, no pixel decoding, plus a truncation check for TIFF, PNG
and NPY) is read when the dataset is built, so a missing, corrupt or mismatched file fails before training
with a ``DatasetError`` naming the file, CSV line or flag. Samples must share their channel count and,
unless ``--allow_mixed_sizes``, their height and width; pixels must be bool, integer or float. With
``--skip_bad_samples`` corrupt files are dropped at build time (counted in ``dataset.num_dropped``) and a file
that fails to decode later is replaced by the next sample and counted in ``dataset.num_skipped`` (a counter
shared by the process and its DataLoader workers).

NaN and infinite pixels: a float file holding any is an error naming it (``NonFinitePixelsError``) when its
pixels are read, in training as in the statistics, which name every such file; ``--nan_fill VALUE``
replaces them by VALUE (raw units) instead, and ``--skip_bad_samples`` treats the file as a corrupt one.
Other no-data markers (such as -9999) are ordinary pixels to this check.

Folders are scanned recursively, following directory links, but each real directory once: a link loop or
a second link to a folder adds no samples.
"""

import argparse
import csv
import itertools
import json
import logging
import math
import multiprocessing
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from util.cli import add_reading_args, run_main

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, ".npy", *PIL_SUFFIXES)
STATS_FILENAME = "channel_stats.json"
CHANNEL_NAMES_FILENAME = "channels.txt"
CHANNEL_AXES = ("first", "last")
ESTIMATE_SAMPLES = 256
PERCENTILE_SAMPLE_SIZE = 2**20
HEADER_THREADS = 16
MAX_NAMED = 10  # files named in one error
NAN_HINT = "pass --nan_fill VALUE to replace them, or --skip_bad_samples to leave the sample out"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> decoded channels
PIL_CONVERT = {"1": "L", "P": "RGB", "PA": "RGBA", "YCbCr": "RGB"}
PIXEL_DTYPE_KINDS = "biuf"  # numpy dtype kinds accepted as pixels: bool, signed and unsigned integers, floats
PIL_DTYPES = {"I;16": "uint16", "I;16L": "uint16", "I;16B": "uint16", "I;16N": "uint16", "I": "int32", "F": "float32"}


class DatasetError(ValueError):
    """A problem with the data or a data flag, raised while the dataset is built."""


class MissingPathError(DatasetError, FileNotFoundError):
    """A path named by a flag or a CSV row does not exist."""


class CorruptFileError(DatasetError):
    """A file cannot be decoded or is truncated."""


class NonFinitePixelsError(CorruptFileError):
    """A file holds NaN or infinite pixels and no ``--nan_fill`` value replaces them."""


@dataclass(frozen=True)
class Header:
    """Shape (C, H, W) and dtype of one file, read without decoding its pixels."""

    shape: tuple
    dtype: np.dtype


# ---------------------------------------------------------------------------------------------- readers


def _suffix(path):
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DatasetError(f"{path}: unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)}")
    return suffix


def _squeeze(shape, path):
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) not in (2, 3):
        raise DatasetError(f"{path}: unsupported image shape {shape}; expected (H, W), (C, H, W) or (H, W, C)")
    return shape


def _is_image_plane(channels, height, width):
    """Whether (height, width) is a plausible image plane of ``channels`` channels: square, or both sides at least
    twice the channel count."""
    return height == width or 2 * channels <= min(height, width)


def _channel_axis(shape, path, channel_axis=None):
    """Channel axis (0 or 2) of a 3-D shape: ``channel_axis`` ('first' or 'last') when given, else by the layout
    rule in the module docstring; a shape the rule cannot decide raises ``DatasetError``."""
    if channel_axis is not None:
        if channel_axis not in CHANNEL_AXES:
            raise DatasetError(f"--channel_axis {channel_axis!r}: expected one of {', '.join(CHANNEL_AXES)}")
        return 0 if channel_axis == "first" else 2
    first, last = _is_image_plane(shape[0], shape[1], shape[2]), _is_image_plane(shape[2], shape[0], shape[1])
    if first != last:
        return 0 if first else 2
    raise DatasetError(
        f"{path}: cannot tell the channel axis of shape {shape}: "
        f"{'both (C, H, W) and (H, W, C) fit' if first else 'neither (C, H, W) nor (H, W, C) fits'} (an image is "
        "square or at least twice as high and wide as it has channels); pass --channel_axis first for (C, H, W) "
        "or --channel_axis last for (H, W, C)"
    )


def _chw_shape(shape, path, channel_axis=None):
    shape = _squeeze(shape, path)
    if len(shape) == 2:
        return (1, *shape)
    return shape if _channel_axis(shape, path, channel_axis) == 0 else (shape[2], shape[0], shape[1])


def _to_chw(arr, path, channel_axis=None):
    """(H, W), (C, H, W) or (H, W, C) array -> (C, H, W) view."""
    shape = _squeeze(arr.shape, path)
    arr = arr.reshape(shape)
    if arr.ndim == 2:
        return arr[None]
    return arr if _channel_axis(shape, path, channel_axis) == 0 else np.moveaxis(arr, 2, 0)


def _png_ihdr(path):
    """(height, width, bit depth, colour type) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise CorruptFileError(f"{path} is not a valid PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return height, width, head[24], head[25]


def _is_16bit_colour_png(path):
    if Path(path).suffix.lower() != ".png":
        return False
    _, _, depth, colour = _png_ihdr(path)
    return depth == 16 and colour != 0


def _decode_png16(path):
    """16-bit colour PNG -> (C, H, W) uint16 (PIL would reduce it to 8 bit)."""
    try:
        import imagecodecs
    except ImportError as e:
        raise DatasetError(f"{path} is a 16-bit colour PNG; install imagecodecs to read it") from e
    return np.moveaxis(np.atleast_3d(imagecodecs.png_decode(Path(path).read_bytes())), 2, 0)


def _read_pil(path):
    if _is_16bit_colour_png(path):
        return _decode_png16(path)
    with Image.open(path) as im:
        im = im.convert(PIL_CONVERT[im.mode]) if im.mode in PIL_CONVERT else im
        arr = np.asarray(im)
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, 2, 0)


def read_array(path, channel_axis=None):
    """Raw pixels of one file as a (C, H, W) array in the file's own dtype; ``channel_axis`` ('first', 'last' or
    None: the layout rule) says how to read a 3-D TIFF or NPY array."""
    suffix = _suffix(path)
    try:
        if suffix in TIFF_SUFFIXES:
            return _to_chw(tifffile.imread(path), path, channel_axis)
        if suffix == ".npy":
            return _to_chw(np.load(path, allow_pickle=False), path, channel_axis)
        return _read_pil(path)
    except DatasetError:
        raise
    except Exception as e:
        raise CorruptFileError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def fill_non_finite(arr, path, fill=None):
    """arr (C, H, W) with its NaN and infinite pixels set to ``fill``; ``NonFinitePixelsError`` naming ``path``
    when it has some and ``fill`` is None. Integer and bool arrays are returned as they are."""
    if arr.dtype.kind != "f":
        return arr
    finite = np.isfinite(arr)
    if finite.all():
        return arr
    if fill is None:
        count = arr.size - np.count_nonzero(finite)
        raise NonFinitePixelsError(f"{path} has {count} NaN or infinite pixel values (of {arr.size}); {NAN_HINT}")
    return np.where(finite, arr, arr.dtype.type(fill))


def read_image(path, channel_axis=None):
    """Raw pixel values of one file as float32 (C, H, W), not rescaled."""
    return np.ascontiguousarray(read_array(path, channel_axis), dtype=np.float32)


# ---------------------------------------------------------------------------------------------- headers


# numpy parses an .npy header with ast.literal_eval; on CPython 3.11 building an AST is not thread-safe (a thread
# switch inside it raises "SystemError: AST constructor recursion depth mismatch"), so header threads take turns
_NPY_HEADER_LOCK = threading.Lock()


def _check_length(path, needed):
    size = os.path.getsize(path)
    if needed > size:
        raise CorruptFileError(f"{path} is truncated: its pixel data need {needed} bytes, the file has {size}")


def _tiff_header(path, channel_axis):
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise CorruptFileError(f"{path} holds no image data")
        series = tif.series[0]
        pages = [page for page in series.pages if page is not None]
        promised = tif.shaped_metadata[0].get("shape", series.shape) if tif.is_shaped else series.shape
        if len(pages) * series.keyframe.size < math.prod(promised):
            raise CorruptFileError(f"{path} is truncated: {len(pages)} image page(s) left of a {tuple(promised)} image")
        ends = [int(o) + int(n) for page in pages for o, n in zip(page.dataoffsets, page.databytecounts)]
        _check_length(path, max(ends, default=0))
        return Header(_chw_shape(series.shape, path, channel_axis), np.dtype(series.dtype))


def _npy_header(path, channel_axis):
    with open(path, "rb") as f, _NPY_HEADER_LOCK:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if dtype.hasobject:
        raise CorruptFileError(f"{path} holds Python objects, not pixels")
    _check_length(path, offset + math.prod(shape) * dtype.itemsize)
    return Header(_chw_shape(shape, path, channel_axis), dtype)


def _check_png_end(path):
    with open(path, "rb") as f:
        f.seek(-12, os.SEEK_END)
        if f.read(12)[4:8] != b"IEND":
            raise CorruptFileError(f"{path} is truncated: it does not end with a PNG IEND chunk")


def _pil_header(path):
    if Path(path).suffix.lower() == ".png":
        height, width, depth, colour = _png_ihdr(path)
        _check_png_end(path)
        if depth == 16 and colour != 0:
            return Header((PNG_CHANNELS[colour], height, width), np.dtype("uint16"))
    with Image.open(path) as im:
        mode = PIL_CONVERT.get(im.mode, im.mode)
        width, height = im.size
    return Header((Image.getmodebands(mode), height, width), np.dtype(PIL_DTYPES.get(mode, "uint8")))


def read_header(path, channel_axis=None):
    """Header (shape (C, H, W), dtype) of one file, without decoding pixels; checks truncation."""
    suffix = _suffix(path)
    if not os.path.isfile(path):
        raise MissingPathError(f"{path} does not exist")
    try:
        if suffix in TIFF_SUFFIXES:
            return _tiff_header(path, channel_axis)
        if suffix == ".npy":
            return _npy_header(path, channel_axis)
        return _pil_header(path)
    except DatasetError:
        raise
    except Exception as e:
        raise CorruptFileError(f"cannot read the header of {path}: {type(e).__name__}: {e}") from e


def _header_or_error(path, channel_axis=None):
    try:
        return read_header(path, channel_axis)
    except CorruptFileError as e:
        return e


# ---------------------------------------------------------------------------------------------- layouts


def _unseen_dirs(dirpath, dirnames, seen):
    """The non-hidden entries of dirnames whose real path is not in seen (which gains them), sorted."""
    kept = []
    for name in sorted(d for d in dirnames if not d.startswith(".")):
        real = os.path.realpath(os.path.join(dirpath, name))
        if real in seen:
            logger.warning(
                "not following %s: it leads to %s, which is scanned already", os.path.join(dirpath, name), real
            )
            continue
        seen.add(real)
        kept.append(name)
    return kept


def _scan(folder):
    """Image files under folder, recursively and sorted; hidden entries are skipped. Directory links are followed,
    but every real directory is scanned once, so a link loop or a second link to a folder adds no samples."""
    found, seen = [], {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = _unseen_dirs(dirpath, dirnames, seen)
        found += [
            os.path.join(dirpath, name)
            for name in filenames
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)
        ]
    return sorted(found)


def _sorted_names(names):
    """Class names sorted numerically when they are integers, else alphabetically."""
    return sorted(names, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))


def _class_folder_split(split_dir, classes):
    """Samples [(path, class index)] and class names of split_dir/<class>/<image>."""
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = found if classes is None else classes
    if not classes:
        raise DatasetError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(f"{split_dir} has class folders {unknown} that the train split lacks")
    samples = [(path, i) for i, name in enumerate(classes) for path in _scan(split_dir / name)]
    return samples, classes


def _csv_file(csv_path, line, row, column):
    value = (row.get(column) or "").strip()
    if not value:
        raise DatasetError(f"{csv_path} line {line}: column '{column}' is empty")
    path = csv_path.parent / value
    if not path.is_file():
        raise MissingPathError(f"{csv_path} line {line}: column '{column}' names {path}, which does not exist")
    return str(path)


def _read_csv(csv_path, classes=None):
    """Samples, class names and channel names (per-channel layout, else None) of a CSV index."""
    if not csv_path.is_file():
        raise MissingPathError(f"CSV index {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DatasetError(f"{csv_path} is empty; expected a header 'path,label' or 'ch0,ch1,...,label'")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        per_file = "path" in reader.fieldnames
        columns = ["path"] if per_file else [c for c in reader.fieldnames if c != "label"]
        if not columns:
            raise DatasetError(f"{csv_path} has no path column; expected 'path,label' or 'ch0,ch1,...,label'")
        rows = []
        for row in reader:
            files = [_csv_file(csv_path, reader.line_num, row, c) for c in columns]
            rows.append((files[0] if per_file else files, (row.get("label") or "").strip(), reader.line_num))
    if not rows:
        raise DatasetError(f"{csv_path} lists no samples")
    classes = _sorted_names({label for _, label, _ in rows if label}) if classes is None else classes
    index = {name: i for i, name in enumerate(classes)}
    unknown = [(line, label) for _, label, line in rows if label and label not in index]
    if unknown:
        line, label = unknown[0]
        raise DatasetError(f"{csv_path} line {line}: label {label!r} is not one of the train split's classes")
    samples = [(files, index[label] if label else -1) for files, label, _ in rows]
    return samples, classes, None if per_file else columns


def _labelled_split(root, split, classes):
    """(samples, classes, csv channel names) of root/<split>.csv or root/<split>/<class>/."""
    csv_path = root / f"{split}.csv"
    if csv_path.is_file():
        return _read_csv(csv_path, classes)
    if (root / split).is_dir():
        return (*_class_folder_split(root / split, classes), None)
    raise MissingPathError(f"--data_path {root}: found neither class folders {root / split}/ nor an index {csv_path}")


def _unlabelled_samples(path):
    """(samples with label -1, csv channel names) for pretraining."""
    if path.is_file() and path.suffix.lower() != ".csv":
        raise DatasetError(f"--data_path {path} is a file but not a .csv index")
    csv_path = path if path.is_file() else path / "train.csv"
    if csv_path.is_file():
        samples, _, names = _read_csv(csv_path)
        return [(files, -1) for files, _ in samples], names
    folder = path / "train" if (path / "train").is_dir() else path
    return [(file, -1) for file in _scan(folder)], None


def _data_path(args):
    value = getattr(args, "data_path", None)
    if not value:
        raise DatasetError("--data_path is required")
    path = Path(value)
    if not path.exists():
        raise MissingPathError(f"--data_path {path} does not exist")
    return path


def _stats_dir(path):
    return path if path.is_dir() else path.parent


def _channel_names(stats_dir, csv_names, num_channels):
    """Channel names from the CSV's columns, else from channels.txt (one per line) in stats_dir, else None."""
    names_file = stats_dir / CHANNEL_NAMES_FILENAME
    if csv_names is not None or not names_file.is_file():
        return csv_names
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if len(names) != num_channels:
        raise DatasetError(f"{names_file} lists {len(names)} channel names but the data have {num_channels} channels")
    return names


# ---------------------------------------------------------------------------------------------- validation


def _as_list(files):
    return [files] if isinstance(files, str) else files


def _describe(files):
    return files if isinstance(files, str) else f"{files[0]} (and {len(files) - 1} more channel files)"


def _sample_shape(files, headers):
    """(C, H, W) of one sample; the files of a per-channel sample must be single-channel and equal in size."""
    if isinstance(files, str):
        return headers[0].shape
    for path, header in zip(files, headers):
        if header.shape[0] != 1:
            raise DatasetError(f"{path} has {header.shape[0]} channels; a per-channel CSV needs 1 channel per file")
        if header.shape[1:] != headers[0].shape[1:]:
            raise DatasetError(
                f"{path} is {header.shape[1:]} but {files[0]} of the same sample is {headers[0].shape[1:]}"
            )
    return (len(files), *headers[0].shape[1:])


def _check_same_shape(shape, first, files, expected, mixed_sizes):
    if shape[0] != expected[0]:
        raise DatasetError(
            f"{_describe(files)} has {shape[0]} channels but {_describe(first)} has {expected[0]}; "
            "every sample needs the same channels"
        )
    if not mixed_sizes and shape[1:] != expected[1:]:
        raise DatasetError(
            f"{_describe(files)} is {shape[1]}x{shape[2]} but {_describe(first)} is {expected[1]}x{expected[2]}; "
            "pass --allow_mixed_sizes if sizes legitimately differ (the crops resize every sample)"
        )


def _header_problem(path, header):
    """The error of one file: its header could not be read, or its pixels are not numbers (complex, text...)."""
    if isinstance(header, Exception):
        return header
    if header.dtype.kind not in PIXEL_DTYPE_KINDS:
        return DatasetError(f"{path} has pixels of dtype {header.dtype}; expected bool, integer or float pixels")
    return None


def _validate(samples, args, source):
    """Read every file header; return (kept samples, (C, H, W) of the first sample, set of dtype names)."""
    skip = getattr(args, "skip_bad_samples", False)
    paths = sorted({path for files, _ in samples for path in _as_list(files)})
    axis = getattr(args, "channel_axis", None)
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        headers = dict(zip(paths, pool.map(_header_or_error, paths, itertools.repeat(axis))))
    kept, first, expected, dtypes = [], None, None, set()
    for files, label in samples:
        sample_headers = [headers[path] for path in _as_list(files)]
        errors = [e for e in map(_header_problem, _as_list(files), sample_headers) if e is not None]
        if errors and not skip:
            raise errors[0]
        if errors:
            logger.warning("skipping a sample: %s", errors[0])
            continue
        shape = _sample_shape(files, sample_headers)
        if first is None:
            first, expected = files, shape
        _check_same_shape(shape, first, files, expected, getattr(args, "allow_mixed_sizes", False))
        dtypes.update(h.dtype.name for h in sample_headers)
        kept.append((files, label))
    if not kept:
        raise DatasetError(f"{source}: no readable image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return kept, expected, dtypes


def parse_channels(value):
    """--channels as None (all), a "0,2,4" string or a list of ints -> list of distinct ids or None."""
    if value is None or value == "":
        return None
    try:
        ids = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError) as e:
        raise DatasetError(f"--channels {value!r} is not a comma-separated list of channel ids") from e
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise DatasetError(f"--channels {value!r} must list distinct channel ids >= 0")
    return ids


def _channel_ids(args, num_channels, example):
    """The channel ids to read (``--channels``, default all), checked against ``--in_chans``; ``example`` is a
    sample's file(s), named in the error."""
    ids = parse_channels(getattr(args, "channels", None))
    if ids is None:
        ids = list(range(num_channels))
    elif max(ids) >= num_channels:
        raise DatasetError(f"--channels {ids} asks for channel {max(ids)} but the data have {num_channels} channels")
    in_chans = getattr(args, "in_chans", None)
    if in_chans is not None and in_chans != len(ids):
        raise DatasetError(
            f"--in_chans {in_chans} does not match the data: {len(ids)} of {num_channels} channels are used "
            f"({_describe(example)} has {num_channels})"
        )
    return ids


# ---------------------------------------------------------------------------------------------- statistics


def _evenly_spaced(items, limit):
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def _int_range(dtype_names):
    """(lowest, highest) value of the data when all dtypes are integers of <= 16 bits, else None."""
    dtypes = [np.dtype(name) for name in dtype_names]
    if not dtypes or any(d.kind not in "ui" or d.itemsize > 2 for d in dtypes):
        return None
    return min(np.iinfo(d).min for d in dtypes), max(np.iinfo(d).max for d in dtypes)


def _histogram_percentiles(hist, offset, qs):
    """Percentiles (len(qs), C) of integer data given per-channel counts, with numpy's 'linear' rule."""
    cum = np.cumsum(hist, axis=1)
    out = np.empty((len(qs), hist.shape[0]))
    for c, counts in enumerate(cum):
        n = int(counts[-1])
        for j, q in enumerate(qs):
            position = (n - 1) * (q / 100)
            k = math.floor(position)
            low, high = np.searchsorted(counts, [k, min(k + 1, n - 1)], side="right") + offset
            out[j, c] = low + (position - k) * (high - low)
    return out


class ChannelStatistics:
    """One-pass per-channel statistics over (C, H, W) images, accumulated in float64.

    Mean and variance: each image's exact mean and sum of squared deviations are merged into the running
    totals with Chan et al.'s parallel update, so they equal numpy's on the concatenated pixels up to float64
    rounding (std is the population std, ddof=0). Percentiles (1st, 99th): exact, from a full per-channel
    histogram, when every dtype is an integer of <= 16 bits; otherwise from ``pixels_per_image`` pixels drawn
    uniformly without replacement from every image (about 2**20 per channel in all). That is exact when no
    image has more pixels than that; else the quantile level is off by about sqrt(p (1 - p) / kept pixels),
    ~1e-4 for p = 0.01 and 2**20 kept pixels.
    """

    def __init__(self, num_channels, int_range=None, pixels_per_image=None, seed=0):
        self.count = 0
        self.mean = np.zeros(num_channels)
        self.m2 = np.zeros(num_channels)
        self.min = np.full(num_channels, np.inf)
        self.max = np.full(num_channels, -np.inf)
        self.int_range = int_range
        self.hist = None if int_range is None else np.zeros((num_channels, int_range[1] - int_range[0] + 1), np.int64)
        self.pixels_per_image = pixels_per_image
        self.kept = []
        self.rng = np.random.default_rng(seed)

    def update(self, img):
        """Add one image (C, H, W) of any real dtype."""
        x = img.reshape(img.shape[0], -1)
        n = x.shape[1]
        mean = x.mean(axis=1, dtype=np.float64)
        m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta**2 * (self.count * n / total)
        self.count = total
        self.min = np.minimum(self.min, x.min(axis=1))
        self.max = np.maximum(self.max, x.max(axis=1))
        if self.hist is not None:
            self._count_values(x)
        elif self.pixels_per_image:
            picked = x if n <= self.pixels_per_image else x[:, self.rng.choice(n, self.pixels_per_image, replace=False)]
            self.kept.append(picked.astype(np.float64))

    def _count_values(self, x):
        """Add (C, N) integer pixels to the histogram: bincount for big images, unique for small ones."""
        low, width = self.int_range[0], self.hist.shape[1]
        for c, row in enumerate(x.astype(np.int64) - low):
            if row.size >= width:
                self.hist[c] += np.bincount(row, minlength=width)
            else:
                values, counts = np.unique(row, return_counts=True)
                self.hist[c, values] += counts

    def result(self):
        """dict of per-channel lists: mean, std, min, max and (when tracked) p1, p99."""
        if self.count == 0:
            raise DatasetError("no pixels to compute channel statistics from")
        out = {
            "mean": self.mean.tolist(),
            "std": np.sqrt(self.m2 / self.count).tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
            "pixels_per_channel": self.count,
        }
        if self.hist is not None:
            p1, p99 = _histogram_percentiles(self.hist, self.int_range[0], (1, 99))
            out["percentile_method"] = "exact: full per-channel integer histogram, numpy 'linear' interpolation"
        elif self.kept:
            p1, p99 = np.percentile(np.concatenate(self.kept, axis=1), (1, 99), axis=1)
            out["percentile_method"] = f"uniform random subsample of {self.pixels_per_image} pixels per image"
        else:
            return out
        return {**out, "p1": p1.tolist(), "p99": p99.tolist()}


def compute_channel_stats(dataset, max_samples=None, percentiles=True):
    """Per-channel statistics of a MultiChannelDataset's raw pixels in one streaming pass (see ChannelStatistics).

    Samples with NaN or infinite pixels (and no ``dataset.nan_fill``) are all read, then named together in one
    ``NonFinitePixelsError``; with ``dataset.skip_bad_samples`` they are left out and counted instead.
    """
    indices = _evenly_spaced(range(len(dataset)), max_samples)
    int_range = _int_range(dataset.dtypes) if percentiles else None
    per_image = math.ceil(PERCENTILE_SAMPLE_SIZE / max(len(indices), 1)) if percentiles else None
    stats, used, non_finite = ChannelStatistics(dataset.in_chans, int_range, per_image), 0, []
    for index in indices:
        try:
            stats.update(dataset.load_raw(index))
            used += 1
        except CorruptFileError as e:
            if dataset.skip_bad_samples:
                dataset.num_skipped += 1
                logger.warning("statistics skip sample %d: %s", index, e)
            elif isinstance(e, NonFinitePixelsError):
                non_finite.append(str(e).removesuffix(f"; {NAN_HINT}"))
            else:
                raise
    if non_finite:
        more = f"; and {len(non_finite) - MAX_NAMED} more" if len(non_finite) > MAX_NAMED else ""
        raise NonFinitePixelsError(
            f"{len(non_finite)} of {len(indices)} samples have NaN or infinite pixels, so their statistics would be "
            f"NaN: {'; '.join(non_finite[:MAX_NAMED])}{more}. Pass --nan_fill VALUE to replace those pixels, or "
            "--skip_bad_samples to leave the samples out"
        )
    return {**stats.result(), "num_samples": used}


def load_channel_stats(path):
    """channel_stats.json -> dict with equal-length 'mean' and 'std' lists."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"--channel_stats {path} does not exist")
    try:
        stats = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read channel statistics {path}: {e}") from e
    ok = isinstance(stats, dict) and isinstance(stats.get("mean"), list) and isinstance(stats.get("std"), list)
    if not ok or not stats["mean"] or len(stats["mean"]) != len(stats["std"]):
        raise DatasetError(f"{path} needs equal-length, non-empty 'mean' and 'std' lists")
    return stats


# ---------------------------------------------------------------------------------------------- normalisation


def parse_floats(value, flag):
    """None, a "1,2,3" string or a list of numbers -> list of floats or None; errors name the flag."""
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{flag} {value!r} is not a comma-separated list of numbers") from e


def _per_channel(values, source, ids, num_channels):
    if len(values) == num_channels:
        return [float(values[i]) for i in ids]
    if len(values) == len(ids):
        return [float(v) for v in values]
    raise DatasetError(f"{source} has {len(values)} values but the data have {num_channels} channels ({len(ids)} used)")


def _positive_std(std):
    for c, s in enumerate(std):
        if s <= 0:
            logger.warning("channel %d has std %g; normalising it with std 1", c, s)
    return [s if s > 0 else 1.0 for s in std]


def _reading(args):
    """MultiChannelDataset keywords of the reading flags --skip_bad_samples, --channel_axis and --nan_fill."""
    return {
        "skip_bad_samples": getattr(args, "skip_bad_samples", False),
        "channel_axis": getattr(args, "channel_axis", None),
        "nan_fill": getattr(args, "nan_fill", None),
    }


def _estimate_mean_std(samples, ids, num_channels, source, args):
    subset = _evenly_spaced(samples, ESTIMATE_SAMPLES)
    dataset = MultiChannelDataset(subset, [], ids, num_channels=num_channels, **_reading(args))
    stats = compute_channel_stats(dataset, percentiles=False)
    logger.warning(
        "%s: no --mean/--std, --channel_stats or %s; normalising with mean/std estimated from %d of %d training "
        "samples. For exact values run: python -m util.datasets stats --data_path %s",
        *(source, STATS_FILENAME, len(subset), len(samples), source),
    )
    return stats["mean"], stats["std"]


def is_rgb(samples, ids, dtypes, names):
    """Whether the channels read are 8-bit RGB: all of one colour PNG/JPEG file per sample, in file order, or three
    channels named R, G, B (``channels.txt`` or the CSV's columns). A 3-band 8-bit TIFF or NPY is not assumed RGB."""
    if len(ids) != 3 or dtypes != {"uint8"}:
        return False
    if names is not None and [names[i].upper() for i in ids] == ["R", "G", "B"]:
        return True
    colour_files = all(isinstance(files, str) and Path(files).suffix.lower() in PIL_SUFFIXES for files, _ in samples)
    return colour_files and list(ids) == [0, 1, 2]


def normalization_record(dataset) -> dict:
    """What a checkpoint keeps of its training data's normalisation (``args.normalization``): mean/std in raw units
    of the channel ids read, with the files' channel count and pixel types."""
    return dict(
        num_channels=dataset.num_channels,
        channels=list(dataset.channel_ids),
        dtypes=sorted(dataset.dtypes),
        mean=[float(m) for m in dataset.mean],
        std=[float(s) for s in dataset.std],
    )


def recorded_mean_std(record, ids, num_channels, dtypes):
    """(mean, std) of channel ids ``ids`` from a checkpoint's ``normalization_record``, or None unless it was made on
    files with the same channel count and pixel types and holds every one of ``ids``."""
    if not record or record.get("num_channels") != num_channels or set(record.get("dtypes") or ()) != set(dtypes):
        return None
    row = {c: i for i, c in enumerate(record["channels"])}
    if not all(c in row for c in ids):
        return None
    return [record["mean"][row[c]] for c in ids], [record["std"][row[c]] for c in ids]


def resolve_mean_std(args, stats_dir, ids, num_channels, dtypes, estimate, *, rgb=False, checkpoint=None):
    """Per-channel (mean, std) in raw pixel units and where they came from, by the policy in the module docstring.

    rgb: whether the data are 8-bit RGB images (``is_rgb``); checkpoint: the (mean, std) a checkpoint recorded for
    these channels (``recorded_mean_std``), or None.
    """
    mean, std = parse_floats(getattr(args, "mean", None), "--mean"), parse_floats(getattr(args, "std", None), "--std")
    if (mean is None) != (std is None):
        raise DatasetError("--mean and --std must be given together")
    if mean is not None:
        mean, std = _per_channel(mean, "--mean", ids, num_channels), _per_channel(std, "--std", ids, num_channels)
        return mean, _positive_std(std), "--mean/--std"
    explicit = getattr(args, "channel_stats", None)
    stats_path = Path(explicit) if explicit else stats_dir / STATS_FILENAME
    if explicit or stats_path.is_file():
        stats = load_channel_stats(stats_path)
        mean = _per_channel(stats["mean"], str(stats_path), ids, num_channels)
        return mean, _positive_std(_per_channel(stats["std"], str(stats_path), ids, num_channels)), str(stats_path)
    if checkpoint is not None:
        return list(checkpoint[0]), _positive_std(list(checkpoint[1])), "the checkpoint's statistics"
    if rgb:
        mean, std = [m * 255 for m in IMAGENET_DEFAULT_MEAN], [s * 255 for s in IMAGENET_DEFAULT_STD]
        return mean, std, "ImageNet mean/std (8-bit RGB images)"
    mean, std = estimate()
    return mean, _positive_std(std), "mean/std estimated from training samples"


# ---------------------------------------------------------------------------------------------- transforms


def _uint8_tensor_to_pil(x):
    """float tensor (3, H, W) of 8-bit values -> PIL RGB image."""
    return Image.fromarray(np.ascontiguousarray(x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()))


def _timm_rgb_transform(args, size, mean, std):
    """timm's ImageNet fine-tuning pipeline for 3-channel 8-bit data; mean/std in 0..255 units."""
    timm_transform = create_transform(
        input_size=size,
        is_training=True,
        color_jitter=getattr(args, "color_jitter", None),
        auto_augment=getattr(args, "aa", None),
        interpolation="bicubic",
        re_prob=getattr(args, "reprob", 0.0),
        re_mode=getattr(args, "remode", "pixel"),
        re_count=getattr(args, "recount", 1),
        scale=_crop_scale(args, pretrain=False),
        hflip=getattr(args, "hflip", 0.5),
        mean=tuple(m / 255 for m in mean),
        std=tuple(s / 255 for s in std),
    )
    return v2.Compose([_uint8_tensor_to_pil, timm_transform])


def _crop_scale(args, pretrain):
    """RandomResizedCrop area range: ``--scale MIN MAX``, else MAE's (0.2, 1) for pretraining, (0.08, 1) otherwise."""
    scale = getattr(args, "scale", None)
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
    """
    size = getattr(args, "input_size", 224)
    mean = mean if mean is not None else parse_floats(getattr(args, "mean", None), "--mean")
    std = std if std is not None else parse_floats(getattr(args, "std", None), "--std")
    if mean is None or std is None:
        raise DatasetError("build_transform needs --mean and --std (or use build_dataset, which resolves them)")
    bicubic = v2.InterpolationMode.BICUBIC
    if is_train and not pretrain and uint8_rgb:
        return _timm_rgb_transform(args, size, mean, std)
    if is_train:
        ops = [
            v2.RandomResizedCrop(size, scale=_crop_scale(args, pretrain), interpolation=bicubic, antialias=True),
            v2.RandomHorizontalFlip(getattr(args, "hflip", 0.5)),
        ]
        ops += [v2.RandomVerticalFlip()] if getattr(args, "vflip", False) else []
    else:
        crop_pct = 224 / 256 if size <= 224 else 1.0
        ops = [v2.Resize(int(size / crop_pct), interpolation=bicubic, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*ops, v2.Normalize(mean, std)])


# ---------------------------------------------------------------------------------------------- datasets


class MultiChannelDataset(torch.utils.data.Dataset):
    """Images of C channels; item = (transformed float32 tensor (C', H', W'), int label, -1 if unlabelled).

    samples: [(path, label)] or [([path per channel], label)]; channel_ids: the channels read, in order, out
    of num_channels in the files. Without a transform an item is the raw float32 tensor (C', H, W).
    """

    def __init__(
        self,
        samples,
        classes,
        channel_ids,
        transform=None,
        *,
        num_channels,
        dtypes=(),
        channel_names=None,
        skip_bad_samples=False,
        channel_axis=None,
        nan_fill=None,
    ):
        self.samples = samples
        self.classes = classes
        self.nb_classes = len(classes)
        self.channel_ids = list(channel_ids)
        self.in_chans = len(self.channel_ids)
        self.num_channels = num_channels
        self.transform = transform
        self.dtypes = set(dtypes)
        self.channel_names = channel_names
        self.skip_bad_samples = skip_bad_samples
        self.channel_axis = channel_axis
        self.nan_fill = nan_fill
        self.num_dropped = 0  # samples left out at build time by skip_bad_samples (set by _build)
        self._num_skipped = multiprocessing.Value("q", 0)  # shared with the DataLoader workers

    @property
    def num_skipped(self):
        """Samples replaced because their file failed to decode, by this process and its DataLoader workers."""
        return self._num_skipped.value

    @num_skipped.setter
    def num_skipped(self, value):
        self._num_skipped.value = value

    def __len__(self):
        return len(self.samples)

    def _read(self, path, channels, ids):
        """Channels ``ids`` of a file of ``channels`` channels, NaN/inf pixels checked (``fill_non_finite``)."""
        arr = read_array(path, self.channel_axis)
        if arr.shape[0] != channels:
            raise CorruptFileError(f"{path} has {arr.shape[0]} channels, expected {channels}")
        return fill_non_finite(arr[ids], path, self.nan_fill)

    def load_raw(self, index):
        """Selected channels of sample ``index`` as (C', H, W) in the files' dtype."""
        files, _ = self.samples[index]
        if isinstance(files, str):
            return self._read(files, self.num_channels, self.channel_ids)
        return np.concatenate([self._read(files[c], 1, [0]) for c in self.channel_ids])

    def __getitem__(self, index):
        for _ in range(len(self.samples)):
            try:
                img = self.load_raw(index)
                break
            except CorruptFileError as e:
                if not self.skip_bad_samples:
                    raise
                with self._num_skipped.get_lock():
                    self._num_skipped.value += 1
                logger.warning("replacing sample %d: %s", index, e)
                index = (index + 1) % len(self.samples)
        else:
            raise DatasetError("no sample of the dataset can be read")
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        return (self.transform(x) if self.transform else x), self.samples[index][1]


def _build(samples, classes, csv_names, path, args, *, train, pretrain, stats_samples, checkpoint_stats=None):
    """Validate samples and attach channel selection, normalisation and transform; stats_samples feed estimates.

    The dataset also carries its normalisation: ``mean``, ``std`` (raw units, per channel read) and ``norm_source``.
    """
    stats_dir = _stats_dir(path)
    num_listed = len(samples)
    split = "" if pretrain else f" ({'train' if train else 'val'} split)"
    samples, shape, dtypes = _validate(samples, args, f"--data_path {path}{split}")
    ids = _channel_ids(args, shape[0], samples[0][0])
    names = _channel_names(stats_dir, csv_names, shape[0])

    def estimate():
        return _estimate_mean_std(stats_samples or samples, ids, shape[0], str(path), args)

    rgb = is_rgb(stats_samples or samples, ids, dtypes, names)
    recorded = recorded_mean_std(checkpoint_stats, ids, shape[0], dtypes)
    mean, std, source = resolve_mean_std(args, stats_dir, ids, shape[0], dtypes, estimate, rgb=rgb, checkpoint=recorded)
    if train and len(ids) == 3 and dtypes == {"uint8"} and not rgb:
        logger.warning(
            "%s: 3 8-bit channels that are not RGB images (colour PNG/JPEG files, or channels named R, G, B in %s), "
            "so neither ImageNet mean/std nor the RGB fine-tuning augmentation (RandAugment, colour jitter, random "
            "erasing) is used; normalising with %s",
            *(path, CHANNEL_NAMES_FILENAME, source),
        )
    transform = build_transform(train, args, pretrain, mean=mean, std=std, uint8_rgb=rgb)
    dataset = MultiChannelDataset(
        samples,
        classes,
        ids,
        transform,
        num_channels=shape[0],
        dtypes=dtypes,
        channel_names=names,
        **_reading(args),
    )
    dataset.num_dropped = num_listed - len(samples)
    dataset.mean, dataset.std, dataset.norm_source = mean, std, source
    return dataset


def build_dataset(is_train, args, checkpoint_stats=None):
    """Labelled dataset of --data_path/{train,val} (class folders or {train,val}.csv) for fine-tuning and eval;
    checkpoint_stats: the ``normalization_record`` of the checkpoint the run starts from, if any."""
    root = _data_path(args)
    train_samples, classes, names = _labelled_split(root, "train", None)
    samples = train_samples if is_train else _labelled_split(root, "val", classes)[0]
    return _build(
        samples,
        classes,
        names,
        root,
        args,
        train=is_train,
        pretrain=False,
        stats_samples=train_samples,
        checkpoint_stats=checkpoint_stats,
    )


def build_pretrain_dataset(args, checkpoint_stats=None):
    """Unlabelled dataset (labels -1) of --data_path: a CSV, root/train.csv, root/train/ or root/."""
    path = _data_path(args)
    samples, names = _unlabelled_samples(path)
    return _build(
        samples, [], names, path, args, train=True, pretrain=True, stats_samples=None, checkpoint_stats=checkpoint_stats
    )


def build_raw_dataset(data_path, skip_bad_samples=False, allow_mixed_sizes=False, channel_axis=None, nan_fill=None):
    """All channels of the pretraining samples of data_path, untransformed (for statistics)."""
    args = argparse.Namespace(
        skip_bad_samples=skip_bad_samples,
        allow_mixed_sizes=allow_mixed_sizes,
        channel_axis=channel_axis,
        nan_fill=nan_fill,
    )
    path = _data_path(argparse.Namespace(data_path=data_path))
    samples, names = _unlabelled_samples(path)
    samples, shape, dtypes = _validate(samples, args, f"--data_path {path}")
    names = _channel_names(_stats_dir(path), names, shape[0])
    return MultiChannelDataset(
        samples,
        [],
        range(shape[0]),
        num_channels=shape[0],
        dtypes=dtypes,
        channel_names=names,
        **_reading(args),
    )


# ---------------------------------------------------------------------------------------------- command line


def write_channel_stats(data_path, out=None, max_samples=None, **kwargs):
    """Compute per-channel statistics of data_path's pretraining samples and write them as JSON; return them."""
    dataset = build_raw_dataset(data_path, **kwargs)
    stats = compute_channel_stats(dataset, max_samples)
    names = dataset.channel_names or [str(c) for c in range(dataset.in_chans)]
    stats = {"channels": names, **stats, "dtypes": sorted(dataset.dtypes)}
    out = Path(out) if out else _stats_dir(Path(data_path)) / STATS_FILENAME
    out.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _stats_command(args):
    result = write_channel_stats(
        args.data_path,
        args.out,
        args.max_samples,
        skip_bad_samples=args.skip_bad_samples,
        allow_mixed_sizes=args.allow_mixed_sizes,
        channel_axis=args.channel_axis,
        nan_fill=args.nan_fill,
    )
    print(f"{len(result['channels'])} channels, {result['num_samples']} samples")
    for name, mean, std in zip(result["channels"], result["mean"], result["std"]):
        print(f"  {name}: mean {mean:.6g} std {std:.6g}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m util.datasets", description="Dataset utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="per-channel mean/std/percentiles in one streaming pass")
    stats.add_argument("--data_path", required=True, help="pretraining layout: CSV, root/train.csv, root/train/, root/")
    stats.add_argument("--out", default=None, help=f"output JSON (default: <data root>/{STATS_FILENAME})")
    stats.add_argument("--max_samples", type=int, default=None, help="use this many evenly spaced samples")
    stats.add_argument("--skip_bad_samples", action="store_true")
    stats.add_argument("--allow_mixed_sizes", action="store_true")
    add_reading_args(stats)
    run_main(_stats_command, parser.parse_args(argv), errors=(DatasetError,))


if __name__ == "__main__":
    main()
