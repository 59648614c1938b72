"""Bad input gets a clear error naming the parameter, raised before any state changes."""

from __future__ import annotations

import copy

import pytest
import torch

import fastlars

OPTIMIZERS = [(fastlars.LARS, {"lr": 0.1}), (fastlars.LAMB, {})]


def _param(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("cls,base", OPTIMIZERS)
@pytest.mark.parametrize(
    "option,value,match",
    [
        ("lr", -1.0, "lr: invalid learning rate"),
        ("lr", float("nan"), "lr: invalid learning rate"),
        ("lr", torch.tensor(-0.5), "lr: invalid learning rate"),
        ("lr", torch.ones(2), "lr: a tensor learning rate must be a one-element"),
        ("weight_decay", -1e-4, "weight_decay: invalid value"),
        ("eps", -1e-8, "eps: invalid value"),
        ("trust_ratio_bounds", (2.0, 1.0), "trust_ratio_bounds: lo=2.0 is greater than hi=1.0"),
        ("trust_ratio_bounds", (-1.0, 1.0), r"trust_ratio_bounds\[0\]: invalid value"),
        ("backend", "cudnn", "backend: unknown backend 'cudnn'"),
        ("adapt", "yes", "adapt: expected True or False"),
    ],
)
def test_bad_common_options(cls, base, option, value, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        cls([_param(3)], **{**base, option: value})


@pytest.mark.parametrize(
    "option,value,match",
    [
        ("trust_coefficient", -0.001, "trust_coefficient: invalid value"),
        ("momentum", -0.9, "momentum: invalid value"),
        ("momentum_style", "tf", "momentum_style: invalid value 'tf'"),
        ("nesterov", True, "nesterov: Nesterov momentum requires momentum > 0"),
    ],
)
def test_bad_lars_options(option, value, match) -> None:
    kwargs = {"lr": 0.1, option: value}
    if option == "nesterov":
        kwargs["momentum"] = 0.0
    with pytest.raises(ValueError, match=match):
        fastlars.LARS([_param(3)], **kwargs)


@pytest.mark.parametrize(
    "option,value,match",
    [
        ("betas", (1.0, 0.999), r"betas\[0\]: invalid value 1.0 \(must be in \[0, 1\)\)"),
        ("betas", (0.9, -0.1), r"betas\[1\]: invalid value"),
        ("betas", (0.9,), "betas: expected a pair"),
        ("max_grad_norm", -1.0, "max_grad_norm: invalid value"),
    ],
)
def test_bad_lamb_options(option, value, match) -> None:
    with pytest.raises(ValueError, match=match):
        fastlars.LAMB([_param(3)], **{option: value})


def test_group_override_is_validated_and_leaves_optimizer_unchanged() -> None:
    opt = fastlars.LAMB([_param(3)])
    with pytest.raises(ValueError, match="weight_decay: invalid value"):
        opt.add_param_group({"params": [_param(4)], "weight_decay": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="unknown option"):
        opt.add_param_group({"params": [_param(4)], "weight_dacay": 0.1})


@pytest.mark.parametrize("cls,base", OPTIMIZERS)
def test_unsupported_parameters(cls, base) -> None:
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*complex parameters"):
        cls([torch.randn(3, dtype=torch.complex64, requires_grad=True)], **base)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*dtype torch.float64 is not supported"):
        cls([_param(2), _param(3, dtype=torch.float64)], **base)


@pytest.mark.parametrize("cls,base", OPTIMIZERS)
def test_group_on_two_devices_is_rejected(cls, base) -> None:
    meta = torch.empty(3, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*is on meta but the group's first parameter is on cpu"):
        cls([_param(3), meta], **base)


@pytest.mark.parametrize("cls,base", OPTIMIZERS)
def test_sparse_gradient_raises_before_any_state_change(cls, base) -> None:
    good, bad = _param(4), _param(5)
    opt = cls([good, bad], **base)
    before = good.detach().clone()
    good.grad = torch.randn(4)
    bad.grad = torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match=r"\['params'\]\[1\] \(shape \(5,\), torch.float32\): sparse gradients"):
        opt.step()
    assert len(opt.state) == 0, "state was created before the bad gradient was rejected"
    assert torch.equal(good.detach(), before)


@pytest.mark.parametrize(
    "grad,match",
    [
        # torch refuses to assign these through `param.grad = ...`; fastlars checks them anyway because
        # the functional API and custom autograd code can hand them over.
        (torch.zeros(5, dtype=torch.complex64), "complex gradients are not supported"),
        (torch.zeros(5, dtype=torch.bfloat16), "gradient dtype torch.bfloat16 differs from the parameter's"),
        (torch.zeros(5, device="meta"), "gradient is on meta, parameter on cpu"),
        (torch.zeros(6), r"gradient shape \(6,\) differs"),
    ],
)
def test_gradient_checks_name_the_parameter(grad, match) -> None:
    from fastlars.optim._validation import check_grad

    with pytest.raises(RuntimeError, match=r"param_groups\[2\]\['params'\]\[3\] \(shape \(5,\)"):
        check_grad(2, 3, torch.zeros(5), grad)
    with pytest.raises(RuntimeError, match=match):
        check_grad(2, 3, torch.zeros(5), grad)


def test_explicit_unusable_backend_raises() -> None:
    reason = fastlars.backends.unavailable_reason("triton", torch.device("cpu"))
    if reason is None:
        pytest.skip("triton runs on CPU here (TRITON_INTERPRET=1), so it is not unusable")
    with pytest.raises(RuntimeError, match="backend='triton' is not usable on cpu"):
        fastlars.LAMB([_param(3)], backend="triton")


def test_capturable_tensor_lr_must_be_on_param_device() -> None:
    with pytest.raises(ValueError, match="lr: with capturable=True a tensor lr must live on"):
        fastlars.LARS([torch.empty(3, device="meta", requires_grad=True)], lr=torch.tensor(0.1), capturable=True)


def _trained(cls, base):
    p = _param(6)
    opt = cls([p], **base)
    p.grad = torch.randn(6)
    opt.step()
    return p, opt


@pytest.mark.parametrize("cls,base", OPTIMIZERS)
@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda sd: sd.pop("param_groups"), "expected a dict with 'state' and 'param_groups'"),
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "has 2 param groups"),
        (lambda sd: sd["param_groups"][0]["params"].append(7), r"param_groups\[0\] holds 2 params"),
        (lambda sd: sd["state"][0].pop("step"), "has keys"),
        (lambda sd: sd["state"][0].update(extra=torch.zeros(6)), "has keys"),
        (lambda sd: sd["state"].update({9: {}}), "parameter id 9, which no param group lists"),
        (lambda sd: sd["param_groups"][0].update(lr=-3.0), r"param_groups\[0\]: lr: invalid learning rate"),
        (lambda sd: sd["param_groups"][0].pop("weight_decay"), "lacks option"),
    ],
)
def test_corrupt_state_dict_is_rejected_and_nothing_changes(cls, base, corrupt, match) -> None:
    _, opt = _trained(cls, base)
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, value in before["state"][0].items():
        assert torch.equal(after["state"][0][key], value)


