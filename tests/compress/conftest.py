"""Fixtures of the compression tests."""
import pytest
import torch


@pytest.fixture
def tokens():
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
