"""Optional Weights & Biases logging (``--wandb PROJECT``) behind TensorBoard's ``SummaryWriter`` interface.

``wandb`` is imported only when ``--wandb`` is given, so it is no dependency of the project; ``check_wandb`` refuses
the flag at start-up when the package is missing. Each scalar and image goes to W&B with TensorBoard's step as
``global_step`` (train scalars at 1000 x fractional epoch, the others at the epoch), the x axis of every W&B chart.
``WANDB_MODE=offline`` keeps the run on disk (``--output_dir/wandb/``, ``wandb sync`` uploads it later).
"""

import numpy as np

from util.errors import RunError

STEP_KEY = "global_step"


def check_wandb(args):
    """``RunError`` when ``--wandb`` is given and the ``wandb`` package cannot be imported."""
    if not getattr(args, "wandb", None):
        return
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise RunError(
            f"--wandb {args.wandb} needs the wandb package, which cannot be imported ({err}): pip install wandb "
            "(or leave --wandb out; TensorBoard logging needs nothing)"
        ) from err


class WandbWriter:
    """``add_scalar`` / ``add_image`` / ``flush`` / ``close`` of a ``SummaryWriter``, logging to one W&B run."""

    def __init__(self, args):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=args.wandb,
            name=getattr(args, "wandb_name", None) or None,
            dir=args.output_dir or None,
            config=dict(vars(args)),
        )
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)

    def add_scalar(self, tag: str, value, global_step: int):
        self.run.log({tag: float(value), STEP_KEY: global_step})

    def add_image(self, tag: str, img, global_step: int, dataformats: str = "CHW"):
        """img: (H, W, C) or (C, H, W) as ``dataformats`` says."""
        img = np.asarray(img)
        if dataformats == "CHW":
            img = img.transpose(1, 2, 0)
        elif dataformats != "HWC":
            raise ValueError(f"dataformats must be 'HWC' or 'CHW', got '{dataformats}'")
        self.run.log({tag: self.wandb.Image(img), STEP_KEY: global_step})

    def flush(self):
        """Nothing to do: W&B writes as it logs."""

    def close(self):
        self.run.finish()


class LogWriters:
    """Several writers (TensorBoard, W&B) behind one ``SummaryWriter`` interface."""

    def __init__(self, writers: list):
        self.writers = writers

    def add_scalar(self, *args, **kwargs):
        for writer in self.writers:
            writer.add_scalar(*args, **kwargs)

    def add_image(self, *args, **kwargs):
        for writer in self.writers:
            writer.add_image(*args, **kwargs)

    def flush(self):
        for writer in self.writers:
            writer.flush()

    def close(self):
        for writer in self.writers:
            writer.close()
