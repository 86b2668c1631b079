"""Reduced precision never changes what a loss means: every reduction that defines a loss runs in float32.

The autocast checks run half-precision matmuls, so they run in a subprocess with oneDNN capped below AMX (virtual
machines that report AMX without enabling it die of SIGILL otherwise; see tests/test_training.py).
"""

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy

import engine_finetune
import models_chamae
import models_vit
from util.amp import NativeScaler, autocast
from util.trainer import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = dict(embed_dim=8, depth=1, num_heads=1, mlp_ratio=1.0)
TINY = dict(**TINY_VIT, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=1)
FP16_MAX = 65504
LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}


def tiny_chamae(**kwargs):
    """4 channels of 16 px in patches of 4: 64 tokens of 16 pixels per image, 48 of them masked at ratio 0.75."""
    return models_chamae.create_model(
        "chamae_vit_tiny_patch16", img_size=16, patch_size=4, in_chans=4, **{**TINY, **kwargs}
    )


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_loss_normaliser_and_sums_stay_float32(amp, norm_pix_loss):
    """A low-precision prediction and decoded-token mask (as autocast makes them), 70,400 decoded tokens: fp16
    cannot hold the count (it was inf: loss 0) and bf16 rounds it to 70,656; the loss is the float64 one."""
    model = tiny_chamae(norm_pix_loss=norm_pix_loss)
    torch.manual_seed(0)
    imgs = torch.randn(1100, 4, 16, 16)
    dtype = LOW_PRECISION[amp]
    pred = torch.randn(1100, 64, 16).to(dtype)
    decoded = torch.ones(1100, 64, dtype=dtype)
    assert 1100 * 64 > FP16_MAX
    loss = model.forward_loss(imgs, pred, decoded)
    target = model.patchify(imgs).double()
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = ((pred.double() - target) ** 2).mean()
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def autocast_losses() -> dict:
    """{decoder: {amp: loss}}: the pretraining loss of a tiny ChannelMAE on 1,400 images (67,200 decoded tokens)
    under CPU autocast, for both decoders, with the same weights, images and masks for every precision."""
    torch.manual_seed(0)
    imgs = torch.randn(1400, 4, 16, 16)
    losses = {}
    for decoder in ("full", "cross"):
        torch.manual_seed(1)
        model = tiny_chamae(decoder=decoder)
        losses[decoder] = {}
        for amp in ("none", "fp16", "bf16"):
            torch.manual_seed(2)
            with torch.no_grad(), autocast(torch.device("cpu"), amp):
                loss, pred, mask = model(imgs, mask_ratio=0.75)
            assert int(mask.sum()) == 1400 * 48 > FP16_MAX
            assert pred.dtype == (LOW_PRECISION[amp] if amp != "none" else torch.float32)
            losses[decoder][amp] = float(loss)
    return losses


def finetune_criterion() -> dict:
    """One fp16-autocast fine-tuning epoch (2 steps) of a tiny ChannelViT through engine_finetune: the dtypes the
    criterion saw and returned, and the epoch's stats."""
    torch.manual_seed(0)
    model = models_vit.create_model(
        "channelvit_tiny_patch16", img_size=32, patch_size=8, in_chans=2, num_classes=5, **TINY_VIT
    )
    seen = []

    def criterion(outputs, targets):
        loss = LabelSmoothingCrossEntropy(smoothing=0.1)(outputs, targets)
        seen.append((str(outputs.dtype), str(loss.dtype)))
        return loss

    data = torch.utils.data.TensorDataset(torch.randn(8, 2, 32, 32), torch.randint(0, 5, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    args = Namespace(
        print_freq=1, accum_iter=1, amp="fp16", lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=1, clip_grad=None
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = NativeScaler(torch.device("cpu"), "fp16")
    state = TrainState(args, model, model, optimizer, scaler, torch.device("cpu"))
    stats = engine_finetune.train_one_epoch(state, loader, 0, criterion)
    return {"seen": seen, "stats": stats}


@pytest.fixture(scope="module")
def capped():
    """autocast_losses() and finetune_criterion(), run in one subprocess with oneDNN capped below AMX."""
    code = f"import json, sys; sys.path[:0] = {[REPO, os.path.dirname(__file__)]!r}; import test_precision as t; "
    code += "print(json.dumps(dict(losses=t.autocast_losses(), finetune=t.finetune_criterion())))"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
@pytest.mark.parametrize("decoder", ["full", "cross"])
def test_autocast_loss_matches_fp32_beyond_fp16_range(capped, decoder, amp):
    """More decoded tokens than fp16 can count: the loss was exactly 0 under fp16 (with zero gradients)."""
    losses = capped["losses"]
    fp32 = losses[decoder]["none"]
    assert fp32 > 0
    assert losses[decoder][amp] == pytest.approx(fp32, rel=0.01)


def test_finetune_criterion_runs_on_float32_logits(capped):
    result = capped["finetune"]
    assert result["seen"] == [["torch.float32", "torch.float32"]] * 2
    assert result["stats"]["grad_norm"] > 0
