"""Training options. compile=true: the training step's objective through torch.compile
(vaelab.compiled.CompiledObjective) gives the eager numbers and gradients from the same draws,
recompiles only for a new batch shape (not for every step of a KL schedule), falls back to eager
with one warning when the compiler fails, and trains end to end. averaging=ema: the checkpoint
holds the moving average. The Trainer is built without the failing NVML-based CUDA check
where no NVIDIA driver is installed."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
from helpers.models import binary_batch, chain_data, linear_chain, small_vae
from helpers.runs import compose_train, tiny
from lightning.pytorch.profilers import SimpleProfiler
from torch._dynamo.utils import counters

from vaelab import train as train_module
from vaelab.build import NoProfiler, build_datamodule, build_module, build_trainer
from vaelab.callbacks.nvml import NVML_CHECK, NoFailingNvmlCheck
from vaelab.compiled import CPU_OPTIONS, CompiledObjective
from vaelab.data.datasets import IndexBatch
from vaelab.errors import ConfigError
from vaelab.module import VAEModule
from vaelab.objectives import ELBO, IWAE, KLSchedule


@pytest.fixture(autouse=True)
def no_argument_checks():
    """The compiled graph has no data-dependent branches; torch.distributions' argument checks
    are one (they raise on bad values), so they stay off here as they are in training."""
    torch.distributions.Distribution.set_default_validate_args(False)
    yield


@pytest.mark.parametrize(
    "schedule",
    [
        KLSchedule(beta=2.0, warmup_steps=100),
        KLSchedule(schedule="cyclical", cycle_steps=100, cycle_ratio=0.5),
        KLSchedule(beta=0.5),
    ],
    ids=["linear", "cyclical", "constant"],
)
def test_a_tensor_step_gives_the_schedules_values(schedule):
    for step in (0, 25, 50, 99, 100, 125, 175, 250, 12345):
        expected = schedule(step)
        got = schedule(torch.tensor(step))
        assert float(got) == pytest.approx(expected, rel=1e-6), step


def loss_and_gradients(vae, objective, x, step, seed):
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    parts = objective(vae, x, x, step)
    parts["loss"].backward()
    grads = [p.grad.clone() for p in vae.parameters()]
    return parts, grads


@pytest.mark.parametrize(
    "case",
    ["elbo_warmup", "iwae", "iwae_dreg", "hvae_iwae_dreg"],
)
def test_compiled_objective_gives_the_eager_loss_and_gradients(case):
    """Same draws (same seed), same loss parts and gradients, one graph for all steps."""
    objective = {
        "elbo_warmup": ELBO(kl_warmup_steps=10),
        "iwae": IWAE(k=3),
        "iwae_dreg": IWAE(k=3, estimator="dreg"),
        "hvae_iwae_dreg": IWAE(k=3, estimator="dreg"),
    }[case]
    if case.startswith("hvae"):
        vae, x = linear_chain()[0], chain_data(8)
    else:
        vae, x = small_vae(), binary_batch(8)
    compiled = CompiledObjective(objective)
    compiled(vae, x, x, 0)  # the first call runs eagerly
    counters.clear()
    for step in (1, 4, 7, 12):  # beta changes with the step until 10: one graph all the same
        eager_fn = lambda *a: objective(*a[:3], step=a[3])  # noqa: E731
        eager, eager_grads = loss_and_gradients(vae, eager_fn, x, step, step)
        got, grads = loss_and_gradients(vae, compiled, x, step, step)
        for name in ("loss", "elbo", "rate", "distortion"):
            torch.testing.assert_close(got[name], eager[name], atol=1e-4, rtol=1e-5)
        for g, e in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    assert not compiled.compiled.failed
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\ndetails that nobody needs")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    vae, x = small_vae(), binary_batch(8)
    objective = ELBO()
    compiled = CompiledObjective(objective)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            torch.manual_seed(step)
            got = compiled(vae, x, x, step)
            torch.manual_seed(step)
            torch.testing.assert_close(got["loss"], objective(vae, x, x, step=step)["loss"])
    assert compiled.compiled.failed
    assert [r.getMessage() for r in caplog.records] == [
        "compile: torch.compile failed (RuntimeError: no C++ compiler found); training eagerly"
    ]


def test_the_objectives_own_errors_are_not_swallowed(monkeypatch):
    def refusing(model, x, target=None, step=None):
        raise ConfigError("objective.something must be positive, got -1")

    vae, x = small_vae(), binary_batch(4)
    compiled = CompiledObjective(refusing)
    with pytest.raises(ConfigError, match="must be positive"):
        compiled(vae, x, x, 0)
    with pytest.raises(ConfigError, match="must be positive"):
        compiled(vae, x, x, 1)  # the compiled call: the same error, no fallback
    assert not compiled.compiled.failed


@pytest.mark.slow
def test_train_with_compile_true(data_dir, tmp_path):
    """A real run with the compiled step and a KL warm-up: one graph for the training batch
    shape (256 training images: 8 full batches of 32) and none per step, no graph break, no
    fallback, the checkpoint written."""
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [*tiny(data_dir), "compile=true", "trainer.max_epochs=3", "objective.kl_warmup_steps=20"],
        output_dir=run_dir,
    )
    counters.clear()
    metrics, _ = train_module.train(cfg)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert metrics["val/elbo"] > -600


@pytest.mark.slow
def test_ema_averaging_is_what_the_checkpoint_holds(data_dir, tmp_path):
    """averaging=ema: the checkpoint's state_dict holds the moving average (updated once per
    optimizer step), the trained weights are kept beside it for resume, and they differ."""
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [*tiny(data_dir), "averaging=ema", "averaging.decay=0.9"], output_dir=run_dir
    )
    train_module.train(cfg)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    average, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert set(average) == set(current)
    differs = [name for name in average if not torch.equal(average[name], current[name])]
    assert differs, "the average equals the trained weights"
    assert "n_averaged" in checkpoint["averaging_state"]
    assert int(checkpoint["averaging_state"]["n_averaged"]) == checkpoint["global_step"]


def test_the_trainer_profiles_nothing_unless_asked(data_dir, tmp_path):
    """Without trainer.profiler, hooks run in one shared null context (Lightning's default
    profiler enters a fresh context manager per hook per callback); a named profiler is kept."""
    quiet = build_trainer(compose_train(tiny(data_dir), output_dir=tmp_path))
    assert isinstance(quiet.profiler, NoProfiler)
    assert quiet.profiler.profile("a") is quiet.profiler.profile("b")
    with quiet.profiler.profile("[Callback]x.on_train_batch_end") as action:
        assert action is None
    cfg = compose_train([*tiny(data_dir), "+trainer.profiler=simple"], output_dir=tmp_path)
    assert isinstance(build_trainer(cfg).profiler, SimpleProfiler)


def test_an_index_batch_moves_as_itself_and_other_batches_as_lightning_moves_them(data_dir):
    datamodule = build_datamodule(compose_train(tiny(data_dir)))
    index = torch.arange(5)
    moved = datamodule.transfer_batch_to_device(IndexBatch("val", index), torch.device("cpu"), 0)
    assert isinstance(moved, IndexBatch) and moved.split == "val"
    assert torch.equal(moved.index, index)
    pair = (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.arange(2))
    moved = datamodule.transfer_batch_to_device(pair, torch.device("cpu"), 0)
    assert isinstance(moved, tuple) and all(
        torch.equal(a, b) for a, b in zip(moved, pair, strict=True)
    )


def test_the_training_step_returns_the_loss_and_its_detached_parts(data_dir):
    """What the callbacks read (the NaN guard, the progress bar, bits per dimension): the
    step's outputs, not attributes it leaves on the module."""
    cfg = compose_train(tiny(data_dir))
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    trainer = SimpleNamespace(log_every_n_steps=1000, global_step=1)
    module.log_dict = lambda *args, **kwargs: None  # (no trainer to log to)
    with patch.object(VAEModule, "trainer", trainer), patch.object(VAEModule, "global_step", 1):
        x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3))
        out = module.training_step((x, x, torch.zeros(4, dtype=torch.long)), 0)
    assert {"loss", "elbo", "rate", "distortion", "beta"} <= set(out)
    assert out["loss"].requires_grad and out["loss"].dim() == 0
    assert not any(v.requires_grad for name, v in out.items() if name != "loss")
    assert out["elbo"].shape == (4,)


