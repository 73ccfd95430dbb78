"""Options with a few named values, and the spellings users write for them."""
from __future__ import annotations

from .fields import Choice


class SeparateCFG(Choice):
    """How calls map to CFG branches: ``OFF`` one state set; ``ON`` two, calls alternate (or follow
    diffusers' ``cache_context``); ``AUTO`` two, a call whose timestep repeats the previous call's is the
    second of a CFG pair, told on device (one set where the graph has no timestep)."""

    OFF = "off"
    ON = "on"
    AUTO = "auto"

    @classmethod
    def _aliases(cls):
        return [(False, cls.OFF), (True, cls.ON), (None, cls.AUTO), *super()._aliases()]


class ChainPolicy(Choice):
    """Which block chains of a graph get cached: the ``LONGEST`` one, or ``ALL``."""

    LONGEST = "longest"
    ALL = "all"
