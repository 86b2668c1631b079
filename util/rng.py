"""Seeding and the RNG states of torch, numpy and Python saved with checkpoints."""

import random

import numpy as np
import torch
import torch.distributed as dist

from util.distributed import get_world_size, is_dist_avail_and_initialized


def seed_everything(seed: int):
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global RNG is what timm Mixup and user code draw from
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed derived from (seed, epoch, rank) alone, e.g. for a DataLoader generator."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def get_rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002 - see seed_everything
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def set_rng_state(state: dict):
    """Restore the states saved by ``get_rng_state``."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - see seed_everything
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss_next"]))
    cuda_state = state.get("cuda")
    if cuda_state is not None and torch.cuda.is_available() and len(cuda_state) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_state)


def gather_rng_states() -> list[dict]:
    """Every process's RNG state, indexed by rank (collective call when distributed)."""
    state = get_rng_state()
    if not is_dist_avail_and_initialized():
        return [state]
    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states
