"""Decoded images kept between epochs for a small split, so a run decodes each file once instead of
once per epoch (on the 16×16 digits, decoding every epoch was a sixth of a study run's time).

Decoding is deterministic, so batches built from kept images equal those decoded afresh; every
epoch's random-resized crop, flip and normalisation still run on them.
"""

from __future__ import annotations

from torch import Tensor

from train.data import augment
from train.data.files import FileReader

KEPT_DECODED_BYTES = 256 << 20


class DecodedImages:
    """RGB uint8 [3, H, W] images of a split by index: decoded from `files` on first use (one batched
    decode per micro-batch) and kept while the kept images total at most `budget_bytes` (None:
    KEPT_DECODED_BYTES); beyond the budget images are decoded on every use. Each process keeps its
    own: with DataLoader workers, which a new loader forks every epoch, nothing outlives the epoch."""

    def __init__(self, files: FileReader, budget_bytes: int | None = None) -> None:
        self.files = files
        self.budget_bytes = KEPT_DECODED_BYTES if budget_bytes is None else budget_bytes
        self.kept_bytes = 0
        self._kept: list[Tensor | None] = [None] * len(files.images)

    def get(self, indices: list[int]) -> list[Tensor]:
        """The decoded images at `indices`, in order; a file that does not decode raises the decoder's
        ValueError naming it."""
        missing = list(dict.fromkeys(j for j in indices if self._kept[j] is None))
        fresh: dict[int, Tensor] = {}
        if missing:
            encoded = [self.files.read(j) for j in missing]
            decoded = augment.decode(encoded, [self.files.images.path(j) for j in missing])
            for j, image in zip(missing, decoded):
                fresh[j] = image
                size = image.numel() * image.element_size()
                if self.kept_bytes + size <= self.budget_bytes:
                    self._kept[j] = image
                    self.kept_bytes += size
        return [fresh[j] if j in fresh else self._kept[j] for j in indices]  # type: ignore[misc]
