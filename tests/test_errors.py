"""Bad input ends in one clear line, never a traceback: checked in-process (compose + run) for
each kind of error, and once per entry point through the CLI (one line on stderr, exit 1)."""

from __future__ import annotations

import gzip
import shutil

import pytest
from helpers.runs import (
    assert_fragments,
    assert_one_line_error,
    evaluate_error,
    run_script,
    tiny,
    train_error,
    write_fake_dataset,
)


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("model.latent_dim=0", ["model.latent_dim", "got 0"]),
        ("objective.beta=-1", ["objective.beta", ">= 0", "-1"]),
        ("objective.n_samples=0", ["objective.n_samples", "got 0"]),
        ("data.binarize=sometimes", ["data.binarize", "dynamic, static, none", "sometimes"]),
        ("data.batch_size=100000", ["data.batch_size=100000", "256 images"]),
        ("model.encoder.hidden_dims=[64,-3]", ["hidden_dims", "-3"]),
        # optimizer, scheduler, trainer and seed: torch's and Lightning's own refusals (or a
        # ZeroDivisionError at the first step) become one line naming the value
        ("optimizer.lr=-1", ["optimizer.lr", "(0, inf)", "-1"]),
        ("optimizer.lr=0", ["optimizer.lr", "(0, inf)", "got 0"]),  # would train nothing
        ("optimizer.lr=.inf", ["optimizer.lr", "(0, inf)", "inf"]),
        ("optimizer.lr=abc", ["optimizer.lr", "'abc'"]),
        ("+optimizer.eps=-1", ["optimizer.eps", "(0, inf)", "-1"]),
        (
            "optimizer._target_=torch.optim.SGD ~optimizer.fused +optimizer.momentum=1.5",
            ["optimizer.momentum", "[0, 1)", "1.5"],
        ),
        ("+optimizer.betas=[0.9,1.5]", ["optimizer.betas", "[0, 1)", "1.5"]),
        ("scheduler=cosine scheduler.T_max=0", ["scheduler.T_max", "[1, inf)", "got 0"]),
        ("scheduler=cosine +scheduler.eta_min=0.01", ["scheduler.eta_min=0.01", "optimizer.lr"]),
        ("scheduler=plateau scheduler.factor=2", ["scheduler.factor", "(0, 1)", "got 2"]),
        ("scheduler=plateau scheduler.factor=0", ["scheduler.factor", "(0, 1)", "got 0"]),
        ("trainer.max_epochs=abc", ["trainer.max_epochs", "'abc'"]),
        ("trainer.log_every_n_steps=0", ["trainer.log_every_n_steps", ">= 1", "got 0"]),
        ("trainer.precision=17", ["trainer:", "Precision 17 is invalid", "bf16-mixed"]),
        ("trainer.devices=0", ["trainer:", "devices=0"]),
        ("trainer.max_time=abc", ["trainer:", "duration='abc'", "DD:HH:MM:SS"]),
        ("seed=abc", ["seed must be an integer", "'abc'"]),
        ("model.encoder.activation=foo", ["activation", "torch.nn.Tanh", "'foo'"]),
        (
            "model=resnet model.encoder.channels=[12,24] model.encoder.groups=8",
            ["ResNetEncoder", "divisible by groups=8", "[12, 24]"],
        ),
        ("model=resnet model.encoder.norm=batch", ["ResNetEncoder norm", "group, none", "'batch'"]),
        (
            "model=resnet model.encoder.channels=[8,8,8,8]",
            ["ResNetEncoder", "divisible by 8", "1x28x28", "len(channels) - 1"],
        ),
    ],
)
def test_bad_value_is_one_line(override, fragments, data_dir, tmp_path):
    overrides = [*tiny(data_dir), *override.split()]
    assert_fragments(train_error(overrides, tmp_path), *fragments)


@pytest.mark.slow
def test_train_cli_prints_one_line_and_exits_1(data_dir, tmp_path):
    result = run_script(
        "train.py", [*tiny(data_dir), f"paths.log_dir={tmp_path}", "objective.beta=-1"], tmp_path
    )
    assert_one_line_error(result, "objective.beta", ">= 0", "-1")


def test_conv_model_on_impossible_image_size(data_dir, tmp_path):
    overrides = [*tiny(data_dir), "model=conv", "model.encoder.channels=[8,16,32]"]
    assert_fragments(train_error(overrides, tmp_path), "divisible by 8", "1x28x28")


def test_bernoulli_refuses_8bit_data(data_dir, tmp_path):
    message = train_error([*tiny(data_dir), "data=fashion_mnist"], tmp_path)
    assert_fragments(message, "accepts binary pixels", "data.binarize=none", "gaussian")


@pytest.mark.slow
def test_unknown_group_option_lists_choices(data_dir, tmp_path):
    result = run_script("train.py", [*tiny(data_dir), "likelihood=laplace"], cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Available options in 'likelihood'" in result.stderr
    assert "continuous_bernoulli" in result.stderr and "gaussian_fixed" in result.stderr


def test_missing_data_without_download(tmp_path):
    assert_fragments(
        train_error(tiny(tmp_path / "nowhere"), tmp_path),
        "MNIST files missing",
        str(tmp_path / "nowhere" / "MNIST" / "raw"),
        "VAELAB_DATA_DIR",
    )


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_dataset_file(damage, tmp_path):
    root = write_fake_dataset(tmp_path / "data")
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    if damage == "truncated":  # a valid gzip stream whose IDX body is cut short
        path.write_bytes(gzip.compress(gzip.decompress(data)[:-100]))
    else:  # bytes flipped inside the compressed stream
        middle = len(data) // 2
        path.write_bytes(
            data[:middle]
            + bytes(b ^ 0xFF for b in data[middle : middle + 64])
            + data[middle + 64 :]
        )
    assert_fragments(train_error(tiny(root), tmp_path / "logs"), str(path), damage)


def test_evaluate_on_a_path_that_is_no_run(tmp_path):
    (tmp_path / "empty").mkdir()
    message = evaluate_error([f"run={tmp_path / 'empty'}"], tmp_path)
    assert "neither a .ckpt file nor a run dir" in message
    not_a_checkpoint = tmp_path / "notes.ckpt"
    shutil.copy(__file__, not_a_checkpoint)
    assert "not a loadable checkpoint" in evaluate_error([f"run={not_a_checkpoint}"], tmp_path)
