"""The arrays of an ``extract_features.py`` .npz that the protocols read, and its metadata columns.

Metadata convention (extract_features.py): each per-sample metadata column NAME is an array ``metadata_NAME``
(N,) of strings, and ``metadata_columns`` (M,) lists the names (CSV metadata columns and ``--path_metadata``).
Two columns always exist: ``split`` (the dataset split of each row) and ``label`` (the class name, '' for
unlabelled rows).
"""

import os
from dataclasses import dataclass, field

import numpy as np

from util.errors import RunError

META_PREFIX = "metadata_"


@dataclass
class FeatureSet:
    """features (N, D) float32; labels (N,) int64, -1 unlabelled; classes (K,); meta: column -> (N,) str."""

    path: str
    features: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    meta: dict = field(default_factory=dict)
    channel_names: np.ndarray = field(default_factory=lambda: np.asarray([], str))
    checkpoint: str = ""

    def column(self, name: str) -> np.ndarray:
        """The metadata column ``name`` (N,) str; ``RunError`` naming the columns there are otherwise."""
        if name not in self.meta:
            raise RunError(f"{self.path} has no metadata column '{name}'; it has {sorted(self.meta)}")
        return self.meta[name]


def load_features(path: str, key: str = "features") -> FeatureSet:
    """Read ``path`` (an extract_features .npz); ``key`` picks the embedding array (e.g. 'boc_features')."""
    if not os.path.isfile(path):
        raise RunError(f"features file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is not a .npz of features: {e}") from e
    with data:
        if key not in data.files:
            raise RunError(f"{path} has no array '{key}' (it has {sorted(data.files)})")
        features = np.asarray(data[key], dtype=np.float32)
        if features.ndim != 2:
            features = features.reshape(len(features), -1)
        labels = data["labels"] if "labels" in data.files else np.full(len(features), -1, np.int64)
        classes = data["classes"] if "classes" in data.files else np.asarray([], str)
        names = [str(n) for n in data["metadata_columns"]] if "metadata_columns" in data.files else []
        meta = {name: np.asarray(data[f"{META_PREFIX}{name}"], dtype=str) for name in names}
        if "split" in data.files:
            meta["split"] = np.asarray(data["split"], dtype=str)
        meta["label"] = np.asarray([str(classes[i]) if i >= 0 else "" for i in labels], dtype=str)
        channel_names = data["channel_names"] if "channel_names" in data.files else np.asarray([], str)
        checkpoint = str(data["checkpoint"]) if "checkpoint" in data.files else ""
    if not np.isfinite(features).all():
        raise RunError(f"{path}: '{key}' holds NaN or infinite values")
    for name, values in meta.items():
        if len(values) != len(features):
            raise RunError(f"{path}: metadata column '{name}' has {len(values)} rows, features {len(features)}")
    return FeatureSet(path, features, np.asarray(labels, np.int64), classes, meta, channel_names, checkpoint)
