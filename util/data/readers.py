"""Readers by suffix: raw pixels as (C, H, W), file headers without decoding, the channel-axis rule, NaN checks.

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

NaN and infinite pixels: a float file holding any is an error naming it (``NonFinitePixelsError``) when its
pixels are read, in training as in the statistics, which name every such file; ``--nan_fill VALUE``
replaces them by VALUE (raw units) instead, and ``--skip_bad_samples`` treats the file as a corrupt one.
Other no-data markers (such as -9999) are ordinary pixels to this check.
"""

import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from util.data.errors import CorruptFileError, DatasetError, MissingPathError, NonFinitePixelsError
from util.data.packed import PackedRef, packed_shape, read_packed

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, ".npy", *PIL_SUFFIXES)
CHANNEL_AXES = ("first", "last")
NAN_HINT = "pass --nan_fill VALUE to replace them, or --skip_bad_samples to leave the sample out"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> decoded channels
PIL_CONVERT = {"1": "L", "P": "RGB", "PA": "RGBA", "YCbCr": "RGB"}
PIL_DTYPES = {"I;16": "uint16", "I;16L": "uint16", "I;16B": "uint16", "I;16N": "uint16", "I": "int32", "F": "float32"}


@dataclass(frozen=True)
class Header:
    """Shape (C, H, W) and dtype of one file, read without decoding its pixels."""

    shape: tuple
    dtype: np.dtype


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
    None: the layout rule) says how to read a 3-D TIFF or NPY array. A packed sample (``PackedRef``) is a
    memory-mapped view: only the bytes that are sliced or copied out of it are read."""
    if isinstance(path, PackedRef):
        return read_packed(path)
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
    if isinstance(path, PackedRef):
        return Header(*packed_shape(path))
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


def header_or_error(path, channel_axis=None):
    try:
        return read_header(path, channel_axis)
    except CorruptFileError as e:
        return e
