"""Every option of every config group composes and instantiates; every model x likelihood pair
builds for 1x28x28 and 3x32x32 images with the right shapes; every `python train.py` command of
the README and docs/ composes; docs/configs.md is what scripts/config_docs.py makes of configs/;
Hydra's --cfg and --info work on the entry points."""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex

import pytest
import torch
from helpers.runs import CONFIGS, REPO, compose_train, run_script, tiny
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from vaelab.build import build_datamodule, build_model, build_module
from vaelab.train import instantiate_group


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


GROUPS = [
    "data",
    "model",
    "likelihood",
    "prior",
    "objective",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
]


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_option_composes_and_instantiates(group, option, data_dir, tmp_path):
    overrides = [*tiny(data_dir), f"{group}={option}"]
    if group == "likelihood" and option != "bernoulli":
        overrides.append("data.binarize=none")  # 8-bit data for likelihoods on [0, 1]
    if group == "data" and option not in ("mnist", "dsprites", "dsprites_like"):
        overrides.append("likelihood=gaussian")  # Bernoulli refuses 8-bit data
    if (group, option) == ("data", "image_folder"):
        overrides.append(f"data.root={tmp_path}")  # the one setting without a default
    if (group, option) == ("scheduler", "time_cosine"):
        overrides.append("trainer.max_time=00:00:01:00")  # its budget
    if group == "callbacks" and option == "none":
        overrides.remove("callbacks.progress_bar.refresh_rate=0")
    if (group, option) in (("model", "vqvae"), ("objective", "vq")):  # they go together
        overrides = [o for o in overrides if not o.startswith("model.latent_dim")]
        overrides += ["model=vqvae", "objective=vq"]
    if (group, option) in (("model", "hvae"), ("model", "categorical")):  # (no latent_dim)
        overrides = [o for o in overrides if not o.startswith("model.latent_dim")]
    cfg = compose_train(overrides, output_dir=tmp_path)
    assert cfg.hydra.runtime.choices[group] == option
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    module.configure_optimizers()  # the optimizer and scheduler partials bind to parameters
    instantiate_group(cfg.callbacks)
    instantiate_group(cfg.logger)
    if group == "trainer" and option == "gpu" and not torch.cuda.is_available():
        return  # composes; a GPU Trainer cannot be built on a machine without one
    instantiate(cfg.trainer)


def test_unknown_option_lists_choices(data_dir):
    with pytest.raises(ConfigCompositionException, match="Available options in 'model'"):
        compose_train(["model=transformer"])


def test_unknown_key_is_refused(data_dir):
    with pytest.raises(ConfigCompositionException, match="latnt_dim"):
        compose_train(["model.latnt_dim=4"])


