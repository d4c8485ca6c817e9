"""Train a VAE: `python train.py [group=option ...] [key=value ...]` (see README)."""

import hydra
from omegaconf import DictConfig

from vaelab.cli import report_errors
from vaelab.train import run


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    # The value a Hydra sweeper (e.g. Optuna) optimises, when the config names one.
    return metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
