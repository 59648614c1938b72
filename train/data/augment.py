"""Batched image transforms, the same on CPU and GPU: decode, random-resized crop, flip, normalise.

A micro-batch is transformed in a few tensor ops instead of one PIL pipeline per image. Crop boxes are
drawn from a torch.Generator the caller seeds per micro-batch, so the same samples get the same crops
in any process layout and after a resume.

Random-resized crop (Szegedy et al. 2015; torchvision's parameters): for an H×W image, draw an area
fraction s ~ U(scale) and a log aspect ratio ln r ~ U(ln 3/4, ln 4/3); the box is w = √(sHW·r),
h = √(sHW/r), accepted if it fits (10 tries, else the central square of side min(H, W)); its corner
is uniform over the positions where it fits; then bilinear resampling to size×size (roi_align).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align

from train.data import codec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ATTEMPTS = 10


def decode(encoded: list[Tensor], paths: list[str], device: torch.device | str = "cpu") -> list[Tensor]:
    """RGB uint8 [3, H, W] images on `device` from encoded files, through train.data.codec: the JPEGs in
    one batched call (nvjpeg on CUDA), other formats one by one. When the batched call fails, each file
    is decoded alone, with the format sniffed from its bytes on the CPU (a PNG named .jpg, a CMYK JPEG
    nvjpeg refuses), and a file that still does not decode raises a ValueError naming it."""
    images = codec.active()
    jpeg = [i for i, p in enumerate(paths) if p.lower().endswith((".jpg", ".jpeg"))]
    out: list[Tensor | None] = [None] * len(encoded)
    try:
        if jpeg:
            for i, image in zip(jpeg, images.decode_jpegs([encoded[i] for i in jpeg], device)):
                out[i] = image
        for i in sorted(set(range(len(encoded))) - set(jpeg)):
            out[i] = images.decode_image(encoded[i]).to(device)
    except RuntimeError:
        out = [_decode_one(images, data, path).to(device) for data, path in zip(encoded, paths)]
    return out  # type: ignore[return-value]


def _decode_one(images: codec.Codec, data: Tensor, path: str) -> Tensor:
    try:
        return images.decode_image(data)
    except RuntimeError as exc:
        raise ValueError(f"--data: cannot decode {path}: {exc}") from exc


def crop_boxes(heights: Tensor, widths: Tensor, scale: tuple[float, float], generator: torch.Generator,
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Random-resized-crop boxes [n, 4] as (x0, y0, x1, y1) in pixels, float64 on the CPU. One draw of
    n × (2·ATTEMPTS + 2) uniforms from `generator` per call (area fractions, log aspect ratios, corner),
    the arithmetic in NumPy: a micro-batch of 32 takes a few dozen microseconds instead of the 0.4 ms
    of as many small torch ops."""
    n = heights.numel()
    u = torch.rand(n, 2 * ATTEMPTS + 2, dtype=torch.float64, generator=generator).numpy()
    h_img = heights.double().numpy()[:, None]
    w_img = widths.double().numpy()[:, None]
    area = h_img * w_img * (scale[0] + (scale[1] - scale[0]) * u[:, :ATTEMPTS])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[:, ATTEMPTS:2 * ATTEMPTS])
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    fits = (w <= w_img) & (h <= h_img) & (w > 0) & (h > 0)
    found, first = fits.any(1), fits.argmax(1)
    rows = np.arange(n)
    side = np.minimum(h_img, w_img)[:, 0]
    w = np.where(found, w[rows, first], side)
    h = np.where(found, h[rows, first], side)
    x0 = np.where(found, np.floor(u[:, -2] * (w_img[:, 0] - w + 1)), np.floor((w_img[:, 0] - w) / 2))
    y0 = np.where(found, np.floor(u[:, -1] * (h_img[:, 0] - h + 1)), np.floor((h_img[:, 0] - h) / 2))
    return torch.from_numpy(np.stack([x0, y0, x0 + w, y0 + h], axis=1))


def center_boxes(heights: Tensor, widths: Tensor, crop_fraction: float) -> Tensor:
    """Central square boxes of side crop_fraction·min(H, W): "resize the shorter side to S/f, then
    center-crop S" expressed in the original image's pixels."""
    side = torch.minimum(heights, widths).double() * crop_fraction
    x0 = (widths.double() - side) / 2
    y0 = (heights.double() - side) / 2
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


def resample(images: list[Tensor], boxes: Tensor, size: int) -> Tensor:
    """Each image's box bilinearly resampled to size×size: float [n, 3, size, size] in 0–255. An output
    pixel averages ⌈box height / size⌉ × ⌈box width / size⌉ bilinear samples (roi_align's adaptive
    grid, chosen per box), so shrinking does not alias and an image's result does not depend on the
    other images of its batch; a box of exactly size×size at integer corners reproduces the pixels."""
    device = images[0].device
    boxes = boxes.to(device=device, dtype=torch.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):  # one roi_align per distinct image shape
        groups.setdefault(tuple(image.shape), []).append(i)
    if len(groups) == 1:
        return _roi_align(torch.stack(images).float(), boxes, size)
    out = torch.empty(len(images), images[0].shape[0], size, size, device=device)
    for members in groups.values():
        index = torch.tensor(members, device=device)
        out[index] = _roi_align(torch.stack([images[i] for i in members]).float(), boxes[index], size)
    return out


def _roi_align(batch: Tensor, boxes: Tensor, size: int) -> Tensor:
    rois = torch.cat([torch.arange(len(batch), device=batch.device, dtype=torch.float32)[:, None], boxes], dim=1)
    return roi_align(batch, rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)


def finish(batch: Tensor, flip: Tensor | None, dtype: torch.dtype, channels_last: bool) -> Tensor:
    """Optional horizontal flips (a bool per image; done in place, `batch` is scratch), then
    x·a + b with a = 1/(255·std), b = −mean/std, i.e. (x/255 − mean)/std, written once in `dtype`,
    NCHW or NHWC (channels_last) memory."""
    device = batch.device
    if flip is not None and bool(flip.any()):
        index = flip.nonzero()[:, 0].to(device)
        batch[index] = batch[index].flip(-1)
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    bias = -torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None] / std
    out = torch.empty(batch.shape, dtype=dtype, device=device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.addcmul(bias, batch, 1.0 / (255.0 * std), out=out)


def train_transform(images: list[Tensor], size: int, generator: torch.Generator, flip: bool,
                    dtype: torch.dtype = torch.float32, channels_last: bool = False) -> Tensor:
    """Random-resized crop (scale (0.25, 1) below 64 px, else (0.08, 1)), optional flip, normalise."""
    heights = torch.tensor([im.shape[-2] for im in images])
    widths = torch.tensor([im.shape[-1] for im in images])
    boxes = crop_boxes(heights, widths, (0.25, 1.0) if size < 64 else (0.08, 1.0), generator)
    flips = torch.rand(len(images), generator=generator) < 0.5 if flip else None
    return finish(resample(images, boxes, size), flips, dtype, channels_last)


def eval_transform(images: list[Tensor], size: int, dtype: torch.dtype = torch.float32,
                   channels_last: bool = False) -> Tensor:
    """Shorter side to size·8/7 then a central size×size crop (the whole image below 64 px), normalise."""
    heights = torch.tensor([im.shape[-2] for im in images])
    widths = torch.tensor([im.shape[-1] for im in images])
    boxes = center_boxes(heights, widths, 1.0 if size < 64 else 7 / 8)
    return finish(resample(images, boxes, size), None, dtype, channels_last)
