"""The trainer's parts on their own: batch arithmetic, config errors, LR schedule, noise-scale and
diffusion formulas, trust ratios by layer, the TensorBoard view's folder and purge, atomic
checkpoints, the command line."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from train import checkpoint, tensorboard
from train.cli import config_from_args, parser
from train.config import TrainConfig, accumulation_steps
from train.metrics import NoiseScale, TrustRatios, WeightDiffusion, squared_norm
from train.models import build_model, resolve_model_name
from train.optimizers import build_optimizer
from train.schedule import Schedule, total_updates


def test_accumulation_steps_divide_or_say_why() -> None:
    assert accumulation_steps(1024, 64, 2) == 8
    assert accumulation_steps(64, 64, 1) == 1
    with pytest.raises(ValueError, match=r"--global-batch 1000 is not a multiple of --device-batch × world size"):
        accumulation_steps(1000, 64, 2)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("optimizer", "adagrad", "--optimizer must be one of"),
    ("global_batch", 0, "--global-batch must be positive"),
    ("device_batch", -4, "--device-batch must be positive"),
    ("lr", -0.1, "--lr must be positive"),
    ("label_smoothing", 1.0, "--label-smoothing must be < 1"),
    ("warmup_epochs", -1.0, "--warmup-epochs must be ≥ 0"),
    ("amp", "fp8", "--amp must be one of"),
    ("shard", "zero3", "--shard must be one of"),
    ("betas", (0.9, 1.0), "--betas must lie in"),
    ("optim_state", "fp8", "--optim-state must be one of"),
    ("optim_state_min_size", -1, "--optim-state-min-size must be ≥ 0"),
])
def test_config_errors_name_the_flag(field: str, value: object, message: str) -> None:
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.check()


def test_peak_lr_scaling_rules() -> None:
    assert TrainConfig(lr=0.3, global_batch=4096).peak_lr() == 0.3
    assert TrainConfig(base_lr=0.1, global_batch=1024, base_batch=256, lr_scaling="linear").peak_lr() == 0.4
    assert TrainConfig(base_lr=0.1, global_batch=1024, base_batch=256, lr_scaling="sqrt").peak_lr() == 0.2
    assert TrainConfig(base_lr=0.1, global_batch=1024, lr_scaling="none").peak_lr() == 0.1
    assert TrainConfig(optimizer="sgd", global_batch=8192).peak_lr() == pytest.approx(3.2)  # Goyal et al.


def test_schedule_warmup_then_poly_decay() -> None:
    s = Schedule(peak_lr=2.0, total=110, warmup=10, decay="poly", poly_power=2.0)
    assert [s(t) for t in (1, 5, 10)] == [0.2, 1.0, 2.0]
    assert s(11) == 2.0
    assert s(61) == pytest.approx(2.0 * (1 - 50 / 100) ** 2)
    assert s(110) == pytest.approx(2.0 * (1 / 100) ** 2)
    cos = Schedule(peak_lr=1.0, total=101, warmup=1, decay="cosine")
    assert cos(52) == pytest.approx(0.5)  # progress (52 − 1 − 1)/100 = ½
    step = Schedule(peak_lr=1.0, total=100, warmup=0, decay="step", milestones=(30, 60))
    assert (step(30), step(31), step(61)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    assert total_updates(2.5, 10, None) == 25 and total_updates(90, 10, 7) == 7


def test_noise_scale_recovers_a_known_gradient_noise() -> None:
    """Per-sample gradients g_i = G + ξ_i with tr(Σ) = d·σ² and |G|² known: B_simple → tr(Σ)/|G|²."""
    gen = torch.Generator().manual_seed(0)
    d, sigma, true_g = 50, 2.0, torch.ones(50) * 0.5
    noise = NoiseScale(horizon=50)
    for _ in range(2000):
        samples = true_g + sigma * torch.randn(64, d, generator=gen)
        g_small, g_big = samples[:16].mean(0), samples.mean(0)
        noise.update(float(g_small.pow(2).sum()), 16, float(g_big.pow(2).sum()), 64)
    expected = d * sigma ** 2 / float(true_g.pow(2).sum())
    assert noise.value == pytest.approx(expected, rel=0.15)
    with pytest.raises(ValueError, match="0 < B_small < B_big"):
        noise.update(1.0, 64, 1.0, 64)


def test_weight_diffusion_is_the_distance_from_the_start() -> None:
    model = nn.Linear(3, 2)
    diffusion = WeightDiffusion(model)
    assert diffusion.distance(model) == 0.0
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.sub_(2.0)
    assert diffusion.distance(model) == pytest.approx(math.sqrt(6 * 1 + 2 * 4))
    assert squared_norm([torch.ones(3), None, torch.full((2,), 2.0)]) == 11.0


def test_checkpoint_is_atomic_and_checked(tmp_path) -> None:
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint.save_atomic({"t": 3, "rng": checkpoint.rng_states()}, path)
    assert checkpoint.load(path)["t"] == 3
    assert not path.with_name("checkpoint.pt.tmp").exists()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(path)
    torch.save({"format": 99}, path)
    with pytest.raises(ValueError, match="not a fastlars trainer checkpoint"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")


def test_shard_files_local_state_and_cleanup(tmp_path) -> None:
    """The FSDP2 shard helpers on plain tensors (the two-process resume test runs them on DTensors): a model's
    slices round-trip, a slice of another shape or a missing entry is refused naming it, older shard folders
    go and the current one stays."""
    model, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    checkpoint.load_local_model_state(other, checkpoint.local_model_state(model))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ValueError, match=r"weight: this rank's slice is \(2, 3\), the shard holds \(4, 3\)"):
        checkpoint.load_local_model_state(other, {"weight": torch.zeros(4, 3), "bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="'bias'"):
        checkpoint.load_local_model_state(other, {"weight": torch.zeros(2, 3)})
    state = {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": []}
    assert checkpoint.local_optimizer_state(state)["sharded_entries"] == []
    for update in (2, 4, 6):
        for rank in (0, 1):
            checkpoint.save_atomic({"t": update}, checkpoint.shard_path(tmp_path, update, rank))
    checkpoint.remove_shards_before(tmp_path, 6)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pt")) == [
        "checkpoint.shards/update000000006/rank0.pt", "checkpoint.shards/update000000006/rank1.pt"]


def test_rng_states_round_trip() -> None:
    states = checkpoint.rng_states()
    first = torch.rand(3)
    checkpoint.restore_rng_states(states)
    assert torch.equal(torch.rand(3), first)


def test_models_and_optimizer_groups() -> None:
    assert resolve_model_name("default", "default") == "small_cnn"
    assert resolve_model_name("default", "/imagenet") == "resnet50"
    with pytest.raises(ValueError, match="--model must be one of"):
        build_model("vgg11", 10)
    model = build_model("small_cnn", 10)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    opt = build_optimizer(TrainConfig(optimizer="lars"), model, lr=1.0)
    decayed, plain = opt.param_groups
    assert all(p.dim() > 1 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert plain["weight_decay"] == 0.0
    sgd = build_optimizer(TrainConfig(optimizer="sgd", nesterov=True), model, lr=1.0)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optim_state_is_fastlars_only(optimizer: str) -> None:
    """--optim-state bf16|int8 with a torch optimizer is an error naming the flag, from the config and from
    build_optimizer alike (nothing is built)."""
    with pytest.raises(ValueError, match=f"--optim-state int8 applies to .*{optimizer}"):
        TrainConfig(optimizer=optimizer, optim_state="int8").check()
    with pytest.raises(ValueError, match=f"--optim-state bf16 applies to lars and lamb only; {optimizer}"):
        build_optimizer(TrainConfig(optimizer=optimizer, optim_state="bf16"), build_model("small_cnn", 10), lr=0.1)
    with pytest.raises(ValueError, match="--optim-state int8 with --shard fsdp2"):
        TrainConfig(optimizer="lamb", optim_state="int8", shard="fsdp2").check()


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_no_skip_nonfinite_reaches_the_optimizer(optimizer: str) -> None:
    """--no-skip-nonfinite sets fastlars' skip_nonfinite to False (True without it), on the optimizer and on
    ZeRO's local one: a step with a NaN in one gradient is then applied (the NaN reaches that tensor, the others
    move) where the default skips it (nothing moves)."""
    assert config_from_args(["--optimizer", optimizer]).skip_nonfinite
    cfg = config_from_args(["--optimizer", optimizer, "--no-skip-nonfinite"])
    assert not cfg.skip_nonfinite
    for skip in (True, False):
        torch.manual_seed(0)
        model = build_model("small_cnn", 10)
        opt = build_optimizer(dataclasses.replace(cfg, skip_nonfinite=skip), model, lr=0.1)
        assert opt.skip_nonfinite is skip
        model(torch.randn(4, 3, 16, 16)).sum().backward()
        names = dict(model.named_parameters())
        names["0.weight"].grad[0, 0, 0, 0] = float("nan")
        before = {n: p.detach().clone() for n, p in names.items()}
        opt.step()
        if skip:
            assert all(torch.equal(p, before[n]) for n, p in names.items())
        else:
            assert names["0.weight"].isnan().any()
            assert all(p.isfinite().all() and not torch.equal(p, before[n]) for n, p in names.items()
                       if n != "0.weight" and p.grad.abs().sum() > 0)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        zero = build_optimizer(cfg, build_model("small_cnn", 10), lr=0.1, zero=True)
        assert zero.optim.skip_nonfinite is False
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_skip_nonfinite_is_fastlars_only(optimizer: str) -> None:
    """--no-skip-nonfinite with a torch optimizer (which never checks its gradients) is an error naming the
    flag, from the config and from build_optimizer alike."""
    cfg = TrainConfig(optimizer=optimizer, skip_nonfinite=False)
    with pytest.raises(ValueError, match=f"--no-skip-nonfinite applies to the fastlars optimizers .*{optimizer}"):
        cfg.check()
    with pytest.raises(ValueError, match=f"--no-skip-nonfinite applies to lars and lamb only; {optimizer}"):
        build_optimizer(cfg, build_model("small_cnn", 10), lr=0.1)


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_optim_state_reaches_the_fastlars_state(optimizer: str) -> None:
    """--optim-state/--optim-state-min-size become state_dtype/min_quantized_size: with the library's 4096 only
    the small CNN's 4,608-element conv is int8; with 0 every adapting weight is; biases and BN stay fp32.
    The state itself holds uint8 codes for exactly those tensors after a step."""
    import fastlars.backends.quantization as q

    assert TrainConfig().optim_state_min_size == q.MIN_QUANTIZED_SIZE
    cfg = config_from_args(["--optimizer", optimizer, "--optim-state", "int8"])
    assert (cfg.optim_state, cfg.optim_state_min_size) == ("int8", q.MIN_QUANTIZED_SIZE)
    for min_size, expected in ((q.MIN_QUANTIZED_SIZE, {"3.weight"}), (0, {"0.weight", "3.weight", "8.weight"})):
        torch.manual_seed(0)
        model = build_model("small_cnn", 10)
        opt = build_optimizer(dataclasses.replace(cfg, optim_state_min_size=min_size), model, lr=0.01)
        names = dict(model.named_parameters())
        assert {n for n, p in names.items() if opt.state_dtype_of(p) == "int8"} == expected
        assert {opt.state_dtype_of(p) for n, p in names.items() if n not in expected} == {"fp32"}
        model(torch.randn(4, 3, 16, 16)).sum().backward()
        opt.step()
        coded = {n for n, p in names.items() if any(t.dtype == torch.uint8 for t in opt.state[p].values()
                                                       if isinstance(t, torch.Tensor))}
        assert coded == expected


def test_trust_ratios_by_layer_name() -> None:
    """The adapting layers' ratios by parameter name, as the optimizer's backend recorded them; none for
    optimizers without a trust ratio."""
    model = build_model("small_cnn", 10)
    opt = build_optimizer(TrainConfig(optimizer="lamb"), model, lr=0.01)
    ratios = TrustRatios(opt, model)
    assert ratios.enabled and ratios.values() == {}  # nothing stepped yet
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    opt.step()
    values = ratios.values()
    assert sorted(values) == ["0.weight", "3.weight", "8.weight"]  # the conv and linear weights; no BN, no bias
    assert values["8.weight"] == opt.trust_ratios[0][2].item() and all(0 < v < 1e3 for v in values.values())
    assert not TrustRatios(build_optimizer(TrainConfig(optimizer="sgd"), model, lr=0.1), model).enabled


def test_tensorboard_folder_setting(tmp_path, monkeypatch) -> None:
    assert tensorboard.resolve("off", tmp_path) is None
    assert tensorboard.resolve(str(tmp_path / "tb"), tmp_path) == tmp_path / "tb"
    monkeypatch.setattr(tensorboard, "installed", lambda: True)
    assert tensorboard.resolve("auto", tmp_path) == tmp_path / "tensorboard"
    monkeypatch.setattr(tensorboard, "installed", lambda: False)
    assert tensorboard.resolve("auto", tmp_path) is None
    with pytest.raises(ValueError, match="--tensorboard runs/tb: the tensorboard package is not installed"):
        tensorboard.resolve("runs/tb", tmp_path)
    with pytest.raises(ValueError, match="--tensorboard needs a folder"):
        TrainConfig(tensorboard="").check()


def test_tensorboard_view_after_resume_holds_the_continued_trajectory(tmp_path) -> None:
    """A run killed after logging steps 1–5 and resumed from its checkpoint at step 3 rewrites steps 4 on:
    TensorBoard's own reader then sees each step once, with the resumed values."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = tensorboard.TensorBoardView(tmp_path, purge_step=1)
    for step in range(1, 6):
        first.write({"step": step, "loss": 10.0 + step, "trust_ratios": {"a": 0.5, "b": float("nan")}})
    first.close()
    resumed = tensorboard.TensorBoardView(tmp_path, purge_step=4)
    for step in range(4, 8):
        resumed.write({"step": step, "loss": 20.0 + step, "top1": None, "trust_ratios": {"a": 0.25}})
    resumed.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0), (7, 27.0)]
    assert "eval/top1" not in events.Tags()["scalars"]
    histograms = events.Histograms(tensorboard.TRUST_RATIO_HISTOGRAM)
    assert [h.step for h in histograms] == list(range(1, 8))
    assert [h.histogram_value.num for h in histograms] == [1.0] * 7  # the NaN ratio is left out
    assert histograms[-1].histogram_value.max == 0.25


def test_cli_parses_flags_and_rejects_bad_values(capsys) -> None:
    cfg = config_from_args(["--optimizer", "lamb", "--global-batch", "512", "--device-batch", "64",
                            "--betas", "0.9", "0.95", "--amp", "bf16", "--channels-last", "--resume"])
    assert (cfg.optimizer, cfg.global_batch, cfg.device_batch, cfg.betas, cfg.amp, cfg.channels_last, cfg.resume) == \
        ("lamb", 512, 64, (0.9, 0.95), "bf16", True, True)
    with pytest.raises(SystemExit):
        config_from_args(["--global-batch", "-1"])
    assert "--global-batch must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_from_args(["--optimizer", "rmsprop"])
    assert config_from_args([]).tensorboard == "auto"
    assert config_from_args(["--tensorboard", "runs/tb"]).tensorboard == "runs/tb"
    assert config_from_args(["--no-tensorboard"]).tensorboard == "off"
    help_text = parser().format_help()
    for flag in ("--data", "--loader", "--lr-scaling", "--poly-power", "--checkpoint-every", "--shard", "--amp",
                 "--tensorboard", "--no-tensorboard", "--optim-state", "--optim-state-min-size"):
        assert flag in help_text
