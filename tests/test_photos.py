"""Natural-image sources on tiny fake files in their real formats: CIFAR-10 pickles, SVHN .mat,
CelebA's folder and partition file, a folder of PNGs. Shapes, labels, splits, md5 and corrupt
files as one line, the per-sample path against the in-memory one, the configs."""

from __future__ import annotations

import json
import logging
import math
import pickle
import urllib.error

import pytest
import torch
from helpers.photos import write_celeba, write_cifar10, write_image_folder, write_svhn
from helpers.runs import compose_train
from hydra.utils import instantiate
from PIL import Image

from vaelab.data import CIFAR10, SVHN, CelebA, ImageDataModule, ImageFolder
from vaelab.errors import ConfigError, DataError


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_cifar10_reads_the_pickles(tmp_path):
    write_cifar10(tmp_path, per_batch=20, n_test=30)
    source = CIFAR10(verify=False)
    assert source.missing(tmp_path) == []
    x, y = source.read(tmp_path, "train")
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y[:12].tolist() == [i % 10 for i in range(12)]
    assert x[3, 0, 0, 0] == 21 and x[3, 1, 0, 0] == 10  # red then green (halved), CHW order
    x_test, y_test = source.read(tmp_path, "test")
    assert len(x_test) == 30 and x_test[1, 0, 5, 5] == (7 + 5) % 256


def test_cifar10_md5_and_corrupt_files_are_one_line(tmp_path):
    folder = write_cifar10(tmp_path)
    with pytest.raises(DataError) as error:
        CIFAR10(verify=True).read(tmp_path, "train")
    assert "data_batch_1 has md5" in one_line(error) and "verify=false" in one_line(error)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError) as error:
        CIFAR10(verify=False).read(tmp_path, "test")
    assert "test_batch is not a CIFAR-10 batch" in one_line(error)
    (folder / "data_batch_2").unlink()
    assert CIFAR10().missing(tmp_path) == ["data_batch_2"]


def test_cifar10_download_failure_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    with pytest.raises(DataError) as error:
        CIFAR10().download(tmp_path)
    assert "download failed" in one_line(error) and "data_batch_1" in one_line(error)


