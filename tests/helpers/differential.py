"""Differential tests' common part: one request's decisions and outputs, and the comparison that says
two libraries gave the same images (same cached steps and diffs, outputs within ``REL_TOL`` relative)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

REL_TOL = 1e-5


@dataclass
class Request:
    """One request's decisions (non-CFG and CFG branch, cache-dit's naming) and outputs."""

    cached: list[int]
    diffs: dict[str, float]
    cfg_cached: list[int] = field(default_factory=list)
    cfg_diffs: dict[str, float] = field(default_factory=dict)
    outputs: list[torch.Tensor] = field(default_factory=list)


def _flat(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])


def assert_same(theirs: list[Request], ours: list[Request]):
    for r, (t, o) in enumerate(zip(theirs, ours)):
        where = f"request {r}"
        assert o.cached == t.cached, f"{where}: cached steps, cache-dit {t.cached}, ours {o.cached}"
        assert o.cfg_cached == t.cfg_cached, f"{where}: CFG cached steps, cache-dit {t.cfg_cached}, ours {o.cfg_cached}"
        for mine, their, what in ((o.diffs, t.diffs, "diffs"), (o.cfg_diffs, t.cfg_diffs, "CFG diffs")):
            assert set(mine) == set(their), f"{where}: {what} recorded at steps {sorted(their)} by cache-dit, {sorted(mine)} by us"
            for k in their:
                a, b = mine[k], their[k]
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(b)), (where, what, k, a, b)
        assert len(o.outputs) == len(t.outputs)
        for i, (a, b) in enumerate(zip(o.outputs, t.outputs)):
            a, b = _flat(a).double(), _flat(b).double()
            err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            assert err <= REL_TOL, f"{where}: output of call {i} differs by {err:.3g} relative"
    assert any(r.cached or r.cfg_cached for r in theirs), "no step cached: the case tests nothing"
