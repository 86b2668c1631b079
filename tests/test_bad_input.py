"""Every bad input of README's "Failure behaviour" table, through the real command line of each tool (issue 18).

The contract, checked for every case: exit status 1, exactly one ``ERROR:`` line on stderr naming the file, flag or
value at fault, no Python traceback, and the checkpoints already in an output directory byte for byte unchanged.

``test_bad_input`` runs all cases with one interpreter start (``tests/cli_runner.py`` forks a child per command
line, which runs the script's ``__main__`` block: the same parsing, checks and exit as ``python script ...``);
``test_bad_input_fresh_process`` (slow) runs each in its own ``python script ...`` process. The checkpoints the
cases need come from real tiny training runs, the first runs of the same batch.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "sample_data")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO}
TINY = ["--input_size", "32", "--patch_size", "8", "--model_kwargs", "embed_dim=32", "depth=1", "num_heads=2"]
TINY_MAE = [*TINY, "decoder_embed_dim=32", "decoder_depth=1", "decoder_num_heads=2", "--vis_every", "0"]
RUN = ["--device", "cpu", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0", "--output_dir", "{out}"]
PRETRAIN = ["main_pretrain.py", *RUN, "--batch_size", "10", "--data_path", "{ihc}", *TINY_MAE]
FINETUNE = ["main_finetune.py", *RUN, "--batch_size", "4", "--data_path", "{digits}", *TINY]
LINPROBE = ["main_linprobe.py", *RUN, "--batch_size", "4", "--data_path", "{digits}", *TINY]
IHC_FINETUNE = ["main_finetune.py", *RUN, "--batch_size", "4", "--data_path", "{ihc_labelled}"]

SETUP = {
    "pretrain_chamae": [*PRETRAIN, "--output_dir", "{runs}/chamae"],
    "pretrain_mae": [*PRETRAIN, "--model", "mae_vit_tiny_patch16", "--output_dir", "{runs}/mae"],
    "finetune": [*FINETUNE, "--output_dir", "{runs}/vit"],
    "finetune_6_channel_mae_on_channel_3": [
        *IHC_FINETUNE,
        *("--finetune", "{runs}/mae/checkpoint-last.pth", "--channels", "3", "--output_dir", "{runs}/mae_ch3"),
    ],
    "extract_metadata": [
        *(
            "extract_features.py",
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--resume",
            "{runs}/chamae/checkpoint-last.pth",
        ),
        *("--data_path", "{csv_metadata}/train.csv", "--metadata_columns", "plate,well", "--out", "{tmp}/meta.npz"),
        *("--channel_names", "R,G"),  # channels the IHC checkpoint knows: an unknown name is an error (issue 14)
    ],
}
"""Real runs whose checkpoints the cases use; each must succeed."""

CHAMAE, MAE, VIT = (
    "{runs}/chamae/checkpoint-last.pth",
    "{runs}/mae/checkpoint-last.pth",
    "{runs}/vit/checkpoint-last.pth",
)
EXTRACT = ["extract_features.py", "--device", "cpu", "--num_workers", "0", "--resume", CHAMAE, "--out", "{tmp}/f.npz"]
STATS = ["-m", "util.data.stats"]

# id: (command line, what the ERROR line must name, the run directory whose checkpoints must stay unchanged)
CASES = {
    # flags: ranges and choices at parse time
    "pretrain-batch_size-0": ([*PRETRAIN, "--batch_size", "0"], ["--batch_size 0", ">= 1"], None),
    "pretrain-mask_ratio-1": ([*PRETRAIN, "--mask_ratio", "1.0"], ["--mask_ratio 1.0"], None),
    "pretrain-mask_ratio-0": ([*PRETRAIN, "--mask_ratio", "0"], ["--mask_ratio 0"], None),
    "pretrain-mask_ratio-negative": ([*PRETRAIN, "--mask_ratio", "-0.1"], ["--mask_ratio -0.1"], None),
    "pretrain-epochs-0": ([*PRETRAIN, "--epochs", "0"], ["--epochs 0"], None),
    "pretrain-accum_iter-0": ([*PRETRAIN, "--accum_iter", "0"], ["--accum_iter 0"], None),
    "pretrain-lr-negative": ([*PRETRAIN, "--lr", "-1"], ["--lr -1"], None),
    "pretrain-decode_ratio-0": ([*PRETRAIN, "--decoder", "cross", "--decode_ratio", "0"], ["--decode_ratio 0"], None),
    "pretrain-seed-negative": ([*PRETRAIN, "--seed", "-1"], ["--seed -1"], None),
    "pretrain-scale-reversed": ([*PRETRAIN, "--scale", "0.9", "0.2"], ["--scale 0.9 0.2"], None),
    "pretrain-num_workers-negative": ([*PRETRAIN, "--num_workers", "-2"], ["--num_workers -2"], None),
    "pretrain-model-unknown": ([*PRETRAIN, "--model", "resnet50"], ["--model", "resnet50"], None),
    "pretrain-flag-unknown": ([*PRETRAIN, "--bogus", "1"], ["--bogus"], None),
    "pretrain-int-not-a-number": ([*PRETRAIN, "--epochs", "ten"], ["--epochs", "ten"], None),
    "finetune-hflip-2": ([*FINETUNE, "--hflip", "2"], ["--hflip 2", "[0, 1]"], None),
    "finetune-drop_path-1.5": ([*FINETUNE, "--drop_path", "1.5"], ["--drop_path 1.5"], None),
    "finetune-smoothing-1": ([*FINETUNE, "--smoothing", "1"], ["--smoothing 1"], None),
    "finetune-nb_classes-0": ([*FINETUNE, "--nb_classes", "0"], ["--nb_classes 0"], None),
    "linprobe-batch_size-0": ([*LINPROBE, "--batch_size", "0"], ["--batch_size 0"], None),
    "visualize-n-0": (["visualize.py", "--resume", CHAMAE, "--n", "0"], ["--n 0"], None),
    "extract-batch_size-0": ([*EXTRACT, "--batch_size", "0"], ["--batch_size 0"], None),
    "extract-knn_k-negative": ([*EXTRACT, "--knn_k", "-1"], ["--knn_k -1"], None),
    "stats-max_samples-0": ([*STATS, "--data_path", "{ihc}", "--max_samples", "0"], ["--max_samples 0"], None),
    "submitit-nodes-0": (["submitit_pretrain.py", "--nodes", "0"], ["--nodes 0"], None),
    # image size and patch size
    "pretrain-input_size-36-patch-8": (
        [*PRETRAIN, "--input_size", "36"],
        ["--input_size 36", "patch size 8"],
        None,
    ),
    "finetune-input_size-36-patch-8": ([*FINETUNE, "--input_size", "36"], ["--input_size 36", "patch size 8"], None),
    "finetune-input_size-36-patch-from-checkpoint": (
        [*IHC_FINETUNE, "--finetune", CHAMAE, "--input_size", "36"],
        ["--input_size 36", "patch size 8", CHAMAE],
        None,
    ),
    "pretrain-resume-input_size-36": (
        [*PRETRAIN, "--output_dir", "{runs}/chamae", "--auto_resume", "--input_size", "36"],
        ["--input_size 36"],
        "{runs}/chamae",
    ),
    # labels and classes, when the dataset is built
    "finetune-empty-label-train-csv": (
        [*FINETUNE, "--data_path", "{csv_empty_train_label}"],
        ["{csv_empty_train_label}/train.csv line 3", "label"],
        None,
    ),
    "finetune-empty-label-val-csv-after-a-checkpoint": (
        [*FINETUNE, "--data_path", "{csv_empty_val_label}", "--output_dir", "{runs}/vit", "--auto_resume"],
        ["{csv_empty_val_label}/val.csv line 2", "label"],
        "{runs}/vit",
    ),
    "finetune-nb_classes-below-classes": ([*FINETUNE, "--nb_classes", "1"], ["--nb_classes 1", "2 classes"], None),
    "finetune-csv-extra-field": (
        [*FINETUNE, "--data_path", "{csv_extra_field}"],
        ["{csv_extra_field}/train.csv line 4", "3 fields"],
        None,
    ),
    "pretrain-csv-metadata-column-read-as-channel": (
        [*PRETRAIN, "--data_path", "{csv_metadata}/train.csv"],
        ["{csv_metadata}/train.csv line 2", "'plate'", "--metadata_columns"],
        None,
    ),
    # checkpoints: kind, family, file
    "finetune-chamae-into-vit": (
        [
            "main_finetune.py",
            *RUN,
            "--data_path",
            "{ihc_labelled}",
            "--finetune",
            CHAMAE,
            "--model",
            "vit_tiny_patch16",
        ],
        [CHAMAE, "channelvit"],
        None,
    ),
    "finetune-resume-pretraining-checkpoint": (
        [*IHC_FINETUNE, "--resume", CHAMAE],
        [CHAMAE, "--finetune"],
        None,
    ),
    "finetune-resume-other-family": (
        [*FINETUNE, "--resume", VIT, "--model", "vit_tiny_patch16"],
        [VIT, "per-channel tokens", "channelvit_*"],
        None,
    ),
    "pretrain-resume-classifier-checkpoint": (
        [*PRETRAIN, "--resume", VIT],
        [VIT, "classifier checkpoint", "main_finetune.py"],
        None,
    ),
    "pretrain-resume-other-family": (
        [*PRETRAIN, "--resume", CHAMAE, "--model", "mae_vit_tiny_patch16"],
        [CHAMAE, "chamae_vit_tiny_patch16", "--model"],
        None,
    ),
    "finetune-from-other-width-shows-the-checkpoints-shape": (
        [*IHC_FINETUNE, "--finetune", MAE, "--channels", "3", *TINY[:4], "--model_kwargs", "embed_dim=64"],
        [MAE, "patch_embed.proj.weight: checkpoint (32, 6, 8, 8), model (64, 1, 8, 8)"],
        None,
    ),
    "pretrain-resume-random-bytes": (
        [*PRETRAIN, "--resume", "{random_bytes}"],
        ["{random_bytes}", "not a checkpoint"],
        None,
    ),
    "pretrain-resume-text-file": (
        [*PRETRAIN, "--resume", "{text_file}"],
        ["{text_file} is a text file, not a checkpoint"],
        None,
    ),
    "finetune-eval-without-resume": ([*FINETUNE, "--eval"], ["--eval", "--resume"], None),
    # tools
    "visualize-mae-with-channel-subset": (
        ["visualize.py", "--device", "cpu", "--resume", MAE, "--channels", "0,1,2", "--out", "{tmp}/r.png"],
        ["--channels 0,1,2", "6"],
        None,
    ),
    "extract-invalid-group_regex": ([*EXTRACT, "--group_regex", "well_(\\d+"], ["--group_regex", "well_(\\d+"], None),
    "extract-unmatched-group_regex": ([*EXTRACT, "--group_regex", "well_(\\d+)"], ["--group_regex", "tile_"], None),
    "stats-bad-path": ([*STATS, "--data_path", "{tmp}/absent"], ["{tmp}/absent"], None),
    "stats-truncated-file": ([*STATS, "--data_path", "{truncated}"], ["{truncated}/01.npy"], None),
    "stats-out-under-a-file": (
        [*STATS, "--data_path", "{ihc}", "--out", "{text_file}/stats.json"],
        ["--out", "{text_file}/stats.json"],
        None,
    ),
    "export-random-bytes": (
        ["export_model.py", "--resume", "{random_bytes}", "--out", "{tmp}/folder"],
        ["{random_bytes} is not a checkpoint"],
        None,
    ),
    "plot_logs-missing-log": (["plot_logs.py", "{tmp}/absent/log.txt", "-o", "{tmp}/c.png"], ["{tmp}/absent"], None),
    "plot_logs-unwritable-out": (
        ["plot_logs.py", "{runs}/vit/log.txt", "-o", "{text_file}/c.png"],
        ["-o {text_file}/c.png"],
        None,
    ),
}


SIGNALLED = {
    "sigterm-without-output_dir": [*PRETRAIN, "--output_dir", "", "--epochs", "50", "--print_freq", "1"],
}
"""Runs that get a SIGTERM once their first training step is logged."""


SIGNALLED = {
    "sigterm-without-output_dir": [*PRETRAIN, "--output_dir", "", "--epochs", "50", "--print_freq", "1"],
}
"""Runs that get a SIGTERM once their first training step is logged."""


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def checkpoints(folder) -> dict:
    """{name: sha256} of the checkpoints in folder."""
    return {name: sha256(os.path.join(folder, name)) for name in sorted(os.listdir(folder)) if name.endswith(".pth")}


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(",".join(row) + "\n" for row in rows))


def digits_rows(split, per_class=4, classes=("0", "1")):
    folder = os.path.join(SAMPLE, "digits", split)
    return [
        [os.path.join(folder, label, name), label]
        for label in classes
        for name in sorted(os.listdir(os.path.join(folder, label)))[:per_class]
    ]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    """The data and files the cases name: {placeholder: path}."""
    root = tmp_path_factory.mktemp("bad_input")
    tiles = sorted(name for name in os.listdir(os.path.join(SAMPLE, "ihc")) if name.endswith(".tif"))[:20]
    (root / "ihc").mkdir()
    for name in [*tiles, "channel_stats.json", "channels.txt"]:
        shutil.copy(os.path.join(SAMPLE, "ihc", name), root / "ihc" / name)
    labelled = [[str(root / "ihc" / name), "ab"[i % 2]] for i, name in enumerate(tiles)]
    for split, rows in (("train", labelled[:12]), ("val", labelled[12:])):
        write_csv(root / "ihc_labelled" / f"{split}.csv", [["path", "label"], *rows])
    shutil.copy(os.path.join(SAMPLE, "ihc", "channel_stats.json"), root / "ihc_labelled")
    train, val = digits_rows("train"), digits_rows("val", 2)
    for split, rows in (("train", train), ("val", val)):
        write_csv(root / "digits" / f"{split}.csv", [["path", "label"], *rows])
    variants = {
        "csv_empty_train_label": ([*train[:1], [train[1][0], ""], *train[2:]], val),
        "csv_empty_val_label": (train, [[val[0][0], ""], *val[1:]]),
        "csv_extra_field": ([*train[:2], [*train[2], "x"], *train[3:]], val),
    }
    for name, (train_rows, val_rows) in variants.items():
        for split, rows in (("train", train_rows), ("val", val_rows)):
            write_csv(root / name / f"{split}.csv", [["path", "label"], *rows])
    rng = np.random.default_rng(0)
    (root / "csv_metadata").mkdir()
    rows = [["DNA", "RNA", "plate", "well"]]
    for i in range(4):
        for channel in ("DNA", "RNA"):
            np.save(root / "csv_metadata" / f"s{i}_{channel}.npy", rng.normal(size=(32, 32)).astype(np.float32))
        rows.append([f"s{i}_DNA.npy", f"s{i}_RNA.npy", "P1", f"A0{i}"])
    write_csv(root / "csv_metadata" / "train.csv", rows)
    (root / "truncated").mkdir()
    for i in range(3):
        np.save(root / "truncated" / f"{i:02d}.npy", rng.normal(size=(1, 32, 32)).astype(np.float32))
    data = (root / "truncated" / "01.npy").read_bytes()
    (root / "truncated" / "01.npy").write_bytes(data[: len(data) // 2])
    (root / "random.pth").write_bytes(rng.bytes(4096))
    (root / "text.pth").write_text("epoch 3, loss 0.61\n")
    (root / "tmp").mkdir()
    return {
        "ihc": str(root / "ihc"),
        "ihc_labelled": str(root / "ihc_labelled"),
        "digits": str(root / "digits"),
        **{name: str(root / name) for name in (*variants, "csv_metadata", "truncated")},
        "random_bytes": str(root / "random.pth"),
        "text_file": str(root / "text.pth"),
        "runs": str(root / "runs"),
        "tmp": str(root / "tmp"),
    }


def resolve(items, paths, case: str = "") -> list[str]:
    """The items with the placeholders of ``paths`` filled in; {out}: the case's own output directory."""
    return [item.format(out=os.path.join(paths["tmp"], "out", case), **paths) for item in items]


