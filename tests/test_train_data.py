"""train.data on CPU: the bundled digits folder, the order contract (layout- and resume-independent
micro-batches), the batched augmentation, evaluation shards, and clear errors for bad inputs."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from train.data import (
    IMAGE_SUFFIXES,
    LoaderConfig,
    augment,
    build_loaders,
    codec,
    default_dataset,
    default_image_size,
    order,
    resolve_data,
)
from train.data.folders import DIGITS_FOLDER, dataset_flips, digits_split, scan_split

CPU = torch.device("cpu")
HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_dataset(tmp_path_factory.mktemp("cache"))


def make_folder(root: Path, classes: dict[str, int], seed: int = 0, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A small ImageFolder of random JPEGs of assorted, non-square sizes."""
    generator = torch.Generator().manual_seed(seed)
    for split in splits:
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in torch.randint(12, 40, (2,), generator=generator))
                image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
                (folder / f"{i:03d}.jpg").write_bytes(codec.active().encode_jpeg(image, quality=90))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"), {"a": 13, "b": 11, "c": 13})  # 37 images per split


def config(root: Path | None, **kw: object) -> LoaderConfig:
    base: dict[str, object] = {"root": root, "loader": "cpu", "device": CPU, "device_batch": 8, "image_size": 16,
                               "workers": 0, "seed": 3}
    return LoaderConfig(**{**base, **kw})  # type: ignore[arg-type]


def epoch(root: Path, epoch_: int, global_batch: int, start_update: int = 0, **kw: object) -> list[tuple]:
    train, _ = build_loaders(config(root, **kw))
    return list(train.epoch(epoch_, global_batch, start_update))


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------- the bundled digits


def test_default_dataset_layout_counts_and_decodable(digits: Path) -> None:
    assert digits.name == DIGITS_FOLDER and digits.parent.name.startswith("cache")
    train, val = scan_split(digits, "train"), scan_split(digits, "val")
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == val.classes == tuple(str(d) for d in range(10))
    assert all(p.endswith(".jpg") and os.path.isfile(p) for p in train.paths() + val.paths())
    from PIL import Image

    assert {Image.open(p).mode for p in val.paths()} == {"RGB"}
    images = codec.active().decode_jpegs([_bytes(p) for p in val.paths()], "cpu")
    assert all(im.shape == (3, 16, 16) and im.dtype == torch.uint8 for im in images)
    assert max(int(im.max()) for im in images) > 200  # ink scaled to 0–255, not left at 0–16
    assert not dataset_flips(digits)


