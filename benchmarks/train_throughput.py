"""Training throughput of vaelab (Lightning, default logger and progress bar) against a plain
PyTorch loop, in one process, on the same model and data.

(a) plain: a hand-written loop over an in-memory uint8 tensor: per-epoch permutation, slicing,
    dynamic binarisation (torch.bernoulli), Bernoulli ELBO with the closed-form KL,
    torch.optim.Adam (defaults).
(b) vaelab: the objects train.py builds from the real configs (data, model, objective,
    optimizer, TensorBoard logger, the run's callbacks: progress bar, image and HParams logging,
    the NaN guard, ...; the Trainer through vaelab.build.build_trainer), Trainer.fit.

The data are N MNIST-shaped images, synthetic unless --data-dir holds MNIST/raw/. Validation and
checkpoint writing are off in (b). The two loops alternate in rounds of --block-images images
(40 steps at batch 128): vaelab trains for a round inside Trainer.fit, then a callback runs the
plain loop for a round, and so on, after a warm-up epoch of vaelab (compilation) and a warm-up
round of the plain loop. A vaelab round is timed from the end of the previous plain round to the
end of its last step, so it holds everything Lightning does per step (data loading, hooks,
logging, the progress bar). This machine's speed swings by up to 2x within seconds, so rounds are
short and paired: each round's ratio compares the two loops a second apart. Each row: ms per step
and samples/s of each loop over all rounds, the ratio vaelab / plain of those (the throughput
ratio), the median and quartiles of the per-round ratios (the paired figure), and the process's
peak resident memory so far. The header and the last line give the speed of a 2048² float32
matrix product before and after (the machine's state).

    python benchmarks/train_throughput.py --batch 128 512 --model mlp conv
    python benchmarks/train_throughput.py --rounds 40 compile=true   # the compiled step

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
    build_datamodule,
    build_model,
    build_module,
    build_trainer,
)
from vaelab.train import instantiate_group, training_callbacks  # noqa: E402

#: torch's switch for an NVML-based torch.cuda.is_available(), which importing Lightning turns on
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


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


class PlainLoop:
    """The loop a user writes by hand, in a script that does not import Lightning (which turns
    on torch's NVML-based CUDA check, a cost at each optimizer step where NVML is absent): run
    `steps` steps at a time, going on through its own epochs."""

    def __init__(self, cfg, images: torch.Tensor, batch: int) -> None:
        torch.manual_seed(0)
        vae = build_model(cfg, (1, 28, 28))
        self.encoder, self.decoder = vae.encoder, vae.decoder
        self.optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
        self.images, self.batch = images, batch
        self.order, self.position = torch.randperm(len(images)), 0

    def run(self, steps: int) -> float:
        """Seconds for `steps` training steps."""
        nvml_check = os.environ.pop(NVML_CHECK, None)
        try:
            with torch.enable_grad():
                start = time.perf_counter()
                for _ in range(steps):
                    self.step()
                return time.perf_counter() - start
        finally:
            if nvml_check is not None:
                os.environ[NVML_CHECK] = nvml_check

    def step(self) -> None:
        if self.position >= len(self.images):  # a new epoch
            self.order, self.position = torch.randperm(len(self.images)), 0
        index = self.order[self.position : self.position + self.batch]
        self.position += self.batch
        x = torch.bernoulli(self.images[index].float() / 255)
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        logits = self.decoder(z)
        distortion = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        rate = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
        loss = (distortion.flatten(1).sum(-1) + rate).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Alternate(L.Callback):
    """After vaelab's warm-up epoch: every `steps` training steps, time them (from the end of the
    previous plain round) and run the plain loop for as many steps; stop after `rounds`."""

    def __init__(self, plain: PlainLoop, steps: int, rounds: int) -> None:
        self.plain, self.steps, self.rounds = plain, steps, rounds
        self.times: list[tuple[float, float]] = []  # (vaelab, plain) seconds per round
        self.start: float | None = None
        self.done = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if trainer.current_epoch == 0:
            return  # warm-up: compilation, first allocations
        if self.start is None:
            self.plain.run(self.steps)  # the plain loop's warm-up round
            self.start, self.done = time.perf_counter(), 0
            return
        self.done += 1
        if self.done < self.steps:
            return
        self.times.append((now - self.start, self.plain.run(self.steps)))
        if len(self.times) == self.rounds:
            trainer.should_stop = True
        self.start, self.done = time.perf_counter(), 0


def alternate(cfg, batch: int, steps: int, rounds: int):
    """(vaelab, plain) seconds for `rounds` rounds of `steps` steps each; the plain loop reads
    the same training images as vaelab's DataModule."""
    L.seed_everything(0)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")  # (Trainer.fit's own setup call then finds the splits loaded)
    module = build_module(cfg, datamodule)
    plain = PlainLoop(cfg, datamodule.splits["train"].images, batch)
    alternation = Alternate(plain, steps, rounds)
    trainer = build_trainer(
        cfg,
        callbacks=[*training_callbacks(cfg, module, datamodule), alternation],
        logger=instantiate_group(cfg.logger),
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return alternation.times


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The speed of an n x n float32 matrix product on this process's threads (best of
    `repeats`): how fast the machine is at the moment."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
    parser.add_argument("--rounds", type=int, default=30, help="alternating plain/vaelab rounds")
    parser.add_argument("--block-images", type=int, default=5120, help="images per loop per round")
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
            f"overrides: {args.overrides or 'none'}, "
            f"2048^2 sgemm {sgemm_gflops():.0f} GFLOP/s"
        )
        print(header)
        rows = [
            f"{'model':>5} {'batch':>5} {'rounds':>6} {'plain ms/step':>13} "
            f"{'vaelab ms/step':>14} {'plain samples/s':>15} {'vaelab samples/s':>16} "
            f"{'ratio':>6} {'peak MB':>8}  round ratios: median (quartiles)"
        ]
        for model in args.model:
            for batch in args.batch:
                cfg = compose_config(
                    model,
                    batch,
                    data_dir,
                    Path(tmp) / f"logs_{model}_{batch}",
                    10**6,  # epochs: the alternation stops training after its rounds
                    args.overrides,
                )
                steps = max(1, args.block_images // batch)
                times = alternate(cfg, batch, steps, args.rounds)
                ours = sum(t for t, _ in times) / (len(times) * steps)
                plain = sum(t for _, t in times) / (len(times) * steps)
                ratios = [p / o for o, p in times]
                low, median, high = statistics.quantiles(ratios, n=4)
                rows.append(
                    f"{model:>5} {batch:>5} {len(times):>6} {1e3 * plain:13.2f} "
                    f"{1e3 * ours:14.2f} {batch / plain:15.0f} {batch / ours:16.0f} "
                    f"{plain / ours:6.2f} {peak_rss_mb():8.0f}  "
                    f"{median:.2f} ({low:.2f}-{high:.2f})"
                )
        print("\n".join(rows))  # after the progress bars, which share the terminal
        print(f"2048^2 sgemm after: {sgemm_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
