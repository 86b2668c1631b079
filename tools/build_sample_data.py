"""Rebuild sample_data/ from real images bundled with scikit-image and scikit-learn.

    python tools/build_sample_data.py            # writes sample_data/ihc and sample_data/digits

scikit-image and scikit-learn are needed only by this script, never for training.

ihc/     skimage.data.immunohistochemistry() (512 x 512 RGB, uint8) plus its H/E/DAB stain separation
         (skimage.color.rgb2hed) -> 6 channels R, G, B, H, E, DAB stored as uint16: RGB x 257 (0..255 ->
         0..65535), HED optical density x 40000, rounded and clipped to 0..65535. Cut into 100 tiles of
         64 x 64 at stride 48 (a 10 x 10 grid), each a (6, 64, 64) TIFF, zlib-compressed with a horizontal
         predictor (tifffile decodes that without imagecodecs). Stride 32 (225 tiles) would need 6.3 MB even
         compressed; sample_data/ must stay under 5 MB.
digits/  sklearn.datasets.load_digits() (1797 images, 8 x 8, values 0..16) -> x 255/16, bilinear upsampling
         to 32 x 32 (PIL), rounded to uint8 grayscale PNG; stratified 80/20 train/val split with seed 0;
         digits/{train,val}/<digit>/NNNN.png where NNNN is the image's index in load_digits().
Each folder also gets channel_stats.json, written by ``python -m util.data.stats`` (training split only).
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage.color import rgb2hed
from skimage.data import immunohistochemistry
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
IHC_CHANNELS = ("R", "G", "B", "H", "E", "DAB")
HED_SCALE = 40000
TILE, STRIDE = 64, 48
DIGIT_SIZE = 32
SEED = 0


def ihc_stack():
    """The IHC slide as a (6, 512, 512) uint16 stack R, G, B, H, E, DAB."""
    rgb = immunohistochemistry()
    hed = np.clip(np.rint(rgb2hed(rgb) * HED_SCALE), 0, 65535)
    stack = np.concatenate([rgb.astype(np.uint16) * 257, hed.astype(np.uint16)], axis=2)
    return np.ascontiguousarray(stack.transpose(2, 0, 1))


def write_ihc(out):
    """Write the (6, 64, 64) tiles, channels.txt and channel_stats.json under out; return the tile count."""
    out.mkdir(parents=True)
    stack = ihc_stack()
    starts = range(0, stack.shape[1] - TILE + 1, STRIDE)
    for row in starts:
        for col in starts:
            tile = np.ascontiguousarray(stack[:, row : row + TILE, col : col + TILE])
            path = out / f"tile_y{row:03d}_x{col:03d}.tif"
            tifffile.imwrite(path, tile, compression="zlib", predictor=True)
    (out / "channels.txt").write_text("\n".join(IHC_CHANNELS) + "\n")
    return len(starts) ** 2


def upsample_digit(image):
    """(8, 8) float image with values 0..16 -> (32, 32) uint8, bilinear."""
    scaled = Image.fromarray((image * (255 / 16)).astype(np.float32))
    big = np.asarray(scaled.resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR))
    return np.clip(np.rint(big), 0, 255).astype(np.uint8)


def write_digits(out):
    """Write digits/{train,val}/<digit>/NNNN.png under out; return (train count, val count)."""
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, val = train_test_split(indices, test_size=0.2, stratify=digits.target, random_state=SEED)
    for split, chosen in (("train", train), ("val", val)):
        for index in sorted(chosen):
            folder = out / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(upsample_digit(digits.images[index])).save(folder / f"{index:04d}.png", optimize=True)
    return len(train), len(val)


def write_stats(folder):
    subprocess.run([sys.executable, "-m", "util.data.stats", "--data_path", str(folder)], cwd=ROOT, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "sample_data")
    args = parser.parse_args()
    for name in ("ihc", "digits"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    tiles = write_ihc(args.out / "ihc")
    train, val = write_digits(args.out / "digits")
    for name in ("ihc", "digits"):
        write_stats(args.out / name)
    print(f"ihc: {tiles} tiles; digits: {train} train, {val} val")


if __name__ == "__main__":
    main()