def _bytes(path: str | Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


# The bundled digits as written and decoded through torchvision.io (encode_jpeg, decode_jpeg, mode RGB) at
# commit ea885b7, before train.data.codec; computed there by digest_of_digits() below (files: every JPEG's
# bytes; pixels: each decoded image's shape and bytes; the train split, then val, in scan_split order).
DIGITS_FILES_SHA256 = "00c9b7b602e39c720691a2f25e4d85105312fdd9efb6d6e8df65610784cdd71f"
DIGITS_PIXELS_SHA256 = "2062566eb09c89dd89115801227e9aa1c3d32f9e3dd911c7018c7821ba45051d"


def digest_of_digits(root: Path, decode) -> tuple[str, str]:
    files, pixels = hashlib.sha256(), hashlib.sha256()
    for split in ("train", "val"):
        paths = scan_split(root, split).paths()
        encoded = [_bytes(p) for p in paths]
        for data in encoded:
            files.update(data.numpy().tobytes())
        for image in decode(encoded, paths):
            pixels.update(str(tuple(image.shape)).encode())
            pixels.update(image.contiguous().numpy().tobytes())
    return files.hexdigest(), pixels.hexdigest()


def test_the_loaders_decode_the_digits_as_before(digits: Path) -> None:
    """augment.decode (every loader's decoder) gives the pixels torchvision.io gave, from the same files."""
    assert codec.active().name == codec.available()[0]
    assert digest_of_digits(digits, augment.decode) == (DIGITS_FILES_SHA256, DIGITS_PIXELS_SHA256)


@pytest.mark.parametrize("name", codec.CODECS)
def test_every_codec_writes_and_decodes_the_digits_alike(name: str, tmp_path: Path, monkeypatch) -> None:
    """Each codec, wherever it imports (torchvision's even where it is deprecated, as the old path),
    writes the bundled dataset byte for byte and decodes it pixel for pixel as before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29's image codecs
        try:
            chosen = codec._CLASSES[name]()
        except Exception as exc:  # a torchcodec built for another torch fails to load
            pytest.skip(f"{name} is not usable here: {exc}")
        monkeypatch.setattr(codec, "active", lambda: chosen)
        root = default_dataset(tmp_path)
        assert digest_of_digits(root, augment.decode) == (DIGITS_FILES_SHA256, DIGITS_PIXELS_SHA256)


def test_default_dataset_split_is_stratified_and_fixed(digits: Path) -> None:
    from sklearn.datasets import load_digits

    train_idx, val_idx = digits_split()
    assert digits_split() == (train_idx, val_idx)
    target = load_digits().target
    assert (len(train_idx), len(val_idx)) == (1437, 360)
    assert sorted(train_idx + val_idx) == list(range(len(target)))
    for label in range(10):  # stratified: every class 20% in validation, to within one image
        in_class = int((target == label).sum())
        assert abs(int((target[val_idx] == label).sum()) - 0.2 * in_class) <= 1
    files = {split: sorted(int(p.stem) for p in (digits / split).rglob("*.jpg")) for split in ("train", "val")}
    assert files == {"train": sorted(train_idx), "val": sorted(val_idx)}
    labels = {int(p.stem): int(p.parent.name) for p in (digits / "val").rglob("*.jpg")}
    assert all(labels[i] == target[i] for i in val_idx)


def test_default_dataset_is_built_once(digits: Path) -> None:
    probe = next((digits / "val" / "3").iterdir())
    before = (digits.stat().st_ino, probe.stat().st_mtime_ns, sorted(os.listdir(digits.parent)))
    assert default_dataset(digits.parent) == digits
    assert (digits.stat().st_ino, probe.stat().st_mtime_ns, sorted(os.listdir(digits.parent))) == before


def test_default_dataset_concurrent_first_use(tmp_path: Path) -> None:
    roots: list[Path] = []
    threads = [threading.Thread(target=lambda: roots.append(default_dataset(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert roots == [tmp_path / DIGITS_FOLDER] * 2
    assert os.listdir(tmp_path) == [DIGITS_FOLDER]  # the loser's staging folder is gone
    assert len(scan_split(roots[0], "train")) == 1437


def test_resolve_default_uses_the_cache_variable(digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLARS_DATA_CACHE", str(digits.parent))
    assert resolve_data("default") == digits
    assert default_image_size("default") == 16 and default_image_size(str(digits)) == 224
    assert IMAGE_SUFFIXES == (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------- the order contract


def test_order_one_process_with_accumulation_equals_two_ranks(folder: Path) -> None:
    one = epoch(folder, 0, 16)  # device_batch 8, accumulation 2
    ranks = [epoch(folder, 0, 16, rank=r, world_size=2) for r in range(2)]  # accumulation 1 each
    assert len(one) == 2 * 3 and all(len(r) == 3 for r in ranks)  # U = ⌈37 / 16⌉ = 3
    assert_same(one, [mb for update in zip(*ranks) for mb in update])


def test_order_accumulation_times_world_size_is_invariant(folder: Path) -> None:
    one = epoch(folder, 1, 32, device_batch=4)  # accumulation 8
    ranks = [epoch(folder, 1, 32, device_batch=4, rank=r, world_size=4) for r in range(4)]  # accumulation 2
    interleaved = [ranks[m % 4][u * 2 + m // 4] for u in range(2) for m in range(8)]
    assert_same(one, interleaved)


def test_resume_yields_the_tail_of_the_epoch(folder: Path) -> None:
    full = epoch(folder, 2, 16)
    assert_same(epoch(folder, 2, 16, start_update=2), full[2 * 2:])
    assert epoch(folder, 2, 16, start_update=3) == []


def test_epochs_and_seeds_differ(folder: Path) -> None:
    e0, e1 = epoch(folder, 0, 16), epoch(folder, 1, 16)
    assert not torch.equal(torch.cat([y for _, y in e0]), torch.cat([y for _, y in e1]))
    assert not torch.equal(e0[0][0], e1[0][0])
    assert not torch.equal(e0[0][0], epoch(folder, 0, 16, seed=4)[0][0])


def test_augmentation_does_not_depend_on_workers(folder: Path) -> None:
    assert_same(epoch(folder, 0, 16, workers=2), epoch(folder, 0, 16, workers=0))


def test_wrap_around_makes_every_update_full() -> None:
    n, g = 37, 16
    batches = list(order.micro_batches(n, g, 8, 0, 1, seed=5, epoch=0))
    assert len(batches) == 6 and all(len(mb.indices) == 8 for mb in batches)
    seen = torch.cat([mb.indices for mb in batches])
    assert len(seen) == 48 and set(seen[:n].tolist()) == set(range(n))  # a permutation, then wrap-around
    assert torch.equal(seen[n:], seen[:48 - n])
    assert len({mb.seed for mb in batches}) == 6


def test_loader_shapes_and_counts(folder: Path) -> None:
    train, val = build_loaders(config(folder, image_size=24))
    assert (train.num_samples, train.num_classes, val.num_samples) == (37, 3, 37)
    assert train.updates_per_epoch(16) == 3 and train.resumes_mid_epoch
    batches = list(train.epoch(0, 16))
    assert len(batches) == 6
    for x, y in batches:
        assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert y.min() >= 0 and y.max() < 3


def test_small_splits_held_in_memory_read_the_same_bytes(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train.data import files

    images = scan_split(folder, "train")
    held, direct = files.FileReader(images), files.FileReader(images, cache=False)
    assert held.buffer is not None and direct.buffer is None
    assert all(torch.equal(held.read(i), direct.read(i)) for i in range(len(images)))
    cached = epoch(folder, 0, 16)
    monkeypatch.setattr(files, "SMALL_SPLIT_BYTES", 100)  # too big to hold: read file by file
    assert files.FileReader(images).buffer is None
    assert_same(epoch(folder, 0, 16), cached)


def test_images_decoded_once_serve_the_same_batches(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small split is decoded once per process and its eval batches built once; both give exactly the
    batches of decoding every epoch, over several epochs (each epoch's crops differ)."""
    from train.data import decoded, loaders

    calls = []
    real_decode = augment.decode

    def counted(encoded: list, paths: list, **kw: object) -> list:
        calls.append(len(encoded))
        return real_decode(encoded, paths, **kw)

    monkeypatch.setattr(augment, "decode", counted)
    train, val = build_loaders(config(folder))
    kept = [list(train.epoch(e, 16)) for e in range(3)]
    evals = [list(val.batches()) for _ in range(2)]
    assert sum(calls) == 37 + 37  # every train and val image decoded once in three epochs and two evaluations
    assert train._decoded.kept_bytes == sum(im.numel() for im in train._decoded.get(list(range(37))))
    assert_same(evals[0], evals[1])

    monkeypatch.setattr(decoded, "KEPT_DECODED_BYTES", 0)  # nothing fits: decoded on every use
    monkeypatch.setattr(loaders, "KEPT_EVAL_BYTES", 0)
    calls.clear()
    fresh_train, fresh_val = build_loaders(config(folder))
    for e in range(3):
        assert_same(list(fresh_train.epoch(e, 16)), kept[e])
    assert_same(list(fresh_val.batches()), evals[0])
    assert_same(list(fresh_val.batches()), evals[0])
    assert sum(calls) == 3 * 48 + 2 * 37  # 3 epochs of 3 updates × 16 samples (wrap-around), two evaluations
    assert not torch.equal(kept[0][0][0], kept[1][0][0])


def test_indivisible_global_batch(folder: Path) -> None:
    train, _ = build_loaders(config(folder, world_size=2))
    with pytest.raises(ValueError, match=r"--global-batch 24 is not a multiple of .* 8 × 2 = 16"):
        next(iter(train.epoch(0, 24)))


# ---------------------------------------------------------------- augmentation and evaluation


def test_dtype_layout_and_normalisation(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "grey").mkdir(parents=True)
        image = torch.full((3, 20, 30), 128, dtype=torch.uint8)
        (tmp_path / split / "grey" / "x.png").write_bytes(_png(image))
    train, val = build_loaders(config(tmp_path, device_batch=2, dtype=torch.bfloat16, channels_last=True))
    x, _ = next(iter(train.epoch(0, 2)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    expected = (128 / 255 - torch.tensor(augment.IMAGENET_MEAN)) / torch.tensor(augment.IMAGENET_STD)
    torch.testing.assert_close(x.float().mean(dim=(0, 2, 3)), expected, atol=0.02, rtol=0)
    (xv, yv), = list(val.batches())
    assert xv.shape == (1, 3, 16, 16) and xv.dtype == torch.bfloat16 and torch.equal(yv, torch.tensor([0]))


def _png(image: torch.Tensor) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(out, format="PNG")
    return out.getvalue()


def test_crop_boxes_fit_and_cover_the_scale_range() -> None:
    generator = torch.Generator().manual_seed(0)
    heights, widths = torch.randint(10, 300, (2000,), generator=generator), torch.randint(10, 300, (2000,))
    boxes = augment.crop_boxes(heights, widths, (0.08, 1.0), generator)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= widths).all() and (boxes[:, 3] <= heights).all()
    assert (w >= 1).all() and (h >= 1).all() and (boxes == boxes.round()).all()
    area = w * h / (heights * widths)
    assert area.min() < 0.15 and area.max() > 0.9


def test_resample_of_the_whole_image_at_its_size_is_exact() -> None:
    images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8) for _ in range(3)]
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 3, dtype=torch.float64)
    assert torch.equal(augment.resample(images, boxes, 16), torch.stack(images).float())


