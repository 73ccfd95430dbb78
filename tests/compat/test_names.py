"""Every public name of cache-dit 1.5.3 is either provided by cachedit-fx or, reached after
``import cachedit_fx as cache_dit``, raises an AttributeError saying why; docs/usage.md lists each one
with its status; ``cache_type`` reads cache-dit's spellings."""
from __future__ import annotations

import pathlib
import re

import pytest

import cachedit_fx
from cachedit_fx.compat.names import ABSENT
from cachedit_fx.errors import ConfigError

reference = pytest.importorskip("cache_dit", reason="cache-dit 1.5.3 (pip install --no-deps cache-dit==1.5.3)")
PUBLIC = sorted(n for n in dir(reference) if not n.startswith("_"))
USAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "usage.md"


def test_every_cache_dit_name_is_here_or_says_why_not():
    provided = {n for n in PUBLIC if n not in ABSENT}
    assert all(hasattr(cachedit_fx, n) for n in provided), [n for n in provided if not hasattr(cachedit_fx, n)]
    assert not set(ABSENT) - set(PUBLIC), "ABSENT names something cache-dit 1.5.3 does not have"
    for name in ABSENT:
        with pytest.raises(AttributeError, match=rf"'{name}' \(cache-dit 1\.5\.3's {name}: .+\)"):
            getattr(cachedit_fx, name)


def test_usage_lists_every_cache_dit_name():
    section = USAGE.read_text().split("## cache-dit 1.5.3's names", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section))
    assert not set(PUBLIC) - listed, sorted(set(PUBLIC) - listed)


def test_cache_type_reads_cache_dits_spellings():
    for spelling in ("DBCache", "db_cache", "DUAL_BLOCK_CACHE", "db", "DBPrune", "dbp", "none", "NC", None):
        assert str(cachedit_fx.cache_type(spelling)) == str(reference.cache_type(spelling)), spelling
    with pytest.raises(ConfigError, match=r"cache_type must be a CacheType or one of DUAL_BLOCK_CACHE.*'fast'"):
        cachedit_fx.cache_type("fast")
