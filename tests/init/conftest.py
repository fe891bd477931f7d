"""Fixtures of the initialiser tests."""
import pytest

from init_helpers import tiny_llama


@pytest.fixture(scope="module")
def base():
    return tiny_llama()