def test_svhn_reads_the_mat_files_and_maps_10_to_0(tmp_path):
    write_svhn(tmp_path, n_train=40, n_test=20, extra=10)
    x, y = SVHN(verify=False).read(tmp_path, "train")
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8
    assert y[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert x[5, 0, 0, 0] == 5 and x[5, 2, 0, 0] == 250
    assert len(SVHN(extra=True, verify=False).read(tmp_path, "train")[0]) == 50
    assert len(SVHN(verify=False).read(tmp_path, "test")[0]) == 20
    with pytest.raises(DataError) as error:
        SVHN(verify=True).read(tmp_path, "test")
    assert "test_32x32.mat has md5" in one_line(error)
    (tmp_path / "SVHN" / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DataError) as error:
        SVHN(verify=False).read(tmp_path, "test")
    assert "is not an SVHN .mat file" in one_line(error)


def test_celeba_partition_crop_and_resize(tmp_path):
    write_celeba(tmp_path, partition=(8, 3, 2))
    source = CelebA(image_size=64, crop=148)
    assert source.missing(tmp_path) == [] and source.image_shape == (3, 64, 64)
    sizes = {split: len(source.read(tmp_path, split)[0]) for split in source.splits}
    assert sizes == {"train": 8, "val": 3, "test": 2}
    x, y = source.read(tmp_path, "val")
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.uint8 and (y == 0).all()
    source.resize(32)
    assert source.read(tmp_path, "test")[0].shape == (2, 3, 32, 32)
    assert CelebA(image_size=16, crop=None).read(tmp_path, "test")[0].shape == (2, 3, 16, 16)


def test_celeba_undecodable_image_and_bad_partition_line(tmp_path):
    folder = write_celeba(tmp_path)
    (folder / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataError) as error:
        CelebA().read(tmp_path, "train")
    assert "000002.jpg cannot be decoded" in one_line(error)
    (folder / "list_eval_partition.txt").write_text("000001.jpg 7\n")
    with pytest.raises(DataError) as error:
        CelebA().per_sample(tmp_path, "train")
    assert "line 1" in one_line(error)


def test_image_folder_labels_from_class_folders_and_seeded_splits(tmp_path):
    root = write_image_folder(tmp_path / "pets", classes=("cats", "dogs"), per_class=10)
    source = ImageFolder(image_size=24, val_fraction=0.1, test_fraction=0.2, split_seed=0)
    source.root = root
    parts = {split: source.read(tmp_path, split) for split in source.splits}
    assert {s: len(x) for s, (x, _) in parts.items()} == {"train": 14, "val": 2, "test": 4}
    x, y = parts["train"]
    assert x.shape == (14, 3, 24, 24) and x.dtype == torch.uint8
    all_labels = torch.cat([labels for _, labels in parts.values()])
    assert sorted(all_labels.tolist()) == [0] * 10 + [1] * 10

    def test_files(seed):
        other = ImageFolder(image_size=24, val_fraction=0.1, test_fraction=0.2, split_seed=seed)
        other.root = root
        return other.per_sample(tmp_path, "test").paths

    assert test_files(0) == test_files(0) != test_files(1)
    flat = write_image_folder(tmp_path / "flat", classes=(), per_class=10)
    grey = ImageFolder(channels=1, image_size=16, val_fraction=0.2, test_fraction=0.2)
    grey.root = flat
    x, y = grey.read(tmp_path, "train")
    assert x.shape == (6, 1, 16, 16) and (y == 0).all()


def test_image_folder_bad_files_raise_or_are_skipped(tmp_path, caplog):
    root = write_image_folder(tmp_path / "pets", per_class=10)
    (root / "cats" / "zzz.png").write_bytes(b"this is no png")
    strict = ImageFolder(image_size=16, val_fraction=0.1, test_fraction=0.1)
    strict.root = root
    with pytest.raises(DataError) as error:
        for split in strict.splits:
            strict.read(tmp_path, split)
    assert "zzz.png cannot be decoded" in one_line(error)
    lenient = ImageFolder(image_size=16, val_fraction=0.1, test_fraction=0.1, on_error="skip")
    lenient.root = root
    with caplog.at_level(logging.WARNING):
        total = sum(len(lenient.read(tmp_path, split)[0]) for split in lenient.splits)
    assert total == 20
    (warning,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 1 of 21" in warning and "zzz.png" in warning


def test_images_of_more_than_8_bits_are_rescaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (PIL mode I;16): PIL's own conversion to 8 bits clips every value above
    255 to white; decode rescales v -> round(v * 255 / 65535). 32-bit pixels are refused."""
    import numpy as np

    from vaelab.data.decoding import decode, eight_bit

    values = np.array([[0, 257, 32768, 65535], [128, 383, 1000, 65280]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    grey = decode(tmp_path / "deep.png", "L", size=2, crop=None)  # the 2x2 centre, unscaled
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert grey[0].tolist() == expected[:, 1:3].tolist()
    rgb = decode(tmp_path / "deep.png", "RGB", size=2, crop=None)
    assert rgb.shape == (3, 2, 2) and (rgb == grey).all()
    for mode, kind in (("I", "integer"), ("F", "float")):
        with pytest.raises(DataError, match=f"x.tif has 32-bit {kind} pixels"):
            eight_bit(Image.new(mode, (2, 2)), tmp_path / "x.tif")


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError):
        ImageFolder(channels=2)
    with pytest.raises(ConfigError):
        ImageFolder(on_error="ignore")
    with pytest.raises(ConfigError):
        ImageFolder(val_fraction=1.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    source = ImageFolder()
    source.root = empty
    assert source.missing(tmp_path) == [str(empty.resolve())]
    with pytest.raises(DataError) as error:
        source.download(tmp_path)
    assert "data.root" in one_line(error)
    few = write_image_folder(tmp_path / "few", classes=(), per_class=3)
    source.root = few
    with pytest.raises(DataError) as error:
        source.read(tmp_path, "train")
    assert "cannot be split" in one_line(error)


def test_fixed_size_sources_refuse_another_size():
    CIFAR10().resize(32)
    with pytest.raises(DataError) as error:
        CIFAR10().resize(64)
    assert "CIFAR10 images are 32x32" in one_line(error)


def test_per_sample_datasets_are_picklable_and_match_read(tmp_path):
    write_celeba(tmp_path)
    source = CelebA(image_size=32)
    dataset = pickle.loads(pickle.dumps(source.per_sample(tmp_path, "train")))
    x, _ = source.read(tmp_path, "train")
    assert torch.equal(dataset[3][0], x[3])


def test_image_folder_in_memory_and_per_sample_workers_give_the_same_batches(tmp_path):
    """The DataModule over an image folder: the per-sample path with 2 worker processes yields
    the batches of the in-memory path for the same seed, every split."""
    root = write_image_folder(tmp_path / "pets", per_class=12)

    def batches(**kwargs):
        source = ImageFolder(val_fraction=0.25, test_fraction=0.25)
        dm = ImageDataModule(
            source,
            str(tmp_path),
            batch_size=4,
            binarize="none",
            dequantize=False,
            root=str(root),
            image_size=20,
            shuffle_seed=3,
            **kwargs,
        )
        dm.setup()
        return [
            [dm.fetch(b)[1:] for b in loader()]
            for loader in (dm.train_dataloader, dm.val_dataloader, dm.test_dataloader)
        ]

    in_memory = batches(in_memory=True)
    per_sample = batches(in_memory=False, num_workers=2)
    for a, b in zip(in_memory, per_sample, strict=True):
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xa.shape[1:] == (3, 20, 20)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("option", ["cifar10", "svhn", "celeba", "image_folder"])
def test_data_configs_build_their_source(option, tmp_path):
    overrides = [f"data={option}", f"paths.data_dir={tmp_path}"]
    if option == "image_folder":
        overrides.append(f"data.root={tmp_path}")
    cfg = compose_train(overrides)
    dm = instantiate(cfg.data)
    expected = {"cifar10": CIFAR10, "svhn": SVHN, "celeba": CelebA, "image_folder": ImageFolder}
    assert isinstance(dm.source, expected[option])
    assert dm.image_shape == ((3, 64, 64) if option in ("celeba", "image_folder") else (3, 32, 32))
    sized = compose_train([*overrides, "data.image_size=32"])
    if option in ("celeba", "image_folder"):
        assert instantiate(sized.data).image_shape == (3, 32, 32)


def small_resnet(*extra: str) -> list[str]:
    return [
        "model=resnet",
        "model.latent_dim=4",
        "model.encoder.channels=[8,16]",
        "model.encoder.blocks_per_stage=1",
        "model.encoder.groups=4",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "callbacks.progress_bar.refresh_rate=0",
        "seed=0",
        *extra,
    ]


@pytest.mark.slow
def test_tiny_cifar10_run_and_evaluation_report_bits_per_dim(tmp_path):
    """train.py then evaluate.py on fake CIFAR-10 files with the residual VAE and the RGB
    mixture of discretised logistics: bits/dim from the discrete likelihood, RGB pictures."""
    from vaelab import evaluate
    from vaelab import train as train_module

    write_cifar10(tmp_path / "data", per_batch=20, n_test=30)
    logs = tmp_path / "logs"
    cfg = compose_train(
        [
            "data=cifar10",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={logs}",
            "data.source.verify=false",
            "data.val_size=20",
            "data.batch_size=16",
            "likelihood=dlogistic_mixture",
            "likelihood.components=2",
            *small_resnet(),
        ],
        output_dir=logs / "run",
    )
    metrics = train_module.run(cfg)
    assert 0 < metrics["val/bpd"] < 12 and math.isfinite(metrics["val/bpd"])
    run_dir = logs / "run"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    from helpers.runs import compose_evaluate

    # the run's data.source.verify=false is never read from its checkpoint: the evaluation
    # checks the md5 unless its own command line says otherwise
    args = [f"run={run_dir}", f"paths.data_dir={tmp_path / 'data'}", "eval.k=4"]
    with pytest.raises(DataError, match="has md5"):
        evaluate.run(compose_evaluate(args, output_dir=tmp_path / "refused"))
    eval_cfg = compose_evaluate([*args, "data.verify=false"], output_dir=tmp_path / "evaluation")
    evaluate.run(eval_cfg)
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert report["k"] == 4
    assert "k / 255" in report["pixel_model"] and "256 values" in report["pixel_model"]
    bpd = report["metrics"]["test/bpd"]
    nll = report["metrics"]["test/nll_is"]
    assert bpd == pytest.approx(nll / (3 * 32 * 32 * math.log(2)), rel=1e-6)
    samples = Image.open(tmp_path / "evaluation" / "samples.png")
    assert samples.mode == "RGB"


@pytest.mark.slow
def test_tiny_image_folder_run_with_worker_processes(tmp_path):
    """data=image_folder data.root=... data.image_size=16: grey images read per sample in 2
    worker processes, the single discretised logistic, the conv VAE."""
    from vaelab import train as train_module

    root = write_image_folder(tmp_path / "pets", per_class=20)
    logs = tmp_path / "logs"
    cfg = compose_train(
        [
            "data=image_folder",
            f"data.root={root}",
            "data.image_size=16",
            "data.source.channels=1",
            "data.source.val_fraction=0.2",
            "data.source.test_fraction=0.2",
            "data.batch_size=8",
            "data.num_workers=2",
            f"paths.data_dir={tmp_path}",
            f"paths.log_dir={logs}",
            "model=conv",
            "model.latent_dim=4",
            "likelihood=dlogistic",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "callbacks.progress_bar.refresh_rate=0",
            "test=true",
        ],
        output_dir=logs / "run",
    )
    metrics = train_module.run(cfg)
    assert math.isfinite(metrics["val/bpd"]) and math.isfinite(metrics["test/bpd"])
