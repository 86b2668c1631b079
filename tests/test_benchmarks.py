"""Smoke test of benchmarks/bench_train.py: one tiny ChannelMAE configuration end to end, no timing assertions.

On CPU each configuration runs in a forked child (the default); the slow variant checks the fresh-interpreter
path (`--single_config`) that CUDA runs use.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--patch_size", "8", "--embed_dim", "32", "--depth", "1", "--num_heads", "2"]
TINY += ["--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2"]
POSITIVE = ("images_per_s", "tokens_per_s", "step_ms", "gflops_per_image", "tflops", "params_m")


@pytest.mark.parametrize(
    "isolation", ["auto", pytest.param("subprocess", marks=pytest.mark.slow)], ids=["fork", "subprocess"]
)
def test_bench_train_tiny_chamae_writes_json(tmp_path, isolation):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--models", "chamae_vit_tiny_patch16"]
    cmd += ["--channels", "2", "--input_size", "32", "--batch_size", "2", "--steps", "2", "--warmup", "1"]
    cmd += ["--device", "cpu", "--isolation", isolation, "--json", str(out), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| chamae_vit_tiny_patch16 | 2 | 32 | 2 | 32 |" in proc.stdout

    report = json.loads(out.read_text())
    assert report["environment"]["timm_use_fused_attn"] is True
    (result,) = report["results"]
    assert "error" not in result, result["error"]
    assert result["task"] == "pretrain"
    assert (result["channels"], result["tokens"], result["encoder_tokens"], result["decoder_tokens"]) == (2, 32, 9, 33)
    for key in POSITIVE:
        assert result[key] > 0, key
    assert result["peak_mem_mb"] >= 0
    assert result["mem_kind"] == "cpu_peak_rss_delta"
    assert result["fused_attn"] == "2/2"
    assert result["sdpa_kernel"] != "math"
    assert result["mfu"] is None and result["host_syncs"] is None
    assert math.isfinite(result["loss"])