@pytest.mark.parametrize(
    "model,likelihood,shape",
    list(
        itertools.product(
            options("model"), options("likelihood"), [(1, 28, 28), (3, 32, 32), (3, 64, 64)]
        )
    ),
)
def test_model_likelihood_pairs_build_with_right_shapes(model, likelihood, shape):
    # one latent of 5 dimensions; the hierarchical model: z1 of 5 and z2 of 3 (a code of 8);
    # the VQ-VAE: a grid of 16 codes over the image downsampled twice; categorical: 5 one-hot
    # variables of 10 classes
    sizes, code = {
        "hvae": ("model.latent_dims=[5,3]", (8,)),
        "vqvae": ("model.n_codes=16", (shape[1] // 4, shape[2] // 4)),
        "categorical": ("model.n_variables=5", (5, 10)),
    }.get(model, ("model.latent_dim=5", (5,)))
    cfg = compose_train([f"model={model}", f"likelihood={likelihood}", sizes])
    vae = build_model(cfg, shape)
    x = torch.rand(3, *shape)
    if vae.likelihood.accepts == ("binary",):
        x = x.round()
    given = vae.given(torch.tensor([0, 3, 9]))  # (a cvae reads the labels, others ignore them)
    q = given.posterior(x)
    assert q.batch_shape == (3,) and q.event_shape == code
    z = q.sample((2,)) if model == "vqvae" else q.rsample((2,))  # (L, B, ...)
    p = given.decode(z)
    assert p.batch_shape == (2, 3) and p.event_shape == shape
    assert p.log_prob(x).shape == (2, 3)
    assert given.reconstruct(x).shape == (3, *shape)
    sample_labels = vae.sample_labels(4)
    n = 4 if sample_labels is None else len(sample_labels)
    assert vae.given(sample_labels).sample(n).shape == (n, *shape)


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_train_commands() -> list[tuple[str, ...]]:
    """The overrides of every single-run `python train.py ...` example in the README and the
    docs/ pages: command lines in code blocks (continuation lines joined) and inline
    `python train.py ...` spans (the Results tables). Skipped: sweeps (-m / --multirun),
    Hydra's own flags (--cfg, --info), placeholders (<run dir>, ...), and the shown error
    examples ($ prompt)."""
    text = "\n".join(path.read_text() for path in DOCS).replace("\\\n", " ")
    lines = re.findall(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S+ )*(python train\.py.*)$", text, re.M)
    commands = lines + re.findall(r"`(python train\.py[^`]*)`", text)
    overrides = []
    for command in commands:
        words = shlex.split(command, comments=True)[2:]  # after "python train.py"
        if any(w.startswith("-") or "<" in w or "..." in w for w in words):  # -m, --cfg, ...
            continue
        overrides.append(words)
    return sorted({tuple(words) for words in overrides})


README_COMMANDS = readme_train_commands()


def test_configs_page_is_up_to_date():
    """docs/configs.md is generated from configs/ (python scripts/config_docs.py)."""
    spec = importlib.util.spec_from_file_location(
        "config_docs", REPO / "scripts" / "config_docs.py"
    )
    config_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_docs)
    page = (REPO / "docs" / "configs.md").read_text()
    assert page == config_docs.render(CONFIGS), "run python scripts/config_docs.py"
    for group in GROUPS:
        for option in options(group):
            assert f"### `{group}={option}`" in page


@pytest.mark.slow
def test_hydra_shows_the_composed_config_and_its_sources(tmp_path):
    result = run_script("train.py", ["--cfg", "job", "model=conv", "model.latent_dim=8"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "_target_: vaelab.nets.ConvEncoder" in result.stdout
    assert "latent_dim: 8" in result.stdout
    result = run_script("evaluate.py", ["--info", "defaults", "run=x"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Defaults List" in result.stdout and "paths/default" in result.stdout


def test_the_readme_has_train_commands_to_check():
    assert len(README_COMMANDS) >= 20
    assert ("experiment=burda2015_vae", "trainer.max_time=00:00:06:00") in README_COMMANDS


@pytest.mark.parametrize("overrides", README_COMMANDS, ids=lambda o: " ".join(o) or "(defaults)")
def test_every_readme_train_command_composes(overrides, tmp_path):
    """What the README tells a user to type is accepted: every key exists, every option is
    one of its group's (an example that needs `+key=` or names a removed option fails here)."""
    compose_train(list(overrides), output_dir=tmp_path)


@pytest.mark.parametrize(
    "overrides,monitor",
    [
        ([], "val/elbo"),
        (["objective=iwae"], "val/iwae"),
        (["experiment=burda2015_iwae"], "val/iwae"),
        (["experiment=mnist_cpu_budget"], "val/iwae"),
        (["objective=ae"], "val/loss"),
        (["hparams_search=optuna"], "val/elbo"),
        (["hparams_search=optuna", "objective=iwae"], "val/iwae"),
    ],
)
def test_best_checkpoint_is_chosen_on_the_trained_bound(overrides, monitor):
    """ModelCheckpoint (the `best` checkpoint of evaluate.py and the final evaluation) monitors
    the bound the objective trains: L_k for IWAE, whose training can loosen the ELBO; so does
    the value train.py returns to a sweeper (a bound to maximise; the autoencoder has none)."""
    cfg = compose_train(overrides)
    assert cfg.callbacks.model_checkpoint.monitor == monitor
    assert monitor in cfg.callbacks.hparams.metrics
    if monitor != "val/loss":
        assert cfg.optimized_metric == monitor
