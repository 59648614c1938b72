"""ImageFolder datasets on disk: the layout check with clear errors, and the bundled digits dataset.

Layout: ROOT/train/<class>/<image> and ROOT/val/<class>/<image>; classes are the sorted folder names
(the same list in both splits), images the sorted files with an image suffix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DIGITS_FOLDER = "digits-jpeg-v1"
DIGITS_SIZE = 16
DIGITS_VAL_FRACTION = 0.2
DIGITS_FOLDS = 5
DEFAULT_FOLD_PREFIX = "default:fold="
NO_FLIP_MARKER = "no-flip"  # a file of this name in an ImageFolder root turns horizontal flips off


@dataclass(frozen=True)
class ImageList:
    """One split: the images as paths relative to `folder` ("<class>/<file>", fixed-width bytes in
    one numpy array: no Python object per image, so forked DataLoader workers do not copy them on
    touch, as lists of 1.28M strings are), their class indices and the class names."""

    folder: Path
    files: np.ndarray
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> str:
        """The full path of image i."""
        return os.path.join(self.folder, os.fsdecode(self.files[i]))

    def paths(self) -> list[str]:
        """All full paths, in order."""
        return [self.path(i) for i in range(len(self))]


def _images(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:  # d_type from the directory: no stat per file on most filesystems
        return sorted(e.name for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())


def scan_split(root: Path, split: str) -> ImageList:
    """The images of root/split, or a ValueError starting "--data:" that says what is wrong."""
    folder = root / split
    if not folder.is_dir():
        raise ValueError(f"--data: {root} has no {split}/ folder (expected an ImageFolder root with train/ and val/)")
    with os.scandir(folder) as entries:
        classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise ValueError(f"--data: {folder} has no class folders")
    files: list[bytes] = []
    counts: list[int] = []
    for name in classes:
        images = _images(folder / name)
        if not images:
            raise ValueError(f"--data: class folder {folder / name} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [os.fsencode(os.path.join(name, image)) for image in images]
        counts.append(len(images))
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(counts))
    return ImageList(folder, np.array(files), labels, tuple(classes))


def digits_fold_of(data: str) -> int | None:
    """The cross-validation fold `data` names: "default:fold=K" → K (0 ≤ K < DIGITS_FOLDS); None for
    anything else ("default" itself is the fixed 80/20 split)."""
    if not data.startswith(DEFAULT_FOLD_PREFIX):
        return None
    text = data[len(DEFAULT_FOLD_PREFIX):]
    if not text.isdigit() or not 0 <= int(text) < DIGITS_FOLDS:
        raise ValueError(f"--data {data}: the fold must be an integer in 0 … {DIGITS_FOLDS - 1}")
    return int(text)


def is_default_data(data: str) -> bool:
    """Whether `data` names the bundled digits ("default", or one of its folds "default:fold=K")."""
    return data == "default" or data.startswith(DEFAULT_FOLD_PREFIX)


def resolve_data(data: str) -> Path:
    """"default" → the bundled digits folder (built on first use), "default:fold=K" → its fold K
    (digits_fold_split); otherwise `data` checked as an ImageFolder root: both splits present, every
    class folder non-empty, the same classes in both."""
    root = default_dataset(fold=digits_fold_of(data)) if is_default_data(data) else Path(data).expanduser()
    if not root.exists():
        raise ValueError(f"--data: {root} does not exist")
    from train.data import idx

    if idx.idx_files(root) is not None:
        return root
    if not (root / "train").is_dir() and any(root.glob("*idx*-ubyte*")):
        raise ValueError(idx.missing_files_message(root))
    train, val = scan_split(root, "train"), scan_split(root, "val")
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise ValueError(f"--data: train/ and val/ of {root} have different classes (in one only: {only[:5]})")
    return root


def dataset_flips(root: Path) -> bool:
    """Whether training images of the dataset at `root` may be mirrored: yes unless the root holds a
    file named "no-flip" (the bundled digits do: a mirrored digit is another digit, or none)."""
    return not (root / NO_FLIP_MARKER).exists()


def default_image_size(data: str) -> int:
    """The crop size the model sees: 16 for the bundled digits, 224 otherwise."""
    return DIGITS_SIZE if is_default_data(data) else 224


def native_image_size(root: Path) -> int | None:
    """The shorter side of the dataset's training images: from the header of an IDX folder's training
    images, else of the first image of the first class folder of root/train (None when unreadable)."""
    import gzip

    from train.data import idx

    files = idx.idx_files(root)
    if files is not None:
        path = files["train_images"]
        with path.open("rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as f:
            header = f.read(16)
        return min(int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big"))
    try:
        with os.scandir(root / "train") as entries:
            first = min((e.name for e in entries if e.is_dir()), default=None)
        if first is None:
            return None
        name = min(_images(root / "train" / first), default=None)
        if name is None:
            return None
        from train.data import codec

        data = torch.frombuffer(bytearray((root / "train" / first / name).read_bytes()), dtype=torch.uint8)
        image = codec.active().decode_image(data)
    except (OSError, RuntimeError, ValueError):
        return None
    return int(min(image.shape[-2:]))


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """cache_dir, else $FASTLARS_DATA_CACHE, else ~/.cache/fastlars."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FASTLARS_DATA_CACHE") or Path.home() / ".cache" / "fastlars")


