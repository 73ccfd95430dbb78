"""cross_dit's requests under an install (tests/install): the cache config, the read-only context, one
request over given timesteps, and the install's cached step count."""
from __future__ import annotations

import torch

import cachedit_fx as cf

from tests.helpers import tinydit
from tests.helpers.tinydit import latent

CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.9, max_warmup_steps=2)
CTX = latent(5, seed=2)


def request(model, timesteps, seed=1, x=None):
    return tinydit.request(model, timesteps, latent(12, seed) if x is None else x, CTX)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def cached_steps(model) -> int:
    return sum(len(r.cached_steps) for r in cf.summary(model, details=True, logging=False) if r.unmatched is None)