def test_resample_groups_shapes_without_changing_results() -> None:
    generator = torch.Generator().manual_seed(1)
    shapes = [(20, 30), (30, 20), (20, 30), (17, 17), (30, 20), (20, 30)]
    images = [torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8) for h, w in shapes]
    heights, widths = torch.tensor([h for h, _ in shapes]), torch.tensor([w for _, w in shapes])
    boxes = augment.crop_boxes(heights, widths, (0.08, 1.0), generator)
    alone = torch.cat([augment.resample([im], box[None], 12) for im, box in zip(images, boxes)])
    assert torch.equal(augment.resample(images, boxes, 12), alone)


def test_flips_follow_the_dataset(folder: Path, digits: Path) -> None:
    assert dataset_flips(folder) and not dataset_flips(digits)
    flipped = epoch(folder, 0, 16, flip=True)
    plain = epoch(folder, 0, 16, flip=False)
    assert_same(epoch(folder, 0, 16), flipped)  # flip=None: the folder allows flips
    mirrored = [torch.equal(a.flip(-1), b) for (xa, _), (xb, _) in zip(flipped, plain) for a, b in zip(xa, xb)]
    assert 0 < sum(mirrored) < len(mirrored)


def test_eval_shards_cover_every_image_once(folder: Path) -> None:
    def shard(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, val = build_loaders(config(folder, rank=rank, world_size=world))
        xs, ys = zip(*val.batches())
        return torch.cat(xs), torch.cat(ys)

    x_all, y_all = shard(0, 1)
    assert len(x_all) == 37
    shards = [shard(r, 3) for r in range(3)]
    assert sum(len(x) for x, _ in shards) == 37
    for r, (x, y) in enumerate(shards):  # rank r holds positions r, r + 3, ...
        assert torch.equal(x, x_all[r::3]) and torch.equal(y, y_all[r::3])
    again = shard(0, 1)
    assert torch.equal(again[0], x_all)  # no augmentation


def test_synthetic_loader() -> None:
    cfg = LoaderConfig(root=None, loader="synthetic", device=CPU, device_batch=4, image_size=8, world_size=2,
                       synthetic_classes=7, synthetic_samples=100, channels_last=True)
    train, val = build_loaders(cfg)
    assert train.num_classes == 7 and train.updates_per_epoch(16) == 7
    batches = list(train.epoch(0, 16, start_update=5))
    assert len(batches) == 2 * 2  # 2 updates left × accumulation 2
    x, y = batches[0]
    assert x.shape == (4, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and int(y.max()) < 7
    assert len(list(val.batches())) == 1 and val.num_samples == 4


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("case", ["missing", "no-val", "empty-class", "different-classes", "no-classes"])
def test_bad_folders_give_data_errors(tmp_path: Path, case: str) -> None:
    root = tmp_path / "data"
    expected = {"missing": "does not exist", "no-val": "has no val/ folder", "empty-class": "has no images",
                "different-classes": "different classes", "no-classes": "has no class folders"}[case]
    if case == "no-val":
        make_folder(root, {"a": 2}, splits=("train",))
    elif case == "empty-class":
        make_folder(root, {"a": 2, "b": 0})
        (root / "train" / "b" / "notes.txt").write_text("not an image")
    elif case == "different-classes":
        make_folder(root, {"a": 2, "b": 1})
        make_folder(root, {"c": 1}, splits=("val",))
    elif case == "no-classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    with pytest.raises(ValueError, match=f"^--data: .*{expected}"):
        resolve_data(str(root))


@pytest.mark.parametrize(("damage", "workers"), [("truncated", 0), ("not-a-jpeg", 0), ("empty", 0), ("truncated", 2)])
def test_corrupt_jpeg_names_the_file(tmp_path: Path, damage: str, workers: int) -> None:
    root = make_folder(tmp_path / "data", {"a": 5, "b": 5})
    bad = root / "train" / "b" / "002.jpg"
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[:len(data) // 3], "not-a-jpeg": b"GIF89a" + data[6:], "empty": b""}[damage])
    train, _ = build_loaders(config(resolve_data(str(root)), device_batch=10, workers=workers))
    with pytest.raises(ValueError, match=f"--data: cannot decode {re.escape(str(bad))}"):
        list(train.epoch(0, 10))


def test_png_named_jpg_still_decodes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 3, "b": 3})
    disguised = root / "train" / "a" / "001.jpg"
    disguised.write_bytes(_png(torch.full((3, 16, 16), 200, dtype=torch.uint8)))
    train, _ = build_loaders(config(root, device_batch=6))
    ((x, _),) = list(train.epoch(0, 6))
    assert x.shape == (6, 3, 16, 16) and torch.isfinite(x).all()


def test_unknown_loader_and_missing_root(folder: Path) -> None:
    with pytest.raises(ValueError, match="--loader must be one of dali, gpu, cpu, synthetic, got 'ffcv'"):
        build_loaders(config(folder, loader="ffcv"))
    with pytest.raises(ValueError, match="--loader cpu needs --data"):
        build_loaders(config(None))


def test_gpu_path_equals_cpu_path_on_cpu(folder: Path) -> None:
    """The gpu loader's split (workers read bytes; decode and augment in the main process) serves the
    cpu loader's batches when run on the CPU without streams."""
    from train.data.loaders import FolderLoader

    gpu_split = FolderLoader(config(folder, loader="gpu", workers=2), "train")
    assert_same(list(gpu_split.epoch(1, 16, start_update=1)), epoch(folder, 1, 16, start_update=1))
    gpu_eval = FolderLoader(config(folder, loader="gpu"), "val")
    _, cpu_eval = build_loaders(config(folder))
    assert_same(list(gpu_eval.batches()), list(cpu_eval.batches()))


@pytest.mark.cuda
def test_gpu_loader_on_cuda(digits: Path) -> None:
    """nvjpeg + GPU augmentation: the cpu loader's samples and crops, pixels within JPEG-decoder
    differences (nvjpeg's IDCT is not libjpeg's; the grey digits have no chroma to upsample)."""
    cuda = torch.device("cuda")
    kw: dict[str, object] = {"device_batch": 64, "dtype": torch.bfloat16, "channels_last": True}
    gpu_train, gpu_val = build_loaders(config(digits, loader="gpu", device=cuda, workers=2, **kw))
    ref = epoch(digits, 0, 128, start_update=8, **kw)
    got = list(gpu_train.epoch(0, 128, start_update=8))
    assert len(got) == len(ref) == 2 * 4  # U = ⌈1,437 / 128⌉ = 12
    for (x, y), (xr, yr) in zip(got, ref):
        assert x.device.type == "cuda" and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y.cpu(), yr)
        assert (x.float().cpu() - xr.float()).abs().mean() < 0.05  # 1 grey level is 0.017
    _, cpu_val = build_loaders(config(digits, device_batch=64))
    got_val = torch.cat([x.float().cpu() for x, _ in gpu_val.batches()])
    assert (got_val - torch.cat([x for x, _ in cpu_val.batches()])).abs().mean() < 0.05


