"""Dataset layouts: which files make the samples (class folders, CSV index, unlabelled folder scan).

Dataset layouts (``--data_path``)
    * class folders ``root/{train,val}/<class>/<image>``;
    * a CSV index ``root/{train,val}.csv`` (for pretraining also any ``file.csv``) with either a ``path``
      column (one file per sample) or one column per channel (one single-channel file per channel, as in
      cell painting; every column other than ``label`` is a channel). ``label`` holds class names and may be
      empty; relative paths resolve against the CSV's folder;
    * unlabelled, pretraining only: every image under ``root/train`` if that folder exists, else under ``root``.

A sample is ``(files, label)``: files is one path, or a list of one single-channel path per channel.

Folders are scanned recursively, following directory links, but each real directory once: a link loop or
a second link to a folder adds no samples.
"""

import csv
import logging
import os
from pathlib import Path

from util.data.config import DataConfig
from util.data.errors import DatasetError, MissingPathError
from util.data.readers import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)


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


def labelled_split(root, split, classes):
    """(samples, classes, csv channel names) of root/<split>.csv or root/<split>/<class>/."""
    csv_path = root / f"{split}.csv"
    if csv_path.is_file():
        return _read_csv(csv_path, classes)
    if (root / split).is_dir():
        return (*_class_folder_split(root / split, classes), None)
    raise MissingPathError(f"--data_path {root}: found neither class folders {root / split}/ nor an index {csv_path}")


def unlabelled_samples(path):
    """(samples with label -1, csv channel names) for pretraining."""
    if path.is_file() and path.suffix.lower() != ".csv":
        raise DatasetError(f"--data_path {path} is a file but not a .csv index")
    csv_path = path if path.is_file() else path / "train.csv"
    if csv_path.is_file():
        samples, _, names = _read_csv(csv_path)
        return [(files, -1) for files, _ in samples], names
    folder = path / "train" if (path / "train").is_dir() else path
    return [(file, -1) for file in _scan(folder)], None


def resolve_data_path(config: DataConfig) -> Path:
    value = config.data_path
    if not value:
        raise DatasetError("--data_path is required")
    if isinstance(value, list | tuple):
        raise DatasetError(
            f"--data_path {' '.join(map(str, value))}: several sources are for pretraining (main_pretrain.py); "
            "pass one here"
        )
    path = Path(value)
    if not path.exists():
        raise MissingPathError(f"--data_path {path} does not exist")
    return path


def stats_folder(path):
    return path if path.is_dir() else path.parent


def as_list(files):
    return [files] if isinstance(files, str) else files


def describe_files(files):
    return files if isinstance(files, str) else f"{files[0]} (and {len(files) - 1} more channel files)"