def check_contract(case: str, status: int, stderr: str, paths: dict, saved: dict | None):
    _, names, run_dir = CASES[case]
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert status == 1, f"exit status {status}\n{stderr[-3000:]}"
    assert len(errors) == 1, f"{len(errors)} ERROR lines:\n{stderr[-3000:]}"
    message = stderr[stderr.index(errors[0]) :]  # the ERROR line and the lines of the same message under it
    for name in resolve(names, paths):
        assert name in message, f"{name!r} not in {message!r}"
    if run_dir is not None:
        assert checkpoints(run_dir.format(**paths)) == saved, "a checkpoint already saved changed"


@pytest.fixture(scope="module")
def batch(paths):
    """(exit statuses, saved checkpoints before the cases) of SETUP then CASES, run by tests/cli_runner.py."""
    out = os.path.join(paths["tmp"], "logs")
    os.makedirs(out)
    setup = [{"argv": resolve(argv, paths), "out": os.path.join(out, name)} for name, argv in SETUP.items()]
    proc = subprocess.run(
        [sys.executable, "tests/cli_runner.py"],
        input=json.dumps(setup),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    statuses = json.loads(proc.stdout.splitlines()[-1])
    for name in SETUP:
        prefix = os.path.join(out, name)
        assert statuses[prefix] == 0, open(prefix + ".err").read()[-3000:]
    saved = {case: checkpoints(run_dir.format(**paths)) for case, (_, _, run_dir) in CASES.items() if run_dir}
    runs = [
        {"argv": resolve(argv, paths, case), "out": os.path.join(out, case)} for case, (argv, _, _) in CASES.items()
    ]
    runs += [
        {"argv": resolve(argv, paths, name), "out": os.path.join(out, name), "signal_at": "Epoch: [0]"}
        for name, argv in SIGNALLED.items()
    ]
    proc = subprocess.run(
        [sys.executable, "tests/cli_runner.py"],
        input=json.dumps(runs),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), saved


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, batch, paths):
    statuses, saved = batch
    prefix = os.path.join(paths["tmp"], "logs", case)
    with open(prefix + ".err") as f:
        stderr = f.read()
    check_contract(case, statuses[prefix], stderr, paths, saved.get(case))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_bad_input_fresh_process(case, batch, paths):
    saved = checkpoints(CASES[case][2].format(**paths)) if CASES[case][2] else None
    argv = resolve(CASES[case][0], paths, case + "-fresh")
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    check_contract(case, proc.returncode, proc.stderr, paths, saved)


