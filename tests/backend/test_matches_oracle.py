"""The ``cachedit`` Dynamo backend against the eager oracle on real (tiny, random) diffusers transformers:
decisions, gates, diffs and outputs equal the oracle's for 7 families x DBCache / TaylorSeer 1 /
TaylorSeer 2 (+ F1B1 cases, separate CFG for Wan), one Dynamo graph per loop, and TaylorSeer really
forecasting (tests/backend/reference.py: the reference runs; tests/backend/families.py: the compiles)."""
from __future__ import annotations

import pytest

from tests.backend.families import CASES, FAMILIES, family_results
from tests.backend.reference import bits, compare_with_oracle, fmt, rel_err

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name,key", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_matches_oracle(name, key):
    r = family_results(name)[key]
    if "error" in r:
        raise r["error"]
    assert r["backend_calls"] == 1, f"{name}: Dynamo compiled {r['backend_calls']} graphs for one loop"
    handle = r["handle"]
    assert handle.chains, f"{name}: no chain was cached: {r['warnings']}"
    assert len(handle.chains) == 1
    n_cached = compare_with_oracle(r["logs"][0], r["oracle"], r["outs"], r["ref_outs"])
    assert n_cached > 0, f"{name}/{key}: no step was cached; the test threshold is too low for this family"
    # the case is only a good test if the diff test also recomputes, and (order 2) if a cached step
    # follows >= 3 computed steps, where the second derivative exists
    for b in range(r["oracle"].n_branches):
        cached = [u[0] for u in r["oracle"].branch_log(b, "use_cache")]
        assert not all(cached[2:]), f"{name}/{key}: every step after warmup cached; lower the test threshold"
        assert any(c and cached[:s].count(False) >= 3 for s, c in enumerate(cached)), \
            f"{name}/{key}: no cached step after 3 computed ones: {bits(cached)}"


@pytest.mark.parametrize("name", FAMILIES)
def test_taylorseer_changes_cached_steps(name):
    """The calibrator really forecasts: order 1 and 2 outputs differ from plain DBCache's (and from
    each other) once a cached step has a derivative to use."""
    r = family_results(name)
    base = r["dbcache"]["outs"]
    for key in ("taylorseer1", "taylorseer2"):
        errs = [rel_err(o, b) for o, b in zip(r[key]["outs"], base)]
        assert max(errs) > 1e-4, f"{name}/{key}: outputs equal plain DBCache's: {fmt(errs)}"
    errs = [rel_err(o, b) for o, b in zip(r["taylorseer2"]["outs"], r["taylorseer1"]["outs"])]
    assert max(errs) > 1e-4, f"{name}: TaylorSeer order 2 outputs equal order 1's: {fmt(errs)}"
