"""Unit tests of the training utilities: checkpoints, RNG state, metric logging, AMP scaler, schedules, LARS,
layer-wise lr decay."""

import argparse
import fractions
import io
import math
import os
import random

import numpy as np
import pytest
import torch
from timm.optim import Lars, param_groups_layer_decay

import models_vit
import util.lr_sched as lr_sched
from util.amp import NativeScaler, autocast, resolve_amp
from util.checkpoint import atomic_save, find_latest_checkpoint, load_checkpoint, load_model, save_model
from util.cli import add_common_args, parse_model_kwargs
from util.lars import LARS
from util.metric_log import LossTracker, MetricLogger, NonFiniteLossError, SmoothedValue, log_train_step
from util.rng import get_rng_state, set_rng_state


def tiny_args(tmp_path, **overrides):
    args = add_common_args(argparse.ArgumentParser()).parse_args(["--output_dir", str(tmp_path)])
    args.epochs, args.save_every, args.distributed = 10, 3, False
    vars(args).update(overrides)
    return args


def save(args, epoch, model=None, **kwargs):
    model = model or torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = NativeScaler(torch.device("cpu"), "none")
    return save_model(args, epoch, model, optimizer, scaler, **kwargs)


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_plain_and_loads_with_weights_only(tmp_path):
    args = tiny_args(tmp_path, mean=[0.5], model_kwargs=["depth=1"], some_path=tmp_path)
    path = save(args, 0, extra={"max_accuracy": 12.5})
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) >= {"model", "optimizer", "scaler", "epoch", "args", "rng", "max_accuracy"}
    assert isinstance(checkpoint["args"], dict) and not isinstance(checkpoint["args"], argparse.Namespace)
    assert checkpoint["args"]["mean"] == [0.5] and checkpoint["args"]["some_path"] == str(tmp_path)
    assert checkpoint["epoch"] == 0 and len(checkpoint["rng"]) == 1
    assert load_checkpoint(path)["max_accuracy"] == 12.5


def test_save_every_and_final_epoch(tmp_path):
    args = tiny_args(tmp_path)
    for epoch in range(args.epochs):
        save(args, epoch)
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "checkpoint-2.pth",
        "checkpoint-5.pth",
        "checkpoint-8.pth",
        "checkpoint-9.pth",
        "checkpoint-last.pth",
    ]
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["epoch"] == 9
    assert torch.load(tmp_path / "checkpoint-5.pth", weights_only=True)["epoch"] == 5
    assert not any(name.endswith(".tmp") for name in names)


