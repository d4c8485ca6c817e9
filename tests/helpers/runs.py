"""Fake datasets in the real on-disk formats, the composed real config shrunk for tests, and
the entry points run as a user runs them."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from vaelab import train as train_module
from vaelab.errors import find_user_error

REPO = Path(__file__).resolve().parents[2]


CONFIGS = REPO / "configs"


def fake_images(n: int, seed: int, size: int = 28) -> np.ndarray:
    """n uint8 images with learnable structure: a bright bar at one of 4 positions + noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
    for i, position in enumerate(rng.integers(0, 4, size=n)):
        start = 3 + 6 * position
        images[i, start : start + 5, 4:-4] = rng.integers(200, 256, size=(5, size - 8))
    return images


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write an IDX file of unsigned bytes (the MNIST format), gzip-compressed by default."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_fake_dataset(
    root: Path, name: str = "MNIST", n_train: int = 320, n_test: int = 64, size: int = 28
) -> Path:
    raw = root / name / "raw"
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", fake_images(n, seed, size))
        labels = np.random.default_rng(seed).integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def compose_config(
    name: str, overrides: list[str] | None = None, output_dir: Path | None = None
) -> DictConfig:
    """The real `name` config (train or evaluate) with `overrides`; with `output_dir`, set as
    the run's output dir, as Hydra's app would."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(name, overrides=overrides or [], return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
        HydraConfig.instance().set_config(cfg)
    return cfg


def compose_train(overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
    """The real train config with `overrides`."""
    return compose_config("train", overrides, output_dir)


def compose_evaluate(
    overrides: list[str] | None = None, output_dir: Path | None = None
) -> DictConfig:
    """The real evaluate config with `overrides`."""
    return compose_config("evaluate", overrides, output_dir)


def tiny(data_dir: Path) -> list[str]:
    """Overrides that make a real training run take a couple of seconds on fake data."""
    return [
        f"paths.data_dir={data_dir}",
        "data.val_size=64",
        "data.batch_size=32",
        "data.eval_batch_size=64",
        "data.download=false",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "callbacks.progress_bar.refresh_rate=0",
        "model.latent_dim=4",
        "seed=0",
    ]


def run_script(
    script: str, args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run train.py / evaluate.py as a user does, in a subprocess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def train_error(overrides: list[str], tmp_path: Path) -> str:
    """The one-line user error that training with `overrides` ends in."""
    cfg = compose_train([*overrides, f"paths.log_dir={tmp_path}"], output_dir=tmp_path / "run")
    with pytest.raises(Exception) as info:
        train_module.run(cfg)
    error = find_user_error(info.value)
    assert error is not None, f"not a user error: {info.value!r}"
    assert "\n" not in str(error), str(error)
    return str(error)


def evaluate_error(overrides: list[str], tmp_path: Path) -> str:
    """The one-line user error that evaluating with `overrides` ends in."""
    from vaelab import evaluate

    cfg = compose_evaluate([*overrides, f"paths.log_dir={tmp_path}"], output_dir=tmp_path / "eval")
    with pytest.raises(Exception) as info:
        evaluate.run(cfg)
    error = find_user_error(info.value)
    assert error is not None, f"not a user error: {info.value!r}"
    assert "\n" not in str(error), str(error)
    return str(error)


def assert_fragments(message: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in message, message


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def evaluated(run_dir: Path, data_dir: Path, out_dir: Path, k: int = 50) -> dict:
    """evaluate.py on a run dir, in-process: its metrics.json."""
    from vaelab import evaluate

    overrides = [f"run={run_dir}", f"paths.data_dir={data_dir}", f"eval.k={k}"]
    evaluate.run(compose_evaluate(overrides, output_dir=out_dir))
    return json.loads((out_dir / "metrics.json").read_text())


def resumed(run_dir: Path, data_dir: Path, max_epochs: int = 3) -> dict:
    """Resume a run dir in-process for `max_epochs` in all; its last checkpoint."""
    resume = [f"resume={run_dir}", f"trainer.max_epochs={max_epochs}", f"paths.data_dir={data_dir}"]
    train_module.run(compose_train(resume, output_dir=run_dir))
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
