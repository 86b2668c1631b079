"""A labelled, multi-domain, 6-channel set cut from the bundled IHC tiles (sample_data/ihc), for bench_boc.py.

The 100 tiles (6 x 64 x 64, stride 48) are put back into the 496 x 496 slide they were cut from, and the slide
is cut again into 32 x 32 crops at stride 16. Each crop gets:

- a label from its stains: ``background`` (the third of crops with the least total H + DAB optical density),
  else ``dab`` or ``hema`` by whether its DAB share of the density is above or below the median of the rest;
- a ``plate`` (domain): the slide's left, middle or right third (P1, P2, P3); crops straddling two thirds are
  dropped, so no pixel is shared across domains;
- a ``well``: the 64 x 64 block of the slide it starts in (several overlapping crops per well).

Files: OUT/{train,val}/<label>/<plate>_w<row><col>_y<Y>_x<X>.tif, (6, 32, 32) uint16, a random 80/20 split
(seed 0), plus channels.txt. The label is a statistic of the H and DAB channels, so raw pixels are a strong
baseline here by construction; the plates differ in tissue content (a real domain shift, not a simulated one).

    python benchmarks/build_ihc_labelled.py --out /tmp/ihc_labelled
"""

import argparse
import re
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
CROP, STRIDE, WELL = 32, 16, 64
CHANNELS = ("R", "G", "B", "H", "E", "DAB")


def read_slide(ihc_dir: Path) -> np.ndarray:
    """The tiles tile_yYYY_xXXX.tif pasted at their offsets: (6, H, W) uint16."""
    tiles = {}
    for path in sorted(ihc_dir.glob("tile_y*_x*.tif")):
        y, x = map(int, re.match(r"tile_y(\d+)_x(\d+)", path.stem).groups())
        tiles[(y, x)] = tifffile.imread(path)
    size = max(y for y, _ in tiles) + next(iter(tiles.values())).shape[-1]
    slide = np.zeros((len(CHANNELS), size, size), np.uint16)
    for (y, x), tile in tiles.items():
        slide[:, y : y + tile.shape[1], x : x + tile.shape[2]] = tile
    return slide


def crops(slide: np.ndarray, stride: int = STRIDE):
    """(y, x, plate) of every crop, at ``stride``, inside one third of the slide."""
    size = slide.shape[-1]
    bounds = [0, size // 3, 2 * size // 3, size]
    for y in range(0, size - CROP + 1, stride):
        for x in range(0, size - CROP + 1, stride):
            plate = next(p for p in range(3) if bounds[p] <= x < bounds[p + 1])
            if x + CROP <= bounds[plate + 1]:
                yield y, x, f"P{plate + 1}"


def labels(stacks: np.ndarray) -> np.ndarray:
    """stacks (N, 6, h, w) -> 'background' | 'dab' | 'hema' per crop (see the module docstring)."""
    h = stacks[:, CHANNELS.index("H")].mean(axis=(1, 2))
    dab = stacks[:, CHANNELS.index("DAB")].mean(axis=(1, 2))
    density = h + dab
    background = density <= np.quantile(density, 1 / 3)
    share = dab / np.maximum(density, 1e-9)
    dab_rich = share > np.median(share[~background])
    return np.where(background, "background", np.where(dab_rich, "dab", "hema"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ihc_dir", default=str(ROOT / "sample_data" / "ihc"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--val_fraction", default=0.2, type=float)
    parser.add_argument("--stride", default=STRIDE, type=int, help="crop stride (32: 195 crops, no overlap)")
    args = parser.parse_args()
    slide = read_slide(Path(args.ihc_dir))
    where = list(crops(slide, args.stride))
    stacks = np.stack([slide[:, y : y + CROP, x : x + CROP] for y, x, _ in where])
    names = labels(stacks.astype(np.float64))
    is_val = np.random.default_rng(0).random(len(where)) < args.val_fraction
    out = Path(args.out)
    for (y, x, plate), stack, label, val in zip(where, stacks, names, is_val):
        folder = out / ("val" if val else "train") / label
        folder.mkdir(parents=True, exist_ok=True)
        well = f"w{y // WELL}{x // WELL}"
        tifffile.imwrite(folder / f"{plate}_{well}_y{y:03d}_x{x:03d}.tif", stack, compression="zlib")
    (out / "channels.txt").write_text("\n".join(CHANNELS) + "\n")
    counts = {str(k): int(v) for k, v in zip(*np.unique(names, return_counts=True))}
    print(f"{len(where)} crops ({int(is_val.sum())} val) -> {out}: {counts}")


if __name__ == "__main__":
    main()
