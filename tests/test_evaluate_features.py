"""evaluate_features.py protocols, bag-of-channels extraction and pretraining, on real IHC crops (issue 16).

Expected values are computed here independently: nearest neighbours and average precision with numpy, the
re-encoded subsets straight from the model.
"""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

import evaluate_features
import extract_features
import main_pretrain
import models_chamae
import models_vit
from util.bag_of_channels import SingleChannelDataset
from util.data.evaluation import eval_dataset
from util.errors import RunError
from util.features import encode
from util.protocols.nearest import chammi_score
from util.protocols.robustness import channel_subsets

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
META = ["--path_metadata", r"plate=(P\d)_", r"well=/(\w+/P\d_w\d+)_"]
CHANNELS = ["R", "G", "B", "H", "E", "DAB"]
pytestmark = pytest.mark.usefixtures("one_thread")


def save_checkpoint(model, path, name, data, **extra):
    args = dict(model=name, input_size=32, patch_size=8, model_kwargs=[f"{k}={v}" for k, v in TINY.items()])
    torch.save({"model": model.state_dict(), "args": {**args, "data_path": str(data), **extra}, "epoch": 0}, path)
    return str(path)


def extract(argv):
    parser = extract_features.get_args_parser()
    return extract_features.main(parser.parse_args([*argv, "--num_workers", "0", "--device", "cpu"]))


def evaluate(argv):
    return evaluate_features.main(evaluate_features.get_args_parser().parse_args([*argv, "--device", "cpu"]))


@pytest.fixture(scope="module")
def ihc(tmp_path_factory):
    """The labelled IHC crops (benchmarks/build_ihc_labelled.py), a tiny ChannelMAE and its features."""
    root = tmp_path_factory.mktemp("ihc")
    data = root / "data"
    build = [sys.executable, "benchmarks/build_ihc_labelled.py", "--out", str(data), "--stride", "32"]
    subprocess.run(build, cwd=ROOT, check=True, capture_output=True)
    torch.manual_seed(0)
    model = models_chamae.create_model("chamae_vit_tiny_patch16", img_size=32, patch_size=8, in_chans=6, **TINY)
    ckpt = save_checkpoint(model, root / "chamae.pth", "chamae_vit_tiny_patch16", data)
    out = root / "features.npz"
    extract(["--resume", ckpt, "--split", "trainval", "--knn_k", "20", *META, "--out", str(out)])
    return Namespace(root=root, data=data, ckpt=ckpt, npz=str(out), z=dict(np.load(out)))


def nearest_labels(train_x, train_y, test_x):
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    return train_y[np.argmax(b @ a.T, axis=1)]


def test_chammi_tasks_hold_out_whole_plates(ihc, tmp_path):
    z = ihc.z
    tasks = {
        "tasks": [
            {"name": "same_plates", "column": "split", "train": ["train"], "test": ["val"]},
            {"name": "P3_held_out", "column": "plate", "test": ["P3"]},
            {"name": "leave_plate_out", "column": "plate", "leave_one_out": True},
        ]
    }
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    out = tmp_path / "r.json"
    argv = [ihc.npz, "--protocol", "chammi", "--tasks", str(tmp_path / "tasks.json"), "--out", str(out)]
    evaluate([*argv, "--scatter", str(tmp_path / "pca.png"), "--colour_by", "label,plate"])
    results = json.loads(out.read_text())["results"]
    x, y, plate = z["features"], z["labels"], z["metadata_plate"]
    assert sorted(set(plate)) == ["P1", "P2", "P3"]
    train, val = z["split"] == "train", z["split"] == "val"
    expected = f1_score(y[val], nearest_labels(x[train], y[train], x[val]), average="macro")
    assert results["same_plates"]["macro_f1"] == pytest.approx(expected)
    held = plate == "P3"
    pred = nearest_labels(x[~held], y[~held], x[held])
    assert results["P3_held_out"]["macro_f1"] == pytest.approx(f1_score(y[held], pred, average="macro"))
    assert results["P3_held_out"]["top1"] == pytest.approx((pred == y[held]).mean() * 100)
    truth, preds = [], []
    for p in ("P1", "P2", "P3"):
        truth.append(y[plate == p])
        preds.append(nearest_labels(x[plate != p], y[plate != p], x[plate == p]))
    loo = f1_score(np.concatenate(truth), np.concatenate(preds), average="macro")
    assert results["leave_plate_out"]["macro_f1"] == pytest.approx(loo)
    assert "CHAMMI_score" not in results and (tmp_path / "pca.png").stat().st_size > 1000


