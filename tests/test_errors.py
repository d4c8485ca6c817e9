"""Bad input ends in one clear line on stderr (exit status 1), never a traceback."""

from __future__ import annotations

import gzip
import shutil

import pytest
from conftest import run_script, tiny, write_fake_dataset

pytestmark = pytest.mark.slow


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("model.latent_dim=0", ["model.latent_dim", "got 0"]),
        ("objective.beta=-1", ["objective.beta", ">= 0", "-1"]),
        ("objective.n_samples=0", ["objective.n_samples", "got 0"]),
        ("data.binarize=sometimes", ["data.binarize", "dynamic, static, none", "sometimes"]),
        ("data.batch_size=100000", ["data.batch_size=100000", "256 images"]),
        ("model.hidden_dims=[64,-3]", ["model.hidden_dims", "-3"]),
    ],
)
def test_bad_value_is_one_line(override, fragments, data_dir, tmp_path):
    result = run_script(
        "train.py", [*tiny(data_dir), f"paths.log_dir={tmp_path}", override], cwd=tmp_path
    )
    assert_one_line_error(result, *fragments)


def test_conv_model_on_impossible_image_size(data_dir, tmp_path):
    args = [*tiny(data_dir), f"paths.log_dir={tmp_path}", "model=conv", "model.channels=[8,16,32]"]
    assert_one_line_error(run_script("train.py", args, cwd=tmp_path), "divisible by 8", "1x28x28")


def test_bernoulli_refuses_8bit_data(data_dir, tmp_path):
    args = [*tiny(data_dir), f"paths.log_dir={tmp_path}", "data=fashion_mnist"]
    assert_one_line_error(
        run_script("train.py", args, cwd=tmp_path),
        "binary pixels",
        "data.binarize=none",
        "gaussian",
    )


def test_unknown_group_option_lists_choices(data_dir, tmp_path):
    result = run_script("train.py", [*tiny(data_dir), "likelihood=laplace"], cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Available options in 'likelihood'" in result.stderr
    assert "continuous_bernoulli" in result.stderr and "gaussian_fixed" in result.stderr


def test_missing_data_without_download(tmp_path):
    args = [*tiny(tmp_path / "nowhere"), f"paths.log_dir={tmp_path}"]
    assert_one_line_error(
        run_script("train.py", args, cwd=tmp_path),
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
    args = [*tiny(root), f"paths.log_dir={tmp_path / 'logs'}"]
    assert_one_line_error(run_script("train.py", args, cwd=tmp_path), str(path), damage)


def test_evaluate_on_a_path_that_is_no_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script(
        "evaluate.py", [f"run={tmp_path / 'empty'}", f"paths.log_dir={tmp_path}"], cwd=tmp_path
    )
    assert_one_line_error(result, "neither a .ckpt file nor a run dir")
    not_a_checkpoint = tmp_path / "notes.ckpt"
    shutil.copy(__file__, not_a_checkpoint)
    result = run_script(
        "evaluate.py", [f"run={not_a_checkpoint}", f"paths.log_dir={tmp_path}"], cwd=tmp_path
    )
    assert_one_line_error(result, "not a loadable checkpoint")
