"""Image-based profiling: well profiles, per-plate normalisation against controls, and mAP (copairs).

As in the JUMP Cell Painting and EFAAR benchmarks: sample embeddings are averaged into one profile per well;
each plate's profiles are normalised against that plate's control wells; then

- phenotypic activity: each treated well queries its replicates (same treatment) among the control wells, and
  a treatment is *retrieved* when its mAP beats the permutation null (Benjamini-Hochberg corrected p < 0.05);
- replicate retrieval: each treated well queries its replicates among the wells of the other treatments.

mean average precision, its null distribution and the correction come from ``copairs``; the scalers and the
whitening from scikit-learn.
"""

import numpy as np
import pandas as pd
from copairs.map import average_precision, mean_average_precision
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from util.errors import RunError
from util.protocols.featureset import FeatureSet

NORMALISATIONS = ("none", "center_scale", "tvn")
"""none; center_scale: per plate, centre on the control wells' mean and divide by their std; tvn (typical
variation normalisation): per plate, centre on the controls, then whiten with a PCA fitted on all control wells."""


def well_profiles(fs: FeatureSet, well: str, plate: str, treatment: str, aggregate: str = "mean"):
    """One profile per (plate, well): (meta DataFrame with plate, well, treatment, n_samples; profiles (W, D)).

    A well's treatment must be the same for all its samples (``RunError`` naming the well otherwise).
    """
    frame = pd.DataFrame({"plate": fs.column(plate), "well": fs.column(well), "treatment": fs.column(treatment)})
    groups = frame.groupby(["plate", "well"], sort=True).indices
    profiles = np.zeros((len(groups), fs.features.shape[1]), np.float64)
    meta = []
    for w, ((p, name), rows) in enumerate(groups.items()):
        treatments = frame["treatment"].iloc[rows].unique()
        if len(treatments) != 1:
            raise RunError(f"well '{name}' of plate '{p}' mixes treatments {sorted(treatments)} ('{treatment}')")
        block = fs.features[rows].astype(np.float64)
        profiles[w] = block.mean(axis=0) if aggregate == "mean" else np.median(block, axis=0)
        meta.append({"plate": p, "well": name, "treatment": treatments[0], "n_samples": len(rows)})
    return pd.DataFrame(meta), profiles


def normalise(meta: pd.DataFrame, profiles: np.ndarray, is_control: np.ndarray, method: str) -> np.ndarray:
    """profiles (W, D) normalised per plate against its control wells (``NORMALISATIONS``)."""
    if method == "none":
        return profiles
    out = np.empty_like(profiles)
    for plate in meta["plate"].unique():
        rows = (meta["plate"] == plate).to_numpy()
        controls = rows & is_control
        if not controls.any():
            raise RunError(f"plate '{plate}' has no control well to normalise against")
        scaler = StandardScaler(with_std=method == "center_scale").fit(profiles[controls])
        out[rows] = scaler.transform(profiles[rows])
    if method == "tvn":
        if is_control.sum() < 2:
            raise RunError("tvn needs at least 2 control wells to fit the whitening")
        pca = PCA(whiten=True, n_components=min(int(is_control.sum()) - 1, profiles.shape[1]))
        out = pca.fit(out[is_control]).transform(out)
    return out


def map_scores(meta, profiles, pos_sameby, pos_diffby, neg_sameby, neg_diffby, queries, null_size, seed) -> dict:
    """copairs AP per query well, then mAP per treatment with its corrected p-value: summary dict."""
    ap = average_precision(
        meta, profiles, pos_sameby, pos_diffby, neg_sameby, neg_diffby, distance="cosine", progress_bar=False
    )
    ap = ap[queries[ap.index.to_numpy()] & (ap["n_pos_pairs"] > 0)]
    if ap.empty:
        raise RunError("no treated well has a replicate: mAP needs at least 2 wells per treatment")
    maps = mean_average_precision(ap, ["treatment"], null_size, threshold=0.05, seed=seed, progress_bar=False)
    return {
        "map": float(maps["mean_average_precision"].mean()),
        "fraction_retrieved": float(maps["below_corrected_p"].mean()),
        "n_treatments": len(maps),
        "n_query_wells": len(ap),
        "per_treatment": {str(r.treatment): float(r.mean_average_precision) for r in maps.itertuples()},
    }


def profile_protocol(
    fs: FeatureSet,
    *,
    well: str,
    plate: str,
    treatment: str,
    control: str,
    method: str = "center_scale",
    aggregate: str = "mean",
    null_size: int = 1000,
    seed: int = 0,
) -> dict:
    """{'activity': {...}, 'replicates': {...}}, each with map, fraction_retrieved and counts."""
    meta, profiles = well_profiles(fs, well, plate, treatment, aggregate)
    is_control = (meta["treatment"] == control).to_numpy()
    if not is_control.any():
        known = sorted(meta["treatment"].unique())
        raise RunError(f"no well has treatment '{control}' (--control); the treatments are {known}")
    profiles = normalise(meta, profiles, is_control, method)
    meta = meta.assign(reference=np.where(is_control, np.arange(len(meta)), -1))
    common = dict(null_size=null_size, seed=seed)
    activity = map_scores(
        meta, profiles, ["treatment", "reference"], [], [], ["treatment", "reference"], ~is_control, **common
    )
    treated = ~is_control
    replicates = map_scores(
        meta[treated].reset_index(drop=True),
        profiles[treated],
        ["treatment"],
        [],
        [],
        ["treatment"],
        np.ones(int(treated.sum()), bool),
        **common,
    )
    counts = {"n_wells": len(meta), "n_control_wells": int(is_control.sum()), "normalisation": method}
    return {"activity": {**activity, **counts}, "replicates": {**replicates, **counts}}
