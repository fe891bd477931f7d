"""Data-driven initialisation: calibration passes over a few batches that feed the adapters' initialisers."""
from .calibrate import calibrate, weight_gradients

__all__ = ["calibrate", "weight_gradients"]
