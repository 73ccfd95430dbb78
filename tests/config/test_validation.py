"""Config validation: a bad value names its field; the cache-dit tags (strify)."""
from __future__ import annotations

import math

import pytest

from cachedit_fx import config
from cachedit_fx.config import DBCacheConfig, TaylorSeerCalibratorConfig


@pytest.mark.parametrize("kwargs, field", [
    (dict(Fn_compute_blocks=0), "Fn_compute_blocks"),
    (dict(residual_diff_threshold=math.nan), "residual_diff_threshold"),
    (dict(steps_computation_policy="sometimes"), "steps_computation_policy"),
    (dict(steps_computation_mask=[1, 2, 0]), "steps_computation_mask"),
    (dict(steps_computation_mask=[]), "steps_computation_mask"),
    (dict(steps_computation_mask=[0, 1], steps_computation_policy="static", max_warmup_steps=0),
     "steps_computation_mask"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DBCacheConfig(**kwargs)


def test_calibrator_config_validation():
    with pytest.raises(ValueError, match="taylorseer_order"):
        TaylorSeerCalibratorConfig(taylorseer_order=0)


def test_strify():
    assert DBCacheConfig().strify() == "DBCache_F8B0_W8I1M0MC0_R0.08"
    assert config.strify(DBCacheConfig()) == "DBCache_F8B0_W8I1M0MC0_R0.08_T0O0"  # cache-dit: no calibrator
    assert config.strify(DBCacheConfig(), TaylorSeerCalibratorConfig()).endswith("_T1O1")