def test_chammi_score_formula():
    f1 = {"WTC_Task_two": 0.6, "HPA_Task_two": 0.3, "hpa3": 0.9, "CP_Task_two": 0.2, "CP-3": 0.5, "CP_Task_four": 0.8}
    results = {name: {"macro_f1": v} for name, v in f1.items()} | {"WTC_Task_one": {"macro_f1": 0.99}}
    assert chammi_score(results) == pytest.approx(0.6 / 3 + (0.3 + 0.9) / 6 + (0.2 + 0.5 + 0.8) / 9)
    del results["CP-3"]
    assert chammi_score(results) is None


def test_knn_protocol_matches_numpy_and_extract(ihc, tmp_path):
    z = ihc.z
    results = evaluate([ihc.npz, "--protocol", "knn", "--out", str(tmp_path / "k.json")])
    train, val = z["split"] == "train", z["split"] == "val"
    pred = nearest_labels(z["features"][train], z["labels"][train], z["features"][val])
    assert results["1nn"]["top1"] == pytest.approx((pred == z["labels"][val]).mean() * 100)
    assert results["20nn_weighted"]["top1"] == pytest.approx(float(z["knn_top1"]))


def average_precisions(x, positives, candidates):
    """AP of each query row q: its positives (bool rows) ranked among candidates (bool rows) by cosine."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    aps = {}
    for q in range(len(x)):
        pool = np.flatnonzero(candidates[q])
        if not positives[q][pool].any():
            continue
        order = pool[np.argsort(-(x[pool] @ x[q]), kind="stable")]
        hits = positives[q][order]
        aps[q] = float(np.mean(np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)))
    return aps


def test_profile_map_matches_numpy(ihc, tmp_path):
    z = ihc.z
    argv = [ihc.npz, "--protocol", "profile", "--treatment_column", "label", "--control", "background"]
    results = evaluate([*argv, "--null_size", "100", "--out", str(tmp_path / "p.json")])
    keys = np.char.add(np.char.add(z["metadata_plate"], "/"), z["metadata_well"])
    wells = np.unique(keys)
    profiles = np.stack([z["features"][keys == w].mean(0) for w in wells]).astype(np.float64)
    plate = np.asarray([w.split("/")[0] for w in wells])
    label = np.asarray([z["classes"][z["labels"][keys == w][0]] for w in wells])
    control = label == "background"
    for p in np.unique(plate):
        ref = profiles[(plate == p) & control]
        std = ref.std(0)
        profiles[plate == p] = (profiles[plate == p] - ref.mean(0)) / np.where(std > 0, std, 1)
    same = label[:, None] == label[None, :]
    not_self = ~np.eye(len(wells), dtype=bool)
    treated = ~control

    def mean_map(aps):
        per_treatment = {t: np.mean([a for q, a in aps.items() if label[q] == t]) for t in set(label[list(aps)])}
        return np.mean(list(per_treatment.values()))

    activity = average_precisions(profiles, same & not_self, (same & not_self) | control[None, :])
    activity = {q: a for q, a in activity.items() if treated[q]}
    assert results["activity"]["map"] == pytest.approx(mean_map(activity))
    sub = profiles[treated]
    label_all, label = label, label[treated]
    same_t = label[:, None] == label[None, :]
    replicates = average_precisions(sub, same_t & ~np.eye(len(sub), dtype=bool), ~np.eye(len(sub), dtype=bool))
    assert results["replicates"]["map"] == pytest.approx(mean_map(replicates))
    assert 0 <= results["activity"]["fraction_retrieved"] <= 1
    assert results["activity"]["n_wells"] == len(wells) and results["activity"]["n_control_wells"] == control.sum()
    assert set(results["activity"]["per_treatment"]) == set(label_all[treated])


def test_channels_protocol_re_encodes_subsets(ihc, tmp_path):
    """ChannelMAE sees only the kept channels; a ViT classifier sees the others zeroed and is scored by its head."""
    z = ihc.z
    out = tmp_path / "c.json"
    argv = [
        ihc.npz,
        "--protocol",
        "channels",
        "--max_subsets",
        "1",
        "--out",
        str(out),
        "--plot",
        str(tmp_path / "c.png"),
    ]
    results = evaluate(argv)
    train, val = z["split"] == "train", z["split"] == "val"
    full = nearest_labels(z["features"][train], z["labels"][train], z["features"][val])
    assert results["k=6"]["top1"] == pytest.approx((full == z["labels"][val]).mean() * 100)
    assert set(results) == {f"k={k}" for k in range(1, 7)} and (tmp_path / "c.png").stat().st_size > 1000
    rows = json.loads(out.read_text())["per_subset"]
    assert [len(r["channels"]) for r in rows] == [1, 2, 3, 4, 5, 6]

    torch.manual_seed(1)
    vit = models_vit.create_model("vit_tiny_patch16", img_size=32, patch_size=8, in_chans=6, num_classes=3, **TINY_ENC)
    ckpt = save_checkpoint(vit, tmp_path / "vit.pth", "vit_tiny_patch16", ihc.data)
    vit_npz = tmp_path / "vit.npz"
    extract(["--resume", ckpt, "--split", "trainval", "--out", str(vit_npz)])
    results = evaluate([str(vit_npz), "--protocol", "channels", "--max_subsets", "1", "--out", str(out)])
    keep = channel_subsets(6, 1)[0]
    datasets = [eval_dataset(Namespace(data_path=str(ihc.data), input_size=32), s) for s in ("train", "val")]
    imgs = torch.stack([datasets[1][i][0] for i in range(len(datasets[1]))])
    zeroed = torch.zeros_like(imgs)
    zeroed[:, list(keep)] = imgs[:, list(keep)]
    with torch.no_grad():
        pred = vit.eval()(zeroed).argmax(1).numpy()
    labels = np.asarray([label for _, label in datasets[1].samples])
    assert results["k=1"]["classifier_top1"] == pytest.approx((pred == labels).mean() * 100)


TINY_ENC = {k: v for k, v in TINY.items() if not k.startswith("decoder")}


def test_bag_of_channels_features_encode_each_channel_alone(ihc, tmp_path):
    out = tmp_path / "boc.npz"
    extract(["--resume", ihc.ckpt, "--split", "val", "--bag_of_channels", "--out", str(out)])
    z = np.load(out)
    dataset = eval_dataset(Namespace(data_path=str(ihc.data), input_size=32), "val")
    assert z["features"].shape == (len(dataset), 6 * 32) and str(z["feature_kind"]) == "bag_of_channels"
    assert "channel_features" not in z.files
    model = models_chamae.create_model("chamae_vit_tiny_patch16", img_size=32, patch_size=8, in_chans=6, **TINY)
    model.load_state_dict(torch.load(ihc.ckpt)["model"])
    model.eval().mask_mode = "independent"
    imgs = torch.stack([dataset[i][0] for i in range(4)])
    for c in (0, 5):
        alone = encode(model, imgs[:, c : c + 1], torch.tensor([c]), "mean")[0].numpy()
        np.testing.assert_allclose(z["features"][:4, c * 32 : (c + 1) * 32], alone, atol=1e-5)

    raw = tmp_path / "raw.npz"
    extract(["--resume", ihc.ckpt, "--split", "val", "--raw_pixels", "8", "--out", str(raw)])
    expected = F.interpolate(imgs, size=(8, 8), mode="bilinear", antialias=True).flatten(1).numpy()
    np.testing.assert_allclose(np.load(raw)["features"][:4], expected, atol=1e-6)


def test_bag_of_channels_pretraining(ihc, tmp_path):
    dataset = SingleChannelDataset(eval_dataset(Namespace(data_path=str(ihc.data), input_size=32), "val"))
    torch.manual_seed(0)
    img, label, name = dataset.draw(3)
    source = dataset.source[3][0]
    assert img.shape == (1, 32, 32) and name in CHANNELS
    assert torch.equal(img[0], source[CHANNELS.index(name)]) and label == dataset.source[3][1]

    out = tmp_path / "run"
    argv = ["--data_path", str(ihc.data), "--input_size", "32", "--patch_size", "8", "--model", "mae_vit_tiny_patch16"]
    argv += ["--bag_of_channels", "--model_kwargs", *[f"{k}={v}" for k, v in TINY.items()], "--epochs", "1"]
    argv += [
        "--batch_size",
        "32",
        "--num_workers",
        "0",
        "--vis_every",
        "0",
        "--output_dir",
        str(out),
        "--device",
        "cpu",
    ]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    ckpt = str(out / "checkpoint-last.pth")
    state = torch.load(ckpt, weights_only=False)
    assert state["model"]["patch_embed.proj.weight"].shape[1] == 1 and state["args"]["bag_of_channels"]

    argv = ["--resume", ckpt, "--split", "val", "--num_workers", "0", "--out", str(tmp_path / "f.npz")]
    with pytest.raises(SystemExit) as failed:
        extract_features.run_main(extract_features.main, extract_features.get_args_parser().parse_args(argv))
    assert str(failed.value.code).startswith("ERROR:") and "--bag_of_channels" in str(failed.value.code)
    extract(["--resume", ckpt, "--split", "val", "--bag_of_channels", "--out", str(tmp_path / "f.npz")])
    assert np.load(tmp_path / "f.npz")["features"].shape == (len(dataset), 6 * 32)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--protocol", "chammi"], "--tasks"),
        (["--protocol", "profile", "--treatment_column", "label"], "--control"),
        (["--protocol", "profile", "--control", "x", "--well_column", "nope"], "no metadata column 'nope'"),
        (["--protocol", "profile", "--treatment_column", "label", "--control", "DMSO"], "'DMSO'"),
        (
            ["--protocol", "profile", "--treatment_column", "label", "--control", "dab", "--well_column", "plate"],
            "mixes",
        ),
    ],
)
def test_bad_input_is_one_error_line(ihc, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_features.run_main(
            evaluate_features.main,
            evaluate_features.get_args_parser().parse_args([ihc.npz, *argv, "--out", str(tmp_path / "r.json")]),
        )
    err = capsys.readouterr().err
    assert exit_info.value.code != 0
    assert message in str(exit_info.value.code) or message in err


def test_flags_are_checked_before_compute(ihc, tmp_path):
    args = main_pretrain.get_args_parser().parse_args(["--bag_of_channels", "--model", "chamae_vit_tiny_patch16"])
    with pytest.raises(RunError, match="--bag_of_channels trains an mae_"):
        main_pretrain.check_flags(args)
    argv = [
        "--resume",
        ihc.ckpt,
        "--split",
        "val",
        "--path_metadata",
        "plate=(Q\\d)_",
        "--out",
        str(tmp_path / "f.npz"),
    ]
    with pytest.raises(RunError, match=r"--path_metadata plate=.* does not match"):
        extract(argv)
    assert not (tmp_path / "f.npz.parts").exists()
