"""IDX parsing, file checks, splits, binarisation and loaders of the MNIST-family DataModule, on
small files written into tmp_path (no network, no shared data)."""

from __future__ import annotations

import gzip
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers.runs import fake_images, write_fake_dataset, write_idx

from vaelab.data import MNIST, FashionMNIST, ImageDataModule, ImageSource
from vaelab.data import pixels as pixels_module
from vaelab.data.datasets import (
    IndexBatch,
    InMemoryImages,
    as_batch,
    load_split,
    missing_files,
    read_idx,
)
from vaelab.data.pixels import bernoulli_255, from_three_bytes
from vaelab.errors import ConfigError, DataError
from vaelab.likelihoods import Bernoulli, ContinuousBernoulli, Gaussian, GaussianFixed

STEMS = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
N_TRAIN, N_TEST, VAL_SIZE = 300, 40, 60


def indexed_images(n: int, seed: int) -> np.ndarray:
    """Fake images whose first two pixels spell out their index (i = p[0] + 256 p[1])."""
    images = fake_images(n, seed)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    return images


def image_indices(images: torch.Tensor) -> torch.Tensor:
    """Inverse of indexed_images for stored uint8 images (N, 1, 28, 28)."""
    return images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()


@pytest.fixture(scope="module")
def indexed_root(tmp_path_factory) -> Path:
    """MNIST files with N_TRAIN index-stamped training and N_TEST test images."""
    root = tmp_path_factory.mktemp("indexed")
    raw = root / "MNIST" / "raw"
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", indexed_images(n, seed))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def datamodule(root: Path, stage: str | None = "fit", **kwargs) -> ImageDataModule:
    kwargs = {"val_size": VAL_SIZE, "batch_size": 32, "download": False, **kwargs}
    dm = ImageDataModule(MNIST(), data_dir=str(root), **kwargs)
    dm.setup(stage)
    return dm


# --- read_idx and load_split ----------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("shape", [(7,), (5, 3, 4)], ids=["1d", "3d"])
def test_read_idx_round_trip(tmp_path, compress, shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx(tmp_path / "file-ubyte", array, compress=compress)
    assert path.suffix == (".gz" if compress else "")
    tensor = read_idx(path, len(shape))
    assert tensor.dtype == torch.uint8
    assert tensor.shape == shape
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_read_idx_wrong_magic_number(tmp_path):
    path = write_idx(tmp_path / "labels", np.arange(10, dtype=np.uint8), compress=False)
    with pytest.raises(DataError, match="magic"):
        read_idx(path, 3)  # a 1-d file where 3-d images are expected


def test_read_idx_not_an_idx_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, this is not an IDX file")
    with pytest.raises(DataError, match="magic"):
        read_idx(path, 1)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="magic"):
        read_idx(empty, 1)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_read_idx_truncated_body(tmp_path, compress):
    array = np.zeros((4, 3, 3), dtype=np.uint8)
    full = write_idx(tmp_path / "full", array, compress=False).read_bytes()
    path = tmp_path / ("cut.gz" if compress else "cut")
    body = full[:-5]  # the header promises 36 bytes, 31 follow
    path.write_bytes(gzip.compress(body) if compress else body)
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path, 3)
    assert "4x3x3" in str(info.value) and "31" in str(info.value)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "header-only"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2]))  # right magic, 1 of 3 dimensions
    with pytest.raises(DataError, match="truncated"):
        read_idx(path, 3)


def test_read_idx_padded_body(tmp_path):
    full = write_idx(tmp_path / "full", np.zeros((2, 2, 2), np.uint8), compress=False)
    path = tmp_path / "padded"
    path.write_bytes(full.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="padded"):
        read_idx(path, 3)


def gz_file(tmp_path: Path) -> Path:
    images = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    return write_idx(tmp_path / "images", images)


