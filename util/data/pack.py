"""Packing: any supported layout(s) -> one packed store (``util.data.packed``), streamed and resumable.

``plan_store`` lists the samples of every source (labelled train + val splits when every source has them, else
the pretraining samples), validates them like a dataset build and groups them by (shape, dtype).
``write_store`` creates the arrays (sparse files of their final size), then writes one sample at a time (memory
stays constant: a dataset larger than RAM packs), flushing the pixels before their ``done`` markers; a rerun
with the same sources resumes after the last flushed sample, a finished store is left as it is.
The statistics of the train split are computed from the finished store (``python -m util.data.stats``'s format).
"""

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from util.data.channels import read_channel_names
from util.data.config import DataConfig
from util.data.dataset import MultiChannelDataset
from util.data.errors import DatasetError, MissingPathError
from util.data.layouts import _sorted_names, as_list, labelled_split, stats_folder, unlabelled_samples
from util.data.packed import FORMAT, STORE_FILENAME, VERSION, is_packed_store
from util.data.readers import read_header
from util.data.stats import STATS_FILENAME, is_rgb, write_channel_stats
from util.data.validate import HEADER_THREADS, validate_samples

FLUSH_BYTES = 256 * 2**20  # pixels written between flushes (bounds the dirty page cache and the work lost)


@dataclass
class SourceSplit:
    """The samples of one split of one source, as a dataset build sees them."""

    source: str
    samples: list
    classes: list
    names: list | None


@dataclass
class Plan:
    """What a store will hold: per split the samples (files, label index) with their group, and the groups."""

    sources: list
    classes: list
    channel_names: list | None
    num_channels: int
    splits: dict = field(default_factory=dict)  # split -> {"samples": [(files, label)], "groups": [...], "keys"}
    source_bytes: int = 0

    def fingerprint(self) -> str:
        listing = {s: [[as_list(f), label] for f, label in v["samples"]] for s, v in self.splits.items()}
        return hashlib.sha256(json.dumps([listing, self.classes, self.channel_names]).encode()).hexdigest()


def _source_splits(root: Path) -> dict:
    """{split: SourceSplit} of one source: train and val when it has both labelled splits, else train only."""
    if not root.exists():
        raise MissingPathError(f"--data_path {root} does not exist")
    if is_packed_store(root):
        raise DatasetError(f"--data_path {root} is a packed store already")
    if not ((root / "val.csv").is_file() or (root / "val").is_dir()):
        samples, names, _ = unlabelled_samples(root)
        return {"train": SourceSplit(str(root), samples, [], names)}
    train, classes, names, _ = labelled_split(root, "train", None)
    val = labelled_split(root, "val", classes)
    return {
        "train": SourceSplit(str(root), train, classes, names),
        "val": SourceSplit(str(root), val[0], classes, val[2]),
    }


def _sample_header(files, headers):
    """((C, H, W), dtype) of a validated sample: its file's, or the per-channel files' stacked (numpy promotion)."""
    if isinstance(files, str):
        return headers[files].shape, headers[files].dtype
    first = headers[files[0]]
    return (len(files), *first.shape[1:]), np.result_type(*(headers[f].dtype for f in files))


def _relabel(samples, classes, union):
    index = {name: i for i, name in enumerate(union)}
    return [(files, index[classes[label]] if label >= 0 else -1) for files, label in samples]


def plan_store(sources, config: DataConfig) -> Plan:
    """Validate every source and decide the store's splits, classes, channel names and groups."""
    per_source = [_source_splits(Path(s)) for s in sources]
    kinds = {tuple(splits) for splits in per_source}
    if len(kinds) > 1:
        raise DatasetError(
            "--data_path: mix of labelled sources (train and val splits) and unlabelled ones; pack them separately"
        )
    union = _sorted_names({c for splits in per_source for c in splits["train"].classes})
    plan = None
    for splits in per_source:
        for name, part in splits.items():
            samples, shape, dtypes = validate_samples(part.samples, config, f"--data_path {part.source} ({name})")
            names = read_channel_names(stats_folder(Path(part.source)), part.names, shape[0])
            if names is None and is_rgb(samples, range(shape[0]), dtypes, None):
                names = ["R", "G", "B"]
            if plan is None:
                plan = Plan(list(map(str, sources)), union, names, shape[0])
            if shape[0] != plan.num_channels or names != plan.channel_names:
                raise DatasetError(
                    f"--data_path {part.source} has channels {names or shape[0]} but {sources[0]} has "
                    f"{plan.channel_names or plan.num_channels}; a store holds one set of channels"
                )
            split = plan.splits.setdefault(name, {"samples": [], "keys": []})
            split["samples"] += _relabel(samples, part.classes, union)
    _group(plan, config)
    return plan


def _group(plan: Plan, config: DataConfig):
    """Give every sample its (shape, dtype) group; sum the source files' sizes."""
    paths = sorted({p for split in plan.splits.values() for files, _ in split["samples"] for p in as_list(files)})
    axis = [config.channel_axis] * len(paths)
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        headers = dict(zip(paths, pool.map(read_header, paths, axis)))
    plan.source_bytes = sum(os.path.getsize(p) for p in paths)
    for split in plan.splits.values():
        groups = {}
        for files, _ in split["samples"]:
            shape, dtype = _sample_header(files, headers)
            key = (tuple(int(s) for s in shape), np.dtype(dtype).str)
            groups.setdefault(key, 0)
            split["keys"].append((list(groups).index(key), groups[key]))
            groups[key] += 1
        split["groups"] = [{"shape": list(k[0]), "dtype": k[1], "count": n} for k, n in groups.items()]


