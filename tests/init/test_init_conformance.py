"""Every registered initialiser passes the conformance properties (lorakit.init.checks.check_initializer)."""
import warnings

import pytest

from lorakit import INITIALIZERS
from lorakit.init.checks import check_initializer


@pytest.mark.parametrize("name", INITIALIZERS.names())
def test_initializer_conformance(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(check_initializer(name)) == 2


def test_pissa_fast_svd_conformance():
    assert len(check_initializer("pissa", "pissa_niter_4")) == 2


@pytest.mark.parametrize("name", ["pissa", "lora_ga", "eva"])
def test_initializers_work_under_dora(name):
    assert len(check_initializer(name, use_dora=True)) == 2