def test_read_idx_corrupt_gzip_flipped_bytes(tmp_path):
    path = gz_file(tmp_path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt") as info:
        read_idx(path, 3)
    assert str(path) in str(info.value)


def test_read_idx_corrupt_gzip_cut_short(tmp_path):
    path = gz_file(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt"):
        read_idx(path, 3)


def test_read_idx_plain_bytes_named_gz(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(write_idx(tmp_path / "raw", np.zeros((1, 2, 2), np.uint8), False).read_bytes())
    with pytest.raises(DataError, match="corrupt"):
        read_idx(path, 3)


def write_split(root: Path, images: np.ndarray, labels: np.ndarray, compress: bool = True) -> None:
    raw = root / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images, compress)
    write_idx(raw / "train-labels-idx1-ubyte", labels, compress)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_load_split_shapes_and_dtypes(tmp_path, compress):
    images = fake_images(12, seed=0)
    write_split(tmp_path, images, np.arange(12) % 10, compress)
    x, y = load_split(tmp_path, "MNIST", True, (28, 28))
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (12,) and y.dtype == torch.int64
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    assert y.tolist() == [i % 10 for i in range(12)]


def test_load_split_prefers_uncompressed_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), compress=True)
    write_idx(raw / "train-images-idx3-ubyte", np.ones((3, 28, 28), np.uint8), compress=False)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    x, _ = load_split(tmp_path, "MNIST", True, (28, 28))
    assert (x == 1).all()


def test_load_split_count_mismatch(tmp_path):
    write_split(tmp_path, fake_images(10, seed=0), np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="10 images") as info:
        load_split(tmp_path, "MNIST", True, (28, 28))
    assert "9 labels" in str(info.value)


def test_load_split_wrong_image_size(tmp_path):
    write_split(tmp_path, fake_images(4, seed=0, size=32), np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="32x32"):
        load_split(tmp_path, "MNIST", True, (28, 28))


def test_load_split_missing_files(tmp_path):
    with pytest.raises(DataError, match="missing"):
        load_split(tmp_path, "MNIST", False, (28, 28))


# --- prepare_data: missing files and failed downloads ---------------------------------------------


def test_missing_files_lists_absent_stems(tmp_path):
    assert missing_files(tmp_path, "MNIST") == STEMS
    write_split(tmp_path, fake_images(2, seed=0), np.zeros(2, np.uint8))
    assert missing_files(tmp_path, "MNIST") == STEMS[2:]


def test_prepare_data_without_download_names_folder_files_and_env_var(tmp_path):
    dm = ImageDataModule(MNIST(), data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str((tmp_path / "MNIST" / "raw").resolve()) in message
    for stem in STEMS:
        assert stem in message
    assert "VAELAB_DATA_DIR" in message
    assert "download=false" in message


def test_prepare_data_names_only_the_missing_files(tmp_path):
    write_split(tmp_path, fake_images(2, seed=0), np.zeros(2, np.uint8))
    with pytest.raises(DataError) as info:
        ImageDataModule(MNIST(), data_dir=str(tmp_path), download=False).prepare_data()
    assert "t10k-images-idx3-ubyte" in str(info.value)
    assert "train-images-idx3-ubyte" not in str(info.value)


def test_prepare_data_with_files_present_does_nothing(data_dir, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("must not download when the files are present")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_download)
    ImageDataModule(MNIST(), data_dir=str(data_dir), download=True).prepare_data()
    ImageDataModule(FashionMNIST(), data_dir=str(data_dir), download=False).prepare_data()


def raise_url_error(*args, **kwargs):
    raise urllib.error.URLError("no network in tests")


@pytest.mark.parametrize(
    "target",
    [
        (torchvision.datasets.MNIST, "download"),  # the whole download step fails
        (torchvision.datasets.mnist, "download_and_extract_archive"),  # every mirror fails
    ],
    ids=["MNIST.download", "download_and_extract_archive"],
)
@pytest.mark.parametrize("source_class", [MNIST, FashionMNIST])
def test_prepare_data_download_failure_is_a_data_error(tmp_path, monkeypatch, target, source_class):
    monkeypatch.setattr(*target, raise_url_error)
    dm = ImageDataModule(source_class(), data_dir=str(tmp_path), download=True)
    with pytest.raises(DataError, match="download failed") as info:
        dm.prepare_data()
    message = str(info.value)
    assert dm.name in message and "VAELAB_DATA_DIR" in message
    assert str((tmp_path / dm.name / "raw").resolve()) in message


# --- setup: splits and argument checks ------------------------------------------------------------


def test_split_sizes_disjoint_and_complete(indexed_root):
    dm = datamodule(indexed_root, binarize="none")
    train, val = image_indices(dm.splits["train"].images), image_indices(dm.splits["val"].images)
    assert len(train) == N_TRAIN - VAL_SIZE and len(val) == VAL_SIZE
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(N_TRAIN))
    # labels travel with their images
    assert (dm.splits["train"].labels == train % 10).all()
    assert (dm.splits["val"].labels == val % 10).all()
    assert "test" not in dm.splits


