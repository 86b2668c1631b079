"""Several data sources in one pretraining run: the ``--data_path`` list or data-mix file, and the mixed dataset.

``--data_path A B ...`` makes each root or CSV a source of sampling weight 1. A data-mix file (``.json``) lists
them with options, paths relative to the file::

    {"sources": [{"path": "ihc", "weight": 1.0},
                 {"path": "sentinel2/train.csv", "weight": 2.0, "channel_stats": "s2_stats.json",
                  "channel_names": "blue,green,red,nir"}],
     "channel_vocabulary": ["R", "G", "B", "H", "E", "DAB", "blue", "green", "red", "nir"]}

``weight`` scales how many batches of the source an epoch draws (1: each sample about once; 2: twice, from
fresh permutations); ``channel_stats`` / ``channel_names`` stand in for ``--channel_stats`` / ``--channel_names``
for that source; ``channel_vocabulary`` (optional) fixes the model's channel names and their order.
"""

import bisect
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from util.data.builders import build_dataset, build_pretrain_dataset
from util.data.channels import split_names
from util.data.config import DataConfig
from util.data.errors import DatasetError, MissingPathError
from util.data.layouts import labelled_split, resolve_data_path


@dataclass(frozen=True)
class Source:
    """One source of a multi-source run: a data root or CSV, its sampling weight and its own flags."""

    path: str
    name: str
    weight: float = 1.0
    channel_stats: str | None = None
    channel_names: str | list | None = None


def _source_name(path: str, taken: set) -> str:
    """A short unique name for logs: the folder name (or CSV stem, or 'parent_stem' for a train.csv)."""
    p = Path(path.rstrip("/"))
    base = p.stem if p.suffix.lower() == ".csv" else p.name
    if p.suffix.lower() == ".csv" and base in ("train", "val"):
        base = f"{p.parent.name}_{base}"
    name, k = base or "source", 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


def _read_mix_file(path: Path) -> tuple[list[Source], list | None]:
    try:
        mix = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read the data-mix file {path}: {e}") from e
    entries = mix.get("sources") if isinstance(mix, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path} needs a non-empty 'sources' list of {{'path': ...}} entries")
    sources, taken = [], set()
    for i, entry in enumerate(entries):
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not entry.get("path"):
            raise DatasetError(f"{path}: source {i} needs a 'path'")
        unknown = sorted(set(entry) - {"path", "weight", "channel_stats", "channel_names"})
        if unknown:
            raise DatasetError(f"{path}: source {i} has unknown keys {unknown}")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, int | float) or weight <= 0:
            raise DatasetError(f"{path}: source {i} has weight {weight!r}; it must be a number > 0")
        resolve = lambda value: None if value is None else str(path.parent / value)  # noqa: E731
        source_path = resolve(entry["path"])
        sources.append(
            Source(
                source_path,
                _source_name(source_path, taken),
                float(weight),
                resolve(entry.get("channel_stats")),
                entry.get("channel_names"),
            )
        )
    return sources, mix.get("channel_vocabulary")


def data_sources(data_path) -> tuple[list[Source], list | None]:
    """(the sources of ``--data_path``, the vocabulary a data-mix file gives or None).

    data_path: one root / CSV / data-mix ``.json`` (a string), or a list of roots and CSVs.
    """
    paths = [data_path] if isinstance(data_path, str) else list(data_path or [])
    if not paths:
        raise DatasetError("--data_path is required")
    if len(paths) == 1 and paths[0].lower().endswith(".json"):
        mix = Path(paths[0])
        if not mix.is_file():
            raise MissingPathError(f"--data_path {mix} (a data-mix file) does not exist")
        return _read_mix_file(mix)
    taken = set()
    return [Source(p, _source_name(p, taken)) for p in paths], None


def source_config(config: DataConfig, source: Source, shared_channels) -> DataConfig:
    """The data flags for one source: its path, statistics, channel names and the ``--channels`` it holds."""
    config = config.for_source(source.path, source.channel_stats)
    if source.channel_names is not None:
        config = replace(config, channel_names=source.channel_names)
    if shared_channels is not None:
        config = replace(config, channels=",".join(shared_channels))
    return config


def sources_channels(config: DataConfig, names_of) -> dict | None:
    """With several sources, ``--channels`` lists names: each source reads those it holds, in that order.

    names_of: source -> its files' channel names. Returns {source name: [names]} or None without --channels.
    """
    wanted = split_names(config.channels)
    if wanted is None:
        return None
    picked = {}
    for source, names in names_of.items():
        picked[source] = [n for n in wanted if n in names]
        if not picked[source]:
            raise DatasetError(f"--channels {config.channels!r}: source {source} holds none of them ({names})")
    missing = [n for n in wanted if not any(n in p for p in picked.values())]
    if missing:
        raise DatasetError(f"--channels {config.channels!r}: no source has channel(s) {missing}")
    return picked


