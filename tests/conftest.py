"""Fixtures shared by the test modules."""

import json
import os
import shutil

import pytest
import torch


def read_log(output_dir) -> list[dict]:
    """The complete lines of ``output_dir/log.txt`` as dicts ([] while it does not exist; a line a running job is
    still appending is left out)."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_data", "digits")


@pytest.fixture
def one_thread():
    """Tiny models train an order of magnitude faster on one thread when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_subset(tmp_path_factory):
    """A function ``(train, val, num_classes=10) -> path``: a class-balanced copy of sample_data/digits holding
    the first ``train`` train and ``val`` val images of each of the first ``num_classes`` classes, with its
    channel_stats.json."""

    def make(train: int, val: int, num_classes: int = 10):
        dst = tmp_path_factory.mktemp("digits")
        for split, count in (("train", train), ("val", val)):
            for label in sorted(os.listdir(os.path.join(DIGITS, split)))[:num_classes]:
                os.makedirs(dst / split / label)
                for name in sorted(os.listdir(os.path.join(DIGITS, split, label)))[:count]:
                    shutil.copy(os.path.join(DIGITS, split, label, name), dst / split / label / name)
        shutil.copy(os.path.join(DIGITS, "channel_stats.json"), dst)
        return dst

    return make
