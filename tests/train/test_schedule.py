"""Learning-rate schedules and TrainConfig validation."""

import math

import pytest

from lorakit.train import TrainConfig
from lorakit.train.schedule import lr_multiplier, warmup_count


def test_warmup_then_cosine():
    f = lr_multiplier("cosine", warmup=4, total=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert math.isclose(f(9), 0.5)
    assert f(13) > 0.0 and math.isclose(f(14), 0.0, abs_tol=1e-12)


def test_linear_and_constant():
    lin, const = lr_multiplier("linear", 0, 10), lr_multiplier("constant", 2, 10)
    assert [lin(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert [const(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_warmup_count():
    assert warmup_count(100, 0.1, None) == 10
    assert warmup_count(100, 0.1, 3) == 3


@pytest.mark.parametrize(
    "bad",
    [{"schedule": "step"}, {"batch_size": 0}, {"max_steps": 0}, {"warmup_ratio": 1.5}],
)
def test_config_rejects(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        TrainConfig().lr = 1.0
