"""The literature presets: Burda et al. (2015) architecture, optimizer and stage learning-rate
schedule, the CPU-budget preset, and the k=5000 evaluation they end with."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.models import approximate_posterior_vae, linear_data, replay_draws
from helpers.runs import compose_train, run_script, tiny

from vaelab import schedules
from vaelab.build import build_datamodule, build_module
from vaelab.errors import ConfigError
from vaelab.evaluation.metrics import CompiledLogWeights
from vaelab.objectives import iwae_bound
from vaelab.run.checkpoints import read_checkpoint as load_checkpoint
from vaelab.schedules import StageDecay, TimeCosine, budget_seconds

PAPER_LR = 1e-3


def test_stage_boundaries_follow_three_to_the_i_passes():
    schedule = StageDecay()
    starts = [0, 1, 4, 13, 40, 121, 364, 1093]  # sum of 3^j for j < i
    for i, start in enumerate(starts):
        assert schedule.stage(start) == i
        if start > 0:
            assert schedule.stage(start - 1) == i - 1
    assert schedule.total_epochs == 3280
    assert schedule.stage(5000) == 7  # the last stage goes on


def test_scheduler_gives_the_papers_learning_rates(data_dir, tmp_path):
    cfg = compose_train([*tiny(data_dir), "experiment=burda2015_vae"], output_dir=tmp_path)
    module = build_module(cfg, build_datamodule(cfg))
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    rates = []
    for _ in range(3280):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for i, start in enumerate([0, 1, 4, 13, 40, 121, 364, 1093]):
        assert rates[start] == pytest.approx(PAPER_LR * 10 ** (-i / 7), rel=1e-12)
    assert rates[-1] == pytest.approx(PAPER_LR * 10**-1)


def test_time_cosine_follows_the_clock_and_continues_after_a_resume(monkeypatch):
    """scheduler=time_cosine: lr = lr0 (1 + cos(pi t / budget)) / 2 at t seconds of training, 0
    after the budget; a resumed run continues from the saved t, the pause not counted."""
    now = [1000.0]
    monkeypatch.setattr(schedules.time, "monotonic", lambda: now[0])
    param = torch.nn.Parameter(torch.zeros(1))

    def cosine(t):
        return 2.0 * 0.5 * (1 + math.cos(math.pi * min(t / 100, 1.0)))

    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = TimeCosine(optimizer, "00:00:01:40")  # 100 s
    assert optimizer.param_groups[0]["lr"] == 2.0
    for t in (25, 50, 75):
        now[0] = 1000.0 + t
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine(t), abs=1e-12)
    state = scheduler.state_dict()
    assert "_clock" not in state and state["elapsed_s"] == 75

    now[0] = 9000.0  # a new process, hours later
    optimizer = torch.optim.SGD([param], lr=2.0)
    resumed = TimeCosine(optimizer, 100)
    resumed.load_state_dict(state)
    for t, after in ((10, 85), (30, 105)):
        now[0] = 9000.0 + t
        optimizer.step()
        resumed.step()
        assert resumed.elapsed_s == after
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine(after), abs=1e-12)
    assert optimizer.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize(
    "budget,seconds",
    [("00:00:20:00", 1200), ("01:02:03:04", 93784), ({"minutes": 20}, 1200), (90, 90)],
)
def test_budget_accepts_what_trainer_max_time_accepts(budget, seconds):
    assert budget_seconds(budget) == seconds


@pytest.mark.parametrize("bad", [None, "20 minutes", "00:20:00", 0, -5, True, {"fortnights": 1}])
def test_bad_budget_is_refused_naming_the_value(bad):
    with pytest.raises(ConfigError, match="scheduler.budget must be a positive duration"):
        budget_seconds(bad)


def test_time_cosine_without_max_time_is_a_clear_error(data_dir, tmp_path):
    """Refused when the module is built, before any work starts."""
    cfg = compose_train([*tiny(data_dir), "scheduler=time_cosine"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.max_time, or seconds\), got None"):
        build_module(cfg, build_datamodule(cfg))


def test_cpu_budget_preset_anneals_over_its_twenty_minutes(data_dir, tmp_path):
    cfg = compose_train(["experiment=mnist_cpu_budget"])
    assert cfg.model.encoder.hidden_dims == [200, 200] and cfg.model.latent_dim == 50
    assert cfg.hydra.runtime.choices.objective == "iwae" and cfg.objective.k == 3
    assert cfg.data.batch_size == 250 and cfg.final_evaluation.k == 5000
    cfg = compose_train([*tiny(data_dir), "experiment=mnist_cpu_budget"], output_dir=tmp_path)
    module = build_module(cfg, build_datamodule(cfg))
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, TimeCosine) and scheduler.budget_s == 20 * 60


@pytest.mark.parametrize("preset,k", [("burda2015_vae", None), ("burda2015_iwae", 50)])
def test_burda_presets_match_the_paper(preset, k):
    cfg = compose_train([f"experiment={preset}"])
    assert cfg.model.encoder.hidden_dims == [200, 200] and cfg.model.latent_dim == 50
    assert cfg.model.decoder.activation._target_ == "torch.nn.Tanh"
    assert cfg.hydra.runtime.choices.likelihood == "bernoulli"
    assert cfg.data.binarize == "dynamic" and cfg.data.batch_size == 20
    assert list(cfg.optimizer.betas) == [0.9, 0.999] and cfg.optimizer.eps == 1e-4
    assert cfg.optimizer.lr == PAPER_LR and cfg.trainer.max_epochs == 3280
    assert cfg.hydra.runtime.choices.scheduler == "burda_stages"
    assert cfg.final_evaluation.k == 5000
    assert cfg.objective.get("k") == k
    if k is not None:
        assert compose_train([f"experiment={preset}", "objective.k=5"]).objective.k == 5


@pytest.mark.parametrize(
    "preset,k", [("burda2015_vae_2layer", None), ("burda2015_iwae_2layer", 50)]
)
def test_two_layer_burda_presets_match_the_paper(preset, k):
    """Section 5: x -> 200-200 -> z1 (100) -> 100-100 -> z2 (50), tanh, the same training."""
    cfg = compose_train([f"experiment={preset}"])
    one_layer = compose_train(["experiment=burda2015_vae"])
    assert cfg.model._target_ == "vaelab.models.HierarchicalVAE"
    assert list(cfg.model.latent_dims) == [100, 50] and list(cfg.model.hidden_dims) == [100, 100]
    assert cfg.model.encoder.hidden_dims == [200, 200]
    assert cfg.model.decoder.hidden_dims == [200, 200]
    for part in (cfg.model.activation, cfg.model.encoder.activation, cfg.model.decoder.activation):
        assert part._target_ == "torch.nn.Tanh"
    for key in ("data", "optimizer", "trainer", "final_evaluation"):
        assert cfg[key] == one_layer[key]
    assert cfg.hydra.runtime.choices.scheduler == "burda_stages"
    assert cfg.objective.get("k") == k


def test_cpu_budget_presets_differ_only_in_the_model():
    one, two = (
        compose_train([f"experiment={p}"]) for p in ("mnist_cpu_budget", "mnist_cpu_budget_2layer")
    )
    for key in ("data", "objective", "optimizer", "scheduler", "trainer", "final_evaluation"):
        assert one[key] == two[key], key
    assert two.model._target_ == "vaelab.models.HierarchicalVAE"


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset", ["burda2015_vae", "burda2015_iwae", "mnist_cpu_budget", "burda2015_iwae_2layer"]
)
def test_presets_run_and_end_with_the_test_nll(preset, data_dir, tmp_path):
    args = [
        *[o for o in tiny(data_dir) if "2layer" not in preset or "latent_dim=" not in o],
        f"paths.log_dir={tmp_path / 'logs'}",
        f"experiment={preset}",
        "trainer.max_epochs=2",
        "data.batch_size=32",
        "final_evaluation.k=10",
    ]
    result = run_script("train.py", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = next((tmp_path / "logs").iterdir()).joinpath("runs").iterdir()
    report = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert report["k"] == 10 and math.isfinite(report["metrics"]["test/nll_is"])
    # the best checkpoint is chosen on the bound the preset trains (L_k for the IWAE ones)
    callbacks = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["callbacks"]
    (key,) = [key for key in callbacks if key.startswith("ModelCheckpoint")]
    monitor = "val/elbo" if preset == "burda2015_vae" else "val/iwae"
    assert f"'monitor': '{monitor}'" in key
    if preset != "mnist_cpu_budget":  # (which validates every 10 epochs)
        assert callbacks[key]["best_model_path"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_k5000_in_chunks_matches_one_sample_at_a_time(compiled):
    """The chunked log-sum-exp over k=5000 samples (several images per decoder call), eager or
    through torch.compile (eval.compile), equals the straightforward computation that decodes
    one sample at a time, on the same draws, to 1e-4."""
    vae, weight, bias = approximate_posterior_vae()
    x = linear_data(weight, bias, n=4)
    q = vae.posterior(x)
    torch.manual_seed(0)
    z_all = q.sample((5000,))  # (k, B, latent)
    log_w = torch.stack(
        [
            vae.decode(z[None]).log_prob(x)[0] + vae.prior().log_prob(z) - q.log_prob(z)
            for z in z_all
        ]
    )
    straightforward = torch.logsumexp(log_w, 0) - math.log(5000)

    replay_draws(vae, z_all)
    weights_fn = CompiledLogWeights(vae, torch.device("cpu")) if compiled else None
    chunked = iwae_bound(vae, x, 5000, max_codes=1000 * len(x), weights_fn=weights_fn)
    chunked = chunked["log_likelihood"]
    if compiled:
        graphs = (weights_fn.gaussian_log_weights, weights_fn.log_likelihood)
        used = [graph for graph in graphs if graph.compiled is not None]
        assert used and not any(graph.failed for graph in used), "fell back to eager"
    torch.testing.assert_close(chunked, straightforward, atol=1e-4, rtol=0)
