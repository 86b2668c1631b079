"""Sample validation: every file's header read once; samples must agree in channels, size and pixel type.

Every file's header (shape and dtype, no pixel decoding, plus a truncation check for TIFF, PNG and NPY) is read
when the dataset is built, so a missing, corrupt or mismatched file fails before training with a
``DatasetError`` naming the file, CSV line or flag. Samples must share their channel count and, unless
``--allow_mixed_sizes``, their height and width; pixels must be bool, integer or float. With
``--skip_bad_samples`` corrupt files are dropped at build time (counted in ``dataset.num_dropped``).
"""

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor

from util.data.config import DataConfig
from util.data.errors import DatasetError
from util.data.layouts import as_list, describe_files
from util.data.readers import IMAGE_SUFFIXES, header_or_error

logger = logging.getLogger(__name__)


HEADER_THREADS = 16
PIXEL_DTYPE_KINDS = "biuf"  # numpy dtype kinds accepted as pixels: bool, signed and unsigned integers, floats


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
            f"{describe_files(files)} has {shape[0]} channels but {describe_files(first)} has {expected[0]}; "
            "every sample needs the same channels"
        )
    if not mixed_sizes and shape[1:] != expected[1:]:
        raise DatasetError(
            f"{describe_files(files)} is {shape[1]}x{shape[2]} but {describe_files(first)} is "
            f"{expected[1]}x{expected[2]}; "
            "pass --allow_mixed_sizes if sizes legitimately differ (the crops resize every sample)"
        )


def _header_problem(path, header):
    """The error of one file: its header could not be read, or its pixels are not numbers (complex, text...)."""
    if isinstance(header, Exception):
        return header
    if header.dtype.kind not in PIXEL_DTYPE_KINDS:
        return DatasetError(f"{path} has pixels of dtype {header.dtype}; expected bool, integer or float pixels")
    return None


def validate_samples(samples, config: DataConfig, source: str):
    """Read every file header; return (kept samples, (C, H, W) of the first sample, set of dtype names)."""
    skip = config.skip_bad_samples
    paths = sorted({path for files, _ in samples for path in as_list(files)})
    axis = config.channel_axis
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        headers = dict(zip(paths, pool.map(header_or_error, paths, itertools.repeat(axis))))
    kept, first, expected, dtypes = [], None, None, set()
    for files, label in samples:
        sample_headers = [headers[path] for path in as_list(files)]
        errors = [e for e in map(_header_problem, as_list(files), sample_headers) if e is not None]
        if errors and not skip:
            raise errors[0]
        if errors:
            logger.warning("skipping a sample: %s", errors[0])
            continue
        shape = _sample_shape(files, sample_headers)
        if first is None:
            first, expected = files, shape
        _check_same_shape(shape, first, files, expected, config.allow_mixed_sizes)
        dtypes.update(h.dtype.name for h in sample_headers)
        kept.append((files, label))
    if not kept:
        raise DatasetError(f"{source}: no readable image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return kept, expected, dtypes
