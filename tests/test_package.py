"""Package surface: param_groups, available_backends, env_report, backend resolution, import safety."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastlars
from fastlars import backends


def test_param_groups_exclude_1d_tensors_and_named_patterns() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model.register_parameter("pos_embed", nn.Parameter(torch.zeros(1, 5, 4)))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.add_module("frozen", frozen)
    decay, no_decay = fastlars.param_groups(model, weight_decay=5e-5, exclude=["pos_*"])
    assert decay["weight_decay"] == 5e-5 and "adapt" not in decay
    assert no_decay == {"params": no_decay["params"], "weight_decay": 0.0, "adapt": False}
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "1.weight", "3.bias", "pos_embed"]
    opt = fastlars.LARS(fastlars.param_groups(model, 5e-5), lr=1.0)
    assert [opt.adapts(g) for g in opt.param_groups] == [True, False]


def test_param_groups_leave_out_empty_groups() -> None:
    assert len(fastlars.param_groups(nn.Linear(3, 3, bias=False), 1e-4)) == 1


def test_available_backends_and_env_report() -> None:
    names = fastlars.available_backends("cpu")
    assert {"reference", "foreach"} <= set(names)
    report = fastlars.env_report()
    assert "torch " + torch.__version__ in report
    for name in backends.BACKENDS:
        assert name in report


def test_auto_resolution_and_env_override(monkeypatch) -> None:
    cpu = torch.device("cpu")
    auto = backends.resolve("auto", cpu)
    assert auto in fastlars.available_backends(cpu) and auto != "reference"
    monkeypatch.setenv(backends.ENV_OVERRIDE, "reference")
    assert backends.resolve("auto", cpu) == "reference"
    assert backends.resolve("foreach", cpu) == "foreach", "the override applies to 'auto' only"
    monkeypatch.setenv(backends.ENV_OVERRIDE, "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        backends.resolve("auto", cpu)


def test_import_works_without_the_compiled_extension(tmp_path) -> None:
    """A missing fastlars._C is one RuntimeWarning and an unavailable native backend, never an ImportError."""
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fastlars._C': raise ImportError('simulated missing build')\n"
        "sys.meta_path.insert(0, Block())\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import fastlars, torch\n"
        "    print(fastlars.available_backends('cpu'))\n"
        "    p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "    fastlars.LAMB([p]).step()\n"
        "    try:\n"
        "        fastlars.LAMB([p], backend='native')\n"
        "    except RuntimeError as e: print('ERR', e)\n"
        "print(sum('fastlars._C could not be imported' in str(w.message) for w in caught))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "default"}).stdout.splitlines()
    available = ast.literal_eval(out[0])
    assert "native" not in available and {"reference", "foreach"} <= set(available)
    assert out[1].startswith("ERR backend='native' is not usable on cpu: fastlars._C could not be imported")
    assert out[2] == "1", "exactly one warning"
