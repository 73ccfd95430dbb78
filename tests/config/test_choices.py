"""Option and enum values fail with the field and the allowed values; ConfigError's place among the
errors."""
from __future__ import annotations

import pytest

import cachedit_fx as cf
from cachedit_fx.backend import parse_options
from cachedit_fx.config import SeparateCFG


def test_options_and_enums_fail_with_the_field_and_allowed_values():
    with pytest.raises(cf.ConfigError, match=r"separate_cfg must be one of False, True, None, 'off', 'on', 'auto'"):
        parse_options(dict(separate_cfg="maybe"))
    with pytest.raises(cf.ConfigError, match=r"chains must be one of 'longest', 'all'"):
        parse_options(dict(chains="first"))
    with pytest.raises(cf.ConfigError, match=r"inner must be one of"):
        parse_options(dict(inner="tvm"))
    assert SeparateCFG.parse(True, "x") is SeparateCFG.ON and SeparateCFG.parse(None, "x") is SeparateCFG.AUTO
    assert issubclass(cf.ConfigError, ValueError) and issubclass(cf.ConfigError, cf.CacheditError)
