"""LARS optimizer (You et al., 2017, "Large Batch Training of Convolutional Networks") as used for MAE linear probing.

Semantics (those of the MAE linear-probing recipe):

- parameters with ``ndim > 1`` (weight matrices): the weight decay term is added to the gradient, then the update
  is rescaled by the trust ratio ``trust_coefficient * ||w|| / ||g + weight_decay * w||`` (1 when either norm is 0);
- parameters with ``ndim <= 1`` (biases, norm scales): plain SGD with momentum, no weight decay, no trust ratio;
- then heavy-ball momentum ``buf = momentum * buf + update`` and ``w -= lr * buf``.

``timm.optim.Lars`` (checked against timm 1.0.31) matches this only without weight decay. Given two param groups
(``ndim > 1`` with ``always_adapt=True``, ``ndim <= 1`` with ``weight_decay=0``) its trust ratio is
``trust_coeff * ||w|| / (||g|| + weight_decay * ||w|| + eps)``, 1 when ``||w||`` or ``||g||`` (not the update) is 0:

- ``weight_decay=0`` (MAE's linear-probing default): with ``eps=0`` its steps equal these bit for bit; with its
  default ``eps=1e-8`` they differ by float32 rounding (max 1.9e-9 after two steps that move a float32 (1000, 768)
  head with ``w ~ N(0, 1e-4)``, ``g ~ N(0, 1e-8)`` by up to 1.1e-5);
- ``weight_decay > 0`` (``--weight_decay``): ``||g|| + wd ||w||`` exceeds ``||g + wd w||``, so its steps are smaller
  (on that head, by 15% at wd=0.05 and 5% at wd=5e-4: max abs differences 2.0e-6 and 4.9e-7), and at ``g = 0`` its
  ratio is 1 instead of ``trust_coefficient / weight_decay``.

This implementation is kept because it is exact for every ``--weight_decay``; ``test_lars_vs_timm`` re-measures both
cases.
"""

import torch


class LARS(torch.optim.Optimizer):
    """LARS with momentum; no weight decay and no trust-ratio scaling for 1-D parameters."""

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        if lr < 0.0 or weight_decay < 0.0 or momentum < 0.0:
            raise ValueError(
                f"invalid LARS hyper-parameters: lr={lr}, weight_decay={weight_decay}, momentum={momentum}"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["trust_coefficient"] * w_norm / u_norm.clamp_min(torch.finfo(u_norm.dtype).tiny),
                        torch.ones_like(w_norm),
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
