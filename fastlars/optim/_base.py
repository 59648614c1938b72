"""What LARS and LAMB share: option validation, lazy state, master weights, skipping, state_dict.

The step of both optimizers has the same shape:

1. gather every group's (param, grad) pairs and validate the gradients (nothing mutated yet);
2. create missing state (``step``, the algorithm's buffers, an fp32 ``master_param`` when kept);
3. per-tensor gradient norms (one backend call per group), from which come the skip flag
   ``found_inf`` (any non-finite norm, or GradScaler's flag) and, for LAMB, the global norm;
4. count the step on the device (``step += 1 − found_inf``), then call the functional update
   once per group; backends write nothing when ``found_inf`` is set.

When every group runs the native CPU kernels, the next steps take a cached path that does the same in
one compiled call (fastlars.optim._host; bit-identical results), until something it cached changes.

With :meth:`TrustRatioOptimizer.record_trust_ratios` on, step 4 also hands each group's backend a
small fp32 vector that receives the per-tensor trust ratios it computes (``trust_ratios``).

No value is read back to the host during ``step()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastlars import backends, distributed, functional
from fastlars.backends import quantization
from fastlars.backends.reference_lowbit import StateBuffer, StochasticRounding
from fastlars.optim import _host
from fastlars.optim import _state_format as state_format
from fastlars.optim import _validation as check

STORAGE_OPTIONS = ("backend", "state_dtype", "min_quantized_size")
"""Options that say how THIS optimizer stores and steps its state: load_state_dict keeps them (and converts
the saved state into them) instead of taking the checkpoint's."""

TRAJECTORY_OPTIONS_WITH_DEFAULTS = ("stochastic_rounding", "rounding_seed")
"""Options a checkpoint from before they existed lacks: this optimizer's values are kept then."""


@dataclass
class GroupWork:
    """The tensors of one param group that take part in this step, and what the step learns of them."""

    group: dict[str, Any]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    backend: str = "foreach"
    reduce: distributed.Reducer | None = None
    """For DTensor-sharded groups: sums per-tensor statistics over the ranks holding the shards."""
    grad_norms: Tensor | None = None
    weight_norms: Tensor | None = None
    states: list[dict[str, Any]] = field(default_factory=list)
    """The optimizer's state entry of each of ``params`` (looked up once per step: a lookup hashes the tensor)."""

    @property
    def device(self) -> torch.device:
        return distributed.local(self.params[0]).device


@dataclass
class GroupViews:
    """The tensors an update touches; local slices for sharded groups (writes reach the parameters)."""

    params: list[Tensor]
    grads: list[Tensor]
    buffers: dict[str, list[StateBuffer]]
    masters: list[Tensor] | None
    low_precision: bool = False
    """Whether the group steps low-precision state or stochastically rounded weights."""
    rounding: StochasticRounding | None = None


