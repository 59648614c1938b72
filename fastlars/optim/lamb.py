"""fastlars.LAMB: layer-wise adaptive moments (You et al. 2019), NVLAMB form by default."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from fastlars import functional
from fastlars.backends._common import Scalar
from fastlars.backends.quantization import MIN_QUANTIZED_SIZE
from fastlars.optim import _validation as check
from fastlars.optim._base import GroupViews, GroupWork, TrustRatioOptimizer
from fastlars.optim.lars import _pair


class LAMB(TrustRatioOptimizer):
    r"""LAMB (You et al. 2019, Algorithm 2) in the NVLAMB form of apex FusedLAMB.

    For each parameter tensor w with gradient g at step t (1-based)::

        g     = g · max_grad_norm / ||G||   when ||G|| > max_grad_norm  (||G|| over ALL the
                                            optimizer's gradients; None or 0 disables it)
        m     = β1·m + (1−β1)·g             (grad_averaging=False: m = β1·m + g)
        v     = β2·v + (1−β2)·g²
        m̂, v̂  = m / (1−β1^t), v / (1−β2^t)  (bias_correction=False: m̂, v̂ = m, v)
        u     = m̂ / (√v̂ + ε) + λ·w          (decoupled_decay=True: w = w − lr·λ·w first, no λ·w in u)
        ratio = ||w|| / ||u||   if ||w|| > 0 and ||u|| > 0, else 1
                trust_clip: min(ratio, 1); trust_ratio_bounds: clamp; groups that do not adapt: 1
        w     = w − lr·ratio·u

    Args:
        params: parameters or param-group dicts; every option can be overridden per group.
        lr: learning rate (float, or a 0-d tensor; on the params' device when capturable).
        betas: (β1, β2), each in [0, 1).
        eps: ε added to √v̂.
        weight_decay: λ.
        bias_correction: divide the moments by (1 − β^t).
        grad_averaging: scale the gradient by (1 − β1) in m.
        max_grad_norm: global gradient-norm clip threshold; None or 0 disables clipping.
        decoupled_decay: apply w −= lr·λ·w outside the trust ratio instead of adding λ·w to u.
        trust_clip: clip the ratio at 1.
        adapt: apply the ratio; None means "where weight_decay ≠ 0" (apex use_nvlamb=False, timm).
        trust_ratio_bounds: optional (lo, hi) clamp of the ratio.
        maximize: ascend instead of descend.
        capturable: check that a tensor lr lives on the device (CUDA-graph safe); step() never
            synchronises with the device either way.
        master_weights: keep fp32 copies of fp16/bf16 params (and fp32 moments) in the state.
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

    buffer_names = ("exp_avg", "exp_avg_sq")
    algorithm = "lamb"

    def __init__(
        self,
        params: Iterable[Any],
        lr: Scalar = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = None,
        decoupled_decay: bool = False,
        trust_clip: bool = False,
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
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            decoupled_decay=decoupled_decay,
            trust_clip=trust_clip,
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
        check.check_betas(group["betas"])
        check.check_bool("bias_correction", group["bias_correction"])
        check.check_bool("grad_averaging", group["grad_averaging"])
        check.check_bool("decoupled_decay", group["decoupled_decay"])
        check.check_max_grad_norm(group["max_grad_norm"])

    def _needs_grad_norms(self, scaler_found_inf: Tensor | None, work: list[GroupWork]) -> bool:
        # Norms give the skip flag when no GradScaler does, and ||G|| for clipping.
        return scaler_found_inf is None or any(w.group["max_grad_norm"] for w in work)

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
        functional.lamb_step(
            views.params,
            views.grads,
            views.buffers["exp_avg"],
            views.buffers["exp_avg_sq"],
            steps,
            lr=g["lr"],
            betas=(float(g["betas"][0]), float(g["betas"][1])),
            eps=g["eps"],
            weight_decay=g["weight_decay"],
            bias_correction=g["bias_correction"],
            grad_averaging=g["grad_averaging"],
            max_grad_norm=g["max_grad_norm"],
            global_grad_norm=global_grad_norm,
            decoupled_decay=g["decoupled_decay"],
            trust_clip=g["trust_clip"],
            adapt=self.adapts(g),
            trust_ratio_bounds=_pair(g["trust_ratio_bounds"]),
            maximize=g["maximize"],
            master_params=views.masters,
            grad_scale=grad_scale,
            found_inf=found_inf,
            reduce_sumsq=item.reduce,
            trust_ratios=trust_ratios,
            rounding=views.rounding,
            low_precision=views.low_precision,
            backend=item.backend,
        )
