"""Input-pipeline throughput: samples/s of the whole training input path per layout, per worker and for N workers,
next to the rate a model consumes on a GPU.

The data are generated once (``--data_dir``, reused while the parameters match): cell-painting-like fields of
``--channels`` 16-bit channels, ``--field`` x ``--field`` pixels (smooth cells over a background, Poisson noise),
written as one TIFF per channel and field (``tiff``: uncompressed, ``tiff_zlib``: zlib-compressed, as JUMP / RxRx
ship them), as one multi-band TIFF per field (``multiband``), and packed by ``pack_dataset.py`` (``packed``).

Input path timed: read, crop, resize to ``--input_size``, flip, normalise, collate, transfer — a
``torch.utils.data.DataLoader`` over ``build_pretrain_dataset`` with ``util.data.device_augment.training_items``,
as ``main_pretrain.py`` builds it. ``aug cpu``: the DataLoader worker does everything (for a packed store it reads
only the crop's window); ``aug device`` (``--gpu_augment``): the worker only cuts the raw window, the resize, flips
and normalisation run on ``--device`` (included when that is CUDA; on a CPU-only machine they are left out, as
they would not run on the worker's core). ``--workers 0`` is one core (the main process, one thread); each rate is
the median of ``--repeats`` windows of ``--seconds`` after a warm-up, on warm page cache.

The model's rate: FLOPs of one training step (forward + backward, ``torch.utils.flop_counter`` on the meta
device, as ``bench_train.py`` counts them) at ``--mfu`` of ``--peak_tflops`` (H200 dense bf16 by default).

    python benchmarks/bench_data.py                       # ~3 minutes on 2 cores
    python benchmarks/bench_data.py --workers 0 15 --device cuda --json data.json   # the 16-core GPU machine
"""

import json
import multiprocessing
import shutil
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import models_chamae  # noqa: E402
from util.data.builders import build_pretrain_dataset  # noqa: E402
from util.data.config import DataConfig  # noqa: E402
from util.data.device_augment import training_items  # noqa: E402
from util.data.pack import plan_store, write_store  # noqa: E402
from util.flags import ArgumentParser  # noqa: E402

CHANNEL_NAMES = ["DNA", "ER", "RNA", "AGP", "Mito", "Ch6", "Ch7", "Ch8"]
RUNS = [  # (layout, augmentation)
    ("tiff", "cpu"),
    ("tiff_zlib", "cpu"),
    ("multiband", "cpu"),
    ("packed", "cpu"),
    ("tiff", "device"),
    ("tiff_zlib", "device"),
    ("packed", "device"),
]


