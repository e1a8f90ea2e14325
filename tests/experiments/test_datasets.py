"""Dataset loaders, on small files written here in the real formats (IDX, gzipped or not; CIFAR-10 pickles)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from batchnorm.experiments import datasets


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    big_endian = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(big_endian).tobytes()


def write_mnist(folder, rng, *, n_train=7, n_test=5, size=6, gz=True, dotted=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        arrays[prefix] = (images, labels)
        for kind, array, rank in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}{'.' if dotted else '-'}idx{rank}-ubyte" + (".gz" if gz else "")
            data = idx_bytes(array)
            (folder / name).write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_loader_reads_idx_files(tmp_path, rng, gz, name):
    arrays = write_mnist(tmp_path, rng, gz=gz)
    data = datasets.load(f"{name}:{tmp_path}")
    assert data.name == name and data.classes == 10
    assert data.x_train.shape == (7, 1, 6, 6) and data.x_test.shape == (5, 1, 6, 6)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    np.testing.assert_allclose(data.x_train[:, 0], arrays["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_test, arrays["t10k"][1])


def test_mnist_loader_accepts_dotted_names(tmp_path, rng):
    arrays = write_mnist(tmp_path, rng, gz=False, dotted=True)
    np.testing.assert_array_equal(datasets.load(f"mnist:{tmp_path}").y_train, arrays["train"][1])


@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_every_type(tmp_path, rng, code):
    array = rng.integers(-100, 100, size=(3, 2, 4)) if code != 0x08 else rng.integers(0, 255, size=(3, 2, 4))
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(array, code))
    np.testing.assert_array_equal(datasets.read_idx(path), array)


def test_read_idx_rejects_corrupt_files(tmp_path, rng):
    good = idx_bytes(rng.integers(0, 255, size=(4, 3, 3)))
    cases = {
        "truncated": good[:-5],
        "too_long": good + b"\0",
        "bad_magic": b"\1\2" + good[2:],
        "bad_type": good[:2] + b"\x42" + good[3:],
        "short_header": good[:6],
        "bad_gzip": gzip.compress(good)[:-12],
    }
    for name, raw in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=name):  # the message names the file
            datasets.read_idx(path)


def test_mnist_loader_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        datasets.load(f"mnist:{tmp_path / 'nowhere'}")
    write_mnist(tmp_path, rng, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        datasets.load(f"mnist:{tmp_path}")
    # as many labels as images, or an error naming the labels file
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="expected 5 labels"):
        datasets.load(f"mnist:{tmp_path}")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 11, np.uint8)))
    with pytest.raises(ValueError, match=r"0\.\.9"):
        datasets.load(f"mnist:{tmp_path}")


def cifar_batch(rng, n):
    return {
        b"batch_label": b"testing batch",
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def write_cifar(folder, rng, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(rng, n)
        with (folder / name).open("wb") as f:
            pickle.dump(batches[name], f, protocol=2)
    return batches


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_loader(tmp_path, rng, nested):
    batches = write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path, rng)
    data = datasets.load(f"cifar10:{tmp_path}")
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0]
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32 x 32
    np.testing.assert_allclose(data.x_train[0, 1, 2, 5], first[1024 + 2 * 32 + 5] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_train[4:8], batches["data_batch_2"][b"labels"])
    np.testing.assert_array_equal(data.y_test, batches["test_batch"][b"labels"])


def test_cifar10_loader_errors(tmp_path, rng):
    write_cifar(tmp_path, rng)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        datasets.load(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR-10 python batch"):
        datasets.load(f"cifar10:{tmp_path}")
    bad = cifar_batch(rng, 4)
    bad[b"data"] = bad[b"data"][:, :100]
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match="N x 3072"):
        datasets.load(f"cifar10:{tmp_path}")


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Boom(), b"labels": [0]}))
    with pytest.raises(ValueError, match="refusing to load"):
        datasets.read_cifar10_batch(path)


def test_digits_is_embedded_and_fixed():
    a, b = datasets.load("digits"), datasets.load("DIGITS")
    assert a.x_train.shape == (1347, 1, 8, 8) and a.x_test.shape == (450, 1, 8, 8)
    assert a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(np.bincount(a.y_test), np.bincount(b.y_test))
    assert np.bincount(a.y_test).min() >= 40  # stratified: every class well represented
    # the very images and labels scikit-learn serves (read from its file without importing it)
    from sklearn.datasets import load_digits

    sk = load_digits()
    ours = np.concatenate([a.x_train, a.x_test]).reshape(-1, 64) * 16
    labels = np.concatenate([a.y_train, a.y_test])
    key = np.lexsort(np.column_stack([ours, labels]).T)
    sk_key = np.lexsort(np.column_stack([sk.data, sk.target]).T)
    np.testing.assert_allclose(ours[key], sk.data[sk_key], atol=1e-5)
    np.testing.assert_array_equal(labels[key], sk.target[sk_key])


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("imagenet", ValueError, "unknown dataset 'imagenet'"),
        ("mnist", ValueError, "needs a folder"),
        ("digits:/tmp", ValueError, "embedded"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        datasets.load(spec)