class TrustRatioOptimizer(torch.optim.Optimizer):
    """Base class of :class:`fastlars.LARS` and :class:`fastlars.LAMB` (not used directly)."""

    _step_supports_amp_scaling = True
    buffer_names: tuple[str, ...] = ()
    """Per-parameter state buffers the algorithm keeps besides ``step`` and ``master_param``."""

    sharded_weight_norms: bool = False
    """Whether sharded groups reduce ||w|| in the gradient-statistics all-reduce (LARS: yes)."""

    algorithm: str = ""
    """"lars" or "lamb": which native op the cached host path (fastlars.optim._host) calls."""

    _state_dtype_overrides: Mapping[Tensor, str] = {}
    """Per-parameter state dtypes set by set_state_dtype (replaced, never mutated: the class default is shared)."""

    _param_positions: dict[int, int] | None = None
    """Each param's position in the optimizer (stochastic rounding's tensor key), built when first needed."""

    host_plan_enabled: bool = True
    """Whether steps over native CPU groups may take the cached host path; False: always the Python
    step (the results are bit-identical either way)."""

    @property
    def skip_nonfinite(self) -> bool:
        """Whether step() reads every gradient for NaN/inf before it writes anything and skips the whole step
        on one (default True). False drops that pass, the one a GradScaler's own check makes redundant: the
        step runs as under a GradScaler that found no overflow. LARS then takes each ||g|| in the pass that
        reads w for ||w|| (native CPU: group by group, each group's update right after, so it finds the
        gradients of a group that fits the cache still there), LAMB reads g only in its update. A non-finite
        gradient then flows into its own tensor's weights and state (its norm, hence its trust ratio, is not
        finite), as in torch's fused optimizers and apex, except where the step computes gradient norms all
        the same and still skips on a non-finite one: LAMB groups with max_grad_norm, FSDP2-sharded groups,
        and LARS with a ``stats_group`` (ZeRO). A GradScaler's flag still skips."""
        return getattr(self, "_skip_nonfinite", True)

    @skip_nonfinite.setter
    def skip_nonfinite(self, value: bool) -> None:
        check.check_bool("skip_nonfinite", value)
        self._skip_nonfinite = value

    # Subclasses define ``_update_group(item, views, steps, grad_scale, found_inf, global_grad_norm,
    # trust_ratios)``, which calls their functional update for one group.

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._check_options(defaults)
        self._host_plan: Any | None = None
        self._resolved: dict[tuple[int, torch.device], str] = {}
        self._trust_ratios: list[Tensor | None] | None = None
        self.stats_group: Any | None = None
        """A process group over which the skip flag and LAMB's ||G|| are summed every step (set by
        fastlars.distributed.zero_redundancy_optimizer); None: this optimizer's tensors only."""
        super().__init__(params, defaults)
        # Created here, not at the first step: torch.compile (torch 2.11) cannot set a new attribute
        # on the optimizer inside a compiled step, and a CUDA graph wants it allocated before capture.
        self._skipped = torch.zeros((), device=self._home_device())

    # ------------------------------------------------------------------ copy and pickle
    _COPIED_ATTRIBUTES = ("_skipped", "_state_dtype_overrides", "_trust_ratios", "_reuse_weight_norms",
                          "_skip_nonfinite", "host_plan_enabled")

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: torch's defaults, state and param_groups, and this
        optimizer's own settings (skipped-step count, per-parameter state formats, recorded trust ratios,
        host-path switches, skip_nonfinite). Hooks are not kept (torch's rule); the host plan and backend
        choices are rebuilt at the copy's first step; ``stats_group`` (a process group, which cannot be
        copied) is None in the copy: set it again on a ZeRO copy."""
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._COPIED_ATTRIBUTES if name in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "defaults" not in state:  # torch's load_state_dict sets state and param_groups through here
            super().__setstate__(state)
            return
        differentiable = "differentiable" in state["defaults"]
        super().__setstate__(state)
        if not differentiable:  # torch's __setstate__ adds the option, which these optimizers do not take
            self.defaults.pop("differentiable")
        self._host_plan = None
        self._resolved = {}
        self._param_positions = None
        self.stats_group = None
        self.__dict__.setdefault("_trust_ratios", None)
        if "_skipped" not in self.__dict__:
            self._skipped = torch.zeros((), device=self._home_device())

    # ----------------------------------------------------------------- options and groups
    def _check_options(self, group: Mapping[str, Any]) -> None:
        """Validate one group's options; subclasses add their own after calling this."""
        check.check_common_options(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its options and parameters (raises before any change)."""
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        index = len(self.param_groups)
        names, params = check.split_param_names(index, params)
        if names is not None:
            param_group = {**param_group, "param_names": names}
        merged = {**self.defaults, **param_group, "params": params}
        unknown = set(merged) - set(self.defaults) - {"params", "param_names"}
        if unknown:
            raise ValueError(f"param_group: unknown option(s) {sorted(unknown)}")
        self._check_options(merged)
        check.check_group_params(index, params, merged["capturable"], merged["lr"], names)
        check.check_rounding_params(index, params, merged["stochastic_rounding"])
        low_precision = self._is_low_precision(merged)
        if params:
            self._refuse_sharded_low_precision(index, params[0], low_precision)
        if params and merged["backend"] != "auto":
            resolve = backends.resolve_low_precision if low_precision else backends.resolve
            resolve(merged["backend"], params[0].device)
        super().add_param_group({**param_group, "params": params})
        self._host_plan = None
        self._param_positions = None
        if params:
            self._backend_for(index, params[0].device)

    @staticmethod
    def adapts(group: Mapping[str, Any]) -> bool:
        """Whether the trust ratio applies: ``adapt`` when set, else weight_decay ≠ 0."""
        return group["weight_decay"] != 0.0 if group["adapt"] is None else group["adapt"]

    # ------------------------------------------------------------ state precision
    def _is_low_precision(self, group: Mapping[str, Any]) -> bool:
        """Whether a group steps low-precision state or stochastically rounded weights (then it runs on a
        backend with a low-precision step, see fastlars.backends.resolve_low_precision)."""
        if group["state_dtype"] != "fp32" or group["stochastic_rounding"]:
            return True
        overrides = self._state_dtype_overrides
        return bool(overrides) and any(overrides.get(p, "fp32") != "fp32" for p in group.get("params", ()))

    @staticmethod
    def _refuse_sharded_low_precision(group_index: int, param: Tensor, low_precision: bool) -> None:
        if low_precision and distributed.is_sharded(param):
            raise ValueError(
                f"state_dtype: param_groups[{group_index}] holds sharded (DTensor) parameters, whose steps "
                "take fp32 state only; use state_dtype='fp32' and stochastic_rounding=False for FSDP2 groups "
                "(ZeRO via fastlars.distributed.zero_redundancy_optimizer keeps whole tensors and takes any)")

    def state_dtype_of(self, param: Tensor) -> str:
        """The state dtype ``param`` gets (or has): "fp32", "bf16" or "int8", from its group's
        ``state_dtype`` and ``min_quantized_size``, the trust-ratio rule (groups that do not adapt keep
        fp32) and :meth:`set_state_dtype`."""
        group = self._group_of(param)
        return state_format.target_dtype(group, param.numel(), self.adapts(group),
                                         self._state_dtype_overrides.get(param))

    def set_state_dtype(self, param: Tensor, dtype: str | None) -> None:
        """Store ``param``'s state as ``dtype`` ("fp32", "bf16", "int8"; None: its group's rule) whatever
        its group says; existing state is converted now (through fp32: int8 → fp32 is exact)."""
        group = self._group_of(param)
        if dtype is not None:
            check.check_choice("dtype", dtype, quantization.STATE_DTYPES)
        overrides = dict(self._state_dtype_overrides)
        if dtype is None:
            overrides.pop(param, None)
        else:
            overrides[param] = dtype
        previous, self._state_dtype_overrides = self._state_dtype_overrides, overrides
        try:
            low_precision = self._is_low_precision(group)
            self._refuse_sharded_low_precision(self.param_groups.index(group), param, low_precision)
            if group["backend"] != "auto":
                (backends.resolve_low_precision if low_precision else backends.resolve)(group["backend"], param.device)
        except ValueError:
            self._state_dtype_overrides = previous
            raise
        state = self.state.get(param)
        if state:
            converted = state_format.convert_entry(state, self.buffer_names, self.state_dtype_of(param), param,
                                                   "master_param" in state)
            for key in state_format.buffer_keys(self.buffer_names):
                state.pop(key, None)
            master = state.pop("master_param", None)
            state.update(converted)
            if master is not None:
                state["master_param"] = master
        self._host_plan = None
        self._resolved.clear()

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("param: not a parameter of this optimizer")

    def _rounding(self, item: GroupWork) -> StochasticRounding | None:
        """How the group's bf16 weights without masters are stochastically rounded (None: to nearest)."""
        if not item.group["stochastic_rounding"]:
            return None
        if self._param_positions is None:
            self._param_positions = {id(p): i for i, p in
                                     enumerate(p for g in self.param_groups for p in g["params"])}
        return StochasticRounding(item.group["rounding_seed"], [self._param_positions[id(p)] for p in item.params])

    # ----------------------------------------------------------------------- step
    def record_trust_ratios(self, enabled: bool = True) -> None:
        """Keep, from the next step() on, the trust ratio that each step applies to each parameter.

        ``trust_ratios[g][k]`` is then the ratio r of ``param_groups[g]["params"][k]`` at the last step
        that updated it (LARS: η·||w|| / (||g|| + λ·||w|| + ε), LAMB: ||w|| / ||u||, after clipping and
        bounds; 1 in groups that do not adapt; NaN before its first step). A skipped step leaves the
        ratios as they were. The backends write the ratios they compute for the update anyway into
        these vectors (no second pass over the weights); only reading them synchronises with the device.
        """
        self._trust_ratios = [] if enabled else None

    @property
    def trust_ratios(self) -> list[Tensor | None] | None:
        """Per param group, a 1-D fp32 tensor of trust ratios, one per parameter of the group (None for a
        group not stepped yet); None unless :meth:`record_trust_ratios` is on."""
        return self._trust_ratios

    def _ratio_output(self, item: GroupWork) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """(the vector the backend writes, and when not every param of the group took part in this step:
        the group's record and the positions in it of those that did), or None when not recording."""
        if self._trust_ratios is None:
            return None
        index = next(gi for gi, g in enumerate(self.param_groups) if g is item.group)
        self._trust_ratios += [None] * (index + 1 - len(self._trust_ratios))
        record = self._trust_ratios[index]
        if record is None or record.device != item.device:
            n = len(item.group["params"])
            record = self._trust_ratios[index] = torch.full((n,), float("nan"), device=item.device)
        if len(item.params) == len(item.group["params"]):  # every param has a gradient: write in place
            return record, None, None
        place = {id(p): k for k, p in enumerate(item.group["params"])}
        positions = torch.tensor([place[id(p)] for p in item.params], device=record.device)
        return record.index_select(0, positions), record, positions  # a skipped step leaves the copy as it was

    @property
    def skipped_steps(self) -> int:
        """How many step() calls changed nothing because a gradient was non-finite (reads the device)."""
        return int(self._skipped.item())

    def _gather(self) -> list[GroupWork]:
        work = []
        for gi, group in enumerate(self.param_groups):
            item = GroupWork(group)
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if (grad.layout != torch.strided or grad.dtype != p.dtype or grad.shape != p.shape
                        or grad.device != p.device or grad.is_complex()):
                    check.check_grad(gi, pi, p, grad, check.param_name(group, pi))  # raises naming it
                item.params.append(p)
                item.grads.append(grad)
            if item.params:
                self._refuse_sharded_low_precision(gi, item.params[0], self._is_low_precision(group))
                if distributed.is_sharded(item.params[0]):
                    # whole-tensor norms need the shard all-reduce, which the foreach backend takes
                    item.reduce = distributed.sum_over(distributed.shard_groups(item.params))
                    item.backend = "foreach"
                else:
                    item.backend = self._backend_for(gi, item.device)
                work.append(item)
        return work

    def _backend_for(self, group_index: int, device: torch.device) -> str:
        """The group's concrete backend on ``device``, resolved once (torch.compile then sees a lookup)."""
        key = (group_index, device)
        if key not in self._resolved:
            group = self.param_groups[group_index]
            resolve = backends.resolve_low_precision if self._is_low_precision(group) else backends.resolve
            self._resolved[key] = resolve(group["backend"], device)
        return self._resolved[key]

    def _keeps_master(self, group: Mapping[str, Any], p: Tensor) -> bool:
        return bool(group["master_weights"]) and p.dtype in check.LOW_PRECISION

    def _init_state(self, item: GroupWork) -> None:
        item.states = [self.state[p] for p in item.params]
        for p, state in zip(item.params, item.states):
            if state:
                continue
            master = self._keeps_master(item.group, p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            dtype = state_format.target_dtype(item.group, p.numel(), self.adapts(item.group),
                                              self._state_dtype_overrides.get(p))
            state.update(state_format.new_entry(p, self.buffer_names, dtype, master))
            if master:
                state["master_param"] = p.detach().clone().float()

    def _needs_grad_norms(self, scaler_found_inf: Tensor | None, work: list[GroupWork]) -> bool:
        """Whether per-tensor gradient norms must be computed (LARS always; LAMB decides)."""
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (see the class docstring for the maths)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        scaler_found_inf: Tensor | None = getattr(self, "found_inf", None)
        if scaler_found_inf is None and not self.skip_nonfinite:
            scaler_found_inf = torch.zeros((), device=self._home_device())  # as a GradScaler without overflow
        if not torch.compiler.is_compiling():
            plan = getattr(self, "_host_plan", None)  # absent on an unpickled optimizer
            if (plan is not None and self._trust_ratios is None and self.stats_group is None
                    and self.host_plan_enabled
                    and plan.step(self.param_groups, self.state, grad_scale, scaler_found_inf, self._skipped)):
                return loss
            self._host_plan = None
        work = self._gather()
        if not work and self.stats_group is None:
            return loss
        for item in work:
            self._init_state(item)

        flags = self._gradient_statistics(work, grad_scale, scaler_found_inf)
        home = work[0].device if work else self._home_device()
        found_inf = torch.stack([f.to(home, torch.float32, non_blocking=True).reshape(()) for f in flags]).amax()
        global_grad_norm = None
        if any(item.group.get("max_grad_norm") for item in work) or self.stats_group is not None:
            global_grad_norm = functional.global_norm([i.grad_norms for i in work if i.grad_norms is not None]
                                                      or [torch.zeros(0, device=home)])
        if self.stats_group is not None:
            found_inf, global_grad_norm = self._reduce_over_stats_group(found_inf, global_grad_norm)
        found_inf = (found_inf > 0).float()
        if self._skipped.device != home:  # the parameters moved after the optimizer was made
            self._skipped = self._skipped.to(home)
        self._skipped.add_(found_inf)

        keep = 1.0 - found_inf
        for item in work:
            steps = [state["step"] for state in item.states]
            torch._foreach_add_(steps, [keep.to(item.device, non_blocking=True)] * len(steps))
            views = self._views(item)
            gnorm = None if global_grad_norm is None else global_grad_norm.to(item.device)
            ratios = self._ratio_output(item)
            self._update_group(item, views, steps, grad_scale, found_inf.to(item.device), gnorm,
                               None if ratios is None else ratios[0])
            if ratios is not None and ratios[1] is not None:  # back into the places of the params that took part
                ratios[1].index_copy_(0, ratios[2], ratios[0])
        if not torch.compiler.is_compiling():
            self._host_plan = _host.build_plan(self, work, self.algorithm)
        return loss

    def _gradient_statistics(
        self, work: list[GroupWork], grad_scale: Tensor | None, scaler_found_inf: Tensor | None
    ) -> list[Tensor]:
        """Fill each group's grad_norms (and sharded weight_norms); return the skip flags to combine.

        Sharded groups sum [||g_i||², (||w_i||²,) scaler flag] over their shards in ONE all-reduce.
        """
        flags = [] if scaler_found_inf is None else [scaler_found_inf]
        needs_norms = self._needs_grad_norms(scaler_found_inf, work)
        for item in work:
            if item.reduce is not None:
                self._sharded_statistics(item, grad_scale, scaler_found_inf)
            elif needs_norms:
                item.grad_norms = functional.grad_norms(item.grads, grad_scale, backend=item.backend)
            if item.grad_norms is not None:
                flags.append((~torch.isfinite(item.grad_norms)).any())
        if not flags:  # nothing to check on this rank (ZeRO partition without gradients)
            flags.append(torch.zeros((), device=self._home_device()))
        return flags

    def _sharded_statistics(self, item: GroupWork, grad_scale: Tensor | None, scaler_found_inf: Tensor | None) -> None:
        n = len(item.params)
        local_grads = [distributed.local(g) for g in item.grads]
        parts = [functional.grad_norms(local_grads, grad_scale, backend="foreach").square()]
        if self.sharded_weight_norms:
            weights = [distributed.local(w) for w in (self._masters(item) or item.params)]
            parts.append(functional.grad_norms(weights, None, backend="foreach").square())
        flag = torch.zeros(1, device=item.device) if scaler_found_inf is None else scaler_found_inf
        parts.append(flag.to(item.device, torch.float32).reshape(1))
        totals = item.reduce(torch.cat([p.to(item.device) for p in parts]))
        item.grad_norms = totals[:n].sqrt()
        if self.sharded_weight_norms:
            item.weight_norms = totals[n : 2 * n].sqrt()
        if scaler_found_inf is not None:  # one rank's overflow skips the step on every rank
            item.grad_norms = item.grad_norms + torch.where(totals[-1] > 0, float("inf"), 0.0)

    def _reduce_over_stats_group(self, found_inf: Tensor, global_grad_norm: Tensor) -> tuple[Tensor, Tensor]:
        stats = torch.stack([found_inf.float(), global_grad_norm.float().square()])
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM, group=self.stats_group)
        return stats[0], stats[1].sqrt()

    def _home_device(self) -> torch.device:
        for group in self.param_groups:
            if group["params"]:
                return distributed.local(group["params"][0]).device
        return torch.device("cpu")

    def _views(self, item: GroupWork) -> GroupViews:
        masters = self._masters(item)
        if self._is_low_precision(item.group):  # never sharded (refused in _gather)
            return GroupViews(
                params=item.params,
                grads=item.grads,
                buffers={name: [state_format.buffer_view(state, name) for state in item.states]
                         for name in self.buffer_names},
                masters=masters,
                low_precision=True,
                rounding=self._rounding(item),
            )
        if item.reduce is None:
            return GroupViews(params=item.params, grads=item.grads, masters=masters,
                              buffers={name: [state[name] for state in item.states] for name in self.buffer_names})
        local = distributed.local  # a sharded group: its DTensors' local shards
        return GroupViews(
            params=[local(p) for p in item.params],
            grads=[local(g) for g in item.grads],
            buffers={name: [local(state[name]) for state in item.states] for name in self.buffer_names},
            masters=None if masters is None else [local(m) for m in masters],
        )

    def _masters(self, item: GroupWork) -> list[Tensor] | None:
        """fp32 master copies for the group's params, or None when the group keeps none."""
        masters = [state.get("master_param") for state in item.states]
        if all(m is None for m in masters):
            return None
        return [m if m is not None else p for m, p in zip(masters, item.params)]

    # ---------------------------------------------------------------- state_dict
    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus ``skipped_steps``; the same for every backend."""
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state_dict saved by any backend, after checking its groups, keys and shapes.

        Each group keeps this optimizer's storage options (``backend``, ``state_dtype``,
        ``min_quantized_size``); the saved state is converted into them: an entry already stored as this
        optimizer stores it is copied unchanged (so resuming is exact), others go through fp32 (an fp32
        checkpoint loads into an int8 optimizer and back). Full-precision buffers keep their saved
        precision (fp32 master weights and moments are not rounded to the parameter dtype). A checkpoint
        from before ``stochastic_rounding``/``rounding_seed`` existed keeps this optimizer's values.
        """
        self._check_state_dict(state_dict)
        self._host_plan = None
        self._param_positions = None
        kept = [{key: g[key] for key in STORAGE_OPTIONS} for g in self.param_groups]
        defaults = [{key: g[key] for key in TRAJECTORY_OPTIONS_WITH_DEFAULTS} for g in self.param_groups]
        saved = copy.deepcopy(state_dict["state"])
        groups = [{**fallback, **saved_group} for fallback, saved_group in zip(defaults, state_dict["param_groups"])]
        super().load_state_dict({"state": state_dict["state"], "param_groups": groups})
        for group, storage in zip(self.param_groups, kept):
            group.update(storage)
        id_to_param = self._saved_id_map(state_dict)
        for pid, entry in saved.items():
            p = id_to_param[pid]
            master = "master_param" in entry
            new = {"step": entry["step"].to(device=p.device, dtype=torch.float32).clone()}
            new.update(state_format.convert_entry(entry, self.buffer_names, self.state_dtype_of(p), p, master))
            if master:
                new["master_param"] = entry["master_param"].to(device=p.device, dtype=torch.float32).clone()
            self.state[p] = new
        self._resolved.clear()
        skipped = int(state_dict.get("skipped_steps", 0))
        home = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else "cpu"
        self._skipped = torch.tensor(float(skipped), device=home)

    def _saved_id_map(self, state_dict: Mapping[str, Any]) -> dict[Any, Tensor]:
        mapping = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            mapping.update(zip(saved["params"], group["params"]))
        return mapping

    def _check_state_dict(self, state_dict: Any) -> None:
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups'")
        groups, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            n = len(groups) if isinstance(groups, list) else type(groups).__name__
            raise ValueError(f"state_dict: has {n} param groups, this optimizer has {len(self.param_groups)}")
        for gi, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise ValueError(f"state_dict: param_groups[{gi}] is not a group dict")
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(f"state_dict: param_groups[{gi}] holds {len(saved['params'])} params, "
                                 f"this optimizer's holds {len(ours['params'])}")
            missing = set(self.defaults) - set(saved) - {*STORAGE_OPTIONS, *TRAJECTORY_OPTIONS_WITH_DEFAULTS}
            if missing:
                raise ValueError(f"state_dict: param_groups[{gi}] lacks option(s) {sorted(missing)}")
            try:
                fallback = {key: ours[key] for key in TRAJECTORY_OPTIONS_WITH_DEFAULTS}
                self._check_options({**fallback, **saved, **{key: ours[key] for key in STORAGE_OPTIONS}})
            except (TypeError, ValueError) as exc:
                raise ValueError(f"state_dict: param_groups[{gi}]: {exc}") from exc
        if not isinstance(state, Mapping):
            raise ValueError("state_dict: 'state' must be a dict")
        positions = {}
        for gi, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            for pi, (pid, p) in enumerate(zip(saved["params"], ours["params"])):
                positions[pid] = (gi, pi, p, saved)
        for pid, entry in state.items():
            if pid not in positions:
                raise ValueError(f"state_dict: state for parameter id {pid!r}, which no param group lists")
            gi, pi, p, saved_group = positions[pid]
            name = check.describe(gi, pi, p, check.param_name(self.param_groups[gi], pi))
            if not isinstance(entry, Mapping):
                raise ValueError(f"state_dict: state of {name} is not a dict")
            try:
                quantization.validate_record(entry.get(quantization.FORMAT_KEY), self.buffer_names,
                                             state_format.KNOWN_MAPS)
            except ValueError as exc:
                raise ValueError(f"state_dict: state of {name}: {exc}") from exc
            expected = {"step", *state_format.expected_keys(entry, self.buffer_names)}
            if saved_group["master_weights"] and p.dtype in check.LOW_PRECISION:
                expected.add("master_param")
            if set(entry) != expected:
                raise ValueError(f"state_dict: state of {name} has keys {sorted(entry)}, expected {sorted(expected)}")
            try:
                state_format.check_entry(entry, self.buffer_names, p, name)
            except ValueError as exc:
                raise ValueError(f"state_dict: {exc}") from exc
            for key in ("step", "master_param"):
                if key not in entry:
                    continue
                value = entry[key]
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    raise ValueError(f"state_dict: state[{key!r}] of {name} must be a floating tensor")
                want = torch.Size([]) if key == "step" else p.shape
                if value.shape != want and not (key == "step" and value.numel() == 1):
                    raise ValueError(f"state_dict: state[{key!r}] of {name} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(want)}")
