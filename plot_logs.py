"""Plot training curves from log.txt files (one JSON object per line) into a PNG, drawn with PIL (no matplotlib).

    python plot_logs.py output_dir/log.txt -o curves.png
    python plot_logs.py run_a/log.txt run_b/log.txt -o compare.png --panel train_loss --panel test_acc1,test_acc5

By default one panel each for the losses (train_loss, test_loss), the learning rate (train_lr) and the accuracy
(test_acc1, test_acc5), those present in the logs. The x axis is 'epoch' (else the line number). When a
resumed run logged an epoch twice, the later line wins.
"""

import argparse
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H = 480, 320
MARGIN = dict(left=64, right=14, top=24, bottom=36)
DEFAULT_PANELS = (
    ("loss", ("train_loss", "test_loss")),
    ("learning rate", ("train_lr",)),
    ("accuracy (%)", ("test_acc1", "test_acc5")),
)
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
AXIS_RGB, GRID_RGB, TEXT_RGB, BACKGROUND_RGB = (60, 60, 60), (225, 225, 225), (20, 20, 20), (255, 255, 255)
MARKER_MAX_POINTS = 40
"""Series with at most this many points also get a dot per point (sparse eval curves stay visible)."""


def read_log(path):
    """log.txt -> {key: sorted [(x, value)]} of finite numbers; x is 'epoch' or the line number."""
    rows = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
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


def nice_ticks(lo, hi, count=5):
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten -> (ticks, lo, hi)."""
    if not hi > lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    last = math.ceil(hi / step) * step
    ticks = [first + i * step for i in range(int(round((last - first) / step)) + 1)]
    return ticks, first, last


def tick_labels(ticks):
    """Short texts for evenly spaced ticks: scientific notation for tiny or huge axes, else enough decimals."""
    step = ticks[1] - ticks[0]
    largest = max(abs(t) for t in ticks)
    if largest >= 1e5 or largest < 1e-2:
        return ["0" if t == 0 else f"{t:.1e}" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step)))
    return [f"{t:.{decimals}f}" for t in ticks]


def draw_panel(draw, origin, title, series, font):
    """One chart at origin (x, y): series is [(label, [(x, y), ...])]."""
    ox, oy = origin
    left, top = ox + MARGIN["left"], oy + MARGIN["top"]
    right, bottom = ox + PANEL_W - MARGIN["right"], oy + PANEL_H - MARGIN["bottom"]
    draw.text((left, oy + 6), title, fill=TEXT_RGB, font=font)
    xs = [x for _, points in series for x, _ in points]
    ys = [y for _, points in series for _, y in points]
    x_ticks, x_lo, x_hi = nice_ticks(min(xs), max(xs))
    y_ticks, y_lo, y_hi = nice_ticks(min(ys), max(ys))

    def to_px(x, y):
        px = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        py = bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
        return px, py

    for t, text in zip(y_ticks, tick_labels(y_ticks)):
        _, py = to_px(x_lo, t)
        draw.line([(left, py), (right, py)], fill=GRID_RGB)
        draw.text((left - 4 - font.getlength(text), py - 6), text, fill=TEXT_RGB, font=font)
    for t, text in zip(x_ticks, tick_labels(x_ticks)):
        px, _ = to_px(t, y_lo)
        draw.line([(px, top), (px, bottom)], fill=GRID_RGB)
        draw.text((px - font.getlength(text) / 2, bottom + 4), text, fill=TEXT_RGB, font=font)
    draw.rectangle([left, top, right, bottom], outline=AXIS_RGB)
    draw.text(((left + right) / 2 - 14, bottom + 18), "epoch", fill=TEXT_RGB, font=font)

    for k, (label, points) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2, joint="curve")
        if len(pixels) <= MARKER_MAX_POINTS:
            for px, py in pixels:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        legend_y = top + 4 + 13 * k
        legend_x = right - 8 - font.getlength(label) - 16
        draw.line([(legend_x, legend_y + 6), (legend_x + 12, legend_y + 6)], fill=colour, width=2)
        draw.text((legend_x + 16, legend_y), label, fill=TEXT_RGB, font=font)


def run_name(path, paths):
    """Label prefix of one log among several: its folder's name."""
    if len(paths) == 1:
        return ""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) + ": "


def plot(paths, out, panels=None):
    """Draw the panels [(title, keys)] (default: DEFAULT_PANELS) of the logs side by side into `out`."""
    logs = [(run_name(p, paths), read_log(p)) for p in paths]
    charts = []
    for title, keys in panels or DEFAULT_PANELS:
        series = [(prefix + key, log[key]) for prefix, log in logs for key in keys if log.get(key)]
        if series:
            charts.append((title, series))
    if not charts:
        raise SystemExit(f"none of the plotted keys is in {', '.join(paths)}")
    image = Image.new("RGB", (PANEL_W * len(charts), PANEL_H), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for k, (title, series) in enumerate(charts):
        draw_panel(draw, (k * PANEL_W, 0), title, series, font)
    image.save(out)
    return image


def main(argv=None):
    parser = argparse.ArgumentParser("plot_logs", description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="log.txt files (JSON lines)")
    parser.add_argument("-o", "--out", default="curves.png", help="output PNG")
    parser.add_argument(
        "--panel",
        action="append",
        default=None,
        metavar="KEY[,KEY...]",
        help="a panel of these keys (repeatable; default: loss, learning rate, accuracy)",
    )
    args = parser.parse_args(argv)
    panels = [(keys, tuple(keys.split(","))) for keys in args.panel] if args.panel else None
    image = plot(args.logs, args.out, panels)
    print(f"wrote {args.out} ({image.width}x{image.height})")


if __name__ == "__main__":
    main()