def test_split_fixed_by_split_seed(indexed_root):
    def val_indices(seed: int) -> list[int]:
        dm = datamodule(indexed_root, binarize="none", split_seed=seed)
        return image_indices(dm.splits["val"].images).tolist()

    assert val_indices(0) == val_indices(0)
    assert val_indices(3) == val_indices(3)
    assert set(val_indices(0)) != set(val_indices(3))


def test_split_is_independent_of_global_rng(indexed_root):
    torch.manual_seed(1)
    first = datamodule(indexed_root, binarize="none").splits["val"].images
    torch.manual_seed(2)
    second = datamodule(indexed_root, binarize="none").splits["val"].images
    assert torch.equal(first, second)


def test_setup_test_stage_loads_the_test_set(indexed_root):
    dm = datamodule(indexed_root, stage="test", binarize="none")
    assert set(dm.splits) == {"test"}
    assert image_indices(dm.splits["test"].images).tolist() == list(range(N_TEST))


def test_batch_size_larger_than_train_split(indexed_root):
    n_train = N_TRAIN - VAL_SIZE
    datamodule(indexed_root, batch_size=n_train)  # fits exactly
    with pytest.raises(ConfigError, match="batch_size") as info:
        datamodule(indexed_root, batch_size=n_train + 1)
    assert str(n_train) in str(info.value)


def test_val_size_leaving_no_training_images(indexed_root):
    with pytest.raises(ConfigError, match="val_size"):
        datamodule(indexed_root, val_size=N_TRAIN)


def test_invalid_binarize_lists_allowed_values():
    with pytest.raises(ConfigError, match="binarize") as info:
        ImageDataModule(MNIST(), data_dir="unused", binarize="threshold")
    for allowed in ("dynamic", "static", "none", "threshold"):
        assert allowed in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"eval_batch_size": 0}, {"val_size": 0}, {"num_workers": -1}],
    ids=lambda kw: next(iter(kw)),
)
def test_invalid_sizes_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ImageDataModule(MNIST(), data_dir="unused", **kwargs)


# --- binarisation and dequantisation --------------------------------------------------------------


def test_dynamic_training_images_stay_uint8_and_resample(data_dir):
    dm = datamodule(data_dir, binarize="dynamic")
    stored = dm.splits["train"].images
    assert stored.dtype == torch.uint8
    torch.manual_seed(0)
    first, second = dm.preprocess(stored), dm.preprocess(stored)
    assert first.dtype == torch.float32 and first.shape == stored.shape
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)
    # black pixels never light up and white ones are always on
    assert (first[stored == 0] == 0).all() and (first[stored == 255] == 1).all()
    # law of large numbers: n Bernoulli(p_i) draws average to mean(p_i), sd <= 0.5 / sqrt(n)
    expected = (stored.double() / 255).mean().item()
    assert first.double().mean().item() == pytest.approx(
        expected, abs=5 * 0.5 / math.sqrt(first.numel())
    )


