"""Trajectories of LAMB and LARS with low-precision state against fp32, driving the quantised
reference (fastlars.backends.reference_lowbit) directly: used by benchmarks/codemaps.py to choose the
code map and by tests/test_lowbit_reference.py to bound the error of the chosen one.

:class:`LowbitSteps` keeps the state of a list of parameters in one format (fp32, bf16 or int8 with
a given pair of code maps; tensors below ``min_quantized_size`` stay fp32) and applies the reference
update. Two gradient sources:

* :func:`structured_trajectory`: seeded noise plus a pull towards 0.3·w (as tests/harness.py), times a
  fixed per-tensor scale pattern (log-normal per row and per column, σ = 1, 5% of columns
  dead), so that √v spreads inside a block (10th percentile ≈ 1.7 decades below the block maximum;
  the digits models' layers measure 0.5–1 decade typically, 3 at worst). The pull
  keeps the dynamics contracting: errors do not compound chaotically, so the parameter error
  measures the quantisation, not the butterfly effect.
* :func:`digits_training`: training a small model on the scikit-learn digits (real gradients;
  chaotic, so compare it with :func:`digits_training`'s own 1-ulp perturbation baseline).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastlars.backends import quantization as q
from fastlars.backends import reference_lowbit as rl
from fastlars.backends._common import LambHyper, LarsHyper
from fastlars.backends.reference import grad_norms

LAMB_HYPER = LambHyper(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                       grad_averaging=True, decoupled_decay=False, trust_clip=False, adapt=True,
                       trust_ratio_bounds=None, maximize=False)
LARS_HYPER = LarsHyper(momentum=0.9, weight_decay=5e-4, trust_coefficient=0.001, eps=0.0, nesterov=False,
                       trust_clip=False, momentum_style="mlperf", adapt=True, trust_ratio_bounds=None, maximize=False)
NO_DECAY_LAMB = LambHyper(**{**LAMB_HYPER.__dict__, "weight_decay": 0.0, "adapt": False})
NO_DECAY_LARS = LarsHyper(**{**LARS_HYPER.__dict__, "weight_decay": 0.0, "adapt": False})

STRUCTURED_SHAPES: list[tuple[int, ...]] = [(4097,), (64, 300), (96, 257), (40, 16, 3, 3), (7, 5), (1031,)]
"""int8 in their requested format: rows of 300 and 257 (ragged blocks), a conv kernel; fp32: a small
matrix and two 1-d tensors (biases: no decay, no adaptation, fp32 state whatever their size)."""


def lr_at(step: int, base: float) -> float:
    """A learning rate that changes every step (as tests/harness.py)."""
    return base * (1.0 + 0.5 * math.sin(0.7 * step))


@dataclass
class LowbitSteps:
    """The state of ``params`` in one format and the reference update over it.

    ``state_dtype``: "fp32", "bf16" or "int8"; ``maps``: (signed map, unsigned map) for int8;
    ``rounding``: stochastic rounding of bf16 params (no masters) when set.
    """

    params: list[Tensor]
    algorithm: str
    state_dtype: str = "fp32"
    maps: tuple[q.CodeMap, q.CodeMap] = (q.SIGNED_MAP, q.UNSIGNED_MAP)
    min_quantized_size: int = q.MIN_QUANTIZED_SIZE
    rounding: rl.StochasticRounding | None = None
    block: int = q.BLOCK_SIZE
    buffers: list[list[rl.StateBuffer]] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    ratios: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        maps = (self.maps[0], self.maps[1]) if self.algorithm == "lamb" else (self.maps[0],)  # (m, v) / momentum
        for p in self.params:
            dtype = q.resolve_state_dtype(self.state_dtype, p.numel(), adapts=p.dim() > 1,
                                          min_quantized_size=self.min_quantized_size)
            self.buffers.append([_zero_buffer(p, dtype, code_map, self.block) for code_map in maps])
            self.steps.append(torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor], lr: float) -> None:
        """One update of every parameter (decay and adaptation on tensors of ≥ 2 dims only)."""
        for s in self.steps:
            s.add_(1.0)
        ratios = []
        for i, (p, g) in enumerate(zip(self.params, grads)):
            adapts = p.dim() > 1
            rounding = None
            if self.rounding is not None:
                rounding = rl.StochasticRounding(self.rounding.seed, [self.rounding.tensor_indices[i]])
            if self.algorithm == "lamb":
                r = rl.lamb_step([p], [g], [self.buffers[i][0]], [self.buffers[i][1]], None, [self.steps[i]], lr=lr,
                                 h=LAMB_HYPER if adapts else NO_DECAY_LAMB, clip_coef=None, grad_scale=None,
                                 found_inf=None, rounding=rounding)
            else:
                r = rl.lars_step([p], [g], [self.buffers[i][0]], None, grad_norms([g], None), [self.steps[i]], lr=lr,
                                 h=LARS_HYPER if adapts else NO_DECAY_LARS, grad_scale=None, found_inf=None,
                                 rounding=rounding)
            ratios.append(r)
        self.ratios.append(torch.cat(ratios))


def _zero_buffer(p: Tensor, dtype: str, code_map: q.CodeMap, block: int) -> rl.StateBuffer:
    if dtype == "int8":
        return q.QuantizedBuffer.zeros_like(p, code_map, block)
    return torch.zeros_like(p, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)


# ============================================================================ structured
def structured_params(shapes: Sequence[tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float32,
                      init_dtype: torch.dtype | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Seeded parameters (rounded through ``init_dtype`` first when given) and their fixed
    gradient-scale patterns (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    params, scales = [], []
    for shape in shapes:
        params.append((torch.randn(shape, generator=gen) * 0.5).to(init_dtype or dtype).to(dtype))
        rows = shape[0] if len(shape) >= 2 else 1
        cols = math.prod(shape) // max(rows, 1)
        row_scale = torch.exp(1.0 * torch.randn(rows, 1, generator=gen))
        col_scale = torch.exp(1.0 * torch.randn(1, cols, generator=gen))
        col_scale = col_scale * (torch.rand(1, cols, generator=gen) >= 0.05)
        scales.append((row_scale * col_scale).reshape(shape))
    return params, scales


def structured_grads(params: Sequence[Tensor], scales: Sequence[Tensor], step: int, seed: int = 0) -> list[Tensor]:
    """scale ⊙ (noise_t + 0.3·w), in each parameter's dtype."""
    gen = torch.Generator().manual_seed(10_000 * seed + step)
    return [(s * (torch.randn(p.shape, generator=gen) + 0.3 * p.float())).to(p.dtype) for p, s in zip(params, scales)]