def _manifest(plan: Plan, complete: bool) -> dict:
    splits = {}
    for name, split in plan.splits.items():
        groups = [{**g, "file": f"{name}-{i:03d}.npy"} for i, g in enumerate(split["groups"])]
        splits[name] = {"groups": groups, "index": f"{name}-index.npy", "done": f"{name}-done.npy"}
        splits[name]["sources"] = f"{name}-sources.json"
        splits[name]["num_samples"] = len(split["samples"])
    return dict(
        format=FORMAT,
        version=VERSION,
        sources=plan.sources,
        classes=plan.classes,
        channel_names=plan.channel_names,
        num_channels=plan.num_channels,
        splits=splits,
        fingerprint=plan.fingerprint(),
        complete=complete,
    )


def _write_json(path: Path, data: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _open_arrays(out: Path, manifest: dict, plan: Plan, fresh: bool) -> dict:
    """{split: (group arrays, done marker)} opened for writing; created (with the index) when ``fresh``."""
    opened = {}
    for name, info in manifest["splits"].items():
        if fresh:
            keys = plan.splits[name]["keys"]
            labels = [label for _, label in plan.splits[name]["samples"]]
            index = np.array([(g, row, label) for (g, row), label in zip(keys, labels)], dtype=np.int64)
            np.save(out / info["index"], index.reshape(-1, 3))
            sources = ["|".join(as_list(files)) for files, _ in plan.splits[name]["samples"]]
            (out / info["sources"]).write_text(json.dumps(sources) + "\n")
        mode = "w+" if fresh else "r+"
        arrays = [
            np.lib.format.open_memmap(out / g["file"], mode, np.dtype(g["dtype"]), (g["count"], *g["shape"]))
            if fresh
            else np.load(out / g["file"], mmap_mode=mode)
            for g in info["groups"]
        ]
        done = np.lib.format.open_memmap(out / info["done"], mode, np.uint8, (info["num_samples"],))
        opened[name] = (arrays, done)
    return opened


def _start(out: Path, plan: Plan) -> tuple[dict, bool]:
    """(manifest, fresh): a new store, or the interrupted/finished one at ``out`` when it packs the same samples."""
    manifest = _manifest(plan, complete=False)
    if (out / STORE_FILENAME).is_file():
        old = json.loads((out / STORE_FILENAME).read_text())
        if old.get("fingerprint") != manifest["fingerprint"]:
            raise DatasetError(f"--out {out} holds a packed store of other samples; remove it or choose another --out")
        return old, False
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"--out {out} exists and is not a packed store; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / STORE_FILENAME, manifest)
    return manifest, True


def _flush(opened):
    for arrays, done in opened.values():
        for arr in arrays:
            arr.flush()
        done.flush()


def _fill(plan: Plan, opened: dict, config: DataConfig, progress: bool):
    """Write every sample not marked done, one at a time; pixels are flushed before their markers."""
    total = sum(len(s["samples"]) for s in plan.splits.values())
    already = sum(int(done.sum()) for _, done in opened.values())
    bar = tqdm(total=total, initial=already, unit="sample", desc="packing", disable=not progress)
    pending = 0
    for name, split in plan.splits.items():
        arrays, done = opened[name]
        reader = MultiChannelDataset(
            split["samples"],
            [],
            range(plan.num_channels),
            num_channels=plan.num_channels,
            **{**config.reading_kwargs(), "skip_bad_samples": False},
        )
        for i, (group, row) in enumerate(split["keys"]):
            if done[i]:
                continue
            arrays[group][row] = reader.load_raw(i)
            pending += arrays[group][row].nbytes
            done[i] = 1
            bar.update()
            if pending >= FLUSH_BYTES:
                _flush(opened)
                pending = 0
    _flush(opened)
    bar.close()
    return already


def store_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def write_store(plan: Plan, out, config: DataConfig, progress: bool = True) -> dict:
    """Pack ``plan`` into ``out`` (resuming an interrupted store of the same samples); returns a summary."""
    out = Path(out)
    start = time.time()
    manifest, fresh = _start(out, plan)
    already, was_complete = 0, bool(manifest.get("complete"))
    if not was_complete:
        opened = _open_arrays(out, manifest, plan, fresh)
        already = _fill(plan, opened, config, progress)
        del opened
        if plan.channel_names is not None:
            (out / "channels.txt").write_text("\n".join(plan.channel_names) + "\n")
        manifest["complete"] = True
        _write_json(out / STORE_FILENAME, manifest)
    if not (out / STATS_FILENAME).is_file():
        write_channel_stats(str(out), out / STATS_FILENAME, allow_mixed_sizes=config.allow_mixed_sizes)
    return dict(
        samples={name: len(s["samples"]) for name, s in plan.splits.items()},
        groups=sum(len(s["groups"]) for s in plan.splits.values()),
        resumed_from=already,
        fresh=fresh,
        was_complete=was_complete,
        source_bytes=plan.source_bytes,
        store_bytes=store_bytes(out),
        seconds=time.time() - start,
    )