def test_atomic_save_failure_keeps_previous_file(tmp_path):
    path = str(tmp_path / "checkpoint-last.pth")
    atomic_save({"epoch": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        atomic_save({"epoch": 2, "bad": lambda: None}, path)
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_find_latest_checkpoint(tmp_path):
    assert find_latest_checkpoint(str(tmp_path)) is None
    assert find_latest_checkpoint(str(tmp_path / "missing")) is None
    for name in ("checkpoint-2.pth", "checkpoint-10.pth", "checkpoint-11.pth.tmp", "checkpoint-best.pth"):
        (tmp_path / name).write_bytes(b"")
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10.pth")
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")


def test_load_model_restores_state_and_rng(tmp_path):
    args = tiny_args(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_model(args, 4, model, optimizer, NativeScaler(torch.device("cpu"), "none"))
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002 (the global RNG is restored)

    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    resume_args = tiny_args(tmp_path, auto_resume=True)
    load_model(resume_args, fresh, fresh_optimizer, NativeScaler(torch.device("cpu"), "none"))
    assert resume_args.start_epoch == 5 and resume_args.resume.endswith("checkpoint-last.pth")
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    got = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_rng_state_round_trip_through_weights_only_pickle():
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002 - the legacy global RNG is what the checkpoint stores
    torch.manual_seed(1)
    buffer = io.BytesIO()
    torch.save(get_rng_state(), buffer)
    before = (torch.randn(2), np.random.randn(2), random.gauss(0, 1))  # noqa: NPY002
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    after = (torch.randn(2), np.random.randn(2), random.gauss(0, 1))  # noqa: NPY002
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_unsafe_load_is_needed_for_pickled_objects(tmp_path):
    path = str(tmp_path / "fraction.pth")
    torch.save({"args": fractions.Fraction(1, 3)}, path)
    with pytest.raises(RuntimeError, match="--unsafe_load"):
        load_checkpoint(path)
    assert load_checkpoint(path, unsafe=True)["args"] == fractions.Fraction(1, 3)


def test_namespace_args_load_without_unsafe(tmp_path):
    """Published fine-tuned MAE checkpoints store 'args' as an argparse.Namespace, which is allowed."""
    path = str(tmp_path / "ns.pth")
    torch.save({"args": argparse.Namespace(a=1)}, path)
    assert load_checkpoint(path)["args"].a == 1


# ----------------------------------------------------------------------------------------------- logging


def test_smoothed_value_and_metric_logger(capsys):
    meter = SmoothedValue(window_size=2)
    for value in (1.0, 2.0, 6.0):
        meter.update(value)
    meter.update(3.0, n=3)
    assert meter.median == 4.5 and meter.max == 6.0 and meter.value == 3.0
    assert meter.global_avg == pytest.approx((1 + 2 + 6 + 9) / 6)

    logger = MetricLogger()
    seen = list(logger.log_every(range(5), print_freq=2, header="Epoch: [3]"))
    logger.update(loss=(2.0, 4), lr=torch.tensor(0.5))
    assert seen == list(range(5)) and logger.loss.global_avg == 2.0 and logger.lr.value == 0.5
    out = capsys.readouterr().out
    assert out.count("Epoch: [3] [") == 3 and "eta: " in out and "Total time" in out


def test_loss_tracker_reports_mean_and_first_bad_step():
    tracker = LossTracker(torch.device("cpu"), epoch=7)
    for step, value in enumerate((1.0, 2.0, 3.0)):
        tracker.update(torch.tensor(value), step)
    assert tracker.flush() == {"loss": (2.0, 3)}
    for step, value in ((3, 1.0), (4, math.nan), (5, math.inf)):
        tracker.update(torch.tensor(value), step)
    with pytest.raises(NonFiniteLossError, match="epoch 7, step 4"):
        tracker.flush()


def test_loss_tracker_averages_finite_grad_norms_of_optimizer_steps():
    """None on accumulation steps; an fp16 step skipped by the scaler has an infinite norm and is left out."""
    tracker = LossTracker(torch.device("cpu"), epoch=0)
    for step, norm in enumerate((None, 3.0, None, math.inf, None, 5.0)):
        tracker.update(torch.tensor(1.0), step, None if norm is None else torch.tensor(norm))
    assert tracker.flush() == {"loss": (1.0, 6), "grad_norm": (4.0, 2)}
    tracker.update(torch.tensor(1.0), 6)
    assert tracker.flush() == {"loss": (1.0, 1)}


def test_log_train_step_logs_grad_norm_like_the_loss():
    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

    tracker = LossTracker(torch.device("cpu"), epoch=2)
    logger, writer = MetricLogger(), Writer()
    for step in range(4):
        tracker.update(torch.tensor(float(step)), step, torch.tensor(10.0 * step))
        log_train_step(step, 4, 2, 0.1, tracker, logger, writer, print_freq=2)
    assert writer.scalars == {"train_loss": (3.0, 3000), "train_grad_norm": (30.0, 3000), "lr": (0.1, 3000)}
    assert logger.grad_norm.global_avg == pytest.approx(15.0) and logger.loss.global_avg == pytest.approx(1.5)


def test_parse_model_kwargs():
    assert parse_model_kwargs(["depth=2", "qkv_bias=False", "act=gelu", "r=0.5"]) == {
        "depth": 2,
        "qkv_bias": False,
        "act": "gelu",
        "r": 0.5,
    }
    with pytest.raises(argparse.ArgumentTypeError):
        parse_model_kwargs(["depth"])


def test_float_list_flags():
    parser = add_common_args(argparse.ArgumentParser())
    assert parser.parse_args(["--mean", "1,2", "3"]).mean == [1.0, 2.0, 3.0]
    assert parser.parse_args(["--std", "0.5"]).std == [0.5]


# ----------------------------------------------------------------------------------------------- AMP / optimisation


def test_resolve_amp_defaults():
    assert resolve_amp(None, torch.device("cpu")) == "none"
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError):
        resolve_amp("fp8", torch.device("cpu"))


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_native_scaler_clips_and_accumulates(amp):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = NativeScaler(torch.device("cpu"), amp)
    x = torch.randn(8, 4) * 100
    with autocast(torch.device("cpu"), amp):
        loss = model(x).float().pow(2).mean()
    assert scaler(loss, optimizer, parameters=model.parameters(), update_grad=False) is None
    grads = [p.grad.clone() for p in model.parameters()]
    norm = scaler(loss.detach().requires_grad_(), optimizer, clip_grad=1.0, parameters=model.parameters())
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert float(norm) == pytest.approx(float(expected), rel=1e-5)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(clipped) == pytest.approx(1.0, rel=1e-4)


def test_lr_schedule_warmup_then_cosine():
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=6)
    group = {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}
    optimizer = torch.optim.SGD([group, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.0)
    assert lr_sched.adjust_learning_rate(optimizer, 1.0, args) == pytest.approx(0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.25, 0.5])
    assert lr_sched.lr_at(2.0, args) == pytest.approx(1.0)
    assert lr_sched.lr_at(4.0, args) == pytest.approx(0.55)
    assert lr_sched.lr_at(6.0, args) == pytest.approx(0.1)


def test_lars_semantics():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    bias = torch.nn.Parameter(torch.randn(3))
    weight.grad, bias.grad = torch.randn(3, 4), torch.randn(3)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9).step()
    update = weight.grad + 0.1 * w0
    trust = 0.001 * w0.norm() / update.norm()
    assert torch.allclose(weight, w0 - 0.5 * trust * update)
    assert torch.allclose(bias, b0 - 0.5 * bias.grad)  # 1-D: no weight decay, no trust ratio


