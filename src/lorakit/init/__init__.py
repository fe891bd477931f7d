"""Data-driven initialisers: calibration hooks and the factor maths they feed."""
from .calibrate import calibrate, weight_gradients

__all__ = ["calibrate", "weight_gradients"]
