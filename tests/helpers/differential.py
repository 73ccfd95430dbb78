"""What the differential tests against cache-dit 1.5.3 share: the library itself (quiet, Flux as one
chain), the zoo Flux with a second text input for CFG, one request's decisions and outputs, and the
comparison that says two libraries gave the same images."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import pytest
import torch

from cachedit_fx import zoo

REL_TOL = 1e-5


def import_cache_dit():
    """cache-dit itself, its loggers at ERROR, with Flux's two block lists as one chain (its default);
    skips the importing test module where it is not installed."""
    os.environ.setdefault("CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS", "1")
    lib = pytest.importorskip("cache_dit", reason="cache-dit 1.5.3 (pip install --no-deps cache-dit==1.5.3)")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return lib


def flux_with_uncond() -> tuple:
    """(transformer, inputs, uncond): the zoo's tiny Flux, its inputs, and other text inputs for the
    unconditional call of a CFG pair."""
    transformer, inputs = zoo.build_transformer("flux")
    g = torch.Generator().manual_seed(123)
    uncond = {k: torch.randn(inputs[k].shape, generator=g) for k in ("encoder_hidden_states", "pooled_projections")}
    return transformer, inputs, uncond


def flat(out) -> torch.Tensor:
    """A call's output (a tensor or a tuple of them) as one flat tensor."""
    return out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])


def assert_outputs_within(ours: list, theirs: list, where: str, rel_tol: float = REL_TOL) -> None:
    """Each call's output of ``ours`` equals ``theirs`` within ``rel_tol`` of the largest magnitude."""
    assert len(ours) == len(theirs), (where, len(ours), len(theirs))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a, b = flat(a).double(), flat(b).double()
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        assert err <= rel_tol, f"{where}: output of call {i} differs by {err:.3g} relative"


@dataclass
class Request:
    """One request's decisions (non-CFG and CFG branch, cache-dit's naming) and outputs."""

    cached: list[int]
    diffs: dict[str, float]
    cfg_cached: list[int] = field(default_factory=list)
    cfg_diffs: dict[str, float] = field(default_factory=dict)
    outputs: list[torch.Tensor] = field(default_factory=list)


def assert_same(theirs: list[Request], ours: list[Request]):
    """Two libraries gave the same images: the same cached steps and diffs (within 1e-5) per request
    and branch, outputs within ``REL_TOL``; and the case cached something."""
    for r, (t, o) in enumerate(zip(theirs, ours)):
        where = f"request {r}"
        assert o.cached == t.cached, f"{where}: cached steps, cache-dit {t.cached}, ours {o.cached}"
        assert o.cfg_cached == t.cfg_cached, f"{where}: CFG cached steps, cache-dit {t.cfg_cached}, ours {o.cfg_cached}"
        for mine, their, what in ((o.diffs, t.diffs, "diffs"), (o.cfg_diffs, t.cfg_diffs, "CFG diffs")):
            assert set(mine) == set(their), f"{where}: {what} recorded at steps {sorted(their)} by cache-dit, {sorted(mine)} by us"
            for k in their:
                a, b = mine[k], their[k]
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(b)), (where, what, k, a, b)
        assert_outputs_within(o.outputs, t.outputs, where)
    assert any(r.cached or r.cfg_cached for r in theirs), "no step cached: the case tests nothing"
