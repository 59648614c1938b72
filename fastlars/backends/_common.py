"""Hyper-parameter records shared by every backend, so each backend signature stays short."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from torch import Tensor

Scalar = Union[float, Tensor]
"""A learning rate: a Python float or a 0-d tensor (on the parameters' device when capturable)."""


@dataclass(frozen=True)
class LarsHyper:
    """LARS options of one parameter group (see fastlars.LARS for their meaning)."""

    momentum: float
    weight_decay: float
    trust_coefficient: float
    eps: float
    nesterov: bool
    trust_clip: bool
    momentum_style: str
    adapt: bool
    trust_ratio_bounds: tuple[float, float] | None
    maximize: bool


@dataclass(frozen=True)
class LambHyper:
    """LAMB options of one parameter group (see fastlars.LAMB for their meaning)."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction: bool
    grad_averaging: bool
    decoupled_decay: bool
    trust_clip: bool
    adapt: bool
    trust_ratio_bounds: tuple[float, float] | None
    maximize: bool
