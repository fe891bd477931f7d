"""Schedules that change what trains while training: ``lisa``, ``increlora``, ``diffora`` (``SCHEDULES``)."""
from .base import SCHEDULES, Schedule, create, trainer_callback
from .lisa import LISA
from .increlora import IncreLoRA
from .diffora import DiffoRA

__all__ = ["DiffoRA", "IncreLoRA", "LISA", "SCHEDULES", "Schedule", "create", "trainer_callback"]
