"""The optimizer classes: options, validation and state; the maths lives in the backends."""

from fastlars.optim.lamb import LAMB
from fastlars.optim.lars import LARS

__all__ = ["LAMB", "LARS"]
