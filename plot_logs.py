"""Plot training curves from log.txt files (one JSON object per line) into one PNG, drawn with matplotlib (Agg).

    python plot_logs.py output_dir/log.txt -o curves.png
    python plot_logs.py run_a/log.txt run_b/log.txt -o compare.png --panel train_loss --panel test_acc1,test_acc5

By default one panel each for the losses (train_loss, test_loss), the learning rate (train_lr) and the accuracy
(test_acc1, test_acc5), those present in the logs. The x axis is 'epoch' (else the line number). When a
resumed run logged an epoch twice, the later line wins. A log that cannot be read, logs without any plotted key
and an -o that cannot be written end with one ``ERROR:`` line (``util.run_main``).
"""

import argparse
import json
import math
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from util.cli import run_main
from util.errors import RunError
from util.flags import ArgumentParser

PANEL_INCHES, DPI = (4.8, 3.2), 100
"""Size of one panel: 480 x 320 pixels."""
DEFAULT_PANELS = (
    ("loss", ("train_loss", "test_loss")),
    ("learning rate", ("train_lr",)),
    ("accuracy (%)", ("test_acc1", "test_acc5")),
)
MARKER_MAX_POINTS = 40
"""Series with at most this many points also get a dot per point (sparse eval curves stay visible)."""


def read_log(path: str) -> dict[str, list[tuple[float, float]]]:
    """log.txt -> {key: sorted [(x, value)]} of finite numbers; x is 'epoch' or the line number."""
    rows = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as err:
        raise RunError(f"cannot read the log {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise RunError(f"the log {path} is not UTF-8 text (JSON lines): {err.reason}") from err
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        x = record.get("epoch", number)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                if math.isfinite(value):
                    rows.setdefault(key, {})[x] = float(value)
    return {key: sorted(points.items()) for key, points in rows.items()}


def run_name(path: str, paths: list[str]) -> str:
    """Label prefix of one log among several: its folder's name."""
    if len(paths) == 1:
        return ""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) + ": "


def draw_panel(ax, title: str, series: list) -> None:
    """One chart on ax: series is [(label, [(x, y), ...])]."""
    for label, points in series:
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label, linewidth=1.5, marker="o" if len(points) <= MARKER_MAX_POINTS else None, ms=3)
    ax.set_title(title, loc="left", fontsize=10)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="0.9")
    ax.legend(fontsize=8)


def check_out(out: str) -> None:
    """Raise RunError unless matplotlib writes the format of ``out``'s extension."""
    extension = os.path.splitext(out)[1].lstrip(".").lower()
    formats = FigureCanvasAgg.get_supported_filetypes()
    if extension not in formats:
        raise RunError(f"-o {out}: no image format '.{extension}' (use one of {', '.join(sorted(formats))})")


def plot(paths: list[str], out: str, panels=None) -> tuple[int, int]:
    """Draw the panels [(title, keys)] (default: DEFAULT_PANELS) of the logs side by side into `out` -> (W, H) px."""
    check_out(out)
    logs = [(run_name(p, paths), read_log(p)) for p in paths]
    charts = []
    for title, keys in panels or DEFAULT_PANELS:
        series = [(prefix + key, log[key]) for prefix, log in logs for key in keys if log.get(key)]
        if series:
            charts.append((title, series))
    if not charts:
        keys = sorted({key for _, keys in panels or DEFAULT_PANELS for key in keys})
        raise RunError(f"none of the plotted keys {keys} has a finite number in {', '.join(paths)}")
    fig = Figure(figsize=(PANEL_INCHES[0] * len(charts), PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, series) in zip(fig.subplots(1, len(charts), squeeze=False)[0], charts):
        draw_panel(ax, title, series)
    try:
        fig.savefig(out)
    except OSError as err:
        raise RunError(f"cannot write -o {out}: {err.strerror or err}") from err
    width, height = fig.get_size_inches() * DPI
    return round(width), round(height)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser("plot_logs", description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="log.txt files (JSON lines)")
    parser.add_argument("-o", "--out", default="curves.png", help="output PNG")
    parser.add_argument(
        "--panel",
        action="append",
        default=None,
        metavar="KEY[,KEY...]",
        help="a panel of these keys (repeatable; default: loss, learning rate, accuracy)",
    )
    return parser


def main(args) -> None:
    panels = [(keys, tuple(keys.split(","))) for keys in args.panel] if args.panel else None
    width, height = plot(args.logs, args.out, panels)
    print(f"wrote {args.out} ({width}x{height})")


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args())