def digits_split() -> tuple[list[int], list[int]]:
    """Indices of sklearn's digits in the training and validation split: stratified 80/20 with
    random_state 0 (1,437 / 360 images), the split the study's reports use."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, val = train_test_split(list(range(len(target))), test_size=DIGITS_VAL_FRACTION, random_state=0,
                                  stratify=target)
    return list(train), list(val)


def digits_fold_split(fold: int, folds: int = DIGITS_FOLDS) -> tuple[list[int], list[int]]:
    """Indices of sklearn's digits in the training and validation split of cross-validation fold
    `fold`: stratified K-fold (K = `folds`, shuffled with random_state 0), so the K validation splits
    are disjoint, cover all 1,797 images, and each holds every class in proportion (359 or 360 images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold

    if not 0 <= fold < folds:
        raise ValueError(f"fold must lie in 0 … {folds - 1}, got {fold}")
    target = load_digits().target
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0).split(target.reshape(-1, 1), target)
    train, val = list(splits)[fold]
    return [int(i) for i in train], [int(i) for i in val]


def default_dataset(cache_dir: str | os.PathLike[str] | None = None, fold: int | None = None) -> Path:
    """The bundled dataset as an ImageFolder of JPEGs, written once: sklearn's 1,797 handwritten digits
    (8×8, 17 grey levels; shipped inside the scikit-learn wheel), scaled to 0–255, upsampled ×2
    (bilinear) to 16×16, grey replicated to RGB, JPEG quality 95, split by digits_split() (or, with
    `fold`, by digits_fold_split(fold), in its own folder), with a "no-flip" marker (dataset_flips).
    Built in a temporary folder and renamed into place, so concurrent first uses are safe: the loser
    of the race removes its copy and uses the winner's."""
    name = DIGITS_FOLDER if fold is None else f"{DIGITS_FOLDER}-fold{fold}of{DIGITS_FOLDS}"
    root = cache_root(cache_dir) / name
    if root.is_dir():
        if not (root / NO_FLIP_MARKER).exists():  # built before the marker existed
            with contextlib.suppress(OSError):  # a read-only shared cache: flips stay the caller's choice
                (root / NO_FLIP_MARKER).touch()
        return root
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from train.data import codec

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=name + ".", dir=root.parent))
    try:
        splits = digits_split() if fold is None else digits_fold_split(fold)
        for split, indices in zip(("train", "val"), splits):
            for i in indices:
                folder = staging / split / str(int(digits.target[i]))
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{i:04d}.jpg").write_bytes(codec.active().encode_jpeg(images[i], quality=95))
        (staging / NO_FLIP_MARKER).write_text("a mirrored digit is another digit (or none)\n")
        try:
            os.rename(staging, root)
        except OSError:
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
