"""fastlars.LARS: layer-wise adaptive rate scaling with momentum (You, Gitman & Ginsburg 2017)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from fastlars import functional
from fastlars.backends._common import Scalar
from fastlars.backends.quantization import MIN_QUANTIZED_SIZE
from fastlars.optim import _validation as check
from fastlars.optim._base import GroupViews, GroupWork, TrustRatioOptimizer

MOMENTUM_STYLES = ("mlperf", "torch")


class LARS(TrustRatioOptimizer):
    r"""LARS with momentum, in the MLPerf ResNet-50 form by default.

    For each parameter tensor w with gradient g (unscaled when a GradScaler drives the step)::

        d     = g + λ·w
        ratio = η·||w|| / (||g|| + λ·||w|| + ε)     if ||w|| > 0 and ||g|| > 0, else 1
                trust_clip: ratio = min(ratio / lr, 1)   (LARC "clip")
                trust_ratio_bounds=(lo, hi): ratio = clamp(ratio, lo, hi)
                groups that do not adapt: ratio = 1
        momentum_style="mlperf":  v = μ·v + lr·ratio·d ;  w = w − v    (nesterov: w − (μ·v + lr·ratio·d))
        momentum_style="torch":   v = μ·v + ratio·d    ;  w = w − lr·v (nesterov: w − lr·(μ·v + ratio·d))

    The two momentum styles differ only when lr changes between steps: "mlperf" (lr inside the
    buffer) is MLPerf's and TensorFlow's; "torch" (lr outside) is timm's ``Lars`` and apex LARC+SGD.

    Args:
        params: parameters or param-group dicts; every option below can be overridden per group.
        lr: learning rate (float, or a 0-d tensor; on the params' device when capturable).
        momentum: μ.
        weight_decay: λ, added to the gradient (and to the ratio's denominator).
        trust_coefficient: η.
        eps: ε in the ratio's denominator.
        nesterov: Nesterov momentum.
        trust_clip: LARC clipping, ratio = min(ratio / lr, 1).
        momentum_style: "mlperf" or "torch", see above.
        adapt: apply the ratio; None means "where weight_decay ≠ 0" (apex, timm, MLPerf).
        trust_ratio_bounds: optional (lo, hi) clamp of the ratio (DeepSpeed uses (0.01, 10)).
        maximize: ascend instead of descend.
        capturable: check that a tensor lr lives on the device, so CUDA graphs replay a changing lr;
            step() never synchronises with the device either way.
        master_weights: keep fp32 copies of fp16/bf16 params (and fp32 momentum) in the state.
        state_dtype: how the moments/momentum are stored: "fp32" (full precision: fp32, or the param's
            dtype when a 16-bit param keeps no master), "bf16" (round to nearest even) or "int8"
            (blockwise 8-bit codes with an fp32 scale per 256 elements; fastlars.backends.quantization).
            Each step decodes, updates in fp32 and re-encodes; LAMB's ratio uses the norm of the update
            computed from the re-encoded moments, i.e. of exactly the update it applies.
        min_quantized_size: tensors with fewer elements keep fp32 state (as do groups that do not adapt);
            ``set_state_dtype(param, dtype)`` overrides the rule per parameter.
        stochastic_rounding: write bf16 params that keep no master by stochastic rounding, unbiased
            (E[SR(x)] = x), with bits from a counter-based RNG keyed on (rounding_seed, the param's position
            in the optimizer, step, element index), identical on every backend; False: round to nearest.
        rounding_seed: the RNG seed (32 bits; saved in the state_dict with the group's options).
        backend: "auto", "reference", "foreach", "triton" or "native".
    """

    buffer_names = ("momentum_buffer",)
    algorithm = "lars"
    sharded_weight_norms = True

    @property
    def reuse_weight_norms(self) -> bool:
        """Whether native CPU steps on the cached host path carry each tensor's ||w|| from one step to the
        next (default True; csrc/cpu/lars_step.h). The update sums ||w'||² of the weights it writes, in
        the order the norm pass sums them (the same bits), and the next step takes it instead of reading
        w again while the weights are unchanged: the same storage and the same version counter, which
        every in-place op on the param (or its master) through autograd bumps — ``load_state_dict``,
        ``copy_``, ``mul_`` under ``no_grad``, an initialiser. A write through ``.data`` or a raw pointer
        is invisible to the version counter: after one, call :meth:`forget_weight_norms` (or set this to
        False). Per step it saves a read of every fp32 weight: 24 B per element instead of 28."""
        return getattr(self, "_reuse_weight_norms", True)

    @reuse_weight_norms.setter
    def reuse_weight_norms(self, value: bool) -> None:
        check.check_bool("reuse_weight_norms", value)
        self._reuse_weight_norms = value
        self._host_plan = None

    def forget_weight_norms(self) -> None:
        """Drop the carried ||w|| of every tensor (see :attr:`reuse_weight_norms`): the next step reads the
        weights for their norms."""
        self._host_plan = None

    def __init__(
        self,
        params: Iterable[Any],
        lr: Scalar,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        trust_clip: bool = False,
        momentum_style: str = "mlperf",
        adapt: bool | None = None,
        trust_ratio_bounds: tuple[float, float] | None = None,
        maximize: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        state_dtype: str = "fp32",
        min_quantized_size: int = MIN_QUANTIZED_SIZE,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            trust_clip=trust_clip,
            momentum_style=momentum_style,
            adapt=adapt,
            trust_ratio_bounds=trust_ratio_bounds,
            maximize=maximize,
            capturable=capturable,
            master_weights=master_weights,
            state_dtype=state_dtype,
            min_quantized_size=min_quantized_size,
            stochastic_rounding=stochastic_rounding,
            rounding_seed=rounding_seed,
            backend=backend,
        )
        super().__init__(params, defaults)

    def _check_options(self, group: Mapping[str, Any]) -> None:
        super()._check_options(group)
        check.check_non_negative("momentum", group["momentum"])
        check.check_non_negative("trust_coefficient", group["trust_coefficient"])
        check.check_bool("nesterov", group["nesterov"])
        check.check_choice("momentum_style", group["momentum_style"], MOMENTUM_STYLES)
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError("nesterov: Nesterov momentum requires momentum > 0")

    def _needs_grad_norms(self, scaler_found_inf: Tensor | None, work: list[GroupWork]) -> bool:
        # Without a GradScaler the norms give the skip flag, so every one is needed before any write. A
        # GradScaler's found_inf already covers every gradient: then functional.lars_step lets kernels that
        # can (the CPU's) take ||g|| in the pass that reads w for ||w||, one read of the gradients less.
        return scaler_found_inf is None or self.stats_group is not None

    def _update_group(
        self,
        item: GroupWork,
        views: GroupViews,
        steps: list[Tensor],
        grad_scale: Tensor | None,
        found_inf: Tensor,
        global_grad_norm: Tensor | None,
        trust_ratios: Tensor | None = None,
    ) -> None:
        g = item.group
        functional.lars_step(
            views.params,
            views.grads,
            views.buffers["momentum_buffer"],
            lr=g["lr"],
            momentum=g["momentum"],
            weight_decay=g["weight_decay"],
            trust_coefficient=g["trust_coefficient"],
            eps=g["eps"],
            nesterov=g["nesterov"],
            trust_clip=g["trust_clip"],
            momentum_style=g["momentum_style"],
            adapt=self.adapts(g),
            trust_ratio_bounds=_pair(g["trust_ratio_bounds"]),
            maximize=g["maximize"],
            master_params=views.masters,
            grad_norms=item.grad_norms,
            weight_norms=item.weight_norms,
            grad_scale=grad_scale,
            found_inf=found_inf,
            trust_ratios=trust_ratios,
            steps=steps,
            rounding=views.rounding,
            low_precision=views.low_precision,
            backend=item.backend,
        )


def _pair(bounds: Any) -> tuple[float, float] | None:
    return None if bounds is None else (float(bounds[0]), float(bounds[1]))
