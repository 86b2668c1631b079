"""Channel robustness: which channel subsets to evaluate, and accuracy against the number of channels k.

For C channels every subset of each size k is evaluated when there are at most ``max_subsets`` of them, else
``max_subsets`` distinct subsets drawn at random (seeded), as in the ChannelViT paper's robustness curves.
"""

import itertools
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def channel_subsets(num_channels: int, max_subsets: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Subsets (sorted position tuples) of every size 1..C: all of a size when few, else a random sample."""
    rng = np.random.default_rng(seed)
    subsets = []
    for k in range(1, num_channels + 1):
        if math.comb(num_channels, k) <= max_subsets:
            subsets += list(itertools.combinations(range(num_channels), k))
            continue
        drawn = set()
        while len(drawn) < max_subsets:
            drawn.add(tuple(sorted(rng.choice(num_channels, k, replace=False).tolist())))
        subsets += sorted(drawn)
    return subsets


def curve(per_subset: list[dict], metric: str) -> dict:
    """{k: {'mean', 'min', 'max', 'n_subsets'}} of ``metric`` over the subsets of each size k."""
    by_k = {}
    for row in per_subset:
        by_k.setdefault(len(row["channels"]), []).append(row[metric])
    return {
        k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)), "n_subsets": len(v)}
        for k, v in sorted(by_k.items())
    }


def plot_curves(curves: dict, path: str, ylabel: str, title: str = ""):
    """curves {name: {k: {'mean', 'min', 'max'}}} -> a PNG: mean against k, the min-max range shaded."""
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in curves.items():
        ks = sorted(points, key=int)
        x = [int(k) for k in ks]
        ax.plot(x, [points[k]["mean"] for k in ks], marker="o", label=name)
        ax.fill_between(x, [points[k]["min"] for k in ks], [points[k]["max"] for k in ks], alpha=0.2)
    ax.set_xlabel("channels given (k)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
