"""Shared fixtures: tiny fake MNIST-family IDX files (no network, no shared data) and argument
checks of torch.distributions switched on. Helpers live in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

# pytest runs the tests in parallel workers (pytest-xdist, `-n auto` in pyproject.toml): one
# thread each, for the worker and the train.py processes its tests start, so that two workers on
# two cores do not fight over them (set OMP_NUM_THREADS yourself to choose otherwise)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers.runs import write_fake_dataset


@pytest.fixture(autouse=True)
def validate_distribution_args():
    """torch.distributions argument checks on in tests: NaN scales, out-of-support data."""
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(True)
    yield
    torch.distributions.Distribution.set_default_validate_args(previous)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data root with fake MNIST and FashionMNIST (320 train / 64 test images each)."""
    root = tmp_path_factory.mktemp("data")
    write_fake_dataset(root, "MNIST")
    write_fake_dataset(root, "FashionMNIST")
    return root