def structured_trajectory(algorithm: str, state_dtype: str = "fp32", *, steps: int = 200,
                          shapes: Sequence[tuple[int, ...]] = STRUCTURED_SHAPES, seed: int = 0,
                          maps: tuple[q.CodeMap, q.CodeMap] = (q.SIGNED_MAP, q.UNSIGNED_MAP),
                          param_dtype: torch.dtype = torch.float32, sr_seed: int | None = None,
                          lr: float | None = None, block: int = q.BLOCK_SIZE,
                          min_quantized_size: int = q.MIN_QUANTIZED_SIZE,
                          init_dtype: torch.dtype | None = None) -> LowbitSteps:
    """Run ``steps`` updates on the structured problem; returns the driver (params, state, ratios).
    ``init_dtype=torch.bfloat16`` with fp32 params is the fp32-master run of bf16 weights."""
    params, scales = structured_params(shapes, seed, param_dtype, init_dtype)
    rounding = None if sr_seed is None else rl.StochasticRounding(sr_seed, list(range(len(params))))
    run = LowbitSteps(params, algorithm, state_dtype, maps, min_quantized_size, rounding, block)
    base = lr if lr is not None else (0.01 if algorithm == "lamb" else 2.0)
    for t in range(1, steps + 1):
        run.step(structured_grads(params, scales, t, seed), lr_at(t, base))
    return run


@dataclass(frozen=True)
class TrajectoryError:
    """How far a low-precision run ended from the fp32 one, over the tensors whose state was quantised.

    ``param_mean_rel``: mean over elements of |p − p_ref| / |p_ref| (bitsandbytes' measure);
    ``param_norm_rel``: the largest ||p − p_ref|| / ||p_ref|| over tensors; ``ratio_mean_rel`` and
    ``ratio_max_rel``: |r − r_ref| / r_ref over every step and adapted tensor."""

    param_mean_rel: float
    param_norm_rel: float
    ratio_mean_rel: float
    ratio_max_rel: float


