"""IDX files (the MNIST / Fashion-MNIST format) and the four-file dataset folders made of them.

An IDX file is a big-endian header — two zero bytes, a type byte (0x08 unsigned byte, 0x09 signed
byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions d — then d
big-endian uint32 sizes, then the values in row-major order. Files may be gzip-compressed (read by
their magic bytes 1f 8b, whatever their name).

A dataset folder holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte, each optionally with a .gz suffix (Debian's dataset-fashion-mnist installs
them gzipped under /usr/share/datasets/fashion-mnist/).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
          0x0E: np.dtype(">f8")}
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in the IDX file at `path` (gzip-compressed or raw), in native byte order; a
    ValueError naming the file when its header or length is wrong."""
    path = Path(path)
    with path.open("rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in DTYPES:
        raise ValueError(f"{path}: not an IDX file (header {data[:4].hex()})")
    dims = data[3]
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"{path}: IDX header says {dims} dimensions but the file ends at {len(data)} bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX shape {shape} of {dtype} needs {expected} bytes of data, the file has "
                         f"{len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool = False) -> None:
    """Write `array` as an IDX file (gzip-compressed with `compress`): for tests and small conversions."""
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"no IDX type for dtype {array.dtype}")
    body = bytes([0, 0, code, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    body += np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
    Path(path).write_bytes(gzip.compress(body) if compress else body)


def idx_files(root: str | os.PathLike[str]) -> dict[str, Path] | None:
    """The four files of the IDX dataset folder `root` (each name with or without .gz), or None when
    any is missing."""
    root = Path(root)
    found = {}
    for key, name in FILES.items():
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def missing_files_message(root: str | os.PathLike[str]) -> str:
    """What to put where for an IDX dataset folder (the error of a folder that lacks some)."""
    names = ", ".join(f"{n}[.gz]" for n in FILES.values())
    return (f"--data {root}: an IDX dataset folder needs the four files {names}; for Fashion-MNIST, "
            f"`make fashion` installs Debian's dataset-fashion-mnist into {FASHION_MNIST_DIR}, or download the "
            f"four .gz files of https://github.com/zalandoresearch/fashion-mnist (data/fashion) into one folder")


def load_split(root: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels int64 [N]) of split "train" or "test" of the IDX folder `root`."""
    files = idx_files(root)
    if files is None:
        raise ValueError(missing_files_message(root))
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"--data {root}: {split} images {images.shape} and labels {labels.shape} do not match "
                         "(expected [N, H, W] and [N])")
    if images.dtype != np.uint8:
        raise ValueError(f"--data {root}: {split} images are {images.dtype}, expected unsigned bytes")
    return images, labels.astype(np.int64)
