"""The GPU's fast paths, on by default on CUDA and off elsewhere (``--no_fast_paths`` turns them off).

* TF32 matmuls and convolutions for the fp32 parts of a run (``torch.set_float32_matmul_precision("high")``;
  autocast's bf16/fp16 work is not affected): ~10 bits of mantissa in the products, float32 accumulation.
* ``torch.backends.cudnn.benchmark``: the patch embedding is one convolution of one shape per run, so cuDNN's
  autotuning pays once and then picks the fastest kernel.
* Fused AdamW (``adamw_kwargs``): one kernel for the whole update instead of a loop over tensors.

Nothing changes on the CPU, so CPU runs and tests give the same numbers as before. On CUDA, fp32 products lose
bits to TF32 and cuDNN's autotuned kernels may differ between runs, so two CUDA runs agree to rounding, not bit
for bit; ``--no_fast_paths`` restores torch's defaults.
"""

import torch


def enable_fast_paths(device: torch.device, enabled: bool = True) -> list[str]:
    """Switch on the fast paths for a run on ``device`` (only CUDA has any); returns the names of those set."""
    if not enabled or torch.device(device).type != "cuda":
        return []
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return ["tf32", "cudnn.benchmark", "fused AdamW"]


def adamw_kwargs(device: torch.device, enabled: bool = True) -> dict:
    """Extra ``torch.optim.AdamW`` keywords: ``fused=True`` on CUDA (with fast paths on), none elsewhere."""
    return {"fused": True} if enabled and torch.device(device).type == "cuda" else {}
