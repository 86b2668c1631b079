"""Per-channel statistics, the normalisation policy (which mean/std a dataset uses) and the stats command.

Normalisation, per channel and in raw pixel units; the first that applies wins
    1. ``--mean`` and ``--std``: one value per channel in the files, in file order (also when ``--channels``
       reorders all of them), or one per ``--channels`` id, in ``--channels`` order, for a subset;
    2. ``--channel_stats FILE``;
    3. ``channel_stats.json`` in the data root (the CSV's folder for a CSV path), written by
       ``python -m util.data.stats --data_path ROOT --out ROOT/channel_stats.json``;
    4. the statistics recorded in the checkpoint the run starts from (``checkpoint_stats``, a
       ``normalization_record``), when it was trained on files of the same channel count and pixel types;
    5. ImageNet mean/std x 255 for 8-bit RGB images (``is_rgb``: one colour PNG/JPEG file per sample read in file
       order, or 3 channels named R, G, B); a 3-band 8-bit TIFF or NPY is not assumed to be RGB;
    6. otherwise mean/std estimated when the dataset is built from up to 256 evenly spaced training samples,
       with a logged warning (the same samples on every call, so train, val and all ranks agree).
    The dataset keeps the values and their source (``mean``, ``std``, ``norm_source``).
"""

import json
import logging
import math
from pathlib import Path

import numpy as np
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.cli import add_reading_args, run_main
from util.data.channels import positional_names
from util.data.config import DataConfig
from util.data.dataset import MultiChannelDataset, build_raw_dataset
from util.data.errors import CorruptFileError, DatasetError, MissingPathError, NonFinitePixelsError
from util.data.layouts import stats_folder
from util.data.readers import NAN_HINT, PIL_SUFFIXES
from util.flags import ArgumentParser
from util.output_dir import check_output_file

logger = logging.getLogger(__name__)


STATS_FILENAME = "channel_stats.json"
ESTIMATE_SAMPLES = 256
PERCENTILE_SAMPLE_SIZE = 2**20
MAX_NAMED = 10  # files named in one error


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


def _by_name(values, record_names, names, ids):
    """``values`` (one per ``record_names``) for the channels ``ids`` of ``names``, matched by name; None unless the
    record names real channels (not positional ones) and holds every channel read."""
    if not record_names or names is None or len(record_names) != len(values):
        return None
    if list(record_names) == positional_names(len(record_names)) or list(record_names) == [
        str(c) for c in range(len(record_names))
    ]:
        return None
    row = {name: i for i, name in enumerate(record_names)}
    wanted = [names[c] for c in ids]
    if not all(name in row for name in wanted):
        return None
    return [float(values[row[name]]) for name in wanted]


def _positive_std(std):
    for c, s in enumerate(std):
        if s <= 0:
            logger.warning("channel %d has std %g; normalising it with std 1", c, s)
    return [s if s > 0 else 1.0 for s in std]


def estimate_mean_std(samples, ids, num_channels: int, source: str, config: DataConfig):
    subset = _evenly_spaced(samples, ESTIMATE_SAMPLES)
    dataset = MultiChannelDataset(subset, [], ids, num_channels=num_channels, **config.reading_kwargs())
    stats = compute_channel_stats(dataset, percentiles=False)
    logger.warning(
        "%s: no --mean/--std, --channel_stats or %s; normalising with mean/std estimated from %d of %d training "
        "samples. For exact values run: python -m util.data.stats --data_path %s",
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
        names=dataset.read_names,
        dtypes=sorted(dataset.dtypes),
        mean=[float(m) for m in dataset.mean],
        std=[float(s) for s in dataset.std],
    )


def recorded_mean_std(record, ids, num_channels, dtypes, names=None):
    """(mean, std) of channel ids ``ids`` from a checkpoint's ``normalization_record``, or None unless it was made on
    files of the same pixel types and holds every channel read: by name when the record names its channels (any
    channel order or count), else by position (files of the same channel count)."""
    if not record or set(record.get("dtypes") or ()) != set(dtypes):
        return None
    mean = _by_name(record["mean"], record.get("names"), names, ids)
    if mean is not None:
        return mean, _by_name(record["std"], record.get("names"), names, ids)
    if record.get("num_channels") != num_channels:
        return None
    row = {c: i for i, c in enumerate(record["channels"])}
    if not all(c in row for c in ids):
        return None
    return [record["mean"][row[c]] for c in ids], [record["std"][row[c]] for c in ids]


