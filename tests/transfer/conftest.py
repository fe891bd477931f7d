"""The task file fixture of the Trans-LoRA tests."""
from __future__ import annotations

import json

import pytest
from transfer_helpers import sentences


@pytest.fixture
def task_file(tmp_path):
    """A local JSONL classification task with three labels."""
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sentences(60)))
    return path
