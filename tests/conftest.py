"""Shared fixtures: tiny fake MNIST-family IDX files (no network, no shared data) and argument
checks of torch.distributions switched on. Helpers live in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
