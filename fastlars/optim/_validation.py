"""Argument checks shared by the optimizers. Every error names the offending option or tensor.

All checks run before anything is mutated, so a rejected call leaves the optimizer as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastlars import backends
from fastlars.backends.quantization import STATE_DTYPES

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_lr(lr: Any, where: str = "lr") -> None:
    """lr must be a finite float ≥ 0 or a one-element floating tensor holding one."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{where}: a tensor learning rate must be a one-element floating tensor, got {lr!r}")
        if lr.requires_grad:
            raise ValueError(f"{where}: a tensor learning rate must not require grad")
        value = float(lr.detach().reshape(()).cpu())
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        value = float(lr)
    else:
        raise TypeError(f"{where}: expected a float or a 0-d tensor, got {type(lr).__name__}")
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{where}: invalid learning rate {value} (must be finite and >= 0)")


def check_non_negative(name: str, value: Any) -> None:
    """A finite real number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name}: invalid value {value} (must be finite and >= 0)")


def check_unit_interval(name: str, value: Any) -> None:
    """A number in [0, 1)."""
    check_non_negative(name, value)
    if not value < 1.0:
        raise ValueError(f"{name}: invalid value {value} (must be in [0, 1))")


def check_betas(betas: Any) -> None:
    """Two numbers, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    check_unit_interval("betas[0]", betas[0])
    check_unit_interval("betas[1]", betas[1])


def check_bool(name: str, value: Any) -> None:
    """A real bool (catches strings such as "False")."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def check_optional_bool(name: str, value: Any) -> None:
    """None or a bool."""
    if value is not None:
        check_bool(name, value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """One of a fixed set of strings."""
    if value not in choices:
        raise ValueError(f"{name}: invalid value {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_bounds(bounds: Any) -> None:
    """None or (lo, hi) with 0 ≤ lo ≤ hi."""
    if bounds is None:
        return
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"trust_ratio_bounds: expected None or a pair (lo, hi), got {bounds!r}")
    check_non_negative("trust_ratio_bounds[0]", bounds[0])
    check_non_negative("trust_ratio_bounds[1]", bounds[1])
    if bounds[0] > bounds[1]:
        raise ValueError(f"trust_ratio_bounds: lo={bounds[0]} is greater than hi={bounds[1]}")


def check_max_grad_norm(value: Any) -> None:
    """None, 0 (both disable clipping) or a positive number."""
    if value is not None:
        check_non_negative("max_grad_norm", value)


def check_common_options(group: Mapping[str, Any]) -> None:
    """Options LARS and LAMB share."""
    check_lr(group["lr"])
    check_non_negative("weight_decay", group["weight_decay"])
    check_non_negative("eps", group["eps"])
    check_bool("trust_clip", group["trust_clip"])
    check_optional_bool("adapt", group["adapt"])
    check_bounds(group["trust_ratio_bounds"])
    check_bool("maximize", group["maximize"])
    check_bool("capturable", group["capturable"])
    check_bool("master_weights", group["master_weights"])
    backends.validate_backend_name(group["backend"])
    check_choice("state_dtype", group["state_dtype"], STATE_DTYPES)
    check_count("min_quantized_size", group["min_quantized_size"])
    check_bool("stochastic_rounding", group["stochastic_rounding"])
    if group["stochastic_rounding"] and group["master_weights"]:
        raise ValueError("stochastic_rounding: rounds bf16 weights that keep no fp32 master; it cannot be combined "
                         "with master_weights=True")
    seed = group["rounding_seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"rounding_seed: expected an int in [0, 2**32), got {seed!r}")


def check_count(name: str, value: Any) -> None:
    """An int ≥ 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")


def describe(group_index: int, param_index: int, tensor: Tensor, name: str | None = None) -> str:
    """How errors name a parameter: its position in param_groups, its name where the optimizer was given
    named parameters, and its shape and dtype."""
    shape = tuple(tensor.shape)
    called = "" if name is None else f" {name!r}"
    return f"param_groups[{group_index}]['params'][{param_index}]{called} (shape {shape}, {tensor.dtype})"


def param_name(group: Mapping[str, Any], param_index: int) -> str | None:
    """The name of a group's parameter when the group has ``param_names``, else None."""
    names = group.get("param_names")
    return None if names is None else names[param_index]


def split_param_names(group_index: int, params: list[Any]) -> tuple[list[str] | None, list[Any]]:
    """(names, params) of a group given as ``(name, tensor)`` pairs (``model.named_parameters()``, as torch's
    optimizers take them: the names go to the group's ``param_names``), or (None, params) without names."""
    named = [isinstance(p, tuple) for p in params]
    if not any(named):
        return None, params
    if not all(named):
        raise ValueError(f"param_groups[{group_index}]['params']: give every parameter with its name or none "
                         f"(item {named.index(False)} has no name)")
    for i, pair in enumerate(params):
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise TypeError(f"param_groups[{group_index}]['params'][{i}]: expected a (name, Tensor) pair, got "
                            f"{tuple(type(x).__name__ for x in pair)}")
    return [name for name, _ in params], [p for _, p in params]


def check_group_params(group_index: int, params: list[Any], capturable: bool, lr: Any,
                       names: list[str] | None = None) -> None:
    """Parameters of a group: floating tensors of a supported dtype, all on one device (errors name a
    parameter by its position, and by its name when ``names`` are given)."""
    device = None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"param_groups[{group_index}]['params'][{i}]: expected a Tensor, got {type(p).__name__}")
        name = describe(group_index, i, p, None if names is None else names[i])
        if p.is_complex():
            raise ValueError(f"{name}: complex parameters are not supported")
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: dtype {p.dtype} is not supported; use float32, float16 or bfloat16")
        if p.is_sparse:
            raise ValueError(f"{name}: sparse parameters are not supported")
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(f"{name}: is on {p.device} but the group's first parameter is on {device}; "
                             "put a group's parameters on one device")
    if capturable and isinstance(lr, Tensor) and device is not None and lr.device != device:
        raise ValueError(f"lr: with capturable=True a tensor lr must live on the parameters' device {device}, "
                         f"not {lr.device}")


def check_rounding_params(group_index: int, params: list[Tensor], stochastic_rounding: bool) -> None:
    """Stochastic rounding is defined for bf16 weights (fp32 ones need none): an fp16 parameter is an error."""
    if not stochastic_rounding:
        return
    for i, p in enumerate(params):
        if p.dtype == torch.float16:
            raise ValueError(f"{describe(group_index, i, p)}: stochastic_rounding rounds bfloat16 weights; keep fp16 "
                             "parameters in a group with stochastic_rounding=False (or master_weights=True)")


def check_grad(group_index: int, param_index: int, param: Tensor, grad: Tensor, name: str | None = None) -> None:
    """A gradient the kernels can use: dense, real, same dtype, device and shape as its parameter."""
    problem = None
    if grad.is_sparse:
        problem = "sparse gradients are not supported"
    elif grad.is_complex():
        problem = "complex gradients are not supported"
    elif grad.device != param.device:
        problem = f"gradient is on {grad.device}, parameter on {param.device}"
    elif grad.dtype != param.dtype:
        problem = f"gradient dtype {grad.dtype} differs from the parameter's {param.dtype}"
    elif grad.shape != param.shape:
        problem = f"gradient shape {tuple(grad.shape)} differs from the parameter's"
    if problem is not None:
        raise RuntimeError(f"{describe(group_index, param_index, param, name)}: {problem}")
