"""CUDA-graph capture of optimizer.step() with capturable=True and a tensor learning rate (GPU only).

The captured step is replayed with a learning rate changed in place between replays and must follow
the eager trajectory, for every backend usable on the GPU; a replay whose gradients hold an inf
changes nothing (the skip is decided on the device). A learning rate held in a CPU tensor is refused
during capture (its value would be frozen into the graph), and the Triton backend's step compiled with
torch.compile(mode="reduce-overhead") (inductor's CUDA graphs) follows the eager trajectory.
"""

from __future__ import annotations

import pytest
import torch

import fastlars
from harness import assert_same_trajectory, lr_at, make_params, synthetic_grads

SHAPES = [(0,), (1,), (7,), (3, 5), (17, 33), (8, 3, 3, 3), (1031,), (65_537,)]
ALGOS = [(fastlars.LARS, {"weight_decay": 1e-2}, 1.0), (fastlars.LAMB, {"max_grad_norm": 1.0}, 0.01)]


def _backends() -> list[str]:
    return fastlars.available_backends("cuda") if torch.cuda.is_available() else ["foreach"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("cls,kw,base_lr", ALGOS)
def test_captured_step_replays_the_eager_trajectory(backend, cls, kw, base_lr) -> None:
    steps = 30
    eager_params = make_params(SHAPES, torch.float32, "cuda")
    eager = cls(eager_params, lr=torch.tensor(base_lr, device="cuda"), capturable=True, backend=backend, **kw)
    params = make_params(SHAPES, torch.float32, "cuda")
    lr = torch.tensor(base_lr, device="cuda")
    opt = cls(params, lr=lr, capturable=True, backend=backend, **kw)
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g

    # Warm up on a side stream (state is created here), as torch.cuda.graphs requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for g, new in zip(grads, synthetic_grads(params, 1)):
            g.copy_(new)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for p, new in zip(eager_params, synthetic_grads(eager_params, 1)):
        p.grad = new
    eager.step()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for t in range(2, steps + 1):
        lr.fill_(lr_at(t, base_lr))
        eager.param_groups[0]["lr"].fill_(lr_at(t, base_lr))
        for g, new in zip(grads, synthetic_grads(params, t)):
            g.copy_(new)
        graph.replay()
        for p, new in zip(eager_params, synthetic_grads(eager_params, t)):
            p.grad = new
        eager.step()
    torch.cuda.synchronize()
    assert_same_trajectory((eager_params, eager), (params, opt), torch.float32)

    before = [p.detach().clone() for p in params]
    grads[3].fill_(float("inf"))
    graph.replay()
    torch.cuda.synchronize()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert opt.skipped_steps == 1


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("cls,kw,base_lr", ALGOS)
def test_host_lr_tensor_is_refused_during_capture(backend, cls, kw, base_lr) -> None:
    if backend not in _backends():
        pytest.skip(f"{backend} backend not usable on this GPU")
    params = make_params(SHAPES, torch.float32, "cuda")
    opt = cls(params, lr=torch.tensor(base_lr), backend=backend, **kw)  # lr on the CPU (capturable=False)
    for p, g in zip(params, synthetic_grads(params, 1)):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # eager: read on the host, fine
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"), \
            torch.cuda.graph(torch.cuda.CUDAGraph()):
        opt.step()
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("cls,kw,base_lr", ALGOS)
def test_triton_step_compiled_reduce_overhead(cls, kw, base_lr) -> None:
    """torch.compile(mode="reduce-overhead") records the step (Triton ops inside) into CUDA graphs and replays
    them; with a device-tensor lr changed in place each step it follows the eager Triton trajectory."""
    if "triton" not in _backends():
        pytest.skip("triton backend not usable on this GPU")
    torch._dynamo.reset()
    steps = 12
    runs = []
    for compiled in (False, True):
        params = make_params(SHAPES, torch.float32, "cuda")
        lr = torch.tensor(base_lr, device="cuda")
        opt = cls(params, lr=lr, capturable=True, backend="triton", **kw)
        grads = [torch.zeros_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        step = torch.compile(opt.step, mode="reduce-overhead") if compiled else opt.step
        for t in range(1, steps + 1):
            lr.fill_(lr_at(t, base_lr))
            for g, new in zip(grads, synthetic_grads(params, t)):
                g.copy_(new)
            step()
        torch.cuda.synchronize()
        runs.append((params, opt))
    assert_same_trajectory(runs[0], runs[1], torch.float32)