def test_dynamic_bernoulli_frequency_per_intensity(data_dir):
    """Pixels of intensity v come out 1 with frequency v/255 (checked per intensity bin)."""
    dm = datamodule(data_dir, binarize="dynamic")
    stored = dm.splits["train"].images
    torch.manual_seed(1)
    draws = torch.stack([dm.preprocess(stored) for _ in range(20)])  # (20, N, 1, 28, 28)
    for low, high in ((1, 39), (200, 255)):
        mask = (stored >= low) & (stored <= high)
        assert mask.sum() > 1000
        p = (stored[mask].double() / 255).mean().item()
        n = 20 * mask.sum().item()
        frequency = draws[:, mask].double().mean().item()
        assert frequency == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / n))


def test_dynamic_eval_splits_are_fixed_and_seeded(data_dir):
    first, second = datamodule(data_dir, None), datamodule(data_dir, None)
    other_seed = datamodule(data_dir, None, binarize_seed=5)
    for split in ("val", "test"):
        images = first.splits[split].images
        assert images.dtype == torch.bool
        assert torch.equal(images, second.splits[split].images)
        assert not torch.equal(images, other_seed.splits[split].images)
        x = first.preprocess(images)
        assert x.dtype == torch.float32 and torch.equal(x, first.preprocess(images))
        assert torch.equal(x, images.float())


def test_fixed_binarisation_matches_intensities(data_dir):
    dm = datamodule(data_dir, None, binarize="static")
    intensity = ImageDataModule(MNIST(), data_dir=str(data_dir), binarize="none", val_size=VAL_SIZE)
    intensity.setup(None)
    for split in ("train", "val", "test"):
        binary, grey = dm.splits[split].images, intensity.splits[split].images
        assert binary.shape == grey.shape
        assert not binary[grey == 0].any() and binary[grey == 255].all()
        expected = (grey.double() / 255).mean().item()
        tolerance = 5 * 0.5 / math.sqrt(binary.numel())
        assert binary.double().mean().item() == pytest.approx(expected, abs=tolerance)


def test_static_binarisation_fixed_by_seed(data_dir):
    first = datamodule(data_dir, binarize="static", binarize_seed=3)
    second = datamodule(data_dir, binarize="static", binarize_seed=3)
    other = datamodule(data_dir, binarize="static", binarize_seed=4)
    stored = first.splits["train"].images
    assert stored.dtype == torch.bool
    assert torch.equal(stored, second.splits["train"].images)
    assert not torch.equal(stored, other.splits["train"].images)
    assert torch.equal(first.preprocess(stored), stored.float())


def test_dequantised_pixels_lie_in_their_bins(data_dir):
    """x = (pixel + u) / 256, u ~ U(0, 1): x in [pixel/256, (pixel+1)/256], uniform in the bin.

    The half-open bin [pixel/256, (pixel+1)/256) is checked exactly in the test below."""
    dm = datamodule(data_dir, None, binarize="none", dequantize=True)
    for split in ("train", "val", "test"):
        stored = dm.splits[split].images
        assert stored.dtype == torch.uint8
        torch.manual_seed(0)
        x = dm.preprocess(stored)
        assert x.dtype == torch.float32 and x.shape == stored.shape
        u = x.double() * 256 - stored.double()  # exact: x * 256 only shifts the exponent
        assert (u >= 0).all() and (u <= 1).all()
        assert not torch.equal(x, dm.preprocess(stored))  # fresh noise each time
        # uniform offsets: mean 1/2 and variance 1/12, to 5 standard errors
        n = u.numel()
        assert u.mean().item() == pytest.approx(0.5, abs=5 * math.sqrt(1 / 12 / n))
        assert u.var().item() == pytest.approx(1 / 12, abs=5 * math.sqrt(1 / 180 / n))


