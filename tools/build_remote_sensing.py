"""Rebuild sample_data/sentinel2 and sample_data/landsat7: real satellite scenes, cut into 32 x 32 tiles, for the
mixed-source pretraining recipe (PRETRAIN.md): their bands share names, the histology tiles' do not.

    pip download --no-deps xarray-spatial -d /tmp/dl            # the Sentinel-2 scene (MIT; Copernicus data)
    (cd /tmp/dl && apt-get download r-cran-stars)               # the Landsat-7 scene (Apache-2.0; public domain)
    python tools/build_remote_sensing.py --wheel /tmp/dl/xarray_spatial-*.whl --deb /tmp/dl/r-cran-stars_*.deb

sentinel2/  xrspatial/datasets/sentinel-2/{blue,green,red,nir,swir1,swir2}_band.nc (200 x 300 each, read with
            scipy.io.netcdf_file). The 10 m bands cover the scene at 200 x 300; the 20 m SWIR bands are stored at the
            same size but cover twice the extent, so they are co-registered first: cropped to [:100, :150] and
            upsampled 2x (pixel repeat). Values 659..5006 are stored as uint16. 6 x 9 tiles of 32 x 32 (stride 32,
            the last 8 rows and 12 columns unused), each a (6, 32, 32) TIFF.
landsat7/   stars/tif/L7_ETMs.tif (352 x 349 x 6 uint8, ETM+ bands 1, 2, 3, 4, 5, 7 = blue, green, red, NIR, SWIR1,
            SWIR2), the top-left 160 x 160 pixels as 5 x 5 tiles of 32 x 32, kept as uint8 (the scene's own type).
Both get channels.txt (blue, green, red, nir, swir1, swir2) and channel_stats.json (``python -m util.data.stats``).
TIFFs are zlib-compressed with a horizontal predictor (tifffile decodes that without imagecodecs).
"""

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import tifffile
from scipy.io import netcdf_file

ROOT = Path(__file__).resolve().parents[1]
BANDS = ("blue", "green", "red", "nir", "swir1", "swir2")
TILE = 32
LANDSAT_SIDE = 160
NETCDF_VARIABLE = "__xarray_dataarray_variable__"


def sentinel2_stack(wheel: Path) -> np.ndarray:
    """The co-registered (6, 200, 300) uint16 Sentinel-2 stack of the xarray-spatial wheel."""
    planes = {}
    with zipfile.ZipFile(wheel) as archive:
        for band in BANDS:
            raw = archive.read(f"xrspatial/datasets/sentinel-2/{band}_band.nc")
            with netcdf_file(io.BytesIO(raw), "r", mmap=False) as f:
                planes[band] = np.array(f.variables[NETCDF_VARIABLE].data, dtype=np.float64)
    for band in ("swir1", "swir2"):  # 20 m pixels: half the 10 m extent, upsampled 2x
        planes[band] = planes[band][:100, :150].repeat(2, axis=0).repeat(2, axis=1)
    stack = np.stack([planes[b] for b in BANDS])
    assert stack.min() >= 0 and stack.max() <= 65535 and np.all(stack == np.round(stack))
    return stack.astype(np.uint16)


def landsat7_stack(deb: Path) -> np.ndarray:
    """The (6, 160, 160) uint8 top-left corner of L7_ETMs.tif in the r-cran-stars package."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, stdout=open(Path(tmp) / "data.tar", "wb"))
        with tarfile.open(Path(tmp) / "data.tar") as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("stars/tif/L7_ETMs.tif"))
            scene = tifffile.imread(io.BytesIO(tar.extractfile(member).read()))
    return np.ascontiguousarray(scene[:LANDSAT_SIDE, :LANDSAT_SIDE].transpose(2, 0, 1))


def write_tiles(stack: np.ndarray, out: Path):
    """(C, H, W) -> out/tile_yYYY_xXXX.tif, 32 x 32 tiles at stride 32, plus channels.txt."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for y in range(0, stack.shape[1] - TILE + 1, TILE):
        for x in range(0, stack.shape[2] - TILE + 1, TILE):
            tile = np.ascontiguousarray(stack[:, y : y + TILE, x : x + TILE])
            tifffile.imwrite(out / f"tile_y{y:03d}_x{x:03d}.tif", tile, compression="zlib", predictor=True)
    (out / "channels.txt").write_text("\n".join(BANDS) + "\n")
    subprocess.run([sys.executable, "-m", "util.data.stats", "--data_path", str(out)], cwd=ROOT, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, required=True, help="xarray_spatial-*.whl (pip download)")
    parser.add_argument("--deb", type=Path, required=True, help="r-cran-stars_*.deb (apt-get download)")
    parser.add_argument("--out", type=Path, default=ROOT / "sample_data")
    args = parser.parse_args()
    write_tiles(sentinel2_stack(args.wheel), args.out / "sentinel2")
    write_tiles(landsat7_stack(args.deb), args.out / "landsat7")


if __name__ == "__main__":
    main()
