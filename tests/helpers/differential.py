"""What the differential tests against cache-dit 1.5.3 share: the library itself (quiet, Flux as one
chain), the zoo Flux with a second text input for CFG, and the comparison of two runs' outputs."""
from __future__ import annotations

import logging
import os

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
