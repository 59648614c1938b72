"""The benchmark inputs: parameter sets equal to the real models, and the compulsory-byte count."""

from __future__ import annotations

import pytest
import torch

import fastlars
from benchmarks.measure import compulsory_bytes, masters, state_lists
from benchmarks.params import PARAM_SETS, bert_shapes
from harness import make_params, synthetic_grads

PUBLISHED_TENSORS = {"resnet50": 161, "bert_base": 199}  # issue 3: ResNet-50 has 161 tensors


@pytest.mark.parametrize("name", [n for n, s in PARAM_SETS.items() if s.published is not None])
def test_parameter_counts_are_the_published_ones(name: str) -> None:
    param_set = PARAM_SETS[name]
    assert param_set.count() == param_set.published, param_set.source
    if name in PUBLISHED_TENSORS:
        assert len(param_set.shapes()) == PUBLISHED_TENSORS[name]


def test_resnet50_shapes_are_torchvisions_in_order() -> None:
    torchvision = pytest.importorskip("torchvision")
    assert PARAM_SETS["resnet50"].shapes() == [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]


def test_bert_layer_is_the_published_one() -> None:
    """One encoder layer of BERT-base holds 7,087,872 parameters (q, k, v, out: 4·(768²+768); two
    LayerNorms: 4·768; FFN: 2·768·3072 + 3072 + 768)."""
    one = sum(torch.Size(s).numel() for s in bert_shapes(1, 768, 3072))
    none = sum(torch.Size(s).numel() for s in bert_shapes(0, 768, 3072))
    assert one - none == 7_087_872


@pytest.mark.parametrize("cls,names,per_elem", [(fastlars.LAMB, ("exp_avg", "exp_avg_sq"), 28),
                                                (fastlars.LARS, ("momentum_buffer",), 20)], ids=["lamb", "lars"])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16+m"])
def test_compulsory_bytes_per_element(cls, names, per_elem, dtype, master) -> None:
    """28 B per element for LAMB and 20 B for LARS, fp32 or bf16 with fp32 masters (design.md §3)."""
    params = make_params([(10, 3), (7,)], dtype)
    for p, g in zip(params, synthetic_grads(params, 1)):
        p.grad = g
    opt = cls(params, lr=0.1, master_weights=master, backend="reference")
    opt.step()
    total = compulsory_bytes(params, state_lists(opt, params, names), masters(opt, params))
    assert total == per_elem * 37


def test_bf16_without_masters_counts_half_width_weights_and_grads() -> None:
    """bf16 params and grads with fp32 LAMB state: read w, g (2 B each), m, v (4 B each); write w, m, v."""
    params = make_params([(5, 4)], torch.bfloat16)
    params[0].grad = synthetic_grads(params, 1)[0]
    opt = fastlars.LAMB(params, lr=0.1, backend="reference")
    opt.step()
    state = state_lists(opt, params, ("exp_avg", "exp_avg_sq"))
    per_elem = 2 + 2 + 2 * state["exp_avg"][0].element_size() + 2 + 2 * state["exp_avg"][0].element_size()
    assert compulsory_bytes(params, state, masters(opt, params)) == per_elem * 20


def test_small_cnn_set_is_the_trainers_model() -> None:
    from train.models import small_cnn

    assert PARAM_SETS["small_cnn"].shapes() == [tuple(p.shape) for p in small_cnn(10).parameters()]


def test_resnet50_small_set_has_resnet50s_tensors_scaled_down() -> None:
    pytest.importorskip("torchvision")
    small, full = PARAM_SETS["resnet50_small"].shapes(), PARAM_SETS["resnet50"].shapes()
    assert len(small) == len(full) == 161
    assert all(len(s) == len(f) and s[2:] == f[2:] for s, f in zip(small, full))
    assert PARAM_SETS["resnet50_small"].count() < 20_000