# ----------------------------------------------------------------------------------------------- what now works


def test_metadata_columns_reach_the_features(batch, paths):
    """A per-channel CSV whose plate and well columns are declared metadata: two channels, and the .npz of
    extract_features.py holds one array per metadata column, aligned with the rows' paths."""
    with np.load(os.path.join(paths["tmp"], "meta.npz")) as f:
        assert list(f["metadata_columns"]) == ["plate", "well"]
        assert f["features"].shape[0] == 4 and list(f["channel_ids"]) == [0, 1]
        assert [p.split("|")[0].rsplit("/", 1)[1] for p in f["paths"]] == [f"s{i}_DNA.npy" for i in range(4)]
        assert list(f["metadata_well"]) == ["A00", "A01", "A02", "A03"] and set(f["metadata_plate"]) == {"P1"}


def write_per_channel_csv(root, header, rows):
    rng = np.random.default_rng(1)
    root.mkdir()
    for row in rows:
        for name in row[:2]:
            np.save(root / name, rng.normal(size=(1, 16, 16)).astype(np.float32))
    write_csv(root / "train.csv", [header, *rows])


def test_metadata_columns_by_prefix_declaration_and_path_layout(tmp_path):
    from util.data.builders import build_pretrain_dataset
    from util.data.config import DataConfig
    from util.data.errors import DatasetError

    rows = [[f"a{i}.npy", f"b{i}.npy", "P1", f"A0{i}"] for i in range(3)]
    write_per_channel_csv(tmp_path / "prefix", ["DNA", "RNA", "Metadata_Plate", "Metadata_Well"], rows)
    (tmp_path / "prefix" / "b1.npy").write_bytes(b"\x93NUMPY")  # corrupt: dropped with --skip_bad_samples
    config = DataConfig(data_path=str(tmp_path / "prefix" / "train.csv"), input_size=16, skip_bad_samples=True)
    dataset = build_pretrain_dataset(config)
    assert dataset.in_chans == 2 and len(dataset) == 2
    assert dataset.metadata == {"Metadata_Plate": ["P1", "P1"], "Metadata_Well": ["A00", "A02"]}

    write_per_channel_csv(tmp_path / "declared", ["DNA", "RNA", "plate", "site"], rows)
    config = DataConfig(data_path=str(tmp_path / "declared"), input_size=16, metadata_columns="plate,site")
    assert build_pretrain_dataset(config).metadata == {"plate": ["P1"] * 3, "site": ["A00", "A01", "A02"]}
    with pytest.raises(DatasetError, match=r"--metadata_columns names \['well'\], which .*train.csv lacks"):
        build_pretrain_dataset(DataConfig(data_path=str(tmp_path / "declared"), metadata_columns="plate,well"))

    write_csv(tmp_path / "declared" / "paths.csv", [["path", "well"], *[[row[0], row[3]] for row in rows]])
    dataset = build_pretrain_dataset(DataConfig(data_path=str(tmp_path / "declared" / "paths.csv"), input_size=16))
    assert dataset.in_chans == 1 and dataset.metadata == {"well": ["A00", "A01", "A02"]}


