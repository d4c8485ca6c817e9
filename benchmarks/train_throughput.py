"""Training throughput of vaelab (Lightning, default logger and progress bar) against a plain
PyTorch loop, in one process, on the same model and data.

(a) plain: a hand-written loop over an in-memory uint8 tensor: per-epoch permutation, slicing,
    dynamic binarisation (torch.bernoulli), Bernoulli ELBO with the closed-form KL,
    torch.optim.Adam (defaults).
(b) vaelab: the objects train.py builds from the real configs (data, model, objective,
    optimizer, TensorBoard logger, the run's callbacks: progress bar, image and HParams logging,
    the NaN guard, ...; the Trainer through vaelab.build.build_trainer), Trainer.fit.

The data are N MNIST-shaped images, synthetic unless --data-dir holds MNIST/raw/. Validation and
checkpoint writing are off in (b), so both time the same training epoch. Each row: median
samples/s over the timed epochs (--rounds alternating rounds of --repeats epochs, each round after
one warm-up epoch), the ratio vaelab / plain of those medians, each round's ratio (the spread
shows the machine's drift) and their median (the paired figure: a round's two sides ran
minutes apart, so slow drift cancels in it), and the process's peak resident memory so far.

    python benchmarks/train_throughput.py --batch 128 512 --model mlp conv
    python benchmarks/train_throughput.py --rounds 5 --repeats 2 compile=true   # compiled step

Hydra overrides at the end apply to (b) only; the plain loop stays eager.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fake-IDX writer the tests use
from helpers.runs import write_idx  # noqa: E402

from vaelab.build import (  # noqa: E402
    NVML_CHECK,
    build_datamodule,
    build_model,
    build_module,
    build_trainer,
)
from vaelab.train import instantiate_group, training_callbacks  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compose_config(model: str, batch: int, data_dir: Path, log_dir: Path, epochs: int, extra):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"model={model}",
                f"data.batch_size={batch}",
                f"paths.data_dir={data_dir}",
                "data.download=false",
                f"trainer.max_epochs={epochs}",
                "+trainer.limit_val_batches=0",
                "+trainer.num_sanity_val_steps=0",
                "trainer.accelerator=cpu",
                *extra,
            ],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(log_dir)
        cfg.hydra.runtime.output_dir = str(log_dir)
        del cfg.callbacks.model_checkpoint
        del cfg.callbacks.last_checkpoint
    HydraConfig.instance().set_config(cfg)
    return cfg


def plain_epochs(cfg, images: torch.Tensor, batch: int, epochs: int) -> list[float]:
    """The loop a user writes by hand, in a script that does not import Lightning (which turns
    on torch's NVML-based CUDA check, a cost at each optimizer step where NVML is absent)."""
    nvml_check = os.environ.pop(NVML_CHECK, None)
    try:
        return plain_loop(cfg, images, batch, epochs)
    finally:
        if nvml_check is not None:
            os.environ[NVML_CHECK] = nvml_check


def plain_loop(cfg, images: torch.Tensor, batch: int, epochs: int) -> list[float]:
    torch.manual_seed(0)
    vae = build_model(cfg, (1, 28, 28))
    encoder, decoder = vae.encoder, vae.decoder
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(images))
        for i in range(0, len(images), batch):
            x = torch.bernoulli(images[order[i : i + batch]].float() / 255)
            mu, log_var = encoder(x).chunk(2, dim=-1)
            z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
            logits = decoder(z)
            distortion = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
            rate = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
            loss = (distortion.flatten(1).sum(-1) + rate).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self.start)


def vaelab_epochs(cfg) -> list[float]:
    L.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    timer = EpochTimer()
    trainer = build_trainer(
        cfg,
        callbacks=[*training_callbacks(cfg), timer],
        logger=instantiate_group(cfg.logger),
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.times


def write_synthetic_mnist(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for prefix, count in (("train", n), ("t10k", 1000)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:count], compress=False)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[:count], compress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--model", nargs="+", default=["mlp"])
    parser.add_argument("--images", type=int, default=60000, help="training set size")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating plain/vaelab rounds")
    parser.add_argument("--data-dir", type=Path, default=None, help="a folder with MNIST/raw/")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for vaelab")
    args = parser.parse_args()
    torch.distributions.Distribution.set_default_validate_args(False)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = Path(tmp) / "data"
            write_synthetic_mnist(data_dir, args.images + 5000)  # 5000 become validation
        header = (
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"data: {'synthetic' if args.data_dir is None else data_dir}, "
            f"overrides: {args.overrides or 'none'}"
        )
        print(header)
        rows = [
            f"{'model':>5} {'batch':>5} {'plain s/ep':>10} {'vaelab s/ep':>11} "
            f"{'plain samples/s':>15} {'vaelab samples/s':>16} {'ratio':>6} {'peak MB':>8}"
            "  ratio per round (median)"
        ]
        for model in args.model:
            for batch in args.batch:
                cfg = compose_config(
                    model,
                    batch,
                    data_dir,
                    Path(tmp) / f"logs_{model}_{batch}",
                    1 + args.repeats,
                    args.overrides,
                )
                datamodule = build_datamodule(cfg)
                datamodule.setup("fit")
                images = datamodule.splits["train"].images
                n = len(images)
                plain, ours, round_ratios = [], [], []
                for _ in range(args.rounds):  # alternate, so drift of the machine hits both
                    plain_round = plain_epochs(cfg, images, batch, 1 + args.repeats)[1:]
                    ours_round = vaelab_epochs(cfg)[1:]
                    plain += plain_round
                    ours += ours_round
                    ratio = statistics.median(plain_round) / statistics.median(ours_round)
                    round_ratios.append(ratio)
                plain_s, ours_s = statistics.median(plain), statistics.median(ours)
                rows.append(
                    f"{model:>5} {batch:>5} {plain_s:10.2f} {ours_s:11.2f} "
                    f"{n / plain_s:15.0f} {n / ours_s:16.0f} {plain_s / ours_s:6.2f} "
                    f"{peak_rss_mb():8.0f}  {' '.join(f'{r:.2f}' for r in round_ratios)} "
                    f"({statistics.median(round_ratios):.2f})"
                )
        print("\n".join(rows))  # after the progress bars, which share the terminal


if __name__ == "__main__":
    main()
