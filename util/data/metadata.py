"""Metadata columns of a CSV index: per-sample values that are not image files (plate, well, site, source...).

A CSV column is metadata, not a channel, when its header starts with ``Metadata_`` (CellProfiler's and the JUMP
Cell Painting ``load_data.csv`` convention: ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``...) or when
``--metadata_columns`` names it (``--metadata_columns plate,well``). In a CSV with a ``path`` column every column
other than ``path`` and ``label`` is metadata. A dataset keeps the values as ``dataset.metadata``: {column: [value
per sample]}, aligned with ``dataset.samples``; ``extract_features.py`` writes them next to the embeddings.
"""

from util.data.errors import DatasetError

METADATA_PREFIX = "Metadata_"


def parse_metadata_columns(value) -> list[str]:
    """--metadata_columns as None, a "plate,well" string or a list -> list of column names."""
    if not value:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    return [name.strip() for name in names if name.strip()]


def metadata_columns(csv_path, fieldnames: list[str], declared, per_file: bool) -> list[str]:
    """The metadata columns of a CSV header (module docstring); a declared column the header lacks is an error."""
    declared = parse_metadata_columns(declared)
    missing = [name for name in declared if name not in fieldnames]
    if missing:
        raise DatasetError(
            f"--metadata_columns names {missing}, which {csv_path} lacks (its columns: {', '.join(fieldnames)})"
        )
    if per_file:
        return [name for name in fieldnames if name not in ("path", "label")]
    return [name for name in fieldnames if name in declared or name.startswith(METADATA_PREFIX)]


def kept_metadata(listed: list, kept: list, metadata: dict[str, list]) -> dict[str, list]:
    """The metadata of the samples ``kept`` out of ``listed`` (an order-preserving subset, e.g. after
    ``--skip_bad_samples`` dropped some): {column: [value per kept sample]}."""
    if len(kept) == len(listed) or not metadata:
        return metadata
    rows, j = [], 0
    for i, sample in enumerate(listed):
        if j < len(kept) and sample == kept[j]:
            rows.append(i)
            j += 1
    return {column: [values[i] for i in rows] for column, values in metadata.items()}


def concat_metadata(datasets) -> dict[str, list]:
    """The metadata of datasets read one after the other; a column some dataset lacks is '' for its samples."""
    columns = list(dict.fromkeys(column for d in datasets for column in d.metadata))
    return {column: [v for d in datasets for v in d.metadata.get(column, [""] * len(d))] for column in columns}