def resolve_mean_std(
    config: DataConfig,
    stats_dir: Path,
    ids,
    num_channels: int,
    dtypes,
    estimate,
    *,
    rgb=False,
    checkpoint=None,
    names=None,
):
    """Per-channel (mean, std) in raw pixel units and where they came from, by the policy in the module docstring.

    rgb: whether the data are 8-bit RGB images (``is_rgb``); checkpoint: the (mean, std) a checkpoint recorded for
    these channels (``recorded_mean_std``), or None; names: the files' channel names, by which a statistics file
    that names its channels (``"channels"``) is matched, whatever its channel order.
    """
    mean, std = parse_floats(config.mean, "--mean"), parse_floats(config.std, "--std")
    if (mean is None) != (std is None):
        raise DatasetError("--mean and --std must be given together")
    if mean is not None:
        mean, std = _per_channel(mean, "--mean", ids, num_channels), _per_channel(std, "--std", ids, num_channels)
        return mean, _positive_std(std), "--mean/--std"
    explicit = config.channel_stats
    stats_path = Path(explicit) if explicit else stats_dir / STATS_FILENAME
    if explicit or stats_path.is_file():
        stats = load_channel_stats(stats_path)
        mean = _by_name(stats["mean"], stats.get("channels"), names, ids)
        if mean is not None:
            return mean, _positive_std(_by_name(stats["std"], stats.get("channels"), names, ids)), str(stats_path)
        mean = _per_channel(stats["mean"], str(stats_path), ids, num_channels)
        return mean, _positive_std(_per_channel(stats["std"], str(stats_path), ids, num_channels)), str(stats_path)
    if checkpoint is not None:
        return list(checkpoint[0]), _positive_std(list(checkpoint[1])), "the checkpoint's statistics"
    if rgb:
        mean, std = [m * 255 for m in IMAGENET_DEFAULT_MEAN], [s * 255 for s in IMAGENET_DEFAULT_STD]
        return mean, std, "ImageNet mean/std (8-bit RGB images)"
    mean, std = estimate()
    return mean, _positive_std(std), "mean/std estimated from training samples"


def write_channel_stats(data_path, out=None, max_samples=None, **kwargs):
    """Compute per-channel statistics of data_path's pretraining samples and write them as JSON; return them. An
    ``out`` whose folder cannot be written is refused before the pass."""
    if out:
        check_output_file(str(out), "--out")
    dataset = build_raw_dataset(data_path, **kwargs)
    stats = compute_channel_stats(dataset, max_samples)
    stats = {"channels": dataset.channel_names, **stats, "dtypes": sorted(dataset.dtypes)}
    out = Path(out) if out else stats_folder(Path(data_path)) / STATS_FILENAME
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
        channel_names=args.channel_names,
        metadata_columns=args.metadata_columns,
    )
    print(f"{len(result['channels'])} channels, {result['num_samples']} samples")
    for name, mean, std in zip(result["channels"], result["mean"], result["std"]):
        print(f"  {name}: mean {mean:.6g} std {std:.6g}")


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m util.data.stats", description="Per-channel mean/std/percentiles in one streaming pass."
    )
    parser.add_argument(
        "--data_path", required=True, help="pretraining layout: CSV, root/train.csv, root/train/, root/"
    )
    parser.add_argument("--out", default=None, help=f"output JSON (default: <data root>/{STATS_FILENAME})")
    parser.add_argument("--max_samples", type=int, default=None, help="use this many evenly spaced samples")
    parser.add_argument("--skip_bad_samples", action="store_true")
    parser.add_argument("--allow_mixed_sizes", action="store_true")
    add_reading_args(parser)
    run_main(_stats_command, parser.parse_args(argv), errors=(DatasetError,))


if __name__ == "__main__":
    main()
