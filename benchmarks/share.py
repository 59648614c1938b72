"""The optimizer's share of a whole training step: ResNet-50 forward + backward, then step(), at
several per-device batch sizes. At a huge global batch spread over many devices (or accumulated),
each device's micro-batch is small while the optimizer still touches every parameter once per
update, so its share grows as the per-device batch shrinks.

share = t_step / (t_forward+backward + t_step), medians over the repeats, measured per backend.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.cases import fastlars_optimizer
from benchmarks.measure import time_ms


def optimizer_share(device: torch.device, batches: list[int], backends: list[str], optims: list[str], repeats: int,
                    image_size: int = 224, log: Any = print) -> list[dict[str, Any]]:
    """Rows (batch, optim, implementation, forward+backward ms, step ms, share) for ResNet-50 in fp32;
    forward+backward is timed once per batch and shared by every optimizer's row."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device)
    params = list(model.parameters())
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def forward_backward(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            model.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y).backward()

        compute = time_ms(forward_backward, device, repeats, warmup=1)
        for optim in optims:
            candidates = [(f"fastlars.{b}", lambda b=b, o=optim: fastlars_optimizer(o, b, params, False))
                          for b in backends]
            candidates.append((f"timm.{optim.capitalize()}", lambda o=optim: _timm(o, params)))
            if optim == "lamb":
                candidates.append(("torch.AdamW(fused)", lambda: torch.optim.AdamW(params, lr=1e-3, fused=True)))
            else:
                candidates.append(("torch.SGD(fused, momentum)",
                                   lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)))
            for name, build in candidates:
                opt = build()
                step = time_ms(opt.step, device, repeats, warmup=1)
                row = {"batch": batch, "optim": optim, "implementation": name,
                       "forward_backward_ms": compute.median, "step_ms": step.median,
                       "share": step.median / (compute.median + step.median)}
                rows.append(row)
                log(f"batch {batch:>4} {optim} {name:<32} fwd+bwd {compute.median:9.1f} ms  step {step.median:8.1f} ms"
                    f"  share {100 * row['share']:5.1f}%")
                opt.state.clear()
    return rows


def _timm(optim: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from timm.optim import Lamb, Lars

    if optim == "lamb":
        return Lamb(params, lr=1e-3, weight_decay=0.01)
    return Lars(params, lr=1.0, momentum=0.9, weight_decay=5e-5)


def share_markdown(rows: list[dict[str, Any]], optim: str) -> str:
    """Batch × implementation → share of step time."""
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    out = [f"ResNet-50 fp32, {optim.upper()}: optimizer share of a training step (fwd+bwd ms in brackets)", "",
           "| per-device batch | fwd+bwd ms | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for b in batches:
        cells = {r["implementation"]: r for r in rows if r["batch"] == b}
        fb = next(iter(cells.values()))["forward_backward_ms"]
        out.append(f"| {b} | {fb:.0f} | " + " | ".join(
            f"{100 * cells[n]['share']:.1f}% ({cells[n]['step_ms']:.1f} ms)" for n in names) + " |")
    return "\n".join(out)


def share_plot(rows: list[dict[str, Any]], path: Any, title: str) -> None:
    """Share vs per-device batch, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["implementation"] for r in rows):
        pts = [(r["batch"], 100 * r["share"]) for r in rows if r["implementation"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("per-device batch")
    ax.set_ylabel("optimizer share of step time, %")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
