"""Reading the encoded images of a split: one file per read, or, for a small split, every file read
once into one buffer at start (only the open/read/close per image and epoch goes away, a third of the
cpu loader's time on the 16×16 digits; train.data.decoded keeps such a split's decoded images too)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from train.data.folders import ImageList

SMALL_SPLIT_FILES = 100_000
SMALL_SPLIT_BYTES = 256 << 20


def read_file(path: str) -> Tensor:
    """A file's bytes as a uint8 tensor (an empty file gives an empty tensor, which then fails to
    decode with the file named)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


class FileReader:
    """Image i's encoded bytes. A split of at most SMALL_SPLIT_FILES files and SMALL_SPLIT_BYTES bytes
    is held in one uint8 buffer (offsets o_i, image i = buffer[o_i : o_(i+1)]), read when the reader is
    built, so forked DataLoader workers share it; larger splits are read file by file."""

    def __init__(self, images: ImageList, cache: bool = True) -> None:
        self.images = images
        self.buffer: Tensor | None = None
        self.offsets: list[int] = []
        if not cache or len(images) > SMALL_SPLIT_FILES:
            return
        paths = images.paths()
        if sum(os.stat(p).st_size for p in paths) > SMALL_SPLIT_BYTES:
            return
        chunks = []
        for p in paths:
            with open(p, "rb") as f:
                chunks.append(f.read())
        self.offsets = [0]
        for chunk in chunks:
            self.offsets.append(self.offsets[-1] + len(chunk))
        joined = bytearray(b"".join(chunks))
        self.buffer = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)

    def read(self, i: int) -> Tensor:
        """The bytes of image i (a view into the buffer when the split is held in memory)."""
        if self.buffer is None:
            return read_file(self.images.path(i))
        return self.buffer[self.offsets[i]:self.offsets[i + 1]]