@pytest.mark.parametrize("pixel", [255, 200])
def test_dequantised_pixels_stay_in_half_open_bin(pixel):
    """floor(256 x) gives back the pixel and x < 1, even where float32 rounding of pixel + u
    would reach pixel + 1 (about 30 of these 4e6 draws without the guard)."""
    dm = ImageDataModule(MNIST(), data_dir="unused", binarize="none", dequantize=True)
    torch.manual_seed(0)
    stored = torch.full((1, 1, 2000, 2000), pixel, dtype=torch.uint8)
    x = dm.preprocess(stored)
    assert (x < 1).all(), int((x >= 1).sum())
    wrong_bin = (x * 256).floor() != pixel
    assert not wrong_bin.any(), int(wrong_bin.sum())


def test_no_dequantisation_is_intensity_over_255(data_dir):
    dm = datamodule(data_dir, binarize="none", dequantize=False)
    stored = dm.splits["train"].images
    x = dm.preprocess(stored)
    torch.testing.assert_close(x, stored.float() / 255, rtol=0, atol=0)
    assert x.max().item() == 1.0  # the fake data has white pixels


@pytest.mark.parametrize(
    "binarize,dequantize,pixel_model,bernoulli,density",
    [
        ("dynamic", True, "binary", 0.0, None),
        ("static", False, "binary", 0.0, None),
        ("none", True, "dequantized", None, math.log(256)),
        ("none", False, "discrete", None, None),
    ],
)
def test_pixel_model_and_bpd_offset(binarize, dequantize, pixel_model, bernoulli, density):
    """The data say what they supply; the likelihood says how bits per dimension follow: a mass
    on {0, 1} for binary pixels, a density on [0, 1] for dequantised 8-bit values (+ ln 256)."""
    dm = ImageDataModule(MNIST(), data_dir="unused", binarize=binarize, dequantize=dequantize)
    assert dm.pixel_model == pixel_model
    assert dm.num_dims == 784 and dm.image_shape == (1, 28, 28)
    assert Bernoulli().bpd_offset(pixel_model) == bernoulli
    for likelihood in (Gaussian(), GaussianFixed(), ContinuousBernoulli()):
        assert likelihood.bpd_offset(pixel_model) == density
        assert pixel_model in likelihood.accepts
    assert (pixel_model in Bernoulli().accepts) == (pixel_model == "binary")


# --- loaders --------------------------------------------------------------------------------------


def test_in_memory_images_getitems_is_one_indexing_operation():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    dataset = InMemoryImages(images, torch.arange(10) * 2)
    x, y = as_batch(dataset.__getitems__([3, 1, 7]))
    assert x.flatten().tolist() == [3, 1, 7] and y.tolist() == [6, 2, 14]
    assert len(dataset) == 10
    assert dataset[4][0].item() == 4 and dataset[4][1].item() == 8


