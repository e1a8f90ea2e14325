"""Data for the demo: scikit-learn's embedded 8x8 digits, or local MNIST / Fashion-MNIST / CIFAR-10.

Every loader returns float32 images ``N x C x H x W`` scaled to ``[0, 1]`` and
int64 labels, with a fixed train/test split. Files are checked as they are
read; anything missing or malformed raises one-line ``FileNotFoundError`` /
``ValueError`` messages naming the file.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

__all__ = ["DATASETS", "Dataset", "load", "read_cifar10_batch", "read_idx"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # N,C,H,W float32 in [0, 1]
    y_train: np.ndarray  # N int64
    x_test: np.ndarray  # M,C,H,W
    y_test: np.ndarray  # M
    classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """``(name, folder)`` of ``digits`` or ``mnist:DIR`` / ``fashion-mnist:DIR`` / ``cifar10:DIR``;
    raises ``ValueError`` for a spec that names no dataset (the folder is not looked at)."""
    name, _, folder = spec.partition(":")
    name = name.strip().lower()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: digits, mnist:DIR, fashion-mnist:DIR, cifar10:DIR")
    if name == "digits":
        if folder:
            raise ValueError("the digits dataset is embedded; it takes no folder")
        return name, None
    if not folder:
        raise ValueError(f"dataset {name} needs a folder: --data {name}:DIR")
    return name, Path(folder).expanduser()


def load(spec: str) -> Dataset:
    """``digits`` (embedded), or ``mnist:DIR``, ``fashion-mnist:DIR``, ``cifar10:DIR``."""
    name, path = parse_spec(spec)
    if path is None:
        return load_digits()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    return load_cifar10(path) if name == "cifar10" else load_mnist(path, name)


def _digits_file() -> Path:
    # the CSV scikit-learn ships; located without importing sklearn (seconds of import time)
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded digits dataset needs scikit-learn: pip install 'batchnorm[demo]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"scikit-learn's digits data is missing: {path}")
    return path


def load_digits(test_size: int = 450) -> Dataset:
    """scikit-learn's 1797 8x8 digits (0..16), split 1347/450, stratified by class, the same every time."""
    table = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float32)  # N, 64 pixels + label
    if table.ndim != 2 or table.shape[1] != 65:
        raise ValueError(f"unexpected digits data of shape {table.shape}")
    x = (table[:, :64] / 16.0).reshape(-1, 1, 8, 8)  # N,1,8,8
    y = table[:, 64].astype(np.int64)
    # stratified split from a fixed permutation: each class gives its share of the test set
    order = np.random.RandomState(0).permutation(len(y))
    classes, sizes = np.unique(y, return_counts=True)
    quota = sizes * test_size / len(y)
    counts = np.floor(quota).astype(int)
    counts[np.argsort(counts - quota)[: test_size - counts.sum()]] += 1  # largest remainders round up
    test = np.zeros(len(y), dtype=bool)
    for c, count in zip(classes, counts, strict=True):
        test[order[y[order] == c][:count]] = True
    return Dataset("digits", x[~test], y[~test], x[test], y[test], 10)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not): 2 zero bytes, a type code, the rank, big-endian sizes, data."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: corrupt gzip data ({error})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    rank = raw[3]
    header = 4 + 4 * rank
    if rank == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{rank}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: corrupt IDX file: header says {shape} ({expected} bytes), found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    # the usual names, gzipped or not, with '-' or '.' before 'idx'
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"missing file in {folder}: {stem} (or {stem}.gz)")


def load_mnist(folder: Path, name: str = "mnist") -> Dataset:
    """The four standard IDX files of MNIST or Fashion-MNIST in ``folder``."""
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{images_path}: expected N x H x W unsigned bytes, got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
        if len(images) == 0:
            raise ValueError(f"{images_path}: holds no images")
        if labels.max() > 9:
            raise ValueError(f"{labels_path}: labels must lie in 0..9, found {int(labels.max())}")
        parts[split] = ((images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64))
    (x_train, y_train), (x_test, y_test) = parts["train"], parts["test"]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{folder}: train images {x_train.shape[2:]} and test images {x_test.shape[2:]} differ")
    return Dataset(name, x_train, y_train, x_test, y_test, 10)


# --- CIFAR-10 (python pickles) --------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: no other code runs."""

    _allowed: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: a pickled dict with ``data`` (N x 3072 bytes) and ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR-10 batch file: {path}")
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as error:  # pickle raises many kinds on garbage
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (expected a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected data of N x 3072 bytes, got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or len(data) == 0:
        raise ValueError(f"{path}: expected {len(data)} labels, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels must lie in 0..9")
    return (data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0), labels


def load_cifar10(folder: Path) -> Dataset:
    """``data_batch_1..5`` and ``test_batch`` in ``folder`` (or its ``cifar-10-batches-py``)."""
    if (folder / "cifar-10-batches-py").is_dir() and not (folder / "test_batch").exists():
        folder = folder / "cifar-10-batches-py"
    train = [read_cifar10_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read_cifar10_batch(folder / "test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)