def trajectory_error(run: LowbitSteps, ref: LowbitSteps, min_size: int = q.MIN_QUANTIZED_SIZE) -> TrajectoryError:
    """Compare two runs over the same problem (see :class:`TrajectoryError`)."""
    chosen = [i for i, p in enumerate(ref.params) if p.numel() >= min_size and p.dim() > 1] or list(
        range(len(ref.params)))
    diffs = [(run.params[i].double() - ref.params[i].double()) for i in chosen]
    refs = [ref.params[i].double() for i in chosen]
    elementwise = torch.cat([(d.abs() / r.abs().clamp_min(1e-12)).reshape(-1) for d, r in zip(diffs, refs)])
    norm_rel = max(float(d.norm() / r.norm()) for d, r in zip(diffs, refs))
    r_run, r_ref = torch.stack(run.ratios).double(), torch.stack(ref.ratios).double()
    adapted = [i for i, p in enumerate(ref.params) if p.dim() > 1]
    rel = ((r_run - r_ref).abs() / r_ref.abs())[:, adapted]
    return TrajectoryError(float(elementwise.mean()), norm_rel, float(rel.mean()), float(rel.max()))


# ================================================================================= digits
def digits_model(name: str, seed: int = 0) -> nn.Module:
    """"mlp" (64-512-512-10), "cnn" (three 3×3 convs, 64-128-128 channels) or "transformer" (the 8
    rows of an image as tokens, 2 encoder layers of width 128)."""
    torch.manual_seed(seed)
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    if name == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                             nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(128 * 16, 10))
    if name == "transformer":
        return _RowTokens()
    raise ValueError(f"model: one of mlp, cnn, transformer; got {name!r}")


class _RowTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 128)
        self.pos = nn.Parameter(torch.randn(8, 128) * 0.02)
        layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x.view(-1, 8, 8)) + self.pos).mean(1))


def digits_batches(steps: int, batch: int = 64, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Random batches of the scikit-learn digits (pixels scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        yield x[idx], y[idx]


@dataclass
class DigitsRun:
    """Final parameters, per-step trust ratios, losses and state snapshots of one digits training run."""

    params: list[Tensor]
    ratios: list[Tensor]
    losses: list[float]
    snapshots: list[tuple[int, int, list[Tensor]]] = field(default_factory=list)


def digits_training(model_name: str, algorithm: str, state_dtype: str = "fp32", *, steps: int = 200,
                    maps: tuple[q.CodeMap, q.CodeMap] = (q.SIGNED_MAP, q.UNSIGNED_MAP),
                    perturb: bool = False, snapshot_at: Sequence[int] = ()) -> DigitsRun:
    """Train ``model_name`` on digits with the reference low-precision update (LAMB lr 5e-3, LARS lr 2;
    decay and adaptation on tensors of ≥ 2 dims). ``perturb``: multiply the initial weights by
    (1 + 2^−24·ξ), ξ ~ N(0, 1) — the 1-ulp baseline of the chaos. ``snapshot_at``: steps after which
    the fp32 values of every state buffer of tensors ≥ 4096 elements are kept (``DigitsRun.snapshots``:
    (step, tensor index, buffers))."""
    model = digits_model(model_name)
    params = [p for p in model.parameters()]
    if perturb:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in params:
                p.mul_(1 + 2.0**-24 * torch.randn(p.shape, generator=gen))
    run = LowbitSteps([p.data for p in params], algorithm, state_dtype, maps)
    losses = []
    lr = 5e-3 if algorithm == "lamb" else 2.0
    snapshots = []
    for t, (x, y) in enumerate(digits_batches(steps), 1):
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        run.step(grads, lr)
        losses.append(float(loss.detach()))
        if t in snapshot_at:
            snapshots += [(t, i, [rl.load(b).clone() for b in run.buffers[i]])
                          for i, p in enumerate(params) if p.numel() >= q.MIN_QUANTIZED_SIZE]
    return DigitsRun([p.detach().clone() for p in params], run.ratios, losses, snapshots)