def test_the_inductor_options_vaelab_names_exist_in_this_torch():
    """vaelab.compiled.CPU_OPTIONS depend on inductor's option names: a torch release that drops
    one is named here (cpu_options would silently leave it out)."""
    missing = sorted(set(CPU_OPTIONS) - set(torch._inductor.list_options()))
    assert not missing, f"this torch has no inductor option {missing} (vaelab.compiled)"


def test_the_failing_nvml_check_is_off_for_the_fit_only(monkeypatch):
    """Where NVML cannot be loaded, Lightning's NVML-based CUDA check fails at every optimizer
    step (vaelab.callbacks.nvml): off while the fit runs, back afterwards, and left alone where
    NVML loads."""
    callback = NoFailingNvmlCheck()
    monkeypatch.setenv(NVML_CHECK, "1")
    monkeypatch.setattr("vaelab.callbacks.nvml.nvml_loads", lambda: False)
    callback.on_fit_start(None, None)
    assert NVML_CHECK not in os.environ
    callback.on_exception(None, None, RuntimeError())
    assert os.environ[NVML_CHECK] == "1"
    monkeypatch.setattr("vaelab.callbacks.nvml.nvml_loads", lambda: True)
    callback.on_fit_start(None, None)
    assert os.environ[NVML_CHECK] == "1"
    callback.on_fit_end(None, None)
    assert os.environ[NVML_CHECK] == "1"


def test_the_precision_follows_the_cpus_bfloat16():
    """bf16-auto: bf16-mixed where bfloat16 is native, else 32-true with one line; bf16 asked
    for on a CPU without it is kept, with the warning; anything else untouched."""
    from vaelab.hardware import trainer_precision

    assert trainer_precision("bf16-auto", True, "cpu") == ("bf16-mixed", "")
    precision, line = trainer_precision("bf16-auto", False, "cpu")
    assert precision == "32-true" and "this CPU has no native bfloat16" in line
    precision, line = trainer_precision("bf16-mixed", False, "cpu")
    assert precision == "bf16-mixed" and "emulated" in line and "bf16-auto or 32-true" in line
    assert trainer_precision("bf16-mixed", True, "cpu") == ("bf16-mixed", "")
    assert trainer_precision("bf16-mixed", False, "cuda") == ("bf16-mixed", "")
    assert trainer_precision("32-true", False, "cpu") == ("32-true", "")


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_auto_trainer_on_either_cpu(native, data_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("vaelab.hardware.native_bf16", lambda device: native)
    cfg = compose_train([*tiny(data_dir), "trainer.precision=bf16-auto"], output_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="vaelab.build"):
        trainer = build_trainer(cfg, logger=False)
    assert trainer.precision == ("bf16-mixed" if native else "32-true")
    warned = [r for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