def test_gpu_loader_without_cuda_is_a_clear_error(folder: Path) -> None:
    with pytest.raises(ValueError, match=r"--loader gpu decodes with nvjpeg on a CUDA device; .* cpu"):
        build_loaders(config(folder, loader="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            build_loaders(config(folder, loader="gpu", device=torch.device("cuda")))


def test_dali_missing_names_the_pip_package(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"--loader dali: NVIDIA DALI is not installed .*nvidia-dali-cuda130 .*"
                                         r"nvidia-dali-cuda120"):
        build_loaders(config(folder, loader="dali"))


# ---------------------------------------------------------------- DALI (CPU operators), where it is installed


@pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali-cuda130 is not installed (pip install 'fastlars[dali]')")
def test_dali_pipeline_on_cpu(digits: Path) -> None:
    cfg = config(digits, loader="dali", device_batch=64, workers=2, dtype=torch.float16, channels_last=True)
    train, val = build_loaders(cfg)
    assert not train.resumes_mid_epoch and train.num_samples == 1437 and train.num_classes == 10
    first = list(train.epoch(0, 128))
    assert len(first) == train.updates_per_epoch(128) * 2 == 24
    x, y = first[0]
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float16 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert_same(list(train.epoch(0, 128)), first)  # seeds from (seed, epoch, rank)
    assert not torch.equal(next(iter(train.epoch(1, 128)))[0], x)
    labels = torch.cat([y for _, y in val.batches()])
    assert len(labels) == 360
    assert torch.equal(torch.bincount(labels), torch.bincount(scan_split(digits, "val").labels))
    with pytest.raises(ValueError, match="resumes only at epoch boundaries"):
        train.epoch(0, 128, start_update=1)
    assert math.isclose(float(x.float().std()), 1.0, abs_tol=0.6)