def _source_datasets(config: DataConfig, sources: list[Source], build) -> list:
    """One dataset per source, ``build(config)`` each; several sources read the ``--channels`` names they hold."""
    if len(sources) == 1:
        return [build(source_config(config, sources[0], None))]
    whole = replace(config, channels=None)
    datasets = [build(source_config(whole, s, None)) for s in sources]
    picked = sources_channels(config, {s.name: d.channel_names for s, d in zip(sources, datasets)})
    if picked is not None:
        datasets = [build(source_config(whole, s, picked[s.name])) for s in sources]
    return datasets


def build_pretrain_sources(args) -> tuple[list, list[Source], list | None]:
    """(one pretraining dataset per source, the sources, the data-mix file's vocabulary or None) of ``--data_path``."""
    config = DataConfig.from_args(args)
    sources, vocabulary = data_sources(config.data_path)
    return _source_datasets(config, sources, build_pretrain_dataset), sources, vocabulary


def union_classes(config: DataConfig, sources: list[Source]) -> list[str]:
    """The sorted union of the class names of the sources' train splits: a class is identified by its name."""
    names = set()
    for source in sources:
        root = resolve_data_path(source_config(config, source, None))
        names.update(labelled_split(root, "train", None, config.metadata_columns)[1])
    return sorted(names)


def build_labelled_sources(args, checkpoint_stats=None) -> tuple[list, list, list[Source], list | None]:
    """(train datasets, val datasets, sources, the data-mix file's vocabulary or None) of a labelled
    ``--data_path`` of one or several roots; with several, labels index the union of their classes.
    checkpoint_stats: the checkpoint's normalisation; a multi-source run's records each source's under ``sources``
    (``build_data``), which that source takes again on ``--resume`` / ``--eval``."""
    config = DataConfig.from_args(args)
    sources, vocabulary = data_sources(config.data_path)
    classes = union_classes(config, sources) if len(sources) > 1 else None

    per_source = (checkpoint_stats or {}).get("sources") or {}
    stats = {s.path: per_source.get(s.name, checkpoint_stats) for s in sources}

    def split(is_train):
        return lambda c: build_dataset(is_train, c, stats[c.data_path], classes)

    train = _source_datasets(config, sources, split(True))
    val = _source_datasets(config, sources, split(False))
    return train, val, sources, vocabulary


def names_record(datasets) -> dict:
    """The ``args.normalization`` of a multi-source run: mean/std in raw units per channel name (the first source
    that reads it), with the sources' pixel types; fine-tuning matches it by name (``recorded_mean_std``)."""
    names, mean, std = [], [], []
    for dataset in datasets:
        for name, m, s in zip(dataset.read_names, dataset.mean, dataset.std):
            if name not in names:
                names.append(name)
                mean.append(float(m))
                std.append(float(s))
    dtypes = sorted({t for d in datasets for t in d.dtypes})
    return dict(num_channels=None, channels=None, names=names, dtypes=dtypes, mean=mean, std=std)


class MixedDataset(torch.utils.data.Dataset):
    """The samples of several sources; item = (img (C_s, H, W), label, embedding rows (C_s,), source index).

    ``sources``: one dataset per source (each with ``embed_ids``, ``util.data.vocabulary.assign_vocabulary``);
    ``names``: their short names; ``weights``: their sampling weights (``util.loaders.SourceBatchSampler``). A batch
    of ``SourceBatchSampler`` holds one source, so its images stack without padding.
    """

    def __init__(self, sources, names, weights):
        self.sources, self.source_names, self.weights = list(sources), list(names), list(weights)
        self.offsets = [0]
        for dataset in self.sources:
            self.offsets.append(self.offsets[-1] + len(dataset))
        self._embed = [torch.as_tensor(d.embed_ids, dtype=torch.long) for d in self.sources]

    @property
    def nb_classes(self) -> int:
        """The classes of a labelled run (every source indexes the same union, ``build_labelled_sources``)."""
        return self.sources[0].nb_classes

    @property
    def in_chans(self) -> int:
        """The first source's channel count (the classifier's default plane count; each batch brings its ids)."""
        return self.sources[0].in_chans

    @property
    def sizes(self) -> list[int]:
        return [len(d) for d in self.sources]

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, index):
        s = bisect.bisect_right(self.offsets, index) - 1
        img, label = self.sources[s][index - self.offsets[s]]
        return img, label, self._embed[s], s

    @property
    def skip_bad_samples(self):
        return any(d.skip_bad_samples for d in self.sources)

    @property
    def num_skipped(self):
        return sum(d.num_skipped for d in self.sources)

    @property
    def num_dropped(self):
        return sum(d.num_dropped for d in self.sources)

    def describe(self) -> str:
        """One line per source: name, path, samples, channels read and normalisation."""
        return "\n".join(
            f"  source {n} ({len(d)} samples, weight {w:g}): channels "
            f"{','.join(d.read_names)} -> rows {d.embed_ids}, normalised with {d.norm_source}"
            for n, d, w in zip(self.source_names, self.sources, self.weights)
        )