def get_args_parser():
    parser = ArgumentParser("Input-pipeline benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="/tmp/channelmae_bench_data", help="generated data (reused)")
    parser.add_argument("--samples", type=int, default=24, help="fields per layout")
    parser.add_argument("--field", type=int, default=1080, help="field height and width in pixels")
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers (0: one core)")
    parser.add_argument("--runs", nargs="+", default=[f"{a}:{b}" for a, b in RUNS], help="layout:cpu|device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed window")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="chamae_vit_base_patch16", choices=models_chamae.PRETRAIN_MODELS)
    parser.add_argument("--peak_tflops", type=float, default=989.4, help="GPU peak (H200 dense bf16)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for the model's rate")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def synthetic_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) uint16: smooth blobs ("cells", ~12-bit range) over a background, with Poisson noise."""
    cells = np.zeros((size // 8, size // 8))
    idx = rng.integers(0, size // 8, (2, size // 40))
    cells[idx[0], idx[1]] = rng.uniform(500, 3000, idx.shape[1])
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.5) ** 2)
    for axis in (0, 1):
        cells = np.apply_along_axis(lambda v: np.convolve(v, kernel, "same"), axis, cells)
    field = np.kron(cells, np.ones((8, 8)))[:size, :size] + 200
    return rng.poisson(field).clip(0, 65535).astype(np.uint16)


def write_sample(task) -> list[str]:
    """Generate field ``i`` and write it in every file layout asked for; returns its per-channel file names."""
    i, args, paths, layouts = task
    rng = np.random.default_rng(i)
    names = CHANNEL_NAMES[: args.channels]
    field = np.stack([synthetic_field(rng, args.field) for _ in names])
    files = [f"f{i:04d}_{name}.tif" for name in names]
    for c, file in enumerate(files):
        tifffile.imwrite(paths["tiff"] / file, field[c])
        if "tiff_zlib" in layouts:
            tifffile.imwrite(paths["tiff_zlib"] / file, field[c], compression="zlib")
    if "multiband" in layouts:
        tifffile.imwrite(paths["multiband"] / f"f{i:04d}.tif", field)
    return files


def write_layouts(args) -> dict:
    """{layout: data path} of the generated data, generating them unless ``--data_dir`` holds these already; the
    fields are generated in parallel, one process per core."""
    root = Path(args.data_dir)
    layouts = sorted({"tiff", "packed", *(run.split(":")[0] for run in args.runs)})
    params = dict(samples=args.samples, field=args.field, channels=args.channels, layouts=layouts, version=2)
    paths = {name: root / name for name in layouts}
    marker = root / "params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return paths
    if root.exists():
        shutil.rmtree(root)
    for name in layouts:
        if name != "packed":
            paths[name].mkdir(parents=True)
    with multiprocessing.Pool() as pool:
        rows = pool.map(write_sample, [(i, args, paths, layouts) for i in range(args.samples)])
    header = ",".join(CHANNEL_NAMES[: args.channels])
    for name in {"tiff", "tiff_zlib"} & set(layouts):
        (paths[name] / "train.csv").write_text("\n".join([header, *map(",".join, rows)]) + "\n")
    config = DataConfig()
    write_store(plan_store([str(paths["tiff"])], config), paths["packed"], config, progress=False)
    marker.write_text(json.dumps(params))
    return paths


def gflops_per_image(args) -> float:
    """Training-step FLOPs (forward + backward) of ``--model`` per image, counted on the meta device."""
    model = models_chamae.create_model(args.model, img_size=args.input_size, in_chans=args.channels).to("meta")
    imgs = torch.empty(2, args.channels, args.input_size, args.input_size, device="meta")
    ids = torch.arange(args.channels, device="meta") if args.model.startswith("chamae") else None
    counter = FlopCounterMode(display=False)
    with counter:
        model(imgs, mask_ratio=0.75, channel_ids=ids)[0].backward()
    return counter.get_total_flops() / 2 / 1e9


def loader_for(path: Path, augment: str, workers: int, args):
    """(DataLoader of endless random batches, the device augmentation or None) as main_pretrain.py builds them."""
    config = DataConfig(
        data_path=str(path), input_size=args.input_size, mean=[500.0] * args.channels, std=[300.0] * args.channels
    )
    dataset = build_pretrain_dataset(config)
    items = training_items(dataset, Namespace(gpu_augment=augment == "device", data_path=str(path)))
    sampler = torch.utils.data.RandomSampler(items, replacement=True, num_samples=10**9)
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=getattr(items, "collate_fn", None),
        pin_memory=args.device.startswith("cuda"),
    )
    on_device = getattr(items, "device_augment", None) if args.device.startswith("cuda") else None
    return loader, on_device


def measure(path: Path, augment: str, workers: int, args) -> list[float]:
    """samples/s of ``--repeats`` consecutive windows of ``--seconds`` after a warm-up of workers + 1 batches."""
    loader, on_device = loader_for(path, augment, workers, args)
    batches = iter(loader)
    device = torch.device(args.device)

    def consume(batches):
        samples, _ = next(batches)
        samples = samples.to(device, non_blocking=True)
        out = on_device(samples) if on_device is not None else samples
        return len(out)

    for _ in range(workers + 1):
        consume(batches)
    rates = []
    for _ in range(args.repeats):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            count += consume(batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(count / (time.perf_counter() - start))
    return rates


def markdown(results, need) -> str:
    lines = ["| layout | augmentation | workers | samples/s (median) | per worker | runs | model needs |"]
    lines.append("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for r in results:
        per = r["median"] / max(r["workers"], 1)
        runs = ", ".join(f"{x:.1f}" for x in r["rates"])
        lines.append(
            f"| {r['layout']} | {r['augment']} | {r['workers']} | {r['median']:.1f} | {per:.1f} | {runs} | {need:.0f} |"
        )
    return "\n".join(lines)


def main(args):
    torch.set_num_threads(1)
    start = time.time()
    paths = write_layouts(args)
    gflops = gflops_per_image(args)
    need = args.peak_tflops * 1e3 * args.mfu / gflops
    print(f"# {args.model}, C={args.channels}, {args.input_size} px: {gflops:.1f} GFLOP per training image")
    print(f"# consumes {need:.0f} samples/s at {args.mfu:.0%} MFU of {args.peak_tflops} TFLOP/s")
    print(f"# {args.samples} fields of {args.channels} x {args.field} x {args.field} uint16, batch {args.batch_size}")
    results = []
    for run in args.runs:
        layout, augment = run.split(":")
        for workers in args.workers:
            rates = measure(paths[layout], augment, workers, args)
            results.append(
                dict(layout=layout, augment=augment, workers=workers, rates=rates, median=statistics.median(rates))
            )
            line = f"{layout:10s} aug {augment:6s} workers {workers}: {results[-1]['median']:8.1f} samples/s"
            print(line, flush=True)
    print(markdown(results, need))
    print(f"# {time.time() - start:.0f} s on {torch.get_num_threads()} thread(s) per process, device {args.device}")
    if args.json:
        report = dict(args=vars(args), gflops_per_image=gflops, model_samples_per_s=need, results=results)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
