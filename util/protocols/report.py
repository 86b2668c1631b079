"""Results as people read them: a Markdown table of the tasks' scores and a PCA scatter of the embeddings."""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

METRICS = ("macro_f1", "top1", "top5", "map", "fraction_retrieved", "n_train", "n_test")


def markdown_table(results: dict) -> str:
    """{task: {metric: value}} -> a Markdown table, one row per task, the metrics any task has as columns."""
    columns = [m for m in METRICS if any(m in r for r in results.values())]
    lines = ["| task | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for task, r in results.items():
        cells = [_cell(r.get(m)) for m in columns]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def pca_scatter(features: np.ndarray, colourings: dict, path: str, title: str = ""):
    """features (N, D) on their first two principal components, one panel per colouring {name: (N,) str}."""
    points = PCA(n_components=2, random_state=0).fit_transform(features.astype(np.float64))
    fig = Figure(figsize=(4.5 * len(colourings), 4))
    FigureCanvasAgg(fig)
    for i, (name, values) in enumerate(colourings.items()):
        ax = fig.add_subplot(1, len(colourings), i + 1)
        for value in np.unique(values):
            rows = values == value
            ax.scatter(points[rows, 0], points[rows, 1], s=6, alpha=0.7, label=str(value) or "(none)")
        ax.set_title(f"{title} coloured by {name}".strip())
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        if len(np.unique(values)) <= 12:
            ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return points
