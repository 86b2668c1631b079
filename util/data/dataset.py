"""The dataset: samples of C channels read, checked for NaN, and transformed; the raw dataset for statistics.

A file that fails to decode after the build is, with ``--skip_bad_samples``, replaced by the next sample and
counted in ``dataset.num_skipped`` (a counter shared by the process and its DataLoader workers).
"""

import logging
import multiprocessing

import numpy as np
import torch

from util.data.channels import positional_names, read_channel_names
from util.data.config import DataConfig
from util.data.errors import CorruptFileError, DatasetError
from util.data.layouts import resolve_data_path, stats_folder, unlabelled_samples
from util.data.readers import fill_non_finite, read_array
from util.data.validate import validate_samples

logger = logging.getLogger(__name__)


class MultiChannelDataset(torch.utils.data.Dataset):
    """Images of C channels; item = (transformed float32 tensor (C', H', W'), int label, -1 if unlabelled).

    samples: [(path, label)] or [([path per channel], label)]; channel_ids: the channels read, in order, out
    of num_channels in the files. Without a transform an item is the raw float32 tensor (C', H, W).
    ``mean``, ``std`` (raw units, per channel read) and ``norm_source`` are the normalisation the builders chose
    (None for a raw dataset); ``channel_names`` names the files' channels (``util.data.channels``) and
    ``read_names`` the channels read; ``embed_ids`` (set by ``util.data.vocabulary.assign_vocabulary``) are the
    model's channel-embedding rows of the channels read (default: their file positions).
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
        self.channel_names = list(channel_names) if channel_names is not None else positional_names(num_channels)
        self.embed_ids = list(self.channel_ids)
        self.skip_bad_samples = skip_bad_samples
        self.channel_axis = channel_axis
        self.nan_fill = nan_fill
        self.mean = self.std = self.norm_source = None  # set by the builders (util.data.builders)
        self.num_dropped = 0  # samples left out at build time by skip_bad_samples (set by _build)
        self.metadata = {}  # CSV metadata columns: {column: [value per sample]} (util.data.metadata; set by _build)
        self._num_skipped = multiprocessing.Value("q", 0)  # shared with the DataLoader workers

    @property
    def num_skipped(self):
        """Samples replaced because their file failed to decode, by this process and its DataLoader workers."""
        return self._num_skipped.value

    @num_skipped.setter
    def num_skipped(self, value):
        self._num_skipped.value = value

    @property
    def read_names(self) -> list[str]:
        """The names of the channels read, in read order."""
        return [self.channel_names[c] for c in self.channel_ids]

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


def build_raw_dataset(
    data_path,
    skip_bad_samples=False,
    allow_mixed_sizes=False,
    channel_axis=None,
    nan_fill=None,
    metadata_columns=None,
    channel_names=None,
):
    """All channels of the pretraining samples of data_path, untransformed (for statistics)."""
    config = DataConfig(
        data_path=data_path,
        channel_names=channel_names,
        skip_bad_samples=skip_bad_samples,
        allow_mixed_sizes=allow_mixed_sizes,
        channel_axis=channel_axis,
        nan_fill=nan_fill,
        metadata_columns=metadata_columns,
    )
    path = resolve_data_path(config)
    samples, names, _ = unlabelled_samples(path, config.metadata_columns)
    samples, shape, dtypes = validate_samples(samples, config, f"--data_path {path}")
    names = read_channel_names(stats_folder(path), names, shape[0], config.channel_names)
    return MultiChannelDataset(
        samples,
        [],
        range(shape[0]),
        num_channels=shape[0],
        dtypes=dtypes,
        channel_names=names,
        **config.reading_kwargs(),
    )