def test_resolved_arguments_and_tensorboard_axis(batch, paths):
    """The arguments dump shows the patch size taken from the checkpoint; the test scalars of an epoch sit on the
    x axis where its last training scalars are (1000 x epochs done)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open(os.path.join(paths["tmp"], "logs", "finetune_6_channel_mae_on_channel_3.out")) as f:
        out = f.read()
    assert '"patch_size": 8' in out and "From the checkpoint" in out and "--patch_size 8" in out
    events = EventAccumulator(os.path.join(paths["runs"], "vit"))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in ("train_loss", "lr", "test_acc1", "test_loss")}
    assert steps["train_loss"][-1] == steps["lr"][-1] == 1000  # 1 epoch: the last training scalars at x = 1000
    assert steps["test_acc1"] == steps["test_loss"] == [1000]


def test_sigterm_without_output_dir_says_nothing_was_saved(batch, paths):
    statuses, _ = batch
    prefix = os.path.join(paths["tmp"], "logs", "sigterm-without-output_dir")
    with open(prefix + ".err") as f:
        stderr = f.read()
    assert statuses[prefix] == 128 + signal.SIGTERM, stderr[-3000:]
    assert "nothing was saved (--output_dir is '')" in stderr and "saved the checkpoint" not in stderr


def test_help_shows_every_default(capsys):
    import extract_features
    import main_finetune
    import main_linprobe
    import main_pretrain
    import plot_logs
    import visualize

    parsers = [m.get_args_parser() for m in (main_pretrain, main_finetune, main_linprobe, extract_features, visualize)]
    for parser in [*parsers, plot_logs.get_args_parser()]:
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, [], "==SUPPRESS=="):
                shown = f"default: {action.default}" in text or "default" in (action.help or "").lower()
                assert shown, f"{parser.prog}: {action.option_strings[0]} does not show its default"
    assert "--batch_size BATCH_SIZE batch size per process (default: 64)" in " ".join(parsers[0].format_help().split())


@pytest.mark.slow
def test_local_submitit_job_folder_is_not_a_literal_percent_j(tmp_path):
    from util import submit

    argv = ["--cluster", "local", "--ngpus", "0", "--job_dir", str(tmp_path / "%j"), "--data_path", "absent"]
    job = submit.submit("main_pretrain", submit.parse_args(__import__("main_pretrain").get_args_parser(), "t", argv))
    job.wait()
    folders = os.listdir(tmp_path)
    assert len(folders) == 1 and folders[0].startswith("local-"), folders
    assert "--data_path absent does not exist" in job.stderr()
