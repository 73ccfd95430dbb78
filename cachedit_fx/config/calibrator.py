"""Calibrators: how a cached step forecasts the middle blocks' output from the computed steps.
cache-dit 1.5.3's three: TaylorSeer (a Taylor series over the computed steps), FoCa (a Heun step
anchored at the last computed step) and DMD (dynamic mode decomposition over recent snapshots)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from .fields import ConfigBase, check_bool, check_choice, check_int, coerce, fail, structural

CALIBRATOR_TYPES = ("taylorseer", "foca", "dmd")
CALIBRATOR_CACHE_TYPES = ("residual", "hidden_states")
DMD_SVD_PRECISIONS = ("low", "medium", "high")
MAX_DMD_HISTORY = 16


def _check_common(config, own_type: str) -> None:
    for name in ("enable_calibrator", "enable_encoder_calibrator"):
        check_bool(name, getattr(config, name))
    check_choice("calibrator_type", config.calibrator_type, (own_type,))
    check_choice("calibrator_cache_type", config.calibrator_cache_type, CALIBRATOR_CACHE_TYPES)
    if not isinstance(config.calibrator_kwargs, dict):
        fail("calibrator_kwargs", "a dict", config.calibrator_kwargs)


@dataclass
class _CalibratorFields(ConfigBase):
    """The fields every cache-dit calibrator config has, in cache-dit's order (a subclass sets its own
    ``calibrator_type`` default; the field keeps its place)."""

    enable_calibrator: bool = structural(True)
    enable_encoder_calibrator: bool = structural(True)
    calibrator_type: str = structural("taylorseer")
    calibrator_cache_type: str = structural("residual")
    calibrator_kwargs: dict = structural(default_factory=dict)


@dataclass
class TaylorSeerCalibratorConfig(_CalibratorFields):
    """Forecast the cached middle residuals (or hidden states) with a Taylor series over the computed
    steps. Every field is cache-dit's."""

    calibrator_type: str = structural("taylorseer")
    taylorseer_order: int = structural(1)

    def __post_init__(self) -> None:
        check_int("taylorseer_order", self.taylorseer_order, 1)
        if self.taylorseer_order > 8:
            fail("taylorseer_order", "an int in 1..8", self.taylorseer_order)
        _check_common(self, "taylorseer")
        order = self.calibrator_kwargs.get("n_derivatives", self.taylorseer_order)
        if set(self.calibrator_kwargs) - {"n_derivatives"} or order != self.taylorseer_order:
            fail("calibrator_kwargs", "{} or {'n_derivatives': taylorseer_order} (the TaylorSeer order is "
                  "taylorseer_order)", self.calibrator_kwargs)

    def strify(self) -> str:
        return f"T1O{self.taylorseer_order}"


@dataclass
class FoCaCalibratorConfig(_CalibratorFields):
    """FoCa (cache-dit 1.5.3): a cached step forecasts ``F_full + (e/2)·((F_full − F_full_prev) +
    (F_k − F_km1))`` from the last two computed values and the last two values (computed or forecast),
    damped towards ``F_full`` beyond 3 steps (docs/algorithm.md). No hyper-parameters: like cache-dit,
    ``calibrator_kwargs`` is accepted and ignored."""

    calibrator_type: str = structural("foca")

    def __post_init__(self) -> None:
        _check_common(self, "foca")

    def strify(self) -> str:
        return "FoCa"


@dataclass
class DMDCalibratorConfig(_CalibratorFields):
    """DMD (cache-dit 1.5.3): a cached step forecasts by dynamic mode decomposition over the evenly
    spaced tail of the last ``dmd_history`` computed values once it holds 4 or more, else by a first
    order Taylor step (docs/algorithm.md). ``dmd_svd_precision`` is accepted for cache-dit's scripts; the
    forecast comes from the snapshots' Gram matrix here, which every precision gives alike.
    ``calibrator_kwargs`` may set ``n_derivatives`` (the fallback's order, cache-dit's only extra)."""

    calibrator_type: str = structural("dmd")
    dmd_history: int = structural(6)
    dmd_rank: int = structural(0)
    dmd_ridge: float = structural(1e-8)
    dmd_svd_precision: str = structural("medium")

    def __post_init__(self) -> None:
        _check_common(self, "dmd")
        check_int("dmd_history", self.dmd_history, 1)
        if self.dmd_history > MAX_DMD_HISTORY:
            fail("dmd_history", f"an int in 1..{MAX_DMD_HISTORY}", self.dmd_history)
        check_int("dmd_rank", self.dmd_rank, 0)
        ridge = self.dmd_ridge
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
            fail("dmd_ridge", "a finite number >= 0", ridge)
        check_choice("dmd_svd_precision", self.dmd_svd_precision, DMD_SVD_PRECISIONS)
        order = self.calibrator_kwargs.get("n_derivatives", 1)
        if set(self.calibrator_kwargs) - {"n_derivatives"} or isinstance(order, bool) or \
                not isinstance(order, int) or not 1 <= order <= 8:
            fail("calibrator_kwargs", "{} or {'n_derivatives': n} with n in 1..8 (the order of the Taylor "
                  "fallback)", self.calibrator_kwargs)

    @property
    def fallback_order(self) -> int:
        """The order of the Taylor forecast used before the DMD fit engages (cache-dit's n_derivatives)."""
        return self.calibrator_kwargs.get("n_derivatives", 1)

    def strify(self) -> str:
        prec = self.dmd_svd_precision[0]
        return f"DMDH{self.dmd_history}{prec}" if prec != "m" else f"DMDH{self.dmd_history}"


CalibratorConfig = Union[TaylorSeerCalibratorConfig, FoCaCalibratorConfig, DMDCalibratorConfig]
CALIBRATOR_CLASSES = {"taylorseer": TaylorSeerCalibratorConfig, "foca": FoCaCalibratorConfig,
                      "dmd": DMDCalibratorConfig}


def coerce_calibrator(value: Any, field: str = "calibrator_config"):
    """A calibrator config (any of the three), a dict of its fields (``calibrator_type`` picks the class,
    TaylorSeer by default), or None (no calibrator)."""
    if isinstance(value, tuple(CALIBRATOR_CLASSES.values())):
        return value
    if isinstance(value, dict):
        kind = value.get("calibrator_type", "taylorseer")
        if kind not in CALIBRATOR_CLASSES:
            fail(f"{field}['calibrator_type']", "one of " + ", ".join(map(repr, CALIBRATOR_TYPES)), kind)
        return coerce(value, CALIBRATOR_CLASSES[kind], field)
    if value is not None:
        fail(field, "a TaylorSeerCalibratorConfig, FoCaCalibratorConfig or DMDCalibratorConfig, or a dict of "
             "its fields", type(value).__name__)
    return None
