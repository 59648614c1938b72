"""Parameter sets of real models: shapes only, no weights.

torchvision models are built on the meta device (no memory, no initialisation); BERT and GPT-2 are
written out from their published architectures (no transformers dependency). Every set's count is
checked against the published parameter count (tests/test_benchmarks_params.py). `tiny` is a
synthetic few-tensor set for smoke tests; `small_cnn` (8 tensors) and `resnet50_small` (161 tensors of
a few hundred elements) time the host overhead of a step, where memory traffic is negligible. These
three have no published count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]


def _torchvision_shapes(name: str) -> list[Shape]:
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    return [tuple(p.shape) for p in model.parameters()]


def bert_shapes(layers: int, hidden: int, ffn: int, vocab: int = 30522, positions: int = 512) -> list[Shape]:
    """HF BertModel (embeddings, encoder, pooler): q, k, v, output projections, two LayerNorms and the
    feed-forward pair per layer."""
    h = hidden
    shapes: list[Shape] = [(vocab, h), (positions, h), (2, h), (h,), (h,)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4
        shapes += [(h,), (h,)]
        shapes += [(ffn, h), (ffn,), (h, ffn), (h,)]
        shapes += [(h,), (h,)]
    return [*shapes, (h, h), (h,)]


def gpt2_shapes(layers: int, hidden: int, vocab: int = 50257, positions: int = 1024) -> list[Shape]:
    """HF GPT2Model (tied output embedding): fused qkv Conv1D, projection, MLP 4×, two LayerNorms per
    layer, final LayerNorm."""
    h = hidden
    shapes: list[Shape] = [(vocab, h), (positions, h)]
    for _ in range(layers):
        shapes += [(h,), (h,), (h, 3 * h), (3 * h,), (h, h), (h,), (h,), (h,), (h, 4 * h), (4 * h,), (4 * h, h), (h,)]
    return [*shapes, (h,), (h,)]


def small_cnn_shapes() -> list[Shape]:
    """The parameters of train.models.small_cnn(10): two bias-free 3×3 convs with BatchNorm, one linear
    layer (8 tensors, 5K parameters)."""
    return [(16, 3, 3, 3), (16,), (16,), (32, 16, 3, 3), (32,), (32,), (10, 32), (10,)]


def resnet50_small_shapes() -> list[Shape]:
    """ResNet-50's 161 tensors in its order, channel counts (the first two dims) divided by 64 and at
    least 1, kernel sizes kept: ~11K parameters, the per-tensor cost of a deep network."""
    return [tuple(max(1, d // 64) if i < 2 else d for i, d in enumerate(s)) for s in _torchvision_shapes("resnet50")]


@dataclass(frozen=True)
class ParamSet:
    """A model's parameter shapes and its published parameter count (with the source); `published` is
    None only for the synthetic `tiny` set."""

    name: str
    build: Callable[[], list[Shape]]
    published: int | None
    source: str
    host_overhead: bool = False
    """A set of a few thousand parameters: its step is host work (Python, validation, launches), so the
    benchmarks report its µs per step and no % of the memory roofline."""

    def shapes(self) -> list[Shape]:
        return self.build()

    def count(self) -> int:
        return sum(math.prod(s) for s in self.shapes())


PARAM_SETS: dict[str, ParamSet] = {s.name: s for s in (
    ParamSet("resnet50", lambda: _torchvision_shapes("resnet50"), 25_557_032, "torchvision ResNet50_Weights"),
    ParamSet("vit_b_16", lambda: _torchvision_shapes("vit_b_16"), 86_567_656, "torchvision ViT_B_16_Weights"),
    ParamSet("bert_base", lambda: bert_shapes(12, 768, 3072), 109_482_240, "HF bert-base-uncased BertModel"),
    ParamSet("bert_large", lambda: bert_shapes(24, 1024, 4096), 335_141_888, "HF bert-large-uncased BertModel"),
    ParamSet("gpt2_xl", lambda: gpt2_shapes(48, 1600), 1_557_611_200, "HF gpt2-xl GPT2Model"),
    ParamSet("tiny", lambda: [(64, 32, 3, 3), (64,), (64,), (10, 64), (10,)], None, "synthetic (smoke tests)",
             host_overhead=True),
    ParamSet("small_cnn", small_cnn_shapes, None, "train.models.small_cnn(10), 8 tensors (host overhead)",
             host_overhead=True),
    ParamSet("resnet50_small", resnet50_small_shapes, None, "ResNet-50's 161 tensors, channels / 64 (host overhead)",
             host_overhead=True),
)}


def make_params(shapes: list[Shape], dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    """Parameters with fixed random values and gradients on `device` (weights ~ 0.02·N(0,1), grads 1e-3·N(0,1))."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, device=device, generator=gen) * 0.02).to(dtype).requires_grad_(True)
        p.grad = (torch.randn(shape, device=device, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params
