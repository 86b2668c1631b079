"""Mixed precision: the ``--amp`` dtype, autocast, the loss scaler / optimizer step, DDP no_sync."""

from contextlib import nullcontext

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_amp(amp: str | None, device: torch.device) -> str:
    """``--amp`` default: bf16 on CUDA when supported, else fp16 on CUDA; 'none' on the CPU."""
    if amp is not None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"--amp must be one of {sorted(AMP_DTYPES)}, got '{amp}'")
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "none"


def autocast(device: torch.device, amp: str):
    """Autocast context for ``amp`` ('bf16' | 'fp16' | 'none') on ``device``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class NativeScaler:
    """Backward + optional gradient clipping + optimizer step, with a ``torch.amp.GradScaler`` for fp16.

    Returns the total gradient norm (a device tensor, before clipping) on update steps, None on accumulation
    steps. The scaler is a no-op for bf16 and fp32.
    """

    def __init__(self, device: torch.device, amp: str):
        self._scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False, update_grad=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if clip_grad is not None:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    @property
    def enabled(self) -> bool:
        return self._scaler.is_enabled()

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        self._scaler.load_state_dict(state_dict)


def maybe_no_sync(model, skip_sync: bool):
    """DDP's ``no_sync()`` on gradient-accumulation steps; a null context otherwise or without DDP."""
    if skip_sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()