def mae_lars_reference(w, grads, lr, weight_decay, momentum, trust_coefficient=1e-3):
    """The MAE LARS rule on one weight matrix, written out: the weight after one step per gradient."""
    buf = None
    for g in grads:
        update = g + weight_decay * w
        if w.norm() > 0 and update.norm() > 0:
            update = update * trust_coefficient * w.norm() / update.norm()
        buf = update if buf is None else momentum * buf + update
        w = w - lr * buf
    return w


def step_ours_and_timm(w, b, grads, lr, weight_decay, momentum=0.9):
    """Step our LARS and timm's Lars (ndim > 1: always adapting; ndim <= 1: plain momentum SGD, eps=0) from (w, b)."""
    ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    theirs = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    lars = LARS(ours, lr=lr, weight_decay=weight_decay, momentum=momentum)
    timm_groups = [
        dict(params=[theirs[0]], weight_decay=weight_decay, always_adapt=True),
        dict(params=[theirs[1]], weight_decay=0.0, always_adapt=False),
    ]
    timm_lars = Lars(timm_groups, lr=lr, momentum=momentum, trust_coeff=1e-3, eps=0.0)
    for g_w, g_b in grads:
        for p, g in zip(ours + theirs, (g_w, g_b, g_w, g_b)):
            p.grad = g.clone()
        lars.step()
        timm_lars.step()
    return ours, theirs


def test_lars_vs_timm():
    """timm's Lars steps like ours without weight decay, and not with it (util/lars.py says why LARS is kept)."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    w, b = torch.randn(5, 16, **f64), torch.randn(5, **f64)
    grads = [(torch.randn(5, 16, **f64), torch.randn(5, **f64)) for _ in range(2)]
    ours, theirs = step_ours_and_timm(w, b, grads, lr=0.5, weight_decay=0.0)
    torch.testing.assert_close(ours[0].detach(), mae_lars_reference(w, [g for g, _ in grads], 0.5, 0.0, 0.9))
    torch.testing.assert_close(ours[1].detach(), b - 0.5 * (1.9 * grads[0][1] + grads[1][1]))
    for mine, timm_param in zip(ours, theirs):
        torch.testing.assert_close(mine, timm_param)
    # g orthogonal to w, weight decay 1: ||g + w|| = 5, but timm divides by ||g|| + ||w|| = 7
    w, g, zero = torch.tensor([[3.0, 0.0]], **f64), torch.tensor([[0.0, 4.0]], **f64), torch.zeros(1, **f64)
    ours, theirs = step_ours_and_timm(w, zero, [(g, zero)], lr=1.0, weight_decay=1.0)
    step = 1e-3 * 3.0 * torch.tensor([[3.0, 4.0]], **f64)
    torch.testing.assert_close(ours[0].detach(), w - step / 5.0)
    torch.testing.assert_close(theirs[0].detach(), w - step / 7.0)


# ----------------------------------------------------------------------------------------------- layer decay


def expected_lr_scale_and_wd(name, param, depth, decay, wd, no_wd):
    """The layer-decay rule of MAE fine-tuning, written out: tokenizer 0, blocks.i i + 1, the rest depth + 1."""
    if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "channel_embed"):
        layer_id = 0
    elif name.startswith("blocks."):
        layer_id = int(name.split(".")[1]) + 1
    else:
        layer_id = depth + 1
    return decay ** (depth + 1 - layer_id), 0.0 if param.ndim == 1 or name in no_wd else wd


@pytest.mark.parametrize("name", ["vit_tiny_patch16", "channelvit_tiny_patch16"])
@pytest.mark.parametrize("global_pool", [False, True])
def test_layer_decay_groups(name, global_pool):
    """timm's param_groups_layer_decay with our group_matcher: the lr_scale and weight decay of each parameter."""
    depth, decay, wd = 12, 0.5, 0.05
    model = models_vit.create_model(
        name, img_size=16, patch_size=8, embed_dim=8, depth=depth, num_heads=2, num_classes=5, global_pool=global_pool
    )
    model.blocks[3].mlp.fc1.weight.requires_grad = False
    groups = param_groups_layer_decay(model, wd, model.no_weight_decay(), layer_decay=decay)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(by_param)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(by_param) == len(trainable)
    for param_name, param in trainable:
        group = by_param[id(param)]
        lr_scale, weight_decay = expected_lr_scale_and_wd(param_name, param, depth, decay, wd, model.no_weight_decay())
        assert (group["lr_scale"], group["weight_decay"]) == (pytest.approx(lr_scale), weight_decay), param_name
    assert by_param[id(model.head.weight)]["lr_scale"] == 1.0
    assert by_param[id(model.blocks[10].attn.qkv.weight)]["lr_scale"] == pytest.approx(decay**2)
    assert by_param[id(model.patch_embed.proj.weight)]["lr_scale"] == pytest.approx(decay ** (depth + 1))
