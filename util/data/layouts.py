"""Dataset layouts: which files make the samples (class folders, CSV index, unlabelled folder scan).

Dataset layouts (``--data_path``)
    * class folders ``root/{train,val}/<class>/<image>``;
    * a CSV index ``root/{train,val}.csv`` (for pretraining also any ``file.csv``) with either a ``path``
      column (one file per sample) or one column per channel (one single-channel file per channel, as in
      cell painting; every column other than ``label`` and the metadata columns is a channel). ``label`` holds
      class names, on every row of a labelled split (empty only in the pretraining layout, which is unlabelled);
      metadata columns (``util.data.metadata``: ``Metadata_*`` or ``--metadata_columns``) are kept per sample;
      relative paths resolve against the CSV's folder; a row must have as many fields as the header;
    * unlabelled, pretraining only: every image under ``root/train`` if that folder exists, else under ``root``;
    * a packed store written by ``pack_dataset.py`` (``util.data.packed``): its train (and val) split.

A sample is ``(files, label)``: files is one path, or a list of one single-channel path per channel. The readers
return the samples with their CSV metadata, {column: [value per sample]} ({} without a CSV).

Folders are scanned recursively, following directory links, but each real directory once: a link loop or
a second link to a folder adds no samples.
"""

import csv
import logging
import os
from pathlib import Path

from util.data.config import DataConfig
from util.data.errors import DatasetError, MissingPathError
from util.data.metadata import metadata_columns
from util.data.packed import is_packed_store, packed_samples
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


def _csv_file(csv_path, line, row, column, per_file):
    value = (row.get(column) or "").strip()
    if not value:
        raise DatasetError(f"{csv_path} line {line}: column '{column}' is empty")
    path = csv_path.parent / value
    if not path.is_file():
        hint = (
            ""
            if per_file
            else (
                f"; if '{column}' is not a channel, declare it with --metadata_columns {column} (or name the column "
                f"Metadata_{column})"
            )
        )
        raise MissingPathError(f"{csv_path} line {line}: column '{column}' names {path}, which does not exist{hint}")
    return str(path)


def _check_row(csv_path, line, row, fieldnames, labelled):
    """A row has one field per header column and, in a labelled split, a label."""
    if None in row:
        raise DatasetError(
            f"{csv_path} line {line}: {len(fieldnames) + len(row[None])} fields but the header has "
            f"{len(fieldnames)} ({','.join(fieldnames)}); quote a value that holds a comma"
        )
    if labelled and not (row.get("label") or "").strip():
        raise DatasetError(
            f"{csv_path} line {line}: empty label; every row of a labelled split needs one (unlabelled data go in "
            "the pretraining layout, e.g. extract_features.py --split pretrain)"
        )


def _read_csv(csv_path, classes=None, labelled=False, declared_metadata=None):
    """Samples, class names, channel names (per-channel layout, else None) and metadata {column: [value per
    sample]} of a CSV index; ``labelled``: every row needs a label."""
    if not csv_path.is_file():
        raise MissingPathError(f"CSV index {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DatasetError(f"{csv_path} is empty; expected a header 'path,label' or 'ch0,ch1,...,label'")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        per_file = "path" in reader.fieldnames
        meta = metadata_columns(csv_path, reader.fieldnames, declared_metadata, per_file)
        columns = ["path"] if per_file else [c for c in reader.fieldnames if c != "label" and c not in meta]
        if not columns:
            raise DatasetError(f"{csv_path} has no path column; expected 'path,label' or 'ch0,ch1,...,label'")
        if labelled and "label" not in reader.fieldnames:
            raise DatasetError(f"{csv_path} has no 'label' column, which a labelled split needs")
        rows, metadata = [], {column: [] for column in meta}
        for row in reader:
            _check_row(csv_path, reader.line_num, row, reader.fieldnames, labelled)
            files = [_csv_file(csv_path, reader.line_num, row, c, per_file) for c in columns]
            rows.append((files[0] if per_file else files, (row.get("label") or "").strip(), reader.line_num))
            for column in meta:
                metadata[column].append((row.get(column) or "").strip())
    if not rows:
        raise DatasetError(f"{csv_path} lists no samples")
    classes = _sorted_names({label for _, label, _ in rows if label}) if classes is None else classes
    index = {name: i for i, name in enumerate(classes)}
    unknown = [(line, label) for _, label, line in rows if label and label not in index]
    if unknown:
        line, label = unknown[0]
        raise DatasetError(f"{csv_path} line {line}: label {label!r} is not one of the train split's classes")
    samples = [(files, index[label] if label else -1) for files, label, _ in rows]
    return samples, classes, None if per_file else columns, metadata


def labelled_split(root, split, classes, declared_metadata=None):
    """(samples, classes, csv channel names, metadata) of root/<split>.csv, root/<split>/<class>/ or a packed
    store."""
    if is_packed_store(root):
        return (*packed_samples(root, split, classes), None, {})
    csv_path = root / f"{split}.csv"
    if csv_path.is_file():
        return _read_csv(csv_path, classes, labelled=True, declared_metadata=declared_metadata)
    if (root / split).is_dir():
        return (*_class_folder_split(root / split, classes), None, {})
    raise MissingPathError(f"--data_path {root}: found neither class folders {root / split}/ nor an index {csv_path}")


def unlabelled_samples(path, declared_metadata=None):
    """(samples with label -1, csv channel names, metadata) for pretraining."""
    if is_packed_store(path):
        return [(ref, -1) for ref, _ in packed_samples(path, "train")[0]], None, {}
    if path.is_file() and path.suffix.lower() != ".csv":
        raise DatasetError(f"--data_path {path} is a file but not a .csv index")
    csv_path = path if path.is_file() else path / "train.csv"
    if csv_path.is_file():
        samples, _, names, metadata = _read_csv(csv_path, declared_metadata=declared_metadata)
        return [(files, -1) for files, _ in samples], names, metadata
    folder = path / "train" if (path / "train").is_dir() else path
    return [(file, -1) for file in _scan(folder)], None, {}


def resolve_data_path(config: DataConfig) -> Path:
    value = config.data_path
    if not value:
        raise DatasetError("--data_path is required")
    if isinstance(value, list | tuple):
        raise DatasetError(
            f"--data_path {' '.join(map(str, value))}: several sources are for main_pretrain.py, "
            "main_finetune.py and main_linprobe.py; "
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
