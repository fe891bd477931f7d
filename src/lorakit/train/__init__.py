"""Training: `fit(model, train_data, eval_data, config=TrainConfig(...))` and `evaluate`."""

from .config import TrainConfig, TrainResult
from .evaluate import evaluate
from .loop import fit

__all__ = ["TrainConfig", "TrainResult", "evaluate", "fit"]