def stored_batches(dm, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [dm.stored(batch) for batch in loader]


@pytest.mark.parametrize("device_cache", [True, False])
def test_train_loader_batches_and_covers_the_epoch(indexed_root, device_cache):
    batch_size = 64
    dm = datamodule(indexed_root, binarize="none", batch_size=batch_size, device_cache=device_cache)
    n_train = N_TRAIN - VAL_SIZE
    seen = []
    batches = stored_batches(dm, dm.train_dataloader())
    assert len(batches) == math.ceil(n_train / batch_size)
    for i, (images, labels) in enumerate(batches):
        size = batch_size if i < len(batches) - 1 else n_train - batch_size * (len(batches) - 1)
        assert images.shape == (size, 1, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (size,) and labels.dtype == torch.int64
        assert (labels == image_indices(images) % 10).all()
        seen += image_indices(images).tolist()
    assert sorted(seen) == sorted(image_indices(dm.splits["train"].images).tolist())
    assert len(set(seen)) == n_train


def test_device_cache_loader_yields_only_indices(indexed_root):
    dm = datamodule(indexed_root, binarize="none", batch_size=64)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, IndexBatch) and batch.split == "train"
    assert batch.index.dtype == torch.int64 and batch.index.shape == (64,)


def test_train_loader_shuffles_between_epochs(indexed_root):
    dm = datamodule(indexed_root, binarize="none", batch_size=64, shuffle_seed=3)
    loader = dm.train_dataloader()
    first = torch.cat([image_indices(x) for x, _ in stored_batches(dm, loader)])
    second = torch.cat([image_indices(x) for x, _ in stored_batches(dm, loader)])
    assert not torch.equal(first, second)
    # the order is a function of (shuffle_seed, epoch) alone, not of the global random state
    torch.manual_seed(123)
    again = datamodule(indexed_root, binarize="none", batch_size=64, shuffle_seed=3)
    replay = torch.cat(
        [image_indices(x) for x, _ in stored_batches(again, again.train_dataloader())]
    )
    assert torch.equal(first, replay)


def test_resumable_loader_restarts_mid_epoch(indexed_root):
    """A loader restored from another loader's state continues that epoch's order exactly."""
    dm = datamodule(indexed_root, binarize="none", batch_size=16, shuffle_seed=5)
    loader = dm.train_dataloader()
    list(loader)  # epoch 0
    iterator = iter(loader)  # epoch 1
    taken = [image_indices(dm.stored(next(iterator))[0]) for _ in range(3)]
    loader.taken = 3  # what the DataModule counts as batches reach training steps
    state = loader.state_dict()
    assert state == {"epoch": 1, "taken": 3}

    reference = datamodule(indexed_root, binarize="none", batch_size=16, shuffle_seed=5)
    reference_loader = reference.train_dataloader()
    list(reference_loader)
    epoch_1 = [image_indices(reference.stored(b)[0]) for b in reference_loader]

    resumed = datamodule(indexed_root, binarize="none", batch_size=16, shuffle_seed=5)
    resumed_loader = resumed.train_dataloader()
    resumed_loader.load_state_dict(state)
    rest = [image_indices(resumed.stored(b)[0]) for b in resumed_loader]
    assert torch.equal(torch.cat(taken + rest), torch.cat(epoch_1))


def test_eval_loaders_keep_order_and_use_eval_batch_size(indexed_root):
    dm = datamodule(indexed_root, None, binarize="none", batch_size=16, eval_batch_size=25)
    val = stored_batches(dm, dm.val_dataloader())
    assert [len(x) for x, _ in val] == [25, 25, 10]
    assert torch.equal(torch.cat([x for x, _ in val]), dm.splits["val"].images)
    test = torch.cat([image_indices(x) for x, _ in stored_batches(dm, dm.test_dataloader())])
    assert test.tolist() == list(range(N_TEST))


@pytest.fixture(scope="module")
def uncompressed_root(tmp_path_factory) -> Path:
    """Index-stamped MNIST files, uncompressed, as torchvision's per-sample dataset reads them."""
    root = tmp_path_factory.mktemp("uncompressed")
    raw = root / "MNIST" / "raw"
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", indexed_images(n, seed), compress=False)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress=False)
    return root


@pytest.mark.parametrize("binarize", ["none", "dynamic", "static"])
def test_fast_paths_give_the_same_batches_as_torchvision(uncompressed_root, binarize):
    """Same seed, same permutation: the in-memory paths (device cache on and off) and
    torchvision's per-sample path yield identical model inputs, for every split."""
    results = []
    for kwargs in (
        {"in_memory": True, "device_cache": True},
        {"in_memory": True, "device_cache": False},
        {"in_memory": False},
    ):
        dm = datamodule(uncompressed_root, None, binarize=binarize, dequantize=False, **kwargs)
        torch.manual_seed(0)
        batches = {
            split: [dm.fetch(batch)[1:] for batch in loader()]  # (targets, labels)
            for split, loader in (
                ("train", dm.train_dataloader),
                ("val", dm.val_dataloader),
                ("test", dm.test_dataloader),
            )
        }
        results.append(batches)
    fast, sliced, per_sample = results
    for split in ("train", "val", "test"):
        for (x1, y1), (x2, y2), (x3, y3) in zip(
            fast[split], sliced[split], per_sample[split], strict=True
        ):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            assert torch.equal(y1, y3)
            if binarize == "none" or split == "train" and binarize == "dynamic":
                assert torch.equal(x1, x3)  # fixed binarisation differs by construction
            else:  # per-sample fixed binarisation: same statistics, its own noise
                assert set(x3.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("device_cache", [True, False])
def test_ddp_shards_are_disjoint_and_cover_the_split(indexed_root, device_cache):
    """With 2 processes, each takes its own half of every epoch's order; together one step of
    both is the batch of a single process with twice the batch size."""
    single = datamodule(indexed_root, binarize="none", batch_size=32, shuffle_seed=1)
    single_loader = single.train_dataloader()
    single_loader.sampler.layout = lambda: (0, 1, 0)
    single_batches = [image_indices(x) for x, _ in stored_batches(single, single_loader)]
    shards = []
    for rank in (0, 1):
        dm = datamodule(
            indexed_root, binarize="none", batch_size=16, shuffle_seed=1, device_cache=device_cache
        )
        loader = dm.train_dataloader()
        loader.sampler.layout = lambda rank=rank: (0, 2, rank)
        assert len(loader.sampler) == (N_TRAIN - VAL_SIZE) // 2
        shards.append([image_indices(x) for x, _ in stored_batches(dm, loader)])
    first, second = (set(torch.cat(shard).tolist()) for shard in shards)
    assert not first & second
    assert first | second == set(image_indices(single.splits["train"].images).tolist())
    for step, (a, b) in enumerate(zip(*shards, strict=True)):
        assert sorted(torch.cat([a, b]).tolist()) == sorted(single_batches[step].tolist())


def test_on_after_batch_transfer_preprocesses(data_dir):
    dm = datamodule(data_dir, binarize="dynamic")
    images, labels = dm.stored(next(iter(dm.train_dataloader())))
    inputs, x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert inputs is x  # no denoising corruption configured
    assert x.dtype == torch.float32 and x.shape == images.shape
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert y is labels


def test_write_fake_dataset_helper_round_trips(tmp_path):
    """The shared conftest helper writes files this module can read."""
    write_fake_dataset(tmp_path, "FashionMNIST", n_train=10, n_test=4)
    assert missing_files(tmp_path, "FashionMNIST") == []
    x, y = load_split(tmp_path, "FashionMNIST", False, (28, 28))
    assert x.shape == (4, 1, 28, 28) and y.shape == (4,)


def test_resume_after_the_last_batch_starts_the_next_epoch_whole(indexed_root):
    """A position saved after an epoch's last batch must not eat into the next epoch."""
    dm = datamodule(indexed_root, binarize="none", batch_size=16, shuffle_seed=5)
    loader = dm.train_dataloader()
    n_batches = len(loader)
    loader.load_state_dict({"epoch": 0, "taken": n_batches})
    loader.sampler.set_epoch(1)
    assert len(list(loader)) == n_batches


# --- image sources: the one thing a new dataset provides --------------------------------------


class ArraySource(ImageSource):
    """A dataset held in memory, 3x8x8 RGB, with its own validation split."""

    name = "Arrays"
    image_shape = (3, 8, 8)
    splits = ("train", "val", "test")
    sizes = {"train": 40, "val": 12, "test": 20}

    def missing(self, data_dir):
        return []

    def read(self, data_dir, split):
        g = torch.Generator().manual_seed(len(split))
        n = self.sizes[split]
        images = torch.randint(0, 256, (n, *self.image_shape), dtype=torch.uint8, generator=g)
        return images, torch.arange(n) % 3


def test_a_new_source_needs_only_read_and_uses_its_own_validation_split():
    dm = ImageDataModule(ArraySource(), data_dir="unused", batch_size=8, binarize="none")
    dm.prepare_data()
    dm.setup()
    assert dm.image_shape == (3, 8, 8) and dm.num_dims == 192
    assert {split: len(dm.splits[split]) for split in ("train", "val", "test")} == {
        "train": 40,
        "val": 12,
        "test": 20,
    }
    inputs, targets, labels = dm.fetch(next(iter(dm.train_dataloader())))
    assert inputs.shape == (8, 3, 8, 8) and 0 <= inputs.min() and inputs.max() < 1
    assert dm.pixel_model == "dequantized"


def test_a_source_with_the_wrong_image_shape_is_one_line():
    class Wrong(ArraySource):
        def read(self, data_dir, split):
            images, labels = super().read(data_dir, split)
            return images[:, :1], labels  # grey images from a source that says RGB

    dm = ImageDataModule(Wrong(), data_dir="unused", binarize="none", batch_size=8)
    expected = r"Arrays train images are torch.uint8 \(1, 8, 8\), expected uint8 \(3, 8, 8\)"
    with pytest.raises(DataError, match=expected):
        dm.setup("fit")


def test_the_source_must_be_an_image_source():
    with pytest.raises(ConfigError, match="data.source must be an image source"):
        ImageDataModule("MNIST", data_dir="unused")


def test_bernoulli_255_matches_its_closed_form_per_intensity():
    """P(x = 1) = p/256 + p/256² + p/256³ (+ 1/256³ at p = 255), i.e. p/255 to 2^-24: black
    is always 0, white always 1, and every other intensity's frequency is within 5 binomial
    standard deviations of p/255."""
    torch.manual_seed(0)
    pixels = torch.arange(256, dtype=torch.uint8).repeat(4000)
    draws = torch.stack([bernoulli_255(pixels) for _ in range(10)]).view(-1, 256).double()
    p = torch.arange(256, dtype=torch.float64) / 255
    frequency, n = draws.mean(0), draws.shape[0]
    assert frequency[0] == 0 and frequency[255] == 1
    assert ((frequency - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()


@pytest.mark.parametrize("p", [0, 1, 2, 127, 128, 254, 255])
def test_the_three_byte_rule_gives_p_over_255_exactly_as_documented(p):
    """Over all 256³ byte triples the rule says 1 for exactly p * 65793 (+ 1 at p = 255) of
    them: P(x) = p/256 + p/256² + p/256³ (+ 1/256³ at p = 255), without sampling error."""
    byte = torch.arange(256, dtype=torch.uint8)
    r0, r1, r2 = (
        byte.view(shape).expand(256, 256, 256).reshape(-1)
        for shape in ((256, 1, 1), (1, 256, 1), (1, 1, 256))
    )
    pixels = torch.full_like(r0, p)
    ones = int(from_three_bytes(pixels, r0, r1, r2).sum())
    assert ones == p * 65793 + (p == 255)


def test_the_cpu_path_draws_later_bytes_for_ties_only_and_follows_the_same_rule(monkeypatch):
    """On a CPU the second and third bytes are drawn only for the pixels tied so far; fed the
    bytes the three-byte rule would read at those pixels (ties made common on purpose), it
    decides every pixel as that rule does."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)
    pixels[:8] = 255
    pixels[8:16] = 0

    def tie_half(r: torch.Tensor) -> torch.Tensor:  # every other byte equal to its pixel
        return torch.where(torch.arange(len(r)) % 2 == 0, pixels, r)

    r0, r1, r2 = (
        tie_half(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)) for _ in "abc"
    )
    ties0 = (r0 == pixels).nonzero().squeeze(1)
    ties1 = ties0[(r1[ties0] == pixels[ties0]).nonzero().squeeze(1)]
    served = [r0, r1[ties0], r2[ties1]]
    asked = []

    def fake_random_bytes(n, device="cpu"):
        asked.append(n)
        return served[len(asked) - 1]

    monkeypatch.setattr(pixels_module, "random_bytes", fake_random_bytes)
    got = bernoulli_255(pixels.view(64, 1, 8, 8))
    assert asked == [4096, len(ties0), len(ties1)] and 0 < len(ties1) < len(ties0) < 4096
    assert torch.equal(got.view(-1), from_three_bytes(pixels, r0, r1, r2))
