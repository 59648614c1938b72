"""IDX datasets: the reader (gzip or raw) on files made here and on the real Fashion-MNIST files when
present, the in-memory loader's 28×28 recipe (pad-and-crop, flip, whole-image evaluation), the fixed
stratified subset, and a trainer run that defaults its crop to the images' own size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import LoaderConfig, build_loaders, idx, native_image_size, resolve_data
from train.data.augment import IMAGENET_MEAN, IMAGENET_STD
from train.data.tensors import shift_and_flip, stratified_subset

REAL = idx.FASHION_MNIST_DIR


def _folder(root: Path, n_train: int = 60, n_test: int = 20, size: int = 28, compress: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        idx.write_idx(root / f"{split}-images-idx3-ubyte{'.gz' if compress else ''}", images, compress)
        idx.write_idx(root / f"{split}-labels-idx1-ubyte", labels)  # one raw file among gzipped ones
    return root


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_gzip_or_raw(tmp_path: Path, compress: bool) -> None:
    for array in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([-3, 7], dtype=np.int32),
                  np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)):
        path = tmp_path / f"a{array.dtype}.idx"
        idx.write_idx(path, array, compress)
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
        back = idx.read_idx(path)
        assert back.dtype == array.dtype and back.shape == array.shape and np.array_equal(back, array)


def test_idx_header_by_hand_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6)))
    assert idx.read_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]
    path.write_bytes(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(5)))
    with pytest.raises(ValueError, match="needs 6 bytes"):
        idx.read_idx(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        idx.read_idx(path)


def test_a_folder_missing_a_file_says_which_four_go_where(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f")
    assert resolve_data(str(root)) == root and idx.idx_files(root) is not None
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.*make fashion"):
        resolve_data(str(root))


def test_loader_recipe_pad_crop_flip_and_whole_image_eval(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f")
    cfg = LoaderConfig(root=root, loader="cpu", device=torch.device("cpu"), device_batch=16, image_size=28, seed=3)
    train, test = build_loaders(cfg)
    assert (train.num_samples, test.num_samples, train.num_classes) == (60, 20, 10)
    assert native_image_size(root) == 28
    images, labels = idx.load_split(root, "test")
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    x, y = next(iter(test.batches()))
    expected = (torch.from_numpy(images[:20]).float()[:, None] / 255 - mean) / std  # the whole image, no crop
    assert torch.allclose(x, expected, atol=1e-5) and torch.equal(y, torch.from_numpy(labels[:20]))
    batches = list(train.epoch(0, 32))
    assert [tuple(b[0].shape) for b in batches] == [(16, 3, 28, 28)] * 4  # ⌈60/32⌉ updates × 2 micro-batches
    assert [b[0].shape for b in train.epoch(0, 32)] == [b[0].shape for b in batches]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(train.epoch(0, 32), batches))  # a pure function of the seed


def test_shift_and_flip_is_a_window_of_the_padded_image() -> None:
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    out = shift_and_flip(images, torch.Generator().manual_seed(1), flip=True)
    gen = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 5, (64, 2), generator=gen)
    mirror = torch.rand(64, generator=gen) < 0.5
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2))
    for i in range(64):
        dy, dx = offsets[i].tolist()
        window = padded[i, dy:dy + 28, dx:dx + 28]
        assert torch.equal(out[i], window.flip(-1) if mirror[i] else window)
    assert 10 < int(mirror.sum()) < 54 and len({tuple(o) for o in offsets.tolist()}) > 10
    plain = shift_and_flip(images, torch.Generator().manual_seed(1), flip=False)
    assert not torch.equal(plain, out)


def test_stratified_subset_keeps_class_proportions() -> None:
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    keep = stratified_subset(labels, 100)
    assert torch.bincount(labels[keep]).tolist() == [60, 30, 10]
    assert torch.equal(keep, stratified_subset(labels, 100)) and len(set(keep.tolist())) == 100
    with pytest.raises(ValueError, match="--train-subset"):
        stratified_subset(labels, 0)
    # exactly the size asked for, also where the shares are not whole (16,384 of ten classes of 6,000: the
    # fashion preset's largest batch is the whole subset)
    ten = torch.arange(10).repeat_interleave(6000)
    keep = stratified_subset(ten, 16384)
    assert len(keep) == 16384 and torch.bincount(ten[keep]).tolist() == [1639] * 4 + [1638] * 6
    odd = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    assert torch.bincount(odd[stratified_subset(odd, 4)]).tolist() == [2, 1, 1]  # 1.87, 1.33, 0.8


def test_trainer_defaults_the_crop_to_the_images_size_and_says_so_once(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from train.config import TrainConfig
    from train.engine import train

    root = _folder(tmp_path / "f", n_train=200, n_test=50)
    result = train(TrainConfig(data=str(root), model="cnn28", optimizer="sgd", global_batch=50, lr=0.1, epochs=2,
                               warmup_epochs=0, device="cpu", loader="cpu", workers=0, train_subset=100,
                               out=str(tmp_path / "run"), tensorboard="off", noise_scale=False))
    said = capsys.readouterr().out
    assert said.count("--image-size not given") == 1 and "cropping at 28" in said
    assert result.steps == 4 and 0 <= result.top1 <= 1  # 100 of the 200 images, batch 50, 2 epochs


@pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists(),
                    reason=f"Fashion-MNIST is not installed in {REAL} (make fashion-data)")
def test_the_real_fashion_mnist_files() -> None:
    train_images, train_labels = idx.load_split(REAL, "train")
    test_images, test_labels = idx.load_split(REAL, "test")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(train_labels).tolist() == [6000] * 10 and np.bincount(test_labels).tolist() == [1000] * 10
    assert train_images.dtype == np.uint8 and 60 < train_images.mean() < 90  # mean grey level ≈ 72.9
    assert native_image_size(REAL) == 28
    from train.study.presets import FASHION, FASHION_SUBSET

    kept = stratified_subset(torch.from_numpy(train_labels), FASHION_SUBSET)
    assert len(kept) == FASHION_SUBSET == FASHION.train_size
    assert max(FASHION.batches) <= FASHION.train_size and FASHION.train_size % max(FASHION.batches) == 0
    # the top batch fits the subset a whole number of times: every batch sees the same images per epoch
