"""Lightning's DDP process launch, made correct under Hydra.

Lightning starts the other processes of a DDP run by re-running the command line with
`hydra.run.dir=<run dir>` added. In a multirun that command still holds `-m` and the whole
sweep, so every extra process would start a sweep of its own in a new dir. Here each process is
started as a single run of exactly this job (its own overrides, swept values included) in this
job's output dir, so one run is one dir, with a single run or inside any sweep or launcher.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd, to_absolute_path
from lightning.pytorch.strategies.launchers import subprocess_script

from vaelab.errors import private_api


def hydra_child_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and working dir for DDP process `local_rank` of this Hydra job."""
    import __main__

    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    hydra = HydraConfig.get()
    command += list(hydra.overrides.task)
    command += [
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        f"hydra.job.name={hydra.job.name}_ddp_process_{local_rank}",
        "hydra.output_subdir=null",  # the run's .hydra/ is written once, by the first process
        "hydra.mode=RUN",  # a preset that sweeps (experiment=..., hparams_search=...) must not
    ]
    return command, get_original_cwd()


def use_hydra_child_command() -> None:
    """Make Lightning's subprocess launcher start DDP processes with hydra_child_command.

    Lightning has no public hook for the command of a DDP child under Hydra: its launcher calls
    the module-level `_hydra_subprocess_cmd`, which is replaced here (checked to exist first)."""
    private_api(subprocess_script, "_hydra_subprocess_cmd")
    subprocess_script._hydra_subprocess_cmd = hydra_child_command
