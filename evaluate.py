"""Evaluate a trained run: `python evaluate.py run=<run dir or .ckpt>` (see README)."""

import hydra
from omegaconf import DictConfig

from vaelab.cli import report_errors
from vaelab.evaluate import run


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
@report_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
