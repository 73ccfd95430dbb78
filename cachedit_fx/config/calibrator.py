"""Calibrators: how a cached step forecasts the middle blocks' output from the computed steps."""
from __future__ import annotations

from dataclasses import dataclass

from .fields import ConfigBase, check_bool, check_choice, check_int, fail, structural

CALIBRATOR_TYPES = ("taylorseer",)
CALIBRATOR_CACHE_TYPES = ("residual", "hidden_states")


@dataclass
class TaylorSeerCalibratorConfig(ConfigBase):
    """Forecast the cached middle residuals (or hidden states) with a Taylor series over the computed
    steps. Every field is cache-dit's."""

    enable_calibrator: bool = structural(True)
    enable_encoder_calibrator: bool = structural(True)
    calibrator_type: str = structural("taylorseer")
    calibrator_cache_type: str = structural("residual")
    calibrator_kwargs: dict = structural(default_factory=dict)
    taylorseer_order: int = structural(1)

    def __post_init__(self) -> None:
        check_int("taylorseer_order", self.taylorseer_order, 1)
        if self.taylorseer_order > 8:
            fail("taylorseer_order", "an int in 1..8", self.taylorseer_order)
        for name in ("enable_calibrator", "enable_encoder_calibrator"):
            check_bool(name, getattr(self, name))
        check_choice("calibrator_type", self.calibrator_type, CALIBRATOR_TYPES)
        check_choice("calibrator_cache_type", self.calibrator_cache_type, CALIBRATOR_CACHE_TYPES)
        if not isinstance(self.calibrator_kwargs, dict):
            fail("calibrator_kwargs", "a dict", self.calibrator_kwargs)
        order = self.calibrator_kwargs.get("n_derivatives", self.taylorseer_order)
        if set(self.calibrator_kwargs) - {"n_derivatives"} or order != self.taylorseer_order:
            fail("calibrator_kwargs", "{} or {'n_derivatives': taylorseer_order} (the TaylorSeer order is "
                  "taylorseer_order)", self.calibrator_kwargs)

    def strify(self) -> str:
        return f"T1O{self.taylorseer_order}"
