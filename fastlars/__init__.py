"""fastlars: fused multi-tensor LARS and LAMB optimizers for PyTorch.

    import fastlars
    opt = fastlars.LARS(fastlars.param_groups(model, weight_decay=5e-5), lr=10.0)

See ``fastlars.LARS`` / ``fastlars.LAMB`` for the maths, ``fastlars.env_report()`` for the backends
usable on this machine.
"""

from fastlars import compat, functional
from fastlars.backends import available_backends
from fastlars.env import env_report
from fastlars.grouping import param_groups
from fastlars.optim import LAMB, LARS

__version__ = "0.1.0"

__all__ = [
    "LAMB",
    "LARS",
    "__version__",
    "available_backends",
    "compat",
    "env_report",
    "functional",
    "param_groups",
]
