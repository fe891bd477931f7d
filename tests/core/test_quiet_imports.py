"""Importing lorakit (and peft after it) prints nothing about optional kernels; user-set logger levels stay."""
import logging
import subprocess
import sys

from lorakit._quiet import NOISY_LOGGERS, quiet_optional_kernels


def test_import_prints_nothing_to_stderr():
    done = subprocess.run([sys.executable, "-c", "import lorakit, peft, diffusers.quantizers"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def test_a_level_the_user_set_is_kept():
    logger = logging.getLogger(NOISY_LOGGERS[0])
    before = logger.level
    try:
        logger.setLevel(logging.DEBUG)
        quiet_optional_kernels()
        assert logger.level == logging.DEBUG
        logger.setLevel(logging.NOTSET)
        quiet_optional_kernels()
        assert logger.level == logging.ERROR
    finally:
        logger.setLevel(before)
