"""Throughput of multi-source pretraining (per-source batches, ``util.loaders.SourceBatchSampler``) against a
single source of the same size, through main_pretrain.py.

    python benchmarks/bench_mix.py                      # CPU, tiny ChannelMAE, 3 repeats
    python benchmarks/bench_mix.py --device cuda --batch_size 64 --embed_dim 192 --depth 12 --epochs 6

single:       one CSV index of 179 samples cycling through the ihc tiles (6 channels), one source.
two sources:  the same 179 samples split into two CSV sources whose channels have different names (R..DAB and
              R'..DAB'), so 12 embedding rows and per-source batches, but the very same pixels to read and
              compute: the difference to `single` is the cost of the per-source batching alone.
real mix:     sample_data/ihc (R,G,B,H,E,DAB) + sentinel2 + landsat7 (blue..swir2), 179 samples of 6 channels;
              the satellite tiles are 32 x 32 files where the ihc ones are 64 x 64, so reading is cheaper.
Each run trains ``--epochs`` epochs; the per-step time of every epoch but the first (``s / it`` of the progress
printer: data loading and the step, as in training) is collected, and the table shows the median over epochs and
repeats, the configurations run alternately. Also printed: the mixed run's per-source losses of its last epoch.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
MIXED = [SAMPLE / "ihc", SAMPLE / "sentinel2", SAMPLE / "landsat7"]
STEP_TIME = re.compile(r"Epoch: \[(\d+)\] Total time: \S+ \(([\d.]+) s / it\)")


def ihc_csv(folder: Path, rows: range, suffix: str = "") -> Path:
    """A CSV source of the ihc tiles ``rows`` (cycling), with its statistics and channel names + ``suffix``."""
    tiles = sorted((SAMPLE / "ihc").glob("*.tif"))
    folder.mkdir(parents=True)
    path = folder / "index.csv"
    path.write_text("path\n" + "".join(f"{tiles[i % len(tiles)]}\n" for i in rows))
    names = (SAMPLE / "ihc" / "channels.txt").read_text().split()
    (folder / "channels.txt").write_text("".join(f"{name}{suffix}\n" for name in names))
    (folder / "channel_stats.json").write_text((SAMPLE / "ihc" / "channel_stats.json").read_text())
    return path


def train(data_paths, output_dir: Path, args) -> tuple[list[float], list[dict]]:
    """(seconds per step of each epoch after the first, log.txt entries) of one main_pretrain.py run."""
    cmd = [
        sys.executable,
        str(ROOT / "main_pretrain.py"),
        "--device",
        args.device,
        "--data_path",
        *map(str, data_paths),
    ]
    cmd += ["--epochs", str(args.epochs), "--warmup_epochs", "1", "--batch_size", str(args.batch_size)]
    cmd += ["--input_size", "32", "--patch_size", "8", "--num_workers", str(args.num_workers), "--vis_every", "0"]
    cmd += ["--output_dir", str(output_dir), "--print_freq", "1000", "--model_kwargs", f"embed_dim={args.embed_dim}"]
    cmd += [f"depth={args.depth}", "num_heads=2", "decoder_embed_dim=32", "decoder_depth=1", "decoder_num_heads=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"ERROR: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    times = [float(t) for epoch, t in STEP_TIME.findall(proc.stdout) if int(epoch) > 0]
    log = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]
    return times, log


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", default=4, type=int)
    parser.add_argument("--repeats", default=3, type=int)
    parser.add_argument("--batch_size", default=16, type=int)
    parser.add_argument("--embed_dim", default=64, type=int)
    parser.add_argument("--depth", default=2, type=int)
    parser.add_argument("--num_workers", default=0, type=int)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total = 179
        halves = [ihc_csv(tmp / "a", range(90)), ihc_csv(tmp / "b", range(90, total), "'")]
        configs = {"single": [ihc_csv(tmp / "single", range(total))], "two sources": halves, "real mix": MIXED}
        times = {name: [] for name in configs}
        logs = {}
        for repeat in range(args.repeats):
            for name, paths in configs.items():
                step_times, logs[name] = train(paths, tmp / f"{name.replace(' ', '_')}{repeat}", args)
                times[name] += step_times
    rows = []
    for name, values in times.items():
        ms = 1000 * statistics.median(values)
        rows.append(dict(config=name, sources=len(configs[name]), samples=total, ms_per_step=ms))
    base = rows[0]["ms_per_step"]
    print(f"| config | sources | samples | ms / step (median of {len(times['single'])}) | images / s | vs single |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        row["images_per_s"] = args.batch_size / row["ms_per_step"] * 1000
        row["relative"] = row["ms_per_step"] / base
        print(
            f"| {row['config']} | {row['sources']} | {row['samples']} | {row['ms_per_step']:.2f} | "
            f"{row['images_per_s']:.0f} | {row['relative']:.3f} |"
        )
    per_source = {k: round(v, 4) for k, v in logs["real mix"][-1].items() if k.startswith("train_loss")}
    print(f"real mix, epoch {logs['real mix'][-1]['epoch']} losses: {per_source}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "mixed_losses": per_source}, indent=2) + "\n")


if __name__ == "__main__":
    main()