@pytest.mark.parametrize("cls,base", OPTIMIZERS)
def test_state_dict_with_wrong_shape_names_the_tensor(cls, base) -> None:
    _, opt = _trained(cls, base)
    sd = copy.deepcopy(opt.state_dict())
    key = next(k for k in sd["state"][0] if k != "step")
    sd["state"][0][key] = torch.zeros(7)
    where = rf"state\['{key}'\] of param_groups\[0\]\['params'\]\[0\] .* has shape \(7,\)"
    with pytest.raises(ValueError, match=where):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("backend", [b for b in fastlars.available_backends("cpu") if b != "triton"])
@pytest.mark.parametrize("cls,base", OPTIMIZERS)
def test_named_parameters_as_torch_takes_them(cls, base, backend) -> None:
    """``cls(model.named_parameters())`` as torch.optim (and timm) take it: the names go to each group's
    param_names and into the state_dict, errors name the parameter, and the steps are those of the same
    optimizer over the bare parameters."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4))
    bare = copy.deepcopy(model)
    named = cls(model.named_parameters(), backend=backend, **base)
    plain = cls(bare.parameters(), backend=backend, **base)
    assert named.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert "param_names" not in plain.param_groups[0]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for p, q, g in zip(model.parameters(), bare.parameters(), grads):
            p.grad, q.grad = g, g.clone()
        named.step()
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare.parameters()))
    saved = named.state_dict()
    assert saved["param_groups"][0]["param_names"][0] == "0.weight"
    again = cls(copy.deepcopy(model).named_parameters(), backend=backend, **base)
    again.load_state_dict(saved)
    model[0].weight.grad = torch.randn(4, 5).to_sparse()
    with pytest.raises(RuntimeError, match=r"\['params'\]\[0\] '0.weight' \(shape \(4, 5\).*sparse gradients"):
        named.step()


def test_named_parameters_all_or_none_and_as_pairs() -> None:
    w, b = _param(3), _param(2)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]: give every parameter with its name or "
                                         r"none \(item 1 has no name\)"):
        fastlars.LAMB([("w", w), b])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]: expected a \(name, Tensor\) pair"):
        fastlars.LAMB([(1, w)])
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] 'z' \(shape \(2,\), torch.complex64\): complex"):
        fastlars.LAMB([("w", w), ("z", torch.zeros(2, dtype=torch.complex64, requires_grad=True))])
    opt = fastlars.LAMB([("w", w)])
    with pytest.raises(ValueError, match="with/without names"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
