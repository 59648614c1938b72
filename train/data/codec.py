"""Image decoding and encoding through a maintained library, chosen once per process.

torchvision 0.29 deprecates its image decoders and encoders in favour of TorchCodec, which took them
over (the same libjpeg-turbo on the CPU and batched nvJPEG on CUDA, so the same pixels). The codec,
in order of preference:
- ``torchcodec``: TorchCodec ≥ 0.16 (``torchcodec.decoders.decode_jpeg`` / ``decode_image``,
  ``torchcodec.encoders.JpegEncoder``), when it imports: it is built for one torch release, and a
  mismatched build fails to load;
- ``torchvision``: ``torchvision.io`` where it is not deprecated (torchvision < 0.29, e.g. the 0.26 of
  torch 2.11);
- ``pil``: Pillow on the CPU (decoded images then move to the device).
On the bundled digits all three give the same JPEG bytes and the same pixels (tests/test_train_data.py).
Every decoder returns RGB uint8 [3, H, W] and raises RuntimeError on bytes it cannot decode.
"""

from __future__ import annotations

import functools
import io
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

CODECS = ("torchcodec", "torchvision", "pil")


class Codec(Protocol):
    """What the loaders need from an image library."""

    name: str

    def decode_jpegs(self, encoded: list[Tensor], device: torch.device | str) -> list[Tensor]:
        """JPEG files (uint8 byte tensors) in one call, decoded on `device` (nvJPEG on CUDA where the
        library has it)."""

    def decode_image(self, data: Tensor) -> Tensor:
        """One file of any supported format, its format sniffed from the bytes, on the CPU."""

    def encode_jpeg(self, image: Tensor, quality: int) -> bytes:
        """An RGB uint8 [3, H, W] image as JPEG bytes (baseline, 4:2:0, libjpeg's default tables)."""


class TorchCodec:
    name = "torchcodec"

    def __init__(self) -> None:
        from torchcodec.decoders import decode_image, decode_jpeg
        from torchcodec.encoders import JpegEncoder

        self._jpeg, self._image, self._encoder = decode_jpeg, decode_image, JpegEncoder

    def decode_jpegs(self, encoded: list[Tensor], device: torch.device | str) -> list[Tensor]:
        try:
            return self._jpeg(list(encoded), mode="RGB", device=device)
        except ValueError as exc:  # torchcodec's error for bytes of no known format
            raise RuntimeError(str(exc)) from exc

    def decode_image(self, data: Tensor) -> Tensor:
        try:
            return self._image(data, mode="RGB")
        except ValueError as exc:
            raise RuntimeError(str(exc)) from exc

    def encode_jpeg(self, image: Tensor, quality: int) -> bytes:
        return self._encoder(image).to_tensor(quality=quality).numpy().tobytes()


class TorchvisionIO:
    name = "torchvision"

    def __init__(self) -> None:
        from torchvision import io as tvio

        self._io = tvio

    def decode_jpegs(self, encoded: list[Tensor], device: torch.device | str) -> list[Tensor]:
        return self._io.decode_jpeg(list(encoded), mode=self._io.ImageReadMode.RGB, device=device)

    def decode_image(self, data: Tensor) -> Tensor:
        return self._io.decode_image(data, mode=self._io.ImageReadMode.RGB)

    def encode_jpeg(self, image: Tensor, quality: int) -> bytes:
        return self._io.encode_jpeg(image, quality=quality).numpy().tobytes()


class Pillow:
    name = "pil"

    def __init__(self) -> None:
        from PIL import Image

        self._image = Image

    def decode_jpegs(self, encoded: list[Tensor], device: torch.device | str) -> list[Tensor]:
        return [self.decode_image(data).to(device) for data in encoded]

    def decode_image(self, data: Tensor) -> Tensor:
        try:
            with self._image.open(io.BytesIO(data.numpy().tobytes())) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises for bytes it cannot read
            raise RuntimeError(str(exc)) from exc
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()

    def encode_jpeg(self, image: Tensor, quality: int) -> bytes:
        out = io.BytesIO()
        self._image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(out, format="JPEG", quality=quality)
        return out.getvalue()


_CLASSES = {"torchcodec": TorchCodec, "torchvision": TorchvisionIO, "pil": Pillow}


def load(name: str) -> Codec:
    """The codec called `name` (one of CODECS); ImportError (or the library's load error) when it
    cannot be used here."""
    if name == "torchvision" and _torchvision_deprecates_images():
        raise ImportError("torchvision >= 0.29 deprecates its image codecs (use torchcodec)")
    return _CLASSES[name]()


def available() -> list[str]:
    """The codecs usable in this process, in order of preference."""
    return [name for name in CODECS if _loads(name)]


@functools.cache
def active() -> Codec:
    """The first usable codec of CODECS (chosen once per process)."""
    for name in CODECS:
        if _loads(name):
            return load(name)
    raise ImportError("no image codec: pip install torchcodec (or pillow)")


def _loads(name: str) -> bool:
    try:
        load(name)
    except Exception:  # a torchcodec built for another torch raises RuntimeError or OSError on load
        return False
    return True


def _torchvision_deprecates_images() -> bool:
    import torchvision

    major, minor = (int(part) for part in torchvision.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (0, 29)
