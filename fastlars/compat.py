"""Drop-in constructors with the argument names and defaults of the optimizers users switch from.

Change one import and keep the call::

    from apex.optimizers import FusedLAMB      ->  from fastlars.compat import FusedLAMB
    from timm.optim import Lamb, Lars          ->  from fastlars.compat import Lamb, Lars

Each class is a subclass of fastlars.LAMB / fastlars.LARS with the argument mapping below; options
the original offers but fastlars does not implement raise ValueError naming the option.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastlars.optim import LAMB, LARS


def _unsupported(name: str, value: Any, origin: str) -> ValueError:
    return ValueError(f"{name}={value!r}: {origin}'s option is not implemented by fastlars")


class FusedLAMB(LAMB):
    """apex.optimizers.FusedLAMB's signature and defaults.

    Mapping: adam_w_mode=True → λ·w inside the trust ratio (fastlars' default); use_nvlamb=True →
    adapt=True (adapt even where weight_decay = 0); max_grad_norm=1.0 global clip as in apex;
    set_grad_none → zero_grad(set_to_none=...) default. amsgrad=True and adam_w_mode=False (L2 mode)
    are not implemented.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        amsgrad: bool = False,
        adam_w_mode: bool = True,
        grad_averaging: bool = True,
        set_grad_none: bool = True,
        max_grad_norm: float = 1.0,
        use_nvlamb: bool = False,
    ) -> None:
        if amsgrad:
            raise _unsupported("amsgrad", amsgrad, "apex FusedLAMB")
        if not adam_w_mode:
            raise _unsupported("adam_w_mode", adam_w_mode, "apex FusedLAMB")
        self.set_grad_none = set_grad_none
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            adapt=True if use_nvlamb else None,
        )

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Clear gradients; by default to None when set_grad_none (apex's behaviour)."""
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)


class Lamb(LAMB):
    """timm.optim.Lamb's signature and defaults.

    Mapping: always_adapt=True → adapt=True; decoupled_decay as in timm (w −= lr·λ·w before the
    ratio); foreach is accepted and ignored (fastlars picks its backend). caution=True and
    corrected_weight_decay=True are not implemented.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        caution: bool = False,
        decoupled_decay: bool = False,
        corrected_weight_decay: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if caution:
            raise _unsupported("caution", caution, "timm Lamb")
        if corrected_weight_decay:
            raise _unsupported("corrected_weight_decay", corrected_weight_decay, "timm Lamb")
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            decoupled_decay=decoupled_decay,
            trust_clip=trust_clip,
            adapt=True if always_adapt else None,
        )


class Lars(LARS):
    """timm.optim.Lars's signature and defaults (lr outside the momentum buffer: momentum_style="torch").

    Mapping: trust_coeff → trust_coefficient; always_adapt=True → adapt=True; eps default 1e-8 as in
    timm; foreach accepted and ignored. dampening ≠ 0 is not implemented. One documented difference:
    with trust_clip, timm clips the fallback ratio of an all-zero weight or gradient to min(1/lr, 1),
    fastlars keeps it at 1.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        always_adapt: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if dampening:
            raise _unsupported("dampening", dampening, "timm Lars")
        super().__init__(
            params,
            lr=lr,
            momentum=float(momentum),
            weight_decay=float(weight_decay),
            trust_coefficient=trust_coeff,
            eps=eps,
            nesterov=nesterov,
            trust_clip=trust_clip,
            momentum_style="torch",
            adapt=True if always_adapt else None,
        )
