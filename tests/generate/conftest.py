"""The tiny synthetic zoo (synthetic_zoo.py), built once per test session."""
from __future__ import annotations

import pytest
from synthetic_zoo import BUDGET, TASKS

from lorakit.generate.taskzoo import build_zoo


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The root of a 6-task zoo (5 experts, 1 held out) on tiny-bert."""
    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny-bert", "tiny-bert", TASKS, BUDGET, progress=False)
